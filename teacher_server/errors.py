"""Server errors and their one mapping to HTTP status codes.

Engines and the service raise these; ``install_error_handlers`` turns each into a JSON body
``{"error": <kind>, "detail": <message>}`` with the right status (and Retry-After for 503), so
no request ever sees a traceback and nothing raised by a request can stop the process.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

log = logging.getLogger("teacher_server")


class ServerError(Exception):
    status = 500
    kind = "internal_error"
    headers: dict[str, str] | None = None


class BadRequest(ServerError):
    """The body cannot be decoded as a targets frame (framing, not content)."""
    status, kind = 400, "bad_request"


class Unauthorized(ServerError):
    status, kind = 401, "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class PayloadTooLarge(ServerError):
    """Body bytes, samples per request or tokens per request over the server's caps."""
    status, kind = 413, "payload_too_large"


class InvalidSample(ServerError):
    """A sample's content is unusable; the message names the sample and the problem."""
    status, kind = 422, "invalid_sample"


class Overloaded(ServerError):
    """The queue is full: back-pressure. Clients retry after ``retry_after`` seconds."""
    status, kind = 503, "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, int(round(retry_after))))}


class NotReady(ServerError):
    """The model is still loading, or the server is shutting down."""
    status, kind = 503, "not_ready"
    headers = {"Retry-After": "2"}


class EngineFailure(ServerError):
    """The engine failed on a batch (e.g. out of memory); the batch's requests get this."""
    status, kind = 500, "engine_failure"


def error_response(e: ServerError) -> JSONResponse:
    return JSONResponse({"error": e.kind, "detail": str(e)}, status_code=e.status, headers=e.headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def _server_error(request: Request, e: ServerError) -> JSONResponse:
        if e.status >= 500 and not isinstance(e, (Overloaded, NotReady)):
            log.error("%s %s -> %d: %s", request.method, request.url.path, e.status, e)
        return error_response(e)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        # last resort: log the traceback on the server, give the client a message, keep serving
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal_error", "detail": f"{type(e).__name__}: {e}"}, status_code=500)
