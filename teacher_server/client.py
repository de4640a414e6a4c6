"""The typed HTTP client of a teacher server (teacher_server/PROTOCOL.md).

The one place that knows the endpoints, the bearer-token header, which failures are worth another
attempt and how long to back off. It imports httpx and the protocol models of ``ckd_common``, never
FastAPI: whoever talks to a server (``deploy.fill``, benches, orchestration) needs only this.

    with TeacherClient(url, token=None) as server:
        server.wait_ready(120)              # polls /readyz (a loading server answers 503)
        info = server.info()                # ckd_common.protocol.Info, not a dict
        tok = server.tokenizer()            # the teacher's own tokenizer files, loaded
        resp = server.targets(request)      # ckd_common.wire request -> response, retried with back-off

``AsyncTeacherClient.targets_frame`` makes exactly one attempt and classifies its failure
(:class:`RetryableError` or a final :class:`ClientError`): a caller that spreads requests over
several servers (the fill) decides where the retry goes and waits :meth:`RetryPolicy.delay`.
"""
from __future__ import annotations

import io
import random
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from pydantic import ValidationError

from ckd_common.protocol import Info, Ready
from ckd_common.wire import (CONTENT_TYPE_REQUEST, TargetsRequest, TargetsResponse, WireError, decode_response,
                             encode_request)

# 408/429/5xx: a slow upload, overloaded, loading, shutting down or a failed sample: another
# attempt (maybe on another replica) can succeed. Every other 4xx names a problem of the request
# itself: final.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class ClientError(RuntimeError):
    """A request failed for good; the message names the server, the endpoint and its answer.
    ``status`` is the HTTP status, None when no answer came (transport error)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Unauthorized(ClientError):
    """HTTP 401: the server wants a bearer token (or another one)."""


class NotReady(ClientError):
    """The server did not become ready in time."""


class RetryableError(ClientError):
    """Worth another attempt: a transport error (refused, reset, timeout) or HTTP 408/429/5xx."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after  # seconds, from the server's Retry-After header


@dataclass(frozen=True)
class RetryPolicy:
    """How often a request is attempted and how long to wait between attempts."""

    attempts: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure: exponential, capped at
        ``max_backoff_s``, jittered x0.5-1.5 (clients do not retry in lockstep) and never shorter
        than the server's Retry-After."""
        backoff = min(self.max_backoff_s, self.backoff_s * 2 ** max(failures - 1, 0)) * (0.5 + random.random())
        return max(backoff, retry_after or 0.0)


def error_detail(r: httpx.Response) -> str:
    """The ``detail`` of a JSON error body (ckd_common.protocol.ErrorBody), else the start of the text."""
    try:
        j = r.json()
        return str(j.get("detail", j))
    except Exception:  # noqa: BLE001 - not JSON
        return r.text[:500]


def retry_after(r: httpx.Response) -> float | None:
    ra = r.headers.get("retry-after")
    return float(ra) if ra and ra.replace(".", "", 1).isdigit() else None


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _raise_for_targets(r: httpx.Response, url: str) -> None:
    """Classify a non-200 answer of POST /v1/targets."""
    detail = f"HTTP {r.status_code} from {url}: {error_detail(r)}"
    if r.status_code in RETRYABLE_STATUS:
        raise RetryableError(detail, r.status_code, retry_after(r))
    if r.status_code == 401:
        raise Unauthorized(detail, r.status_code)
    raise ClientError(detail, r.status_code)


def _failure(e: Exception, url: str, what: str) -> ClientError:
    """A request that got no HTTP answer, as one line: the server, the request, what happened and
    what to do. A URL that cannot work is final; everything else (refused, reset, timed out, broken
    answer) is worth another attempt."""
    if isinstance(e, (httpx.UnsupportedProtocol, httpx.InvalidURL)):
        return ClientError(f"{url!r} is not an http(s) URL of a teacher server ({e}); use e.g. "
                           f"http://127.0.0.1:8000")
    reason = str(e) or type(e).__name__
    if isinstance(e, httpx.ConnectError):
        hint = "is the server running (teacher_server serve ...) and is the URL right?"
    elif isinstance(e, httpx.TimeoutException):
        hint = "the server is overloaded or hung; check its log and /metrics, or raise the client's timeout"
    else:  # reset, closed mid-answer, protocol error: the server died, restarted or was killed
        hint = "the server may have died or restarted; check its log, then retry"
    return RetryableError(f"{type(e).__name__} talking to {url} ({what}): {reason}; {hint}")


# what httpx raises when no answer came (InvalidURL is no RequestError: a URL httpx cannot even parse)
_NO_ANSWER = (httpx.RequestError, httpx.InvalidURL)


