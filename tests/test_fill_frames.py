"""The fill's fast paths against the plain ones, on random inputs: a response frame (wire v2)
decoded straight into format-2 segment arrays (deploy.fill_frames.decode_block) equals
decode_response + encode_record + concat_records, bit for bit; a writer fed those arrays
(CacheWriter.add_encoded) stores exactly what CacheWriter.add stores; blocks joined
(concat_blocks) and samples taken from a segment (SegmentData.take, compaction) equal
concat_records of their records. Bad answers are refused naming the sample."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ckd_common.kd.relation import factor_dense
from ckd_common.targets import AutocorrFactor, SampleTargets, SparseTopK
from ckd_common.wire import TargetsResponse, decode_response, encode_response
from deploy.fill_frames import FrameError, decode_block
from logit_cache import CacheMeta, CacheReader, open_group
from logit_cache.layout import concat_blocks, concat_records, encode_record
from logit_cache.synthetic import make_sample

NV = 4


def _meta(vocab=1000, k=8, encoding="q8", kinds=("text", "visual", "autocorr")) -> CacheMeta:
    return CacheMeta(teacher_fingerprint="t", tokenizer_hash="h", template="pretrain", dataset_fingerprint="d",
                     vision_strategy="full", num_visual_tokens=NV, vocab_size=vocab, k=k, value_encoding=encoding,
                     target_kinds=list(kinds))


def _request(targets: list[SampleTargets]) -> list[SimpleNamespace]:
    """The prepared samples a response answers (what decode_block checks it against)."""
    return [SimpleNamespace(key=t.key, id=f"s{i}", response_positions=np.arange(t.text.num_positions),
                            num_visual=t.visual.num_positions if t.visual is not None else 0)
            for i, t in enumerate(targets)]


def _samples(n, vocab=1000, k=8, salt="") -> list[SampleTargets]:
    """Teacher-like samples with factored autocorrelations (what servers send), one without text
    positions and one image whose factor has rank 0 (an all-zero R)."""
    out = [make_sample(i, vocab=vocab, k=k, nv=NV, salt=salt) for i in range(n)]
    if vocab > 1 << 16:  # a bijection of the ids: Zipf-like draws seldom reach the ids above 65,535
        out = [SampleTargets(t.key, *[None if p is None else SparseTopK((p.ids * 7919 + 12345) % vocab, p.logprobs,
                                                                        p.tail) for p in (t.text, t.visual)],
                             t.autocorr) for t in out]
    out = [SampleTargets(t.key, t.text, t.visual, factor_dense(t.autocorr)) if t.autocorr is not None else t
           for t in out]
    out[0] = SampleTargets(out[0].key, SparseTopK(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32),
                                                  np.zeros(0, np.float32)), out[0].visual, out[0].autocorr)
    if n > 4:
        out[4] = SampleTargets(out[4].key, out[4].text, out[4].visual,
                               AutocorrFactor(np.zeros((0, NV), np.int8), np.zeros(0, np.float32), 1.0, 0.0))
    return out


def encode_samples(targets: list[SampleTargets], meta: CacheMeta) -> dict[str, np.ndarray]:
    """The plain path: each sample's record (encode_record), joined (concat_records)."""
    return concat_records([encode_record(t, meta) for t in targets], meta)


