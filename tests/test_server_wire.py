"""ckd_common.wire: request/response frames round-trip, and broken frames fail with a message."""
from __future__ import annotations

import re

import numpy as np
import pytest

from ckd_common.targets import AutocorrFactor, SampleTargets, SparseTopK
from ckd_common.wire import (RESPONSE_MAGIC, TargetsRequest, TargetsResponse, WireError, WireSample, decode_frame,
                             decode_request, decode_response, encode_request, encode_response)


def _topk(rng, n, k, vocab):
    lp = np.sort(rng.normal(size=(n, k)).astype(np.float32), axis=1)[:, ::-1] - 3
    return SparseTopK(rng.integers(0, vocab, (n, k)), np.ascontiguousarray(lp), rng.random(n).astype(np.float32))


def test_request_roundtrip():
    rng = np.random.default_rng(0)
    ws = [WireSample("a" * 32, rng.integers(0, 500, 40), np.array([30, 31, 38]), 5, 16, b"\x89PNG...", "s0"),
          WireSample("b" * 32, rng.integers(0, 500, 7), np.array([2, 3]), id="s1"),
          WireSample("c" * 32, rng.integers(0, 500, 21), np.array([], dtype=np.int64), 0, 16, b"", "s2")]
    got = decode_request(encode_request(TargetsRequest(ws, 64, 496, "qwen2_base")))
    assert (got.k, got.vocab_limit, got.template) == (64, 496, "qwen2_base")
    for a, b in zip(ws, got.samples):
        for field in ("key", "id", "visual_start", "num_visual", "image"):
            assert getattr(a, field) == getattr(b, field), field
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.response_positions, b.response_positions)


def test_response_roundtrip_is_exact():
    rng = np.random.default_rng(1)
    k, nv, rank = 8, 6, 3
    ac = AutocorrFactor(rng.integers(-127, 128, (rank, nv)).astype(np.int8), rng.random(rank).astype(np.float32), 0.9,
                        0.0123)
    ts = [SampleTargets("a" * 32, _topk(rng, 5, k, 100), _topk(rng, nv, k, 100), ac),
          SampleTargets("b" * 32, _topk(rng, 3, k, 100)),
          SampleTargets("c" * 32, _topk(rng, 0, k, 100))]
    data = encode_response(TargetsResponse(ts, k, 100, "fp"))
    meta, arrays = decode_frame(data, RESPONSE_MAGIC)
    assert arrays["autocorr_codes"].size == rank * nv and arrays["autocorr_scale"].size == rank  # the factor only
    got = decode_response(data)
    assert got.teacher_fingerprint == "fp" and got.vocab_limit == 100
    for a, b in zip(ts, got.targets):
        assert a.key == b.key
        for pa, pb in ((a.text, b.text), (a.visual, b.visual)):
            assert (pa is None) == (pb is None)
            if pa is not None:
                np.testing.assert_array_equal(pa.ids, pb.ids)
                np.testing.assert_array_equal(pa.logprobs, pb.logprobs)
                np.testing.assert_array_equal(pa.tail, pb.tail)
    f = got.targets[0].autocorr
    np.testing.assert_array_equal(f.codes, ac.codes)
    np.testing.assert_array_equal(f.scale, ac.scale)
    assert f.share == ac.share and f.tail_trace == ac.tail_trace
    assert got.targets[1].autocorr is None


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:6], "shorter than"),
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:4] + (99).to_bytes(4, "little") + b[8:], "wire version 99"),
    (lambda b: b[:-8], "runs past the end"),
    (lambda b: b[:8] + (10 ** 9).to_bytes(4, "little") + b[12:], "header length"),
])
def test_broken_frames(mutate, message):
    body = encode_request(TargetsRequest([WireSample("a" * 32, np.arange(9), np.array([1]))], 4))
    with pytest.raises(WireError, match=message):
        decode_request(mutate(body))


def _frame(header_json: bytes, payload: bytes = b"") -> bytes:
    """A request frame around a hand-written header (what a broken or hostile client sends)."""
    import struct

    from ckd_common.wire import WIRE_VERSION

    header_json += b" " * ((-(12 + len(header_json))) % 8)
    return struct.pack("<4sII", b"CKDQ", WIRE_VERSION, len(header_json)) + header_json + payload


