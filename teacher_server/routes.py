"""Thin HTTP routes: each calls the service and returns; errors are mapped in errors.py."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ckd_common.wire import CONTENT_TYPE_REQUEST, CONTENT_TYPE_RESPONSE

from ckd_common.protocol import ErrorBody, Health, Info, Ready

from .errors import as_server_error

router = APIRouter()


def _errors(*codes: int) -> dict:
    """OpenAPI error responses: exactly the codes an endpoint can answer with (errors.py). Every
    endpoint but the probes answers 401 when a token is set (app.py), 500 on an unexpected failure,
    and 408 / 503 from the connection layer (connections.py: a stalled request, too many
    connections); the others are listed per endpoint."""
    return {code: {"model": ErrorBody} for code in sorted({401, 408, 500, 503, *codes})}


def _service(request: Request):
    return request.app.state.service


@router.get("/healthz", response_model=Health, tags=["ops"], summary="the process is alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, tags=["ops"], summary="the model is loaded and serving",
            responses={503: {"model": Ready}})
async def readyz(request: Request):
    svc = _service(request)
    if svc.ready:
        return Ready(ready=True)
    detail = ("shutting down" if svc.stopping else
              f"model failed to load: {svc.load_error}" if svc.load_error else "model loading")
    return JSONResponse(Ready(ready=False, detail=detail).model_dump(), status_code=503)


@router.get("/v1/info", response_model=Info, tags=["teacher"], responses=_errors(503),
            summary="teacher fingerprint, vocabulary, visual tokens, limits")
async def info(request: Request) -> Info:
    return _service(request).info()


@router.get("/v1/tokenizer", tags=["teacher"], responses={200: {"content": {"application/zip": {}}}, **_errors(503)},
            summary="the teacher's tokenizer files (zip), so clients prepare data identically")
async def tokenizer(request: Request) -> Response:
    svc = _service(request)
    svc.require_ready()
    return Response(svc.tokenizer_zip, media_type="application/zip")


@router.post("/v1/targets", tags=["teacher"], response_class=Response,
             summary="teacher targets for a batch of prepared samples (binary in, binary out)",
             description="Body: a ckd targets request frame (`ckd_common.wire`, teacher_server/PROTOCOL.md). "
                         "Response: a targets frame with top-k ids, log-probs, tail mass per position and "
                         "the normalised visual autocorrelation per image sample.",
             openapi_extra={"requestBody": {"required": True, "content": {
                 CONTENT_TYPE_REQUEST: {"schema": {"type": "string", "format": "binary"}}}}},
             responses={200: {"content": {CONTENT_TYPE_RESPONSE: {"schema": {"type": "string", "format": "binary"}}}},
                        **_errors(400, 413, 422)})
async def targets(request: Request) -> Response:
    svc = _service(request)
    t0 = time.perf_counter()
    code = 200
    try:
        body = await svc.targets(request)
        return Response(body, media_type=CONTENT_TYPE_RESPONSE)
    except Exception as e:  # mapped here (not later) so that /metrics counts the code the client gets
        err = as_server_error(e, "POST /v1/targets")
        code = err.status
        if err is e:
            raise
        raise err from None
    except BaseException:  # cancelled: the server stopped waiting (shutdown past --graceful-timeout)
        code = 500
        raise
    finally:
        svc.metrics.requests.labels(code=str(code)).inc()
        if code == 200:
            svc.metrics.latency.observe(time.perf_counter() - t0)


@router.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response, responses=_errors())
async def metrics(request: Request) -> Response:
    return Response(_service(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