def _assert_same_arrays(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("encoding", ["q8", "f16"])
@pytest.mark.parametrize("vocab", [1000, 70_000, 151_936])  # 0, 1 and 2 high bits per id
def test_decode_block_equals_the_plain_path(encoding, vocab):
    k = 8
    targets = _samples(7, vocab=vocab, k=k, salt=str(vocab))
    assert any(t.visual is None for t in targets) and any(t.visual is not None for t in targets)
    assert any(t.autocorr is not None and t.autocorr.rank > 1 for t in targets)
    if vocab > 65_536:
        assert max(int(t.text.ids.max(initial=0)) for t in targets) >= 65_536 or \
            max(int(t.visual.ids.max()) for t in targets if t.visual is not None) >= 65_536
    meta = _meta(vocab=vocab, k=k, encoding=encoding)
    frame = encode_response(TargetsResponse(targets, k, vocab))
    block = decode_block(frame, _request(targets), meta, "http://u")
    _assert_same_arrays(block, encode_samples(decode_response(frame).targets, meta))


def test_decode_block_drops_factors_a_group_does_not_store():
    """A group without the autocorrelation kind stores none, as encode_record drops it."""
    meta = _meta(kinds=("text", "visual"))
    targets = _samples(6)
    frame = encode_response(TargetsResponse(targets, 8, 1000))
    block = decode_block(frame, _request(targets), meta, "u")
    _assert_same_arrays(block, encode_samples(decode_response(frame).targets, meta))
    assert len(block["autocorr"]) == 0 and not block["autocorr_share"].any()


def test_concat_blocks_equals_encoding_everything_at_once():
    meta = _meta()
    targets = _samples(9)
    blocks = [encode_samples(targets[i:i + 3], meta) for i in range(0, 9, 3)] + [encode_samples([], meta)]
    _assert_same_arrays(concat_blocks(blocks, meta), encode_samples(targets, meta))
    text_only = [t for t in targets if t.visual is None]
    _assert_same_arrays(concat_blocks([encode_samples(text_only, meta), encode_samples(targets[:3], meta)], meta),
                        encode_samples(text_only + targets[:3], meta))


@pytest.mark.parametrize("vocab", [1000, 151_936])
def test_take_equals_the_records_of_those_rows(tmp_path, vocab):
    """Compaction's byte move (SegmentData.take: one gather per array) against the plain path
    (SegmentData.record per sample, concat_records), on random row selections."""
    meta = _meta(vocab=vocab)
    targets = _samples(11, vocab=vocab)
    group = open_group(tmp_path / "c", meta=meta, create=True)
    with group.writer() as w:
        for t in targets:
            w.add(t)
    (m,) = group.committed()
    data = group.load_segment(m.segment)
    rng = np.random.default_rng(0)
    for rows in ([], [3], list(range(11)), sorted(rng.choice(11, 6, replace=False).tolist()), [9, 0, 4]):
        _assert_same_arrays(data.take(rows), concat_records([data.record(r) for r in rows], meta))


def test_add_encoded_stores_what_add_stores(tmp_path):
    meta = _meta()
    targets = _samples(10)
    frame = encode_response(TargetsResponse(targets, 8, 1000))
    plain = open_group(tmp_path / "plain", meta=meta, create=True)
    fast = open_group(tmp_path / "fast", meta=meta, create=True)
    with plain.writer() as w:
        for t in targets:
            w.add(t)
    with fast.writer() as w:  # two responses' worth
        for part in (targets[:4], targets[4:]):
            w.add_encoded(decode_block(encode_response(TargetsResponse(part, 8, 1000)), _request(part), meta, "u"))
        with pytest.raises(ValueError, match="added twice"):
            w.add_encoded(decode_block(frame, _request(targets), meta, "u"))
        with pytest.raises(ValueError, match="must hold exactly the arrays"):
            w.add_encoded({"keys": np.zeros((0, 16), np.uint8)})
    (p,), (f,) = plain.committed(), fast.committed()
    _assert_same_arrays(plain.load_segment(p.segment).arrays, fast.load_segment(f.segment).arrays)
    assert p.arrays == f.arrays  # same checksums
    a, b = CacheReader(plain), CacheReader(fast)
    for t in targets:
        x, y = a.get(t.key), b.get(t.key)
        np.testing.assert_array_equal(x.text.ids, y.text.ids)
        np.testing.assert_array_equal(x.text.logprobs, y.text.logprobs)
        if t.autocorr is not None:
            np.testing.assert_array_equal(x.autocorr.codes, y.autocorr.codes)
            np.testing.assert_array_equal(x.autocorr.scale, y.autocorr.scale)
            assert x.autocorr.share == y.autocorr.share
            assert x.autocorr.tail_trace == y.autocorr.tail_trace


def test_a_frame_without_tail_traces_stores_them_as_unknown(tmp_path):
    """A server that predates the tail trace (no ``autocorr_tail`` in the header): the factor is
    stored with NaN, read back as tail_trace None (the uncorrected relation term)."""
    import json

    from ckd_common.wire import RESPONSE_MAGIC, decode_frame, encode_frame

    meta = _meta()
    targets = _samples(6)
    assert any(t.autocorr is not None and t.autocorr.tail_trace is not None for t in targets)
    head, arrays = decode_frame(encode_response(TargetsResponse(targets, 8, 1000)), RESPONSE_MAGIC)
    head = json.loads(json.dumps(head))
    for m in head["samples"]:
        m.pop("autocorr_tail", None)
    old = encode_frame(RESPONSE_MAGIC, head, dict(arrays))
    assert all(t.autocorr is None or t.autocorr.tail_trace is None for t in decode_response(old).targets)
    group = open_group(tmp_path / "g", meta=meta, create=True)
    with group.writer() as w:
        w.add_encoded(decode_block(old, _request(targets), meta, "u"))
    r = CacheReader(group)
    with_factor = [t for t in targets if t.autocorr is not None]
    assert with_factor and all(r.get(t.key).autocorr.tail_trace is None for t in with_factor)
    fresh = open_group(tmp_path / "h", meta=meta, create=True)  # the same targets with the header field
    with fresh.writer() as w:
        w.add_encoded(decode_block(encode_response(TargetsResponse(targets, 8, 1000)), _request(targets), meta, "u"))
    r = CacheReader(fresh)
    for t in with_factor:
        got = r.get(t.key).autocorr.tail_trace
        assert got == t.autocorr.tail_trace or abs(got - t.autocorr.tail_trace) < 1e-6


def test_a_writer_commits_segments_by_rows_and_bytes(tmp_path):
    meta = _meta()
    targets = _samples(10)
    block = encode_samples(targets, meta)
    group = open_group(tmp_path / "c", meta=meta, create=True)
    per_sample = sum(a.nbytes for a in block.values()) / 10
    w = group.writer(segment_rows=4, segment_bytes=1 << 40)
    for t in targets:
        w.add(t)
    w.commit()
    assert [m.num_samples for m in w.committed] == [4, 4, 2]
    g2 = open_group(tmp_path / "d", meta=meta, create=True)
    w = g2.writer(segment_rows=1 << 20, segment_bytes=int(per_sample * 3))
    for i in range(0, 10, 2):
        w.add_encoded(encode_samples(targets[i:i + 2], meta))
    w.commit()
    assert sum(m.num_samples for m in w.committed) == 10 and len(w.committed) >= 3


def _bad(targets, i, **change):
    t = targets[i]
    text = SparseTopK(**{**t.text.__dict__, **change}) if change else t.text
    return targets[:i] + [SampleTargets(t.key, text, t.visual, t.autocorr)] + targets[i + 1:]


@pytest.mark.parametrize("what, change, message", [
    ("id beyond the vocabulary", "ids", "text ids outside \\[0, vocab_size=1000\\)"),
    ("positive log-prob", "logprobs", "log-probs must be <= 0"),
    ("NaN log-prob", "nan", "log-probs must be <= 0 and not NaN"),
    ("tail above 1", "tail", "tail masses must lie in \\[0, 1\\]"),
])
def test_invalid_values_are_refused_naming_the_sample(what, change, message):
    targets = _samples(5)
    t = targets[3].text
    ids, lp, tail = t.ids.copy(), t.logprobs.copy(), t.tail.copy()
    if change == "ids":
        ids[1, 2] = 1000
    elif change == "logprobs":
        lp[0, 0] = 0.5
    elif change == "nan":
        lp[2, 1] = np.nan
    else:
        tail[0] = 1.5
    bad = _bad(targets, 3, ids=ids, logprobs=lp, tail=tail)
    frame = encode_response(TargetsResponse(bad, 8, 1000))
    with pytest.raises(FrameError, match=f"sample 's3'.*{message}"):
        decode_block(frame, _request(bad), _meta(), "http://u")


def test_answers_that_do_not_match_the_request_are_refused():
    targets = _samples(4)
    meta = _meta()
    frame = encode_response(TargetsResponse(targets, 8, 1000))
    req = _request(targets)
    with pytest.raises(FrameError, match="answered 4 samples for a request of 3"):
        decode_block(frame, req[:3], meta, "u")
    req[1].response_positions = np.arange(99)
    with pytest.raises(FrameError, match="answered sample 's1' inconsistently"):
        decode_block(frame, req, meta, "u")
    with pytest.raises(FrameError, match="k 8/16"):
        decode_block(frame, _request(targets), _meta(k=16), "u")
    img = [t for t in targets if t.visual is not None]
    no_ac = [SampleTargets(t.key, t.text, t.visual, None) for t in img]
    with pytest.raises(FrameError, match="lacks a visual autocorrelation"):
        decode_block(encode_response(TargetsResponse(no_ac, 8, 1000)), _request(no_ac), meta, "u")
    # a teacher without autocorrelation (e.g. vllm) fills a group that does not expect one
    block = decode_block(encode_response(TargetsResponse(no_ac, 8, 1000)), _request(no_ac),
                         _meta(kinds=("text", "visual")), "u")
    assert len(block["autocorr"]) == 0 and int(block["visual_offsets"][-1]) == NV * len(no_ac)
    with pytest.raises(FrameError, match="undecodable"):
        decode_block(frame[:40], req, meta, "u")


@pytest.mark.parametrize("change, message", [
    ("code", "autocorr codes must lie in \\[-127, 127\\]"),
    ("scale", "autocorr scales must be finite and >= 0"),
    ("share", "a share outside \\[0, 1\\]"),
])
def test_invalid_factors_are_refused(change, message):
    targets = _samples(4)
    i = next(j for j, t in enumerate(targets) if t.autocorr is not None and t.autocorr.rank > 0 and j > 0)
    f = targets[i].autocorr
    codes, scale, share = f.codes.copy(), f.scale.copy(), f.share
    if change == "code":
        codes[-1, 0] = -128
    elif change == "scale":
        scale[0] = np.nan
    else:
        share = 1.5
    bad = targets[:i] + [SampleTargets(targets[i].key, targets[i].text, targets[i].visual,
                                       AutocorrFactor(codes, scale, share))] + targets[i + 1:]
    frame = encode_response(TargetsResponse(bad, 8, 1000))
    with pytest.raises(FrameError, match=message if change == "share" else f"sample 's{i}'.*{message}"):
        decode_block(frame, _request(bad), _meta(), "http://u")


def test_compact_moves_stored_bytes_within_a_memory_cap(tmp_path):
    """What the cascade runs after every fill: small segments merged without decoding, each merged
    segment within ``target_bytes``; every sample reads back unchanged."""
    from logit_cache.maintenance import _encoded_bytes, compact, verify

    meta = _meta()
    targets = _samples(12)
    group = open_group(tmp_path / "c", meta=meta, create=True)
    for i in range(0, 12, 2):
        with group.writer() as w:
            w.add_encoded(encode_samples(targets[i:i + 2], meta))
    before = {t.key: CacheReader(group).get(t.key) for t in targets}
    cap = int(2.5 * max(_encoded_bytes(m) for m in group.committed()))
    new = compact(group, target_rows=100, progress=False, target_bytes=cap)
    assert len(new) >= 2 and len(group.committed()) < 6
    assert all(_encoded_bytes(m) <= cap for m in group.committed())
    rep = verify(group, progress=False)
    assert rep["ok"] and rep["samples"] == rep["unique_keys"] == 12 and rep["duplicates"] == 0
    reader = CacheReader(group)
    for key, want in before.items():
        got = reader.get(key)
        np.testing.assert_array_equal(got.text.ids, want.text.ids)
        np.testing.assert_array_equal(got.text.logprobs, want.text.logprobs)
        assert (got.autocorr is None) == (want.autocorr is None)
        if want.autocorr is not None:
            np.testing.assert_array_equal(got.autocorr.codes, want.autocorr.codes)
            np.testing.assert_array_equal(got.autocorr.scale, want.autocorr.scale)
            assert got.autocorr.share == want.autocorr.share
