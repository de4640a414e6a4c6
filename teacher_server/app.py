"""The FastAPI application: lifespan (load in the background, drain on shutdown), auth, routes."""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from .config import ServerConfig
from .engines import Engine
from .errors import Unauthorized, error_response, install_error_handlers
from .routes import router
from .service import TeacherService

log = logging.getLogger("teacher_server")

# Probes stay open so orchestrators need no secret; everything else needs the token when one is set.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})


def create_app(config: ServerConfig, engine: Engine | None = None, exit_on_load_failure: bool = True) -> FastAPI:
    service = TeacherService(config, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def load() -> None:
            # loading takes minutes for a real teacher: /healthz answers meanwhile, /readyz says 503
            try:
                await asyncio.to_thread(service.load)
            except Exception as e:  # noqa: BLE001
                service.load_error = f"{type(e).__name__}: {e}"
                log.error("teacher model failed to load: %s", service.load_error)
                if exit_on_load_failure:  # an unusable server should not linger: exit non-zero
                    os.kill(os.getpid(), signal.SIGTERM)

        task = asyncio.create_task(load())
        try:
            yield
        finally:
            # uvicorn has stopped accepting and waited for in-flight requests; drain the engine
            await task
            await asyncio.to_thread(service.close)

    app = FastAPI(title="LLaVA-CKD teacher server", version="1",
                  description="Runs one teacher VLM and returns distillation targets for prepared samples. "
                              "The binary /v1/targets format is documented in teacher_server/PROTOCOL.md.",
                  lifespan=lifespan)
    app.state.service = service

    if config.token:
        expected = config.token.encode()

        @app.middleware("http")
        async def bearer_auth(request: Request, call_next):
            if request.url.path not in PUBLIC_PATHS:
                if not hmac.compare_digest(bearer_token(request.headers.get("authorization", "")), expected):
                    return error_response(Unauthorized("missing or wrong bearer token (Authorization: Bearer ...)"))
            return await call_next(request)

    app.include_router(router)
    install_error_handlers(app)  # last: its guard wraps the auth middleware too
    return app


def bearer_token(authorization: str) -> bytes:
    """The token of an ``Authorization: Bearer <token>`` header; b"" for any other header. The
    scheme is case-insensitive (RFC 9110 §11.1); the caller compares the token in constant time."""
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" else b""


__all__ = ["create_app", "ServerConfig"]
