"""Hostile or broken clients against the real uvicorn server (teacher_server.connections), over
loopback with raw sockets and httpx: slow uploads do not starve a legitimate client, stalled
requests get 408, connections beyond the cap get 503 while open ones are served, broken frames get
400 on a connection that stays usable, and disconnects are counted as 499, not 500.

No test depends on timing: a connection that must stay held is given a generous timeout (60 s) and
one that must time out is given a short one and awaited with a generous bound; states are awaited
through /metrics or the server's answers, never assumed after a sleep."""
from __future__ import annotations

import json
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ckd_common.wire import CONTENT_TYPE_REQUEST, REQUEST_MAGIC, TargetsRequest, WireSample, encode_frame
from test_server_support import InProcessServer, read_http_response

pytestmark = pytest.mark.integration
PATIENT_S = 60.0  # a connection that must stay held meanwhile
WAIT_S = 60.0  # the bound on waiting for something that must happen


def _config(tiny_models, **limits):
    from teacher_server.config import ServerConfig

    return ServerConfig(model_dir=str(tiny_models["tiny-teacher"]), log_level="warning", **limits)


@pytest.fixture(scope="module")
def patient(tiny_models):
    """Default admission limits (32 in flight), generous request deadlines."""
    with InProcessServer(_config(tiny_models, idle_timeout_s=PATIENT_S, header_timeout_s=PATIENT_S,
                                 body_timeout_s=PATIENT_S)) as srv:
        yield srv


@pytest.fixture(scope="module")
def wire_samples(patient, synth_dir):
    from ckd_common.data import prepare_file
    from teacher_server.client import TeacherClient

    with TeacherClient(patient.url) as server:
        info, tok = server.info(), server.tokenizer()
    ds = prepare_file(synth_dir / "instruct.json", tok, "qwen2_base", info.num_visual_tokens,
                      info.image_token_id, synth_dir / "images")
    return [WireSample(s.key, s.input_ids, s.response_positions, s.visual_start, s.num_visual,
                       Path(s.image_path).read_bytes() if s.has_image else None, s.id) for s in ds.samples[:4]]


def _connect(srv) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT_S)


def _post_head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: teacher\r\nContent-Type: {CONTENT_TYPE_REQUEST}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {WAIT_S:.0f} s: {what}"
        time.sleep(0.05)


