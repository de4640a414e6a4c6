"""Server errors and their one mapping to HTTP status codes.

Engines, the service and the connection layer raise or build these; ``install_error_handlers``
turns each into a JSON body ``{"error": <kind>, "detail": <message>}`` with the right status (and
Retry-After for 503), so no request ever sees a traceback and nothing raised by a request can stop
the process or tear down a keep-alive connection. ``as_server_error`` is the one place where any
other exception becomes one of these.
"""
from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

log = logging.getLogger("teacher_server")


class ServerError(Exception):
    status = 500
    kind = "internal_error"
    headers: dict[str, str] | None = None


class BadRequest(ServerError):
    """The body cannot be decoded as a targets frame (framing, array shapes and dtypes; not content)."""
    status, kind = 400, "bad_request"


class Unauthorized(ServerError):
    status, kind = 401, "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class RequestTimeout(ServerError):
    """The request's headers or body did not arrive in time (a stalled or trickling client). The
    connection is closed: what is left of the body is not worth waiting for."""
    status, kind = 408, "request_timeout"
    headers = {"Connection": "close"}


class PayloadTooLarge(ServerError):
    """Body bytes, samples per request or tokens per request over the server's caps."""
    status, kind = 413, "payload_too_large"


class InvalidSample(ServerError):
    """A sample's content is unusable; the message names the sample and the problem."""
    status, kind = 422, "invalid_sample"


class ClientClosed(ServerError):
    """The client closed the connection before its answer (nginx's 499). Never delivered: it only
    keeps such requests apart from server failures in /metrics and the log."""
    status, kind = 499, "client_closed"


class Overloaded(ServerError):
    """Back-pressure: too much admitted work. Clients retry after ``retry_after`` seconds."""
    status, kind = 503, "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, int(round(retry_after))))}


class TooManyConnections(Overloaded):
    """A connection opened while ``--max-connections`` others were open: answered, then closed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 1.0)
        self.headers = {**self.headers, "Connection": "close"}


class NotReady(ServerError):
    """The model is still loading, or the server is shutting down."""
    status, kind = 503, "not_ready"
    headers = {"Retry-After": "2"}


class EngineFailure(ServerError):
    """The engine failed on a sample (e.g. out of memory); that sample's request gets this."""
    status, kind = 500, "engine_failure"


class InternalError(ServerError):
    """Anything unexpected while handling a request; the traceback goes to the server log only."""
    status, kind = 500, "internal_error"


def as_server_error(e: BaseException, where: str = "") -> ServerError:
    """``e`` as the ServerError the client is answered with (the one mapping of foreign exceptions)."""
    from starlette.requests import ClientDisconnect

    if isinstance(e, ServerError):
        return e
    if isinstance(e, ClientDisconnect):
        return ClientClosed("the client closed the connection before the request was answered")
    # last resort: the traceback stays in the server log, the client gets one line, the server serves on
    log.error("unexpected error%s", f" in {where}" if where else "", exc_info=e)
    return InternalError(f"{type(e).__name__}: {e}")


def error_body(e: ServerError) -> bytes:
    return json.dumps({"error": e.kind, "detail": str(e)}).encode()


def error_response(e: ServerError) -> JSONResponse:
    return JSONResponse({"error": e.kind, "detail": str(e)}, status_code=e.status, headers=e.headers)


class _KeepServing:
    """ASGI middleware: an unexpected exception becomes its mapped answer *here*, inside
    Starlette's ServerErrorMiddleware, which would answer 500 and then re-raise (uvicorn then logs
    the traceback and tears the keep-alive connection down)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:  # noqa: BLE001 - mapped, logged, answered
            if started:  # half an answer is out: nothing better than closing the connection
                raise
            await error_response(as_server_error(e, f"{scope['method']} {scope['path']}"))(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Call after every other middleware is added, so that the guard wraps them all."""

    @app.exception_handler(ServerError)
    async def _server_error(request: Request, e: ServerError) -> JSONResponse:
        if isinstance(e, ClientClosed):
            log.info("%s %s: %s", request.method, request.url.path, e)
        elif e.status >= 500 and not isinstance(e, (Overloaded, NotReady)):
            log.error("%s %s -> %d: %s", request.method, request.url.path, e.status, e)
        return error_response(e)

    app.add_middleware(_KeepServing)
