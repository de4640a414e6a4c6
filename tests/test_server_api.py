"""The teacher server in-process (FastAPI TestClient, real tiny teacher on CPU): endpoints, every
bad-input case with its status code and message, caps, auth, back-pressure, engine failures."""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import numpy as np
import pytest

from ckd_common.wire import (CONTENT_TYPE_REQUEST, TargetsRequest, WireSample, decode_response, encode_request)

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from teacher_server.app import create_app  # noqa: E402
from teacher_server.config import ServerConfig  # noqa: E402
from teacher_server.engines.base import Engine, EngineDescription  # noqa: E402
from teacher_server.errors import EngineFailure  # noqa: E402

MAX_SAMPLES = 8
MAX_BODY = 1 << 20
MAX_K = 32


def _wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "model did not load"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def client(tiny_models):
    cfg = ServerConfig(model_dir=str(tiny_models["tiny-teacher"]), max_request_samples=MAX_SAMPLES,
                       max_body_mb=MAX_BODY / 2 ** 20, max_k=MAX_K)
    app = create_app(cfg, exit_on_load_failure=False)
    with TestClient(app) as c:
        _wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def info(client):
    return client.get("/v1/info").json()


@pytest.fixture(scope="module")
def samples(tiny_models, synth_dir, info):
    from transformers import AutoTokenizer

    from ckd_common.data import prepare_file

    tok = AutoTokenizer.from_pretrained(str(tiny_models["tiny-teacher"]))
    ds = prepare_file(synth_dir / "instruct.json", tok, "qwen2_base", info["num_visual_tokens"],
                      info["image_token_id"], synth_dir / "images")
    with_image = [s for s in ds.samples if s.has_image]
    text_only = [s for s in ds.samples if not s.has_image]
    assert with_image and text_only, "the synthetic data should hold both kinds"
    return with_image[:3] + text_only[:1]


def wire(s, **over) -> WireSample:
    from pathlib import Path

    w = WireSample(s.key, s.input_ids.copy(), s.response_positions, s.visual_start, s.num_visual,
                   Path(s.image_path).read_bytes() if s.has_image else None, s.id)
    return replace(w, **over)


def post(client, ws: list[WireSample], k: int = 8, template: str | None = "qwen2_base", **kw):
    body = encode_request(TargetsRequest(ws, k, kw.pop("vocab_limit", None), template))
    return client.post("/v1/targets", content=body, headers={"Content-Type": CONTENT_TYPE_REQUEST, **kw})


def test_probes_info_docs_metrics(client, info, tiny_models):
    from ckd_common.model import load_vlm, model_info

    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["ready"] is True
    m = model_info(*load_vlm(tiny_models["tiny-teacher"]))
    assert info["teacher_fingerprint"] == m.fingerprint and info["tokenizer_hash"] == m.tokenizer_hash
    assert info["num_visual_tokens"] == m.num_visual_tokens and info["hidden_size"] == m.hidden_size
    assert info["common_vocab_size"] == m.common_vocab
    assert info["dtype"] == "fp32" and info["device"] == "cpu" and info["max_k"] == MAX_K
    assert set(info["supported_templates"]) >= {"pretrain", "qwen2_base"}
    spec = client.get("/openapi.json").json()
    assert "/v1/targets" in spec["paths"] and CONTENT_TYPE_REQUEST in str(spec["paths"]["/v1/targets"])
    assert client.get("/docs").status_code == 200
    assert client.get("/v1/tokenizer").headers["content-type"] == "application/zip"