def _header(arrays, samples=None) -> bytes:
    import json

    samples = samples if samples is not None else [{"key": "a" * 32, "length": 4, "num_response": 1,
                                                    "image_bytes": -1}]
    return json.dumps({"meta": {"k": 4, "samples": samples}, "arrays": arrays}).encode()


def _arrays(ids_dtype="<i4", ids_shape=(4,), img_dtype="|u1"):
    return [{"name": "input_ids", "dtype": ids_dtype, "shape": list(ids_shape)},
            {"name": "response_positions", "dtype": "<i4", "shape": [1]},
            {"name": "images", "dtype": img_dtype, "shape": [0]}]


@pytest.mark.parametrize("header, message", [
    (_header([{"name": "x", "dtype": "<i4", "shape": [2 ** 32, 2 ** 32]}]), "shape"),
    (_header([{"name": "x", "dtype": "<i4", "shape": [1 << 16, 1 << 16]}]), "runs past the end"),
    (_header([{"name": "x", "dtype": "<i4", "shape": [10 ** 30]}]), "shape"),
    (_header([{"name": "x", "dtype": "<i4", "shape": [0, 10 ** 30]}]), "shape"),
    (_header([{"name": "x", "dtype": "<i4", "shape": [1.5]}]), "shape"),
    (_header([{"name": "x", "dtype": "<i4", "shape": [1] * 40}]), "shape"),
    (_header([{"name": "x", "dtype": "|O", "shape": [1]}]), "not allowed"),
    (_header([{"name": "x", "dtype": "<U8", "shape": [1]}]), "not allowed"),
    (_header([{"name": "x", "dtype": ">i4", "shape": [1]}]), "not allowed"),
    (_header([{"name": "x", "dtype": "(2,)<i4", "shape": [1]}]), "not allowed"),
    (_header([{"name": "x", "dtype": "no such dtype", "shape": [1]}]), "not a numpy dtype"),
    (_header(5), "'arrays' (a list)"),
    (_header(["x"]), "not an object"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"meta": {"k": ' + b"9" * 5000 + b"}}", "not JSON"),
    (_header(_arrays(ids_shape=(4, 2))), "must be 1-D integers"),
    (_header(_arrays(ids_dtype="<f4")), "must be 1-D integers"),
    (_header(_arrays(img_dtype="<i2")), "must be 1-D bytes"),
    (_header(_arrays(), [{"key": "a", "length": 4.0, "num_response": 1, "image_bytes": -1}]), "must be an integer"),
    (_header(_arrays(), [{"key": "a", "length": True, "num_response": 1, "image_bytes": -1}]), "must be an integer"),
    (_header(_arrays(), "all"), "list of objects"),
])
def test_hostile_headers_are_wire_errors(header, message):
    """Shapes whose product overflows int64, 100k-deep JSON, non-numeric dtypes, 2-D or float ids:
    each is a WireError (-> 400) with a one-line reason, never an OverflowError/RecursionError/cast."""
    with pytest.raises(WireError, match=re.escape(message)) as ei:
        decode_request(_frame(header, b"\0" * 64))
    assert "\n" not in str(ei.value) and len(str(ei.value)) < 400


def test_float_and_2d_ids_are_refused_not_cast():
    from ckd_common.wire import REQUEST_MAGIC, encode_frame

    ids = np.random.default_rng(2).integers(0, 500, 8)
    good = encode_request(TargetsRequest([WireSample("a" * 32, ids, np.array([1, 2]))], 4))
    assert decode_request(good).samples[0].input_ids.tolist() == ids.tolist()
    meta = {"k": 4, "samples": [{"key": "a" * 32, "length": 8, "num_response": 2, "image_bytes": -1}]}
    for bad in (ids.astype(np.float32) + 0.5, ids.reshape(8, 1).astype("<i4")):  # 1.5 must not become 1
        frame = encode_frame(REQUEST_MAGIC, meta, {"input_ids": bad, "response_positions": np.array([1, 2], "<i4"),
                                                   "images": np.zeros(0, np.uint8)})
        with pytest.raises(WireError, match="'input_ids' must be 1-D integers"):
            decode_request(frame)