class _Trickler(threading.Thread):
    """A client that announces a 1000-byte body and sends it one byte every 2 s, reading whatever
    the server answers meanwhile, until ``stop`` is set (then it hangs up mid-body)."""

    def __init__(self, srv, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.srv, self.stop, self.outcome = srv, stop, None

    def run(self) -> None:
        with _connect(self.srv) as s:
            s.sendall(_post_head("/v1/targets", 1000) + b"C")
            s.settimeout(2.0)
            while not self.stop.is_set():
                try:
                    self.outcome = s.recv(4096) or b"closed"  # the server gave up on us
                    return
                except TimeoutError:
                    s.sendall(b"K")
            s.shutdown(socket.SHUT_RDWR)


def test_slow_uploads_do_not_starve_a_legitimate_client(patient, wire_samples):
    """33 connections trickling a body hold no engine slot: a legitimate request is served while they
    trickle (it used to get 503: the 32 slots were taken before the body was read). When they hang up
    mid-body they are counted as 499 (client closed), not 500."""
    from teacher_server.client import RetryPolicy, TeacherClient

    before_499 = patient.metric('teacher_requests_total{code="499"}')
    before_500 = patient.metric('teacher_requests_total{code="500"}')
    stop = threading.Event()
    slow = [_Trickler(patient, stop) for _ in range(33)]
    for t in slow:
        t.start()
    try:
        # the server holds them: uploading (now), or admitted and waiting for their bodies (before the fix)
        _until(lambda: patient.metric("teacher_receiving_requests") + patient.metric("teacher_inflight_requests")
               >= 32, "the slow uploads are held by the server")
        with TeacherClient(patient.url, retry=RetryPolicy(attempts=1)) as server:
            got = server.targets(TargetsRequest(wire_samples, 8, None, "qwen2_base"))
            assert [t.key for t in got.targets] == [s.key for s in wire_samples]
        _until(lambda: patient.metric("teacher_receiving_requests") == 33, "all 33 bodies being received")
        assert all(t.outcome is None for t in slow), [t.outcome for t in slow if t.outcome]
    finally:
        stop.set()
        for t in slow:
            t.join(WAIT_S)
    _until(lambda: patient.metric('teacher_requests_total{code="499"}') - before_499 >= 33, "33 disconnects counted")
    assert patient.metric('teacher_requests_total{code="500"}') == before_500
    assert patient.metric("teacher_receiving_requests") == 0 and patient.metric("teacher_inflight_requests") == 0


def test_broken_frames_get_400_and_keep_the_connection(patient, wire_samples):
    """Overflowing shapes, a 100k-deep header, 2-D and float input_ids: 400 with a one-line message on
    one keep-alive connection, which then serves a good request (no 500, no torn-down connection)."""
    s0 = wire_samples[-1]
    meta = {"k": 8, "template": None, "samples": [{"key": s0.key, "length": len(s0.input_ids),
                                                   "num_response": len(s0.response_positions), "image_bytes": -1}]}
    ids, resp = np.asarray(s0.input_ids, "<i4"), np.asarray(s0.response_positions, "<i4")

    def raw(header: bytes) -> bytes:
        return struct.pack("<4sII", REQUEST_MAGIC, 1, len(header)) + header

    bodies = [raw(json.dumps({"meta": meta, "arrays": [{"name": "input_ids", "dtype": "<i4", "shape": shape}]})
                  .encode()) for shape in ([2 ** 32, 2 ** 32], [10 ** 30])]
    bodies.append(raw(b"[" * 100_000 + b"]" * 100_000))
    for bad_ids in (np.stack([ids, ids], 1), ids.astype("<f4") + 0.5):
        bodies.append(encode_frame(REQUEST_MAGIC, meta, {"input_ids": bad_ids, "response_positions": resp,
                                                         "images": np.zeros(0, np.uint8)}))
    before_400 = patient.metric('teacher_requests_total{code="400"}')
    before_500 = patient.metric('teacher_requests_total{code="500"}')
    with _connect(patient) as sock:
        for body in bodies:
            sock.sendall(_post_head("/v1/targets", len(body)) + body)
            status, headers, answer = read_http_response(sock)
            detail = json.loads(answer)
            assert status == 400 and detail["error"] == "bad_request", answer[:300]
            assert "\n" not in detail["detail"] and "Traceback" not in detail["detail"]
            assert headers.get("connection") != "close"
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: teacher\r\n\r\n")  # the same connection serves on
        assert read_http_response(sock)[0] == 200
    assert patient.metric('teacher_requests_total{code="400"}') - before_400 == len(bodies)
    assert patient.metric('teacher_requests_total{code="500"}') == before_500


def test_stalled_requests_get_408_and_the_server_serves_on(tiny_models):
    """Headers that stop coming and a body that stops coming get 408 and a closed connection; a body
    nobody reads (the request was answered early) and a connection that never sends a request are
    closed too. Short deadlines; the test only waits for what must happen."""
    import httpx

    cfg = _config(tiny_models, idle_timeout_s=10.0, header_timeout_s=1.0, body_timeout_s=1.0)
    with InProcessServer(cfg) as srv, \
            _connect(srv) as headers_stall, _connect(srv) as body_stall, _connect(srv) as unread_body, \
            _connect(srv) as silent:
        headers_stall.sendall(b"POST /v1/targets HTTP/1.1\r\nHost: teacher\r\n")  # and never the blank line
        body_stall.sendall(_post_head("/v1/targets", 1000) + b"x" * 10)  # and never the rest
        unread_body.sendall(_post_head("/healthz", 1000) + b"x" * 10)  # answered (405) without reading it

        status, headers, body = read_http_response(headers_stall)
        assert status == 408 and headers["connection"] == "close"
        assert json.loads(body)["error"] == "request_timeout" and "--header-timeout" in json.loads(body)["detail"]

        status, headers, body = read_http_response(body_stall)
        assert status == 408 and headers["connection"] == "close"
        assert "did not arrive in time: 10 bytes" in json.loads(body)["detail"]

        assert read_http_response(unread_body)[0] == 405
        for s in (headers_stall, body_stall, unread_body, silent):  # every one is closed by the server
            s.settimeout(WAIT_S)
            assert s.recv(4096) == b""  # (silent: quietly, no 408 a client could read as an answer)

        assert srv.metric('teacher_requests_total{code="408"}') == 1
        assert srv.metric('teacher_receive_timeouts_total{phase="headers"}') == 1
        # (>= 1: were the event loop stalled past the grace, this layer would answer the stalled body too)
        assert srv.metric('teacher_receive_timeouts_total{phase="body"}') >= 1
        assert srv.metric('teacher_requests_total{code="500"}') == 0
        assert httpx.get(f"{srv.url}/healthz", timeout=WAIT_S).status_code == 200


def test_connections_beyond_the_cap_get_503_and_open_ones_are_served(tiny_models):
    import httpx

    with InProcessServer(_config(tiny_models, max_connections=4, idle_timeout_s=PATIENT_S,
                                 header_timeout_s=PATIENT_S)) as srv:
        held = [_connect(srv) for _ in range(4)]
        try:
            for s in held:
                s.sendall(b"GET /healthz HTTP/1.1\r\n")  # the rest of the request comes later
            r = httpx.get(f"{srv.url}/healthz", timeout=WAIT_S)  # the 5th connection
            assert r.status_code == 503 and r.json()["error"] == "overloaded"
            assert "--max-connections" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
            assert r.headers["connection"] == "close"
            for s in held:  # the connections opened within the cap are served
                s.sendall(b"Host: teacher\r\n\r\n")
                assert read_http_response(s)[0] == 200
        finally:
            for s in held:
                s.close()

        def served() -> bool:
            return httpx.get(f"{srv.url}/healthz", timeout=WAIT_S).status_code == 200

        _until(served, "a new connection is served once the held ones closed")
        assert srv.metric("teacher_connections_refused_total") >= 1


def test_an_unexpected_error_is_a_one_line_500_and_the_connection_stays(patient, wire_samples):
    """A bug while handling a request: 500 internal_error with one line (the traceback only in the
    server log) on a connection that then serves the next request (Starlette's last-resort handler
    answers and re-raises, and uvicorn then tears the keep-alive connection down)."""
    from ckd_common.wire import encode_request

    svc = patient.app.state.service

    def broken(body):
        raise ZeroDivisionError("a bug in the service")

    body = encode_request(TargetsRequest(wire_samples[:1], 8, None, "qwen2_base"))
    svc.decode_and_check = broken  # an instance attribute shadows the method for this test only
    try:
        with _connect(patient) as sock:
            sock.sendall(_post_head("/v1/targets", len(body)) + body)
            status, headers, answer = read_http_response(sock)
            assert status == 500 and json.loads(answer) == {"error": "internal_error",
                                                             "detail": "ZeroDivisionError: a bug in the service"}
            assert headers.get("connection") != "close"
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: teacher\r\n\r\n")
            assert read_http_response(sock)[0] == 200
    finally:
        del svc.decode_and_check
