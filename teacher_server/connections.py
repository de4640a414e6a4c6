"""The connection layer under the app: what a client can hold before its request reaches the service.

uvicorn bounds little of it (read in uvicorn's ``protocols/http/h11_impl.py``): its keep-alive
timeout runs only between requests and every received byte cancels it, nothing limits how long a
request's headers or body may take, and ``--limit-concurrency`` answers a plain-text 503 to every
request once the connections it counts (idle ones included) reach the limit. Nothing in ASGI sees a
request before its headers are complete. So this module wraps uvicorn's h11 protocol:

- **Idle connections.** A connection that sends no byte of a request for ``--idle-timeout`` seconds
  (after opening, or between requests: uvicorn's keep-alive timeout) is closed quietly.
- **Header deadline.** A request's line and headers must arrive within ``--header-timeout`` seconds
  of its first byte: otherwise 408 and close.
- **Body deadline.** The service reads ``/v1/targets`` bodies against ``ServerConfig.body_deadline``
  and answers 408 itself. Here the same rule (plus a grace) closes connections whose body nobody reads
  any more, e.g. a client still trickling the body of a request answered early (401, 413, 503).
- **Connection cap.** A connection opened while ``--max-connections`` others are open gets 503
  ``overloaded`` (Retry-After, ``Connection: close``) for its request, then is closed. Connections
  already open are served as before: the cap never turns away a client mid-conversation.

The engine's capacity (``--max-inflight-requests``) is the service's business and counts a request
only once its body has arrived, so slow uploads hold connections (bounded here), never the engine.
Request line + headers are at most 16 KiB (h11's default; uvicorn answers 400 beyond).
"""
from __future__ import annotations

import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import ServerConfig
from .errors import RequestTimeout, TooManyConnections, error_body, error_response
from .metrics import Metrics

log = logging.getLogger("teacher_server")

# The service answers a slow body with 408 at the deadline; this layer acts on the same body only
# this much later, so that (short of an event loop stalled for that long) it never pre-empts the
# service's answer, and acts alone on bodies the service does not read.
BODY_GRACE_S = 2.0


def _raw_response(e: RequestTimeout) -> bytes:
    """A complete ``Connection: close`` answer written straight to the socket: before a request's
    headers are complete there is no ASGI cycle (and h11 would refuse to answer)."""
    body = error_body(e)
    return (f"HTTP/1.1 {e.status} Request Timeout\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


async def _drain(receive) -> None:
    """Read what is left of a request body (bounded by the body deadline). Answering before the body
    has arrived and then closing resets the connection under a client that is still sending: it
    would see a reset, not the answer."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with request deadlines and a connection cap (see the module docstring).
    Use :func:`protocol_class` to bind a config and metrics.

    One timer per connection, re-armed as the request moves on: idle (no byte of a request yet:
    closed quietly) -> headers (408) -> body (closed; the service answers 408 first) -> none (the
    request has arrived; uvicorn's keep-alive timer takes over once it is answered)."""

    cfg: ServerConfig
    metrics: Metrics

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.metrics.open_connections.inc()
        self._timer = None
        self._partial = False  # bytes of the current request have arrived
        self._body_started: float | None = None  # loop time the current request's body began arriving
        self._body_bytes = 0
        if len(self.connections) > self.cfg.max_connections:
            self.metrics.connections_refused.inc()
            self.app = self._refuse  # every request on this connection (there is one: it is closed after)
        self._arm(self.loop.time() + self.cfg.idle_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.metrics.open_connections.dec()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self.conn.their_state
        if before is h11.IDLE and not self._partial:  # the first byte of a request: its headers' deadline
            self._partial = True
            self._arm(self.loop.time() + self.cfg.header_timeout_s)
        super().data_received(data)
        after = self.conn.their_state
        if after is h11.SEND_BODY:
            if self._body_started is None:
                self._body_started, self._body_bytes = self.loop.time(), 0
                self._arm(self._body_due())
            self._body_bytes += len(data)
        elif after is h11.IDLE:
            if before is not h11.IDLE:  # a body drained after an early answer ended; the next cycle began
                self._request_done()
                self._arm(self.loop.time() + self.cfg.idle_timeout_s)
        else:  # the whole request has arrived (or the connection is done): the service has it now
            self._request_done()

    # -- deadlines -----------------------------------------------------------------------------------
    def _request_done(self) -> None:
        self._disarm()
        self._partial, self._body_started = False, None

    def _body_due(self) -> float:
        return self.cfg.body_deadline(self._body_started, self._body_bytes) + BODY_GRACE_S

    def _arm(self, when: float) -> None:
        self._disarm()
        self._timer = self.loop.call_at(when, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._body_started is not None:
            due = self._body_due()  # the bytes that arrived meanwhile extend the deadline
            if due > self.loop.time():
                self._arm(due)
                return
            self.metrics.receive_timeouts.labels(phase="body").inc()
            log.info("closing a connection whose request body stalled (%d bytes received)", self._body_bytes)
            if self.cycle is not None and not self.cycle.response_started:  # nobody answered: say why
                self.cycle.disconnected = True  # the app's answer, if one comes, goes nowhere
                self.transport.write(_raw_response(RequestTimeout(
                    f"the request body did not arrive in time ({self._body_bytes} bytes received)")))
        elif self._partial:  # part of a request arrived, not all its headers
            self.metrics.receive_timeouts.labels(phase="headers").inc()
            if self.cycle is None or self.cycle.response_complete:  # no answer of ours is being written
                self.transport.write(_raw_response(RequestTimeout(
                    f"the request line and headers did not arrive within {self.cfg.header_timeout_s:g} s "
                    f"(--header-timeout); send the whole request at once")))
        # else: idle, no byte of a request: close quietly (a client reusing the connection must not
        # read a 408 as the answer to its next request)
        self.transport.close()

    # -- the cap -------------------------------------------------------------------------------------
    async def _refuse(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        await _drain(receive)
        e = TooManyConnections(f"{self.cfg.max_connections} connections are open (--max-connections); "
                               f"retry later or reuse a connection")
        await error_response(e)(scope, receive, send)


def protocol_class(cfg: ServerConfig, metrics: Metrics) -> type[BoundedH11Protocol]:
    """uvicorn's ``http=`` argument for a server with ``cfg``'s limits, reporting to ``metrics``."""
    return type("BoundedH11Protocol", (BoundedH11Protocol,), {"cfg": cfg, "metrics": metrics})


def uvicorn_server(app, cfg: ServerConfig):
    """The uvicorn server of ``app`` (built by ``create_app(cfg)``): the CLI runs it, tests run it on a
    thread. Serve it with ``server.run(sockets=[a bound socket])``."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, http=protocol_class(cfg, app.state.service.metrics),
                                         log_level=cfg.log_level, access_log=False,
                                         timeout_keep_alive=cfg.idle_timeout_s,
                                         timeout_graceful_shutdown=cfg.graceful_timeout_s))
