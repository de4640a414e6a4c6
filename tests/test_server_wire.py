"""ckd_common.wire: request/response frames round-trip, and broken frames fail with a message."""
from __future__ import annotations

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
    ac = AutocorrFactor(rng.integers(-127, 128, (rank, nv)).astype(np.int8), rng.random(rank).astype(np.float32), 0.9)
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
    assert f.share == ac.share
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