def test_targets_equal_in_process_teacher(client, info, samples, tiny_models):
    from ckd_common.model import load_vlm
    from ckd_common.teacher import TeacherInput, TeacherRunner

    r = post(client, [wire(s) for s in samples], k=8)
    assert r.status_code == 200, r.text
    got = decode_response(r.content)
    assert got.teacher_fingerprint == info["teacher_fingerprint"] and got.k == 8
    model, _ = load_vlm(tiny_models["tiny-teacher"])
    runner = TeacherRunner(model, vocab_limit=info["common_vocab_size"])
    want = runner.targets([TeacherInput.from_prepared(s, info["image_size"], aspect_ratio=info["image_aspect_ratio"])
                           for s in samples], 8)
    for g, w in zip(got.targets, want):
        assert g.key == w.key
        np.testing.assert_array_equal(g.text.ids, w.text.ids)
        np.testing.assert_allclose(g.text.logprobs, w.text.logprobs, atol=1e-4)
        np.testing.assert_allclose(g.text.tail, w.text.tail, atol=1e-5)
        assert (g.visual is None) == (w.visual is None)
        if w.visual is not None:
            np.testing.assert_array_equal(g.visual.ids, w.visual.ids)
            np.testing.assert_allclose(g.visual.logprobs, w.visual.logprobs, atol=1e-4)
            np.testing.assert_allclose(g.autocorr, w.autocorr, atol=1e-5)
    metrics = client.get("/metrics").text
    assert 'teacher_requests_total{code="200"}' in metrics and "teacher_batch_samples_bucket" in metrics


def test_smaller_vocab_limit(client, samples):
    r = post(client, [wire(samples[0])], k=4, vocab_limit=50)
    assert r.status_code == 200, r.text
    t = decode_response(r.content).targets[0]
    assert t.text.ids.max() < 50 and t.visual.ids.max() < 50


