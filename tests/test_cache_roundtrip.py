"""logit_cache: round trip, plain-zarr reading by FORMAT.md, fsspec stores, batch/pickle access."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import zarr

from ckd_common.targets import AutocorrFactor, SampleTargets, SparseTopK, dense_autocorr
from logit_cache import CacheMeta, CacheReader, open_for_training, open_group
from logit_cache.maintenance import compact, info, verify
from logit_cache.synthetic import make_sample, random_key

VOCAB, K, NV = 1000, 8, 4


def meta(enc="f16", **kw):
    d = dict(teacher_fingerprint="teach", tokenizer_hash="tok", template="qwen2_base", dataset_fingerprint="ds0123456789abcdef",
             vocab_size=VOCAB, k=K, vision_strategy="full", num_visual_tokens=NV, value_encoding=enc)
    d.update(kw)
    return CacheMeta(**d)


def fill(root, n, enc="f16", segment_rows=16, salt="", **wkw):
    g = open_group(root, meta=meta(enc), create=True)
    samples = [make_sample(i, VOCAB, K, NV, salt=salt) for i in range(n)]
    with g.writer(segment_rows=segment_rows, **wkw) as w:
        for s in samples:
            w.add(s)
    return g, samples


def assert_close(a: SampleTargets, b: SampleTargets, enc: str):
    assert a.key == b.key
    for x, y in ((a.text, b.text), (a.visual, b.visual)):
        if x is None:
            assert y is None
            continue
        np.testing.assert_array_equal(x.ids, y.ids)                       # ids exact
        assert np.array_equal(np.isneginf(x.logprobs), np.isneginf(y.logprobs))
        fin = np.isfinite(x.logprobs)
        # stated encoding error, in probability space (what the loss uses)
        tol = 2e-3 if enc == "f16" else 2e-2
        np.testing.assert_allclose(np.exp(y.logprobs[fin]), np.exp(x.logprobs[fin]), atol=tol)
        np.testing.assert_allclose(y.tail, x.tail, atol=1e-3)
        assert y.logprobs.dtype == np.float32 and y.tail.dtype == np.float32
    assert_autocorr_stored(a.autocorr, b.autocorr)


def assert_autocorr_stored(written, read):
    """A read-back autocorrelation is a factor whose stored share is its real error."""
    if written is None:
        assert read is None
        return
    assert isinstance(read, AutocorrFactor)
    if isinstance(written, AutocorrFactor):  # factors are stored verbatim
        np.testing.assert_array_equal(read.codes, written.codes)
        np.testing.assert_array_equal(read.scale, written.scale)
        assert read.share == np.float32(written.share)
        return
    r = dense_autocorr(written)
    r = r / np.linalg.norm(r)
    err2 = float(np.linalg.norm(r - read.dense()) ** 2)
    assert abs(err2 - (1 - read.share)) < 1e-5, (err2, read.share)
    assert read.share > 0.999
    np.testing.assert_array_equal(read.dense(), read.dense().T)


@pytest.mark.parametrize("enc", ["f16", "q8"])
def test_round_trip(tmp_path, enc):
    g, samples = fill(tmp_path / "cache", 40, enc)
    r = CacheReader(g)
    assert len(r) == 40 and r.duplicates == 0
    assert {s.key for s in samples} == g.committed_keys() == set(r.keys())
    for s in samples:
        assert_close(s, r.get(s.key), enc)
    assert any(s.visual is None for s in samples) and any(s.text.num_positions == 0 for s in samples)
    got = r.get_many([s.key for s in samples[::-1]])
    for s, t in zip(samples[::-1], got):
        assert_close(s, t, enc)
    seq = {t.key: t for t in r.iter_samples()}
    assert set(seq) == {s.key for s in samples}
    assert verify(g, progress=False)["samples"] == 40
    rep = info(g)
    assert rep["format_version"] == 3 and rep["image_samples"] == sum(s.visual is not None for s in samples)
    assert rep["bytes_per_image_sample"] > 0 and rep["stored_bytes_by_array"]["autocorr"] > 0
    fac = rep["autocorr_factor"]
    assert 0 < fac["rank_max"] <= NV and 0.999 < fac["share_min"] <= 1 and fac["worst_rel_loss_error_bound"] < 0.07


def test_padding_and_exact_ids_wide_vocab(tmp_path):
    """k larger than the vocabulary: padded entries (id 0, -inf) survive; uint32 ids for a big vocab."""
    m = meta("q8", vocab_size=200_000, k=6, num_visual_tokens=0, target_kinds=["text"])
    g = open_group(tmp_path, meta=m, create=True)
    ids = np.array([[199_999, 150_000, 3, 0, 0, 0]], dtype=np.int64)
    lp = np.array([[-0.1, -2.5, -7.0, -np.inf, -np.inf, -np.inf]], dtype=np.float32)
    s = SampleTargets(key=random_key(1), text=SparseTopK(ids, lp, np.array([0.0], np.float32)))
    with g.writer() as w:
        w.add(s)
    t = CacheReader(g).get(s.key)
    np.testing.assert_array_equal(t.text.ids, ids)
    assert np.isneginf(t.text.logprobs[0, 3:]).all()
    np.testing.assert_allclose(t.text.logprobs[0, :3], lp[0, :3], atol=0.05)
    assert t.visual is None and t.autocorr is None


@pytest.mark.parametrize("vocab", [70_000, 151_936, 1 << 20, 1 << 24])   # 1, 2, 4 and 8 high bits
@pytest.mark.parametrize("k", [1, 3, 8, 64])
def test_split_ids_fast_packing_equals_the_bits(vocab, k):
    """split_ids packs whole ids per byte where the bits allow; the bytes are those of the plain
    bit-by-bit packing (encoding._pack_bits), and join_ids inverts both, on random ids."""
    from logit_cache.encoding import _pack_bits, ids_hi_bits, join_ids, split_ids

    hb = ids_hi_bits(vocab)
    ids = np.random.default_rng(k).integers(0, vocab, (37, k))
    lo, hi = split_ids(ids, hb)
    np.testing.assert_array_equal(hi, _pack_bits((ids >> 16).astype(np.uint8), hb))
    np.testing.assert_array_equal(join_ids(lo, hi, hb), ids)


@pytest.mark.parametrize("enc, vocab", [("f16", VOCAB), ("q8", VOCAB), ("q8", 151_936)])
def test_plain_zarr_read_follows_format_md(tmp_path, enc, vocab):
    """Read a sample with zarr+numpy only, exactly as FORMAT.md §3.3 says, and compare."""
    root = tmp_path / "cache"
    g = open_group(root, meta=meta(enc, vocab_size=vocab), create=True)
    samples = [make_sample(i, vocab, K, NV) for i in range(20)]
    with g.writer(segment_rows=8) as w:
        for s in samples:
            w.add(s)
    r = CacheReader(g)
    target = samples[13]
    seg_id, row = r.locate(target.key)
    k, vocab_size, i = K, vocab, row
    # -- plain zarr from here on (the FORMAT.md snippet, for text and visual) --------------------
    grp = zarr.open_group(f"{root}/qwen2_base__ds0123456789abcd", mode="r")
    assert grp.attrs["logit_cache"]["format_version"] == 3
    seg = zarr.open_group(f"{root}/qwen2_base__ds0123456789abcd/segments/{seg_id}", mode="r")
    assert bytes(seg["keys"][i]).hex() == target.key

    def topk(kind):
        o = seg[f"{kind}_offsets"][i:i + 2]
        ids = seg[f"{kind}_ids"][o[0]:o[1]].astype("int64")
        if f"{kind}_ids_hi" in seg:
            h = int(np.ceil(np.log2(vocab_size))) - 16
            bits = np.unpackbits(seg[f"{kind}_ids_hi"][o[0]:o[1]], axis=1, count=k * h).reshape(len(ids), k, h)
            ids |= (bits.astype("int64") @ (1 << np.arange(h - 1, -1, -1))) << 16
        tail = seg[f"{kind}_tail"][o[0]:o[1]].astype("float32")
        lp = seg[f"{kind}_lp"][o[0]:o[1]]
        if enc == "q8":
            c = np.cumsum(lp, axis=1, dtype=np.uint8)
            lp = seg[f"{kind}_lp0"][o[0]:o[1]].astype("float32")[:, None] - 24 * (c / 127) ** 2
            lp[c == 255] = -np.inf
        return ids, lp.astype("float32"), tail

    ids, lp, tail = topk("text")
    vids, vlp, vtail = topk("visual")
    a = seg["autocorr_offsets"][i:i + 2]
    U = (seg["autocorr"][a[0]:a[1]].astype("float32") * seg["autocorr_scale"][a[0]:a[1]][:, None]).T
    R = U @ U.T
    share = float(seg["autocorr_share"][i])
    # -- compare with the project reader and with what was written -------------------------------
    assert ("text_ids_hi" in seg) == (vocab > 65536)
    t = r.get(target.key)
    np.testing.assert_array_equal(ids, t.text.ids)
    np.testing.assert_array_equal(ids, target.text.ids)
    np.testing.assert_allclose(lp, t.text.logprobs, rtol=1e-6)
    np.testing.assert_array_equal(tail, t.text.tail)
    np.testing.assert_array_equal(vids, t.visual.ids)
    np.testing.assert_array_equal(vids, target.visual.ids)
    np.testing.assert_allclose(vlp, t.visual.logprobs, rtol=1e-6)
    np.testing.assert_array_equal(R, t.autocorr.dense())
    assert share == t.autocorr.share
    want = target.autocorr / np.linalg.norm(target.autocorr)
    assert abs(np.linalg.norm(want - R) ** 2 - (1 - share)) < 1e-5


def test_fsspec_memory_store_and_sharding(tmp_path):
    root = "memory://cachetest/3b"
    g, samples = fill(root, 25, "q8", segment_rows=10, chunk_rows=4, shard_rows=16)
    r = open_for_training(root, {"dataset_fingerprint": "ds0123456789abcdef", "template": "qwen2_base", "k": K})
    assert len(r) == 25
    for s in samples:
        assert_close(s, r[s.key], "q8")
    assert verify(g, progress=False)["ok"]
    assert info(g)["bytes_per_position"] > 0


def test_file_url_store(tmp_path):
    root = f"file://{tmp_path}/c"
    g, samples = fill(root, 10, "f16")
    assert len(CacheReader(g)) == 10


def test_reader_pickles(tmp_path):
    g, samples = fill(tmp_path, 12, "q8")
    r = pickle.loads(pickle.dumps(CacheReader(g)))
    assert_close(samples[1], r.get(samples[1].key), "q8")


def test_reader_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    g, samples = fill(tmp_path, 30, "f16")
    r = CacheReader(g)
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(r.get, [s.key for s in samples] * 3))
    for s, t in zip(samples * 3, got):
        assert_close(s, t, "f16")


def test_compact_merges_atomically(tmp_path):
    g, samples = fill(tmp_path, 30, "q8", segment_rows=4)
    assert len(g.committed()) == 8
    new = compact(g, target_rows=100, progress=False)
    assert len(new) == 1 and [m.segment for m in g.committed()] == new
    assert g.committed()[0].replaces and not g.replaced_segments()
    r = CacheReader(g)
    assert len(r) == 30 and r.duplicates == 0
    for s in samples:
        assert_close(s, r.get(s.key), "q8")
    assert verify(g, progress=False)["samples"] == 30


_READER = None


def _read_ids(key):
    return _READER.get(key).text.ids.tolist()


def _read_ids_with(args):
    reader, key = args
    return reader.get(key).text.ids.tolist()


@pytest.mark.integration
@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_reader_in_loader_worker_processes(tmp_path, start):
    """A reader built (and used) in the parent works in forked and spawned data-loader workers."""
    import multiprocessing as mp
    global _READER
    g, samples = fill(tmp_path, 12, "q8")
    _READER = CacheReader(g)
    _READER.get(samples[0].key)  # zarr's event loop is running in the parent before the fork
    keys = [s.key for s in samples]
    ctx = mp.get_context(start)
    with ctx.Pool(2) as pool:
        if start == "fork":
            got = pool.map(_read_ids, keys)
        else:
            got = pool.map(_read_ids_with, [(_READER, k) for k in keys])
    for s, ids in zip(samples, got):
        assert ids == s.text.ids.tolist()


def test_writer_rejects_bad_samples_with_clear_errors(tmp_path):
    g = open_group(tmp_path, meta=meta(), create=True)
    s = make_sample(0)
    w = g.writer()
    with pytest.raises(ValueError, match="hex"):
        w.add(SampleTargets(key="not-a-key", text=s.text))
    bad = SparseTopK(s.text.ids[:, :4], s.text.logprobs[:, :4], s.text.tail)
    with pytest.raises(ValueError, match="k=4"):
        w.add(SampleTargets(key=s.key, text=bad))
    big = SparseTopK(np.full((1, K), VOCAB, np.int64), np.full((1, K), -3.0, np.float32), np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="vocab_size"):
        w.add(SampleTargets(key=s.key, text=big))
    logits = SparseTopK(np.zeros((1, K), np.int64), np.full((1, K), 5.0, np.float32), np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="log-softmax"):
        w.add(SampleTargets(key=s.key, text=logits))
    w.add(s)
    with pytest.raises(ValueError, match="twice"):
        w.add(s)
    w.abort()
    assert g.committed() == [] and g.uncommitted_segments() == []
