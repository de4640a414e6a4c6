"""teacher_server.client against scripted answers (httpx.MockTransport): typed /v1/info, which
failures are retried and which are final, back-off bounds and Retry-After, readiness waits. The
real server is exercised through the same client in test_fill_integration / test_server_integration."""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from ckd_common.protocol import Info
from ckd_common.targets import SampleTargets, SparseTopK
from ckd_common.wire import TargetsRequest, TargetsResponse, WireSample, decode_response, encode_response
from teacher_server.client import (AsyncTeacherClient, ClientError, NotReady, RetryableError, RetryPolicy,
                                   TeacherClient, Unauthorized)

URL = "http://teacher.test"
NO_WAIT = RetryPolicy(attempts=3, backoff_s=0.0, max_backoff_s=0.0)
INFO = dict(engine="hf", teacher_fingerprint="f" * 32, tokenizer_hash="t1", vocab_size=512, tokenizer_vocab_size=496,
            common_vocab_size=496, hidden_size=64, num_visual_tokens=16, vision_strategy="full", image_size=56,
            image_token_id=3, dtype="fp32", device="cpu", max_k=64, max_batch_tokens=1024, max_request_samples=8,
            max_request_tokens=4096, max_body_bytes=1 << 20, supported_templates=["pretrain", "qwen2_base"],
            target_kinds=["text", "visual", "autocorr"], wire_version=1)


def scripted(*answers):
    """A transport answering the i-th request with answers[i] (a Response, or an exception to raise)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        answer = answers[min(len(seen), len(answers) - 1)]
        seen.append(request)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return seen, handler


def error(status: int, detail: str, **headers) -> httpx.Response:
    return httpx.Response(status, json={"error": "x", "detail": detail}, headers=headers)


def _request() -> TargetsRequest:
    return TargetsRequest([WireSample("a" * 32, np.arange(5, dtype=np.int32), np.arange(2, dtype=np.int32), -1, 0,
                                      None, "s0")], 4, None, "qwen2_base")


def _response_frame() -> bytes:
    text = SparseTopK(np.zeros((2, 4), np.int64), np.zeros((2, 4), np.float32), np.zeros(2, np.float32))
    return encode_response(TargetsResponse([SampleTargets("a" * 32, text)], 4, 496))


def test_info_is_the_typed_model_and_sends_the_token():
    seen, handler = scripted(httpx.Response(200, json=INFO))
    with TeacherClient(URL + "/", token="s3cret", transport=httpx.MockTransport(handler)) as c:
        info = c.info()
    assert isinstance(info, Info) and info.common_vocab_size == 496 and info.target_kinds[-1] == "autocorr"
    assert seen[0].url.path == "/v1/info" and seen[0].headers["authorization"] == "Bearer s3cret"


def test_info_errors_name_the_server_and_the_answer():
    _, handler = scripted(error(401, "missing or wrong bearer token"))
    with pytest.raises(Unauthorized, match=f"server {URL} requires a bearer token"):
        TeacherClient(URL, transport=httpx.MockTransport(handler)).info()
    _, handler = scripted(httpx.Response(200, json={**INFO, "vocab_size": "many"}))
    with pytest.raises(ClientError, match="does not match this client's protocol"):
        TeacherClient(URL, transport=httpx.MockTransport(handler)).info()
    _, handler = scripted(httpx.ConnectError("refused"))
    with pytest.raises(RetryableError, match=f"ConnectError talking to {URL}") as ei:
        TeacherClient(URL, transport=httpx.MockTransport(handler)).info()
    assert ei.value.status is None


def test_targets_retries_overload_and_transport_errors_then_succeeds():
    seen, handler = scripted(error(503, "overloaded", **{"Retry-After": "0"}), httpx.ReadTimeout("slow"),
                             httpx.Response(200, content=_response_frame()))
    with TeacherClient(URL, retry=NO_WAIT, transport=httpx.MockTransport(handler)) as c:
        resp = c.targets(_request())
    assert len(seen) == 3 and resp.targets[0].key == "a" * 32
    assert seen[0].headers["content-type"] == "application/x-ckd-targets-request"


def test_targets_gives_up_after_the_policy_and_never_retries_a_rejected_request():
    seen, handler = scripted(error(503, "overloaded"))
    with pytest.raises(ClientError, match="giving up after 3 attempts; last error: HTTP 503 from"):
        TeacherClient(URL, retry=NO_WAIT, transport=httpx.MockTransport(handler)).targets(_request())
    assert len(seen) == 3
    seen, handler = scripted(error(422, "sample 0: token id 999 is outside the vocabulary"))
    with pytest.raises(ClientError, match="HTTP 422 from .*token id 999") as ei:
        TeacherClient(URL, retry=NO_WAIT, transport=httpx.MockTransport(handler)).targets(_request())
    assert len(seen) == 1 and not isinstance(ei.value, RetryableError) and ei.value.status == 422


def test_async_targets_frame_classifies_one_attempt():
    async def one(*answers):
        seen, handler = scripted(*answers)
        c = AsyncTeacherClient(URL, token="t", transport=httpx.MockTransport(handler))
        try:
            return await c.targets_frame(b"frame"), seen
        finally:
            await c.aclose()

    frame, seen = asyncio.run(one(httpx.Response(200, content=_response_frame())))
    assert decode_response(frame).targets[0].key == "a" * 32 and seen[0].headers["authorization"] == "Bearer t"
    with pytest.raises(RetryableError) as ei:
        asyncio.run(one(error(429, "slow down", **{"Retry-After": "7"})))
    assert ei.value.retry_after == 7.0 and ei.value.status == 429
    with pytest.raises(Unauthorized):
        asyncio.run(one(error(401, "missing or wrong bearer token")))
    with pytest.raises(ClientError, match="HTTP 413") as ei:
        asyncio.run(one(error(413, "too large")))
    assert not isinstance(ei.value, RetryableError)


def test_backoff_is_exponential_capped_jittered_and_honours_retry_after():
    p = RetryPolicy(attempts=6, backoff_s=0.5, max_backoff_s=4.0)
    for failures, base in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)):
        for _ in range(20):
            assert 0.5 * base <= p.delay(failures) <= 1.5 * base
    assert p.delay(1, retry_after=30.0) == 30.0


def test_wait_ready_polls_until_ready_or_stops():
    seen, handler = scripted(httpx.ConnectError("refused"), httpx.Response(503, json={"ready": False,
                                                                                      "detail": "model loading"}),
                             httpx.Response(200, json={"ready": True}))
    TeacherClient(URL, transport=httpx.MockTransport(handler)).wait_ready(60, poll_s=0)
    assert [r.url.path for r in seen] == ["/readyz"] * 3
    _, handler = scripted(httpx.Response(503, json={"ready": False, "detail": "model loading"}))
    with pytest.raises(NotReady, match=f"server {URL} is not ready after 0s \\(model loading\\)"):
        TeacherClient(URL, transport=httpx.MockTransport(handler)).wait_ready(0, poll_s=0)

    def server_died() -> None:
        raise RuntimeError("the server process exited")

    with pytest.raises(RuntimeError, match="exited"):
        TeacherClient(URL, transport=httpx.MockTransport(handler)).wait_ready(60, poll_s=0, check=server_died)


# ---------------------------------------------------------------------------------------------
# transport failures against real sockets: one line naming the server, the request and what to do


class _DeadAfterReadyz:
    """A loopback 'server' that answers one GET /readyz with ready, then dies (its port refuses)."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            body = b'{"ready": true, "detail": ""}'
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
        self.sock.close()