class TeacherClient:
    """Synchronous client of one server (readiness, info, tokenizer, targets, metrics)."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 60.0,
                 retry: RetryPolicy = RetryPolicy(), transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.retry = retry
        self._http = httpx.Client(headers=auth_headers(token), timeout=httpx.Timeout(timeout_s, connect=10.0),
                                  transport=transport)

    def __enter__(self) -> "TeacherClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _get(self, path: str, timeout: float | None = None) -> httpx.Response:
        try:
            return self._http.get(self.url + path, **({} if timeout is None else {"timeout": timeout}))
        except _NO_ANSWER as e:
            raise _failure(e, self.url, f"GET {path}") from None

    def _ok(self, r: httpx.Response, what: str) -> httpx.Response:
        if r.status_code == 401:
            raise Unauthorized(f"server {self.url} requires a bearer token (HTTP 401: {error_detail(r)})", 401)
        if r.status_code != 200:
            raise ClientError(f"server {self.url}: {what} failed with HTTP {r.status_code}: {error_detail(r)}",
                              r.status_code)
        return r

    # -- probes --------------------------------------------------------------------------------------
    def ready(self) -> Ready:
        """GET /readyz: 200 and 503 both carry a Ready body (503 while loading or shutting down)."""
        r = self._get("/readyz", timeout=10)
        if r.status_code in (200, 503):
            try:
                return Ready.model_validate(r.json())
            except ValueError:  # not JSON, or not a Ready body (pydantic's ValidationError is a ValueError)
                pass
        return Ready(ready=False, detail=f"HTTP {r.status_code}: {error_detail(r)}")

    def wait_ready(self, wait_s: float, poll_s: float = 0.5, check: Callable[[], None] | None = None) -> None:
        """Poll /readyz until the model is loaded; NotReady after ``wait_s`` seconds. ``check`` is
        called before every poll and may raise to stop waiting (e.g. the server process exited)."""
        deadline = time.monotonic() + wait_s
        last = "no answer"
        while True:
            if check is not None:
                check()
            try:
                state = self.ready()
                if state.ready:
                    return
                last = state.detail or "not ready"
            except RetryableError as e:
                last = str(e)
            if time.monotonic() >= deadline:
                raise NotReady(f"server {self.url} is not ready after {wait_s:.0f}s ({last}); is it running "
                               f"(teacher_server serve ...) and is the URL right?")
            time.sleep(poll_s)

    # -- teacher ---------------------------------------------------------------------------------------
    def info(self) -> Info:
        """GET /v1/info as the protocol model."""
        r = self._ok(self._get("/v1/info", timeout=30), "GET /v1/info")
        try:
            return Info.model_validate(r.json())
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
            raise ClientError(f"server {self.url}: its /v1/info answer does not match this client's protocol "
                              f"(another llava-ckd version?): {problems}") from None
        except ValueError:  # not JSON at all
            raise ClientError(f"server {self.url}: /v1/info did not answer JSON: {r.text[:200]!r}") from None

    def tokenizer_zip(self) -> bytes:
        """GET /v1/tokenizer: the teacher's tokenizer files as a zip."""
        return self._ok(self._get("/v1/tokenizer"), "GET /v1/tokenizer").content

    def tokenizer(self):
        """The teacher's tokenizer (transformers), loaded from /v1/tokenizer."""
        from transformers import AutoTokenizer

        data = self.tokenizer_zip()
        with tempfile.TemporaryDirectory() as d:
            try:
                zipfile.ZipFile(io.BytesIO(data)).extractall(d)
                return AutoTokenizer.from_pretrained(d, local_files_only=True)
            except (zipfile.BadZipFile, OSError, ValueError) as e:
                raise ClientError(f"server {self.url}: GET /v1/tokenizer sent {len(data)} bytes that are not a "
                                  f"loadable tokenizer ({type(e).__name__}: {e}); is it a teacher_server of "
                                  f"this version?") from None

    def metrics(self) -> str:
        """GET /metrics (Prometheus text)."""
        return self._ok(self._get("/metrics", timeout=30), "GET /metrics").text

    def targets(self, request: TargetsRequest) -> TargetsResponse:
        """POST /v1/targets; retryable failures are retried per :attr:`retry`."""
        body = encode_request(request)
        failures = 0
        while True:
            try:
                try:
                    r = self._http.post(self.url + "/v1/targets", content=body,
                                        headers={"Content-Type": CONTENT_TYPE_REQUEST})
                except _NO_ANSWER as e:
                    raise _failure(e, self.url, "POST /v1/targets") from None
                if r.status_code != 200:
                    _raise_for_targets(r, self.url)
                try:
                    return decode_response(r.content)
                except WireError as e:
                    raise ClientError(f"server {self.url} sent an undecodable targets frame: {e}") from None
            except RetryableError as e:
                failures += 1
                if failures >= self.retry.attempts:
                    raise ClientError(f"giving up after {failures} attempts; last error: {e}") from None
                time.sleep(self.retry.delay(failures, e.retry_after))


class AsyncTeacherClient:
    """Asynchronous POST /v1/targets to one server, ``concurrency`` connections, one attempt per call."""

    def __init__(self, url: str, token: str | None = None, concurrency: int = 2, timeout_s: float = 600.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s, connect=10.0),
                                       headers={**auth_headers(token), "Content-Type": CONTENT_TYPE_REQUEST},
                                       transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def targets_frame(self, body: bytes) -> bytes:
        """One attempt: an encoded request frame in, the response frame out. Raises RetryableError
        (transport errors, 429/5xx) or ClientError (any other answer: final)."""
        try:
            r = await self._http.post(self.url + "/v1/targets", content=body)
        except _NO_ANSWER as e:
            raise _failure(e, self.url, "POST /v1/targets") from None
        if r.status_code != 200:
            _raise_for_targets(r, self.url)
        return r.content
