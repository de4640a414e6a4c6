"""The teacher server as a real uvicorn process: auth, a flood of concurrent requests (back-pressure,
bounded memory, no crash), fill with a token, graceful shutdown finishing an in-flight request."""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from ckd_common.wire import TargetsRequest, WireSample, decode_response, encode_request
from test_server_support import ServerProc

pytestmark = pytest.mark.integration
TOKEN = "integration-token"
BATCH_TOKENS = 1024


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _guarded_server(model, d: Path, name: str) -> ServerProc:
    (d / "token").write_text(TOKEN + "\n")
    return ServerProc(model, d, "--token-file", str(d / "token"),
                      "--max-batch-tokens", str(BATCH_TOKENS), "--max-inflight-requests", "4",
                      "--max-queue-tokens", str(2 * BATCH_TOKENS), "--max-request-tokens", "1000000",
                      "--max-request-samples", "512", name=name).start()


@pytest.fixture(scope="module")
def guarded(tiny_models, tmp_path_factory):
    srv = _guarded_server(tiny_models["tiny-teacher"], tmp_path_factory.mktemp("guarded"), "guarded")
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture
def doomed(tiny_models, tmp_path):
    """A server of its own for a test that shuts it down (the module's stays up for the others, in any order)."""
    srv = _guarded_server(tiny_models["tiny-teacher"], tmp_path, "doomed")
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def wire_samples(guarded, synth_dir):
    from ckd_common.data import prepare_file
    from teacher_server.client import TeacherClient

    with TeacherClient(guarded.url, TOKEN) as server:
        info, tok = server.info(), server.tokenizer()
    ds = prepare_file(synth_dir / "instruct.json", tok, "qwen2_base", info.num_visual_tokens,
                      info.image_token_id, synth_dir / "images")
    return [WireSample(s.key, s.input_ids, s.response_positions, s.visual_start, s.num_visual,
                       Path(s.image_path).read_bytes() if s.has_image else None, s.id) for s in ds.samples]


def test_auth_enforced(guarded):
    import httpx

    assert httpx.get(f"{guarded.url}/healthz").status_code == 200
    for path in ("/v1/info", "/metrics", "/docs"):
        r = httpx.get(f"{guarded.url}{path}")
        assert r.status_code == 401 and "bearer token" in r.json()["detail"]
    assert httpx.post(f"{guarded.url}/v1/targets", content=b"x").status_code == 401
    assert httpx.get(f"{guarded.url}/v1/info", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_config_saved_next_to_the_port_file_without_the_token(guarded):
    import json

    saved = json.loads((guarded.workdir / "guarded.config.json").read_text())
    assert saved["config"] == "ServerConfig" and saved["max_batch_tokens"] == BATCH_TOKENS
    assert saved["token_file"].endswith("token") and saved["token"] == "<redacted>"


def test_fill_needs_and_uses_the_token(guarded, synth_dir, tmp_path):
    from deploy.fill import FillConfig, FillError, fill

    opts = FillConfig([guarded.url], str(synth_dir / "pretrain.json"), str(synth_dir / "images"), "pretrain", 8,
                      str(tmp_path / "cache"), progress=False)
    with pytest.raises(FillError, match="bearer token"):
        fill(opts)
    opts.token_file = str(guarded.workdir / "token")  # the token travels in a file, never in the config
    stats = fill(opts)
    assert stats.written == stats.samples > 0


def test_client_targets_need_and_use_the_token(guarded, wire_samples):
    from teacher_server.client import TeacherClient, Unauthorized

    request = TargetsRequest(wire_samples[:2], 8, None, "qwen2_base")
    with pytest.raises(Unauthorized):
        TeacherClient(guarded.url).targets(request)
    with TeacherClient(guarded.url, TOKEN) as server:
        assert [t.key for t in server.targets(request).targets] == [s.key for s in wire_samples[:2]]
        assert 'teacher_requests_total{code="200"}' in server.metrics()


def test_flood_gets_backpressure_not_a_crash(guarded, wire_samples):
    import httpx

    body = encode_request(TargetsRequest(wire_samples[:8], 8, None, "qwen2_base"))
    rss_before = _rss_mib(guarded.proc.pid)
    n = 96

    async def flood():
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(limits=limits, timeout=120,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            return await asyncio.gather(*(c.post(f"{guarded.url}/v1/targets", content=body) for _ in range(n)))

    rs = asyncio.run(flood())
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 1 and codes.count(503) > 0, codes
    for r in rs:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"] == "overloaded"
        else:
            assert len(decode_response(r.content).targets) == 8
    assert guarded.proc.poll() is None
    assert httpx.get(f"{guarded.url}/readyz").status_code == 200
    again = httpx.post(f"{guarded.url}/v1/targets", content=body, headers={"Authorization": f"Bearer {TOKEN}"},
                       timeout=120)
    assert again.status_code == 200  # once the flood is over, the server serves normally
    # admitted work is bounded (4 requests in flight), so memory does not grow with the flood size
    assert _rss_mib(guarded.proc.pid) - rss_before < 300
    metrics = httpx.get(f"{guarded.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    assert 'teacher_requests_total{code="503"}' in metrics


def test_graceful_shutdown_finishes_in_flight(doomed, wire_samples):
    """SIGTERM while a many-batch request is being processed."""
    import httpx

    samples = (wire_samples * 20)[:400]
    body = encode_request(TargetsRequest(samples, 8, None, "qwen2_base"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    result: dict = {}

    def send() -> None:
        result["r"] = httpx.post(f"{doomed.url}/v1/targets", content=body, headers=auth, timeout=300)

    t = threading.Thread(target=send)
    t.start()
    while True:  # wait until the server is working on it (no deadline: the request is what ends the wait)
        m = httpx.get(f"{doomed.url}/metrics", headers=auth).text
        if "teacher_inflight_requests 1.0" in m and "teacher_queue_tokens 0.0" not in m:
            break
        assert t.is_alive(), f"the request ended before the server was seen working on it: {result}"
        time.sleep(0.005)
    rc = doomed.terminate()
    t.join(120)
    assert rc == 0
    r = result["r"]
    assert r.status_code == 200, r.text
    assert len(decode_response(r.content).targets) == len(samples)