class _Resetting:
    """A loopback 'server' that accepts every connection and drops it at once (a crashing server)."""

    def __init__(self) -> None:
        import socket
        import struct
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._linger = struct.pack("ii", 1, 0)  # close with RST, not FIN
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import socket

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            conn.recv(65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, self._linger)
            conn.close()

    def close(self) -> None:
        self.sock.close()


def _one_line(e: BaseException, url: str, *needles: str) -> None:
    msg = str(e)
    assert "\n" not in msg and url in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


@pytest.mark.integration  # a real socket server
def test_a_server_that_dies_after_readyz_gives_one_line_errors_not_httpx_tracebacks():
    srv = _DeadAfterReadyz()
    with TeacherClient(srv.url, retry=NO_WAIT) as c:
        c.wait_ready(30, poll_s=0)
        srv.thread.join(30)
        with pytest.raises(RetryableError) as ei:
            c.tokenizer()
        _one_line(ei.value, srv.url, "GET /v1/tokenizer", "ConnectError", "is the server running")
        assert ei.value.status is None and ei.value.__cause__ is None
        with pytest.raises(RetryableError) as ei:
            c.info()
        _one_line(ei.value, srv.url, "GET /v1/info")
        with pytest.raises(ClientError, match="giving up after 3 attempts") as ei:
            c.targets(_request())
        _one_line(ei.value, srv.url, "POST /v1/targets", "is the server running")
        with pytest.raises(NotReady) as ei:
            c.wait_ready(0, poll_s=0)
        _one_line(ei.value, srv.url, "is it running")


@pytest.mark.integration  # a real socket server
def test_a_server_that_resets_connections_gives_one_line_errors():
    srv = _Resetting()
    try:
        with TeacherClient(srv.url, retry=NO_WAIT) as c:
            for call, what in ((c.info, "GET /v1/info"), (c.tokenizer_zip, "GET /v1/tokenizer")):
                with pytest.raises(RetryableError) as ei:
                    call()
                _one_line(ei.value, srv.url, what, "may have died or restarted")
            with pytest.raises(ClientError, match="giving up after 3 attempts") as ei:
                c.targets(_request())
            _one_line(ei.value, srv.url, "POST /v1/targets")

        async def one():
            client = AsyncTeacherClient(srv.url)
            try:
                return await client.targets_frame(b"frame")
            finally:
                await client.aclose()

        with pytest.raises(RetryableError) as ei:
            asyncio.run(one())
        _one_line(ei.value, srv.url, "POST /v1/targets")
    finally:
        srv.close()


def test_bad_urls_and_bad_tokenizer_answers_are_client_errors():
    for bad in ("localhost:8000", "ftp://host/x", "http://", "http://[::1"):
        with TeacherClient(bad, retry=NO_WAIT) as c:  # construction never fails: the first request says why
            for call in (c.info, lambda: c.targets(_request()), lambda: c.wait_ready(60, poll_s=0)):
                with pytest.raises(ClientError, match="use e.g. http://127.0.0.1:8000") as ei:
                    call()
                assert not isinstance(ei.value, RetryableError), bad  # final: no retry can fix a URL
    _, handler = scripted(httpx.Response(200, content=b"not a zip"))
    with pytest.raises(ClientError, match="not a loadable tokenizer") as ei:
        TeacherClient(URL, transport=httpx.MockTransport(handler)).tokenizer()
    _one_line(ei.value, URL, "GET /v1/tokenizer")