def _expect(r, status: int, *needles: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert "Traceback" not in r.text
    for n in needles:
        assert n in body["detail"], (n, body["detail"])


def test_bad_inputs_name_sample_and_problem(client, info, samples):
    img, txt = samples[0], samples[-1]
    vocab, nv, image_id = info["vocab_size"], info["num_visual_tokens"], info["image_token_id"]

    ids = txt.input_ids.copy()
    ids[-1] = vocab
    _expect(post(client, [wire(img), wire(txt, input_ids=ids)], template=None), 422,
            "sample 1", repr(txt.id), f"token id {vocab}", "vocabulary")

    _expect(post(client, [wire(img, image=b"\x89PNG not really an image")], template=None), 422,
            "sample 0", repr(img.id), "image", "cannot be decoded")

    import io

    from PIL import Image

    from ckd_common.data import MAX_IMAGE_PIXELS

    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    bomb = io.BytesIO()
    Image.new("1", (side, side)).save(bomb, format="PNG")  # a few KB claiming a huge canvas
    _expect(post(client, [wire(img, image=bomb.getvalue())], template=None), 422, repr(img.id), "pixels",
            "downscale")

    # visual span inconsistent with the model's visual-token count
    short = np.concatenate([img.input_ids[:img.visual_start + nv - 1], img.input_ids[img.visual_start + nv:]])
    _expect(post(client, [wire(img, input_ids=short, num_visual=nv - 1,
                               response_positions=img.response_positions - 1)], template=None), 422,
            repr(img.id), f"{nv - 1} tokens", f"{nv} visual tokens per image")
    # span in the wrong place
    _expect(post(client, [wire(img, visual_start=img.visual_start + 1)], template=None), 422,
            repr(img.id), "visual span", f"id {image_id}")
    # image tokens but no image
    _expect(post(client, [wire(img, image=None)], template=None), 422, repr(img.id), "no image was sent")

    for k in (0, MAX_K + 1):
        _expect(post(client, [wire(txt)], k=k), 422, f"k={k}", "out of range")
    _expect(post(client, [wire(txt)], vocab_limit=info["common_vocab_size"] + 1), 422, "vocab_limit")

    _expect(post(client, [wire(txt, response_positions=np.array([len(txt.input_ids) - 1]))]), 422,
            repr(txt.id), "response positions")
    _expect(post(client, [wire(txt, key="0" * 32)]), 422, repr(txt.id), "does not match the content")
    _expect(post(client, [wire(txt)], template="nope"), 422, "template 'nope'")
    _expect(client.post("/v1/targets", content=b"garbage"), 400, "malformed targets request")
    _expect(client.post("/v1/targets", content=encode_request(TargetsRequest([], 8))), 422, "no samples")


def test_malformed_frames_are_400_with_one_line(client, samples):
    """2-D or float input_ids, non-byte images, shapes whose product overflows int64 and 100k-deep
    headers: 400 with a one-line reason (they used to pass, be cast, or end in a 500 traceback)."""
    import json
    import struct

    from ckd_common.wire import REQUEST_MAGIC, encode_frame

    s = samples[-1]
    meta = {"k": 8, "template": None, "samples": [{"key": s.key, "id": s.id, "length": len(s.input_ids),
                                                   "num_response": len(s.response_positions), "image_bytes": -1}]}
    ids, resp = np.asarray(s.input_ids, "<i4"), np.asarray(s.response_positions, "<i4")
    no_image = np.zeros(0, np.uint8)
    bodies = {
        "float ids": encode_frame(REQUEST_MAGIC, meta, {"input_ids": ids.astype("<f4") + 0.5,
                                                        "response_positions": resp, "images": no_image}),
        "2-D ids": encode_frame(REQUEST_MAGIC, meta, {"input_ids": np.stack([ids, ids], 1),
                                                      "response_positions": resp, "images": no_image}),
        "int images": encode_frame(REQUEST_MAGIC, meta, {"input_ids": ids, "response_positions": resp,
                                                         "images": np.zeros(0, "<i4")}),
    }
    for shape in ([2 ** 32, 2 ** 32], [10 ** 30]):
        h = json.dumps({"meta": meta, "arrays": [{"name": "input_ids", "dtype": "<i4", "shape": shape}]}).encode()
        bodies[f"shape {shape}"] = struct.pack("<4sII", REQUEST_MAGIC, 1, len(h)) + h
    deep = b"[" * 100_000 + b"]" * 100_000
    bodies["deep header"] = struct.pack("<4sII", REQUEST_MAGIC, 1, len(deep)) + deep
    for what, body in bodies.items():
        r = client.post("/v1/targets", content=body, headers={"Content-Type": CONTENT_TYPE_REQUEST})
        _expect(r, 400, "malformed targets request")
        assert r.json()["error"] == "bad_request" and "\n" not in r.json()["detail"], (what, r.text)
    assert post(client, [wire(s)]).status_code == 200  # and the server serves on


def test_a_failing_sample_fails_alone_not_the_batch_it_joined(client, samples):
    """Three clients' requests are batched together; the engine fails on one sample of them. Its
    request gets 500 naming the sample; the other two get their (correct) targets."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    engine = client.app.state.service.engine
    real = engine.runner.targets
    plug, poison = "p" * 32, "b" * 32
    release, calls = threading.Event(), []

    def targets(inputs, k):  # the engine's forward, with a fault injected for one sample
        keys = [x.key for x in inputs]
        calls.append(keys)
        if plug in keys:
            release.wait(120)  # holds the engine's worker while the three requests queue up
        if poison in keys:
            raise RuntimeError("simulated device failure on one sample")
        return real(inputs, k)

    good = [wire(samples[0]), wire(samples[2])]
    alone = decode_response(post(client, good, template=None).content).targets
    engine.runner.targets = targets
    try:
        with ThreadPoolExecutor(4) as ex:
            held = ex.submit(post, client, [wire(samples[-1], key=plug)], template=None)
            deadline = time.monotonic() + 60
            while not calls:  # the worker is inside the plug's forward
                assert time.monotonic() < deadline
                time.sleep(0.01)
            reqs = [ex.submit(post, client, [w], template=None)
                    for w in (good[0], wire(samples[1], key=poison), good[1])]
            while engine.queued_samples < 3:  # all three wait for the worker: they will be one batch
                assert time.monotonic() < deadline
                time.sleep(0.01)
            release.set()
            r_held, (r0, r_bad, r1) = held.result(), [f.result() for f in reqs]
    finally:
        release.set()
        engine.runner.targets = real
    assert sorted(calls[1]) == sorted([good[0].key, poison, good[1].key]), calls  # batched together
    assert r_held.status_code == 200
    _expect(r_bad, 500, poison, "simulated device failure")
    for r, want in ((r0, alone[0]), (r1, alone[1])):
        assert r.status_code == 200, r.text
        got = decode_response(r.content).targets[0]
        assert got.key == want.key
        np.testing.assert_array_equal(got.text.ids, want.text.ids)
        np.testing.assert_allclose(got.text.logprobs, want.text.logprobs, atol=1e-4)


def test_caps_413(client, samples):
    _expect(post(client, [wire(samples[-1])] * (MAX_SAMPLES + 1)), 413, f"{MAX_SAMPLES + 1} samples",
            str(MAX_SAMPLES))
    _expect(client.post("/v1/targets", content=b"\0" * (MAX_BODY + 1)), 413, "exceeds the limit")
    # the server keeps serving after every rejection
    assert post(client, [wire(samples[0])]).status_code == 200


def test_auth(tiny_models, tmp_path):
    cfg = ServerConfig(model_dir=str(tiny_models["tiny-teacher"]), token="s3cret")
    with TestClient(create_app(cfg, exit_on_load_failure=False)) as c:
        _wait_ready(c)  # probes stay open
        assert c.get("/healthz").status_code == 200
        for path in ("/v1/info", "/metrics", "/v1/tokenizer"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert "bearer token" in r.json()["detail"]
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        # the scheme is case-insensitive (RFC 9110 11.1); the token is not
        for good in ("bearer s3cret", "BEARER s3cret", "Bearer  s3cret "):
            assert c.get("/v1/info", headers={"Authorization": good}).status_code == 200, good
        for bad in ("bearer S3CRET", "Basic s3cret", "s3cret", "bearer", "Bearers3cret"):
            assert c.get("/v1/info", headers={"Authorization": bad}).status_code == 401, bad
        assert c.post("/v1/targets", content=b"x").status_code == 401


def test_image_pixel_limit_is_configurable_and_in_info(tiny_models, samples):
    import io

    from PIL import Image

    from ckd_common.data import MAX_IMAGE_PIXELS

    cfg = ServerConfig(model_dir=str(tiny_models["tiny-teacher"]), max_image_pixels=64 * 64)
    with TestClient(create_app(cfg, exit_on_load_failure=False)) as c:
        _wait_ready(c)
        assert c.get("/v1/info").json()["max_image_pixels"] == 64 * 64
        img = samples[0]
        small, big = io.BytesIO(), io.BytesIO()
        Image.new("RGB", (64, 64)).save(small, format="PNG")
        Image.new("RGB", (65, 64)).save(big, format="PNG")
        assert post(c, [wire(img, image=small.getvalue())], template=None).status_code == 200
        _expect(post(c, [wire(img, image=big.getvalue())], template=None), 422, "65x64", str(64 * 64),
                "max_image_pixels")
    assert ServerConfig(model_dir=str(tiny_models["tiny-teacher"])).max_image_pixels == MAX_IMAGE_PIXELS
    with pytest.raises(Exception, match="max_image_pixels"):
        ServerConfig(model_dir=str(tiny_models["tiny-teacher"]), max_image_pixels=MAX_IMAGE_PIXELS + 1).validate()


class _Upload:
    """A request whose body arrives as ``chunks`` and then, unless ``complete``, never finishes
    (a stalled client) or ends in a disconnect."""

    headers: dict = {}

    def __init__(self, chunks, end: str) -> None:
        self.chunks, self.end = chunks, end

    async def stream(self):
        from starlette.requests import ClientDisconnect

        for c in self.chunks:
            yield c
        if self.end == "stall":
            await asyncio.Event().wait()
        elif self.end == "disconnect":
            raise ClientDisconnect()


def test_body_reads_are_bounded_by_the_deadline_and_disconnects_are_499(client):
    from teacher_server.errors import ClientClosed, RequestTimeout
    from teacher_server.service import TeacherService

    cfg = ServerConfig(model_dir="unused", body_timeout_s=0.2, min_upload_kib_s=1)
    svc = TeacherService(cfg, engine=GatedEngine(client.app.state.service.desc))
    assert asyncio.run(svc.read_body(_Upload([b"ab", b"cd"], "complete"))) == b"abcd"
    with pytest.raises(RequestTimeout, match="did not arrive in time: 3 bytes") as ei:
        asyncio.run(svc.read_body(_Upload([b"abc"], "stall")))
    assert ei.value.status == 408 and ei.value.headers["Connection"] == "close"
    with pytest.raises(ClientClosed) as ei:
        asyncio.run(svc.read_body(_Upload([b"abc"], "disconnect")))
    assert ei.value.status == 499
    assert "teacher_receiving_requests 0.0" in svc.metrics.render().decode()
    # the deadline: the allowance plus one second per min-rate KiB received
    assert cfg.body_deadline(100.0, 0) == 100.2 and cfg.body_deadline(100.0, 2048) == pytest.approx(102.2)


def test_serve_cli_is_derived_from_server_config_and_keeps_every_flag(tiny_models, tmp_path):
    from teacher_server.cli import _parser, config_from_args

    p = _parser()
    flags = {s for a in p._subparsers._group_actions[0].choices["serve"]._actions for s in a.option_strings}
    for old in ("--model", "--device", "--dtype", "--engine", "--host", "--port", "--port-file", "--config-out",
                "--token-file", "--max-batch-tokens", "--max-queue-tokens", "--max-inflight-requests",
                "--max-request-samples", "--max-request-tokens", "--max-body-mb", "--max-k", "--chunk-size",
                "--graceful-timeout", "--torch-threads", "--log-level"):
        assert old in flags, old
    assert "--token" not in flags  # a secret: only ever read from --token-file
    model = str(tiny_models["tiny-teacher"])
    cfg = config_from_args(p.parse_args(["serve", "--model", model, "--max-body-mb", "1.5", "--graceful-timeout", "7",
                                         "--max-connections", "9", "--header-timeout", "2.5", "--body-timeout", "4",
                                         "--min-upload-rate", "8", "--max-image-pixels", "4096"]))
    assert cfg == ServerConfig(model_dir=model, max_body_mb=1.5, graceful_timeout_s=7, max_connections=9,
                               header_timeout_s=2.5, body_timeout_s=4.0, min_upload_kib_s=8.0, max_image_pixels=4096)
    assert cfg.max_body_bytes == int(1.5 * 2 ** 20)
    assert config_from_args(p.parse_args(["serve", "--model", model])) == ServerConfig(model_dir=model)
    from ckd_common.config import to_argv  # a parent process (the cascade) can start a server from a config

    assert config_from_args(p.parse_args(["serve", *to_argv(cfg)])) == cfg
    assert to_argv(cfg)[:2] == ["--model", model] and "--max-body-mb" in to_argv(cfg)


def test_config_validated_at_once_and_saved_without_the_token(tiny_models, tmp_path):
    import json

    from ckd_common.config import ConfigError

    bad = ServerConfig(model_dir=str(tmp_path), device="tpu", engine="trt", max_k=0, port=70000,
                       token_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError) as ei:
        bad.validate()
    assert len(ei.value.problems) == 6, ei.value.problems
    cfg = ServerConfig(model_dir=str(tiny_models["tiny-teacher"]), port_file=str(tmp_path / "s.port"),
                       token="s3cret").validate()
    assert cfg.config_path == tmp_path / "s.config.json"
    cfg.save(cfg.config_path)
    assert json.loads(cfg.config_path.read_text())["token"] == "<redacted>"
    assert "s3cret" not in cfg.config_path.read_text() and "s3cret" not in cfg.describe() + repr(cfg)


# ---------------------------------------------------------------------------------------------
# back-pressure and engine failures, deterministic with a gated stub engine


class GatedEngine(Engine):
    """Holds every request until ``gate`` opens; reports a settable queue size."""

    name = "stub"

    def __init__(self, desc: EngineDescription, fail: bool = False) -> None:
        self.desc, self.fail = desc, fail
        self.gate: asyncio.Event | None = None
        self.waiting = 0
        self.fake_queue_tokens = 0

    def load(self):
        return self.desc

    @property
    def queued_tokens(self) -> int:
        return self.fake_queue_tokens

    @property
    def queued_samples(self) -> int:
        return self.waiting

    def tokens_per_second(self) -> float:
        return 1000.0

    async def targets(self, inputs, k, vocab_limit):
        from ckd_common.targets import SampleTargets, SparseTopK

        if self.fail:
            raise EngineFailure("simulated out-of-memory")
        self.waiting += 1
        await self.gate.wait()
        self.waiting -= 1
        def z(n):
            return SparseTopK(np.zeros((n, k), np.int64), np.zeros((n, k), np.float32), np.zeros(n, np.float32))
        return [SampleTargets(x.key, z(len(x.response_positions)), z(x.num_visual) if x.num_visual else None,
                              np.eye(x.num_visual, dtype=np.float32) if x.num_visual else None) for x in inputs]

    def close(self, drain: bool = True) -> None:
        pass


def _stub_app(client, **cfg):
    import httpx

    svc = client.app.state.service
    desc = replace(svc.desc, tokenizer=None)
    engine = GatedEngine(desc, fail=cfg.pop("fail", False))
    app = create_app(ServerConfig(model_dir="unused", **cfg), engine=engine, exit_on_load_failure=False)
    app.state.service.load()
    return engine, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://stub")


def test_backpressure_inflight_and_queue(client, samples):
    engine, ac = _stub_app(client, max_inflight_requests=3, max_queue_tokens=10_000)
    body = encode_request(TargetsRequest([wire(samples[0])], 8))

    async def flood():
        engine.gate = asyncio.Event()
        tasks = [asyncio.create_task(ac.post("/v1/targets", content=body)) for _ in range(3)]
        while engine.waiting < 3:
            await asyncio.sleep(0.01)
        over = await ac.post("/v1/targets", content=body)  # a 4th request while 3 are held
        engine.fake_queue_tokens = 10_000  # the queue is now full: new requests are turned away
        engine.gate.set()
        done = await asyncio.gather(*tasks)
        queued = await ac.post("/v1/targets", content=body)
        engine.fake_queue_tokens = 0
        after = await ac.post("/v1/targets", content=body)
        await ac.aclose()
        return over, done, queued, after

    over, done, queued, after = asyncio.run(flood())
    assert over.status_code == 503 and int(over.headers["retry-after"]) >= 1
    assert "in flight" in over.json()["detail"]
    assert [r.status_code for r in done] == [200] * 3
    assert queued.status_code == 503 and "queue" in queued.json()["detail"] and "retry-after" in queued.headers
    assert after.status_code == 200


def test_engine_failure_is_500_and_server_survives(client, samples):
    engine, ac = _stub_app(client, fail=True)
    body = encode_request(TargetsRequest([wire(samples[0])], 8))

    async def go():
        r1 = await ac.post("/v1/targets", content=body)
        r2 = await ac.get("/healthz")
        await ac.aclose()
        return r1, r2

    r1, r2 = asyncio.run(go())
    _expect(r1, 500, "simulated out-of-memory")
    assert r2.status_code == 200


def test_concurrent_requests_with_different_k_are_batched_correctly(client, samples):
    """Requests arriving together are batched across requests, but only with the same k and
    vocab_limit; every answer equals the one the request gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [(k, vl) for k in (4, 8) for vl in (None, 60)] * 2
    alone = {c: decode_response(post(client, [wire(s) for s in samples], k=c[0], vocab_limit=c[1]).content)
             for c in set(cases)}
    with ThreadPoolExecutor(len(cases)) as ex:
        rs = list(ex.map(lambda c: post(client, [wire(s) for s in samples], k=c[0], vocab_limit=c[1]), cases))
    for c, r in zip(cases, rs):
        assert r.status_code == 200, r.text
        for g, w in zip(decode_response(r.content).targets, alone[c].targets):
            assert g.text.k == c[0]
            np.testing.assert_array_equal(g.text.ids, w.text.ids)
            np.testing.assert_allclose(g.text.logprobs, w.text.logprobs, atol=1e-4)


def test_batch_selection_policy():
    """The oldest waiting sample anchors the batch; neighbours in length join within the padded budget."""
    from types import SimpleNamespace

    from teacher_server.engines.hf import HFEngine, _Item

    eng = HFEngine(SimpleNamespace(max_batch_tokens=100))
    lengths = [40, 10, 12, 45, 11, 30, 9]
    eng._pending = [_Item(SimpleNamespace(length=n), 8, 100, None, None, seq) for seq, n in enumerate(lengths)]
    eng._pending.append(_Item(SimpleNamespace(length=10), 4, 100, None, None, 99))  # other k: never mixed
    first = eng._take_batch()
    assert 0 in [it.seq for it in first]  # the oldest is always served
    assert sorted(it.inp.length for it in first) == [40, 45]  # closest length; adding 30 would exceed 100
    second = eng._take_batch()
    assert sorted(it.inp.length for it in second) == [9, 10, 11, 12]  # short ones together: little padding
    rest = [eng._take_batch() for _ in range(2)]
    assert [[it.inp.length for it in b] for b in rest] == [[30], [10]] and not eng._pending
    assert rest[1][0].k == 4
