"""Benchmark of logit_cache I/O and encoding error on teacher-like distributions.

Data (logit_cache.synthetic.teacher_like_topk, full softmax over a Qwen2-sized vocabulary, exact
top-k and tail): logits = Zipf(s) unigram prior over ids (low ids frequent, as in BPE vocabularies)
+ N(0, 1.5) context noise + a boost N(mu, 2.5) on 32 context candidates drawn from the prior,
times a log-normal inverse temperature. Two profiles, half of the positions each:
  peaked:      s=1.0, mu=7  (top-1 mostly > 0.9, tiny tails)
  heavy-tail:  s=0.6, mu=6  (median top-1 ~0.35, median tail ~0.3, ids spread over the vocab)
Text samples have 16-96 response positions; one in three samples has an image with NV visual
positions and an NV x NV autocorrelation.

Measured side by side in one run: value encodings f16 vs q8, chunk rows, sharding. KL error is the
mean over positions of KL(P || P^) on the (k+1)-bucket coarsening (top-k probabilities + tail),
both renormalised, P from float32, P^ from what the reader returns. Bytes per position count the
stored position arrays (ids, values, tails, offsets, keys) — autocorrelation bytes are reported
separately.

    .venv/bin/python bench/cache_io.py [--samples 300] [--vocab 151936] [--k 64]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckd_common.targets import SampleTargets, SparseTopK  # noqa: E402
from ckd_common.templates import QWEN2_BASE  # noqa: E402
from logit_cache import TARGET_KINDS, CacheMeta, CacheReader, open_group  # noqa: E402
from logit_cache.synthetic import random_autocorr, random_key, teacher_like_topk  # noqa: E402

PROFILES = {"peaked": dict(zipf_s=1.0, boost_mean=7.0), "heavy": dict(zipf_s=0.6, boost_mean=6.0)}


def gen_samples(n, vocab, k, nv, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(16, 97, size=n)
    has_img = np.arange(n) % 3 == 0
    total_text = int(counts.sum())
    total_vis = int(has_img.sum()) * nv
    pools = {}
    for kind, m in (("text", total_text), ("visual", total_vis)):
        half = m // 2
        a = teacher_like_topk(half, vocab, k, seed=seed + 11 + len(kind), **PROFILES["peaked"])
        b = teacher_like_topk(m - half, vocab, k, seed=seed + 23 + len(kind), **PROFILES["heavy"])
        perm = rng.permutation(m)  # interleave the profiles across samples
        pools[kind] = SparseTopK(np.concatenate([a.ids, b.ids])[perm], np.concatenate([a.logprobs, b.logprobs])[perm],
                                 np.concatenate([a.tail, b.tail])[perm])
        pools[kind + "_profile"] = np.concatenate([np.zeros(half, bool), np.ones(m - half, bool)])[perm]
    out, ti, vi = [], 0, 0
    for i in range(n):
        t = pools["text"]
        c = int(counts[i])
        text = SparseTopK(t.ids[ti:ti + c], t.logprobs[ti:ti + c], t.tail[ti:ti + c])
        ti += c
        vis = ac = None
        if has_img[i]:
            v = pools["visual"]
            vis = SparseTopK(v.ids[vi:vi + nv], v.logprobs[vi:vi + nv], v.tail[vi:vi + nv])
            vi += nv
            ac = random_autocorr(nv, rng, d=32)
        out.append(SampleTargets(key=random_key(i, "bench"), text=text, visual=vis, autocorr=ac))
    return out, pools


def coarse_kl(lp, tail, lph, tailh):
    p = np.concatenate([np.exp(lp.astype(np.float64)), tail[:, None].astype(np.float64)], 1)
    q = np.concatenate([np.exp(lph.astype(np.float64)), tailh[:, None].astype(np.float64)], 1)
    p /= p.sum(1, keepdims=True)
    q = np.maximum(q, 1e-30)
    q /= q.sum(1, keepdims=True)
    m = p > 0
    return np.where(m, p * (np.log(np.where(m, p, 1)) - np.log(np.where(m, q, 1))), 0).sum(1)


def dir_bytes(path: Path, exclude_prefix=("autocorr",)):
    pos, ac, files = 0, 0, 0
    for dp, _, fns in os.walk(path):
        for fn in fns:
            f = Path(dp) / fn
            files += 1
            rel = f.relative_to(path).parts
            arr = rel[2] if len(rel) > 2 and rel[0] == "segments" else ""
            if arr.startswith(exclude_prefix):
                ac += f.stat().st_size
            else:
                pos += f.stat().st_size
    return pos, ac, files


def run_config(samples, positions, raw_bytes, vocab, k, nv, enc, chunk_rows, shard_rows, clevel, workdir, n_rand):
    root = Path(tempfile.mkdtemp(dir=workdir))
    meta = CacheMeta.for_group(dataset_fingerprint="bench", template=QWEN2_BASE, has_images=True,
                               teacher_fingerprint="bench", tokenizer_hash="bench", vocab_size=vocab, k=k,
                               vision_strategy="full", num_visual_tokens=nv, value_encoding=enc,
                               target_kinds=TARGET_KINDS)
    g = open_group(root, meta=meta, create=True)
    t0 = time.perf_counter()
    with g.writer(segment_rows=512, chunk_rows=chunk_rows, shard_rows=shard_rows, clevel=clevel) as w:
        for s in samples:
            w.add(s)
    wt = time.perf_counter() - t0
    pos_bytes, ac_bytes, files = dir_bytes(root / g.name)
    t0 = time.perf_counter()
    r = CacheReader(g)
    index_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    keys = [s.key for s in samples]
    pick = [keys[i] for i in rng.integers(0, len(keys), n_rand)]
    r.get(pick[0])
    t0 = time.perf_counter()
    for key in pick:
        r.get(key)
    rand = n_rand / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for j in range(0, n_rand, 32):
        r.get_many(pick[j:j + 32])
    rand_batch = n_rand / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    got = {s.key: s for s in r.iter_samples()}
    seq = len(got) / (time.perf_counter() - t0)
    kl = {}
    for kind in ("text", "visual"):
        lp = np.concatenate([getattr(s, kind).logprobs for s in samples if getattr(s, kind) is not None])
        tl = np.concatenate([getattr(s, kind).tail for s in samples if getattr(s, kind) is not None])
        lph = np.concatenate([getattr(got[s.key], kind).logprobs for s in samples if getattr(s, kind) is not None])
        tlh = np.concatenate([getattr(got[s.key], kind).tail for s in samples if getattr(s, kind) is not None])
        ids_ok = all(np.array_equal(getattr(got[s.key], kind).ids, getattr(s, kind).ids)
                     for s in samples if getattr(s, kind) is not None)
        assert ids_ok, "ids must round-trip exactly"
        kl[kind] = coarse_kl(lp, tl, lph, tlh)
    shutil.rmtree(root)
    return dict(enc=enc, clevel=clevel, chunk_rows=chunk_rows, shard_rows=shard_rows or 0, write_mb_s=raw_bytes / wt / 1e6,
                bytes_per_position=pos_bytes / positions, autocorr_bytes=ac_bytes, files=files,
                index_ms=index_s * 1e3, rand=rand, rand_batch=rand_batch, seq=seq, kl=kl)


def bench_index(n_keys, vocab, k, workdir, seg_rows=16384):
    """Reader index build and committed_keys() for n_keys samples (positions empty: keys only)."""
    from logit_cache.store import array_names
    root = Path(tempfile.mkdtemp(dir=workdir))
    meta = CacheMeta.for_group(dataset_fingerprint="index", template=QWEN2_BASE, has_images=False,
                               teacher_fingerprint="bench", tokenizer_hash="bench", vocab_size=vocab, k=k,
                               vision_strategy="none", num_visual_tokens=0, value_encoding="q8",
                               target_kinds=TARGET_KINDS)
    g = open_group(root, meta=meta, create=True)
    rng = np.random.default_rng(5)
    for lo in range(0, n_keys, seg_rows):
        s = min(seg_rows, n_keys - lo)
        arrays = {"keys": rng.integers(0, 256, (s, 16), dtype=np.uint8), "autocorr": np.zeros(0, np.float16)}
        for name in array_names(meta):
            if name.endswith("offsets"):
                arrays[name] = np.zeros(s + 1, np.int64)
            elif name.endswith("_ids"):
                arrays[name] = np.zeros((0, k), meta.ids_dtype)
            elif name.endswith("_lp"):
                arrays[name] = np.zeros((0, k), np.uint8)
            elif name not in arrays:
                arrays[name] = np.zeros(0, np.float16)
        g.write_segment(arrays)
    t0 = time.perf_counter()
    r = CacheReader(g)
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    ck = g.committed_keys()
    t_keys = time.perf_counter() - t0
    some = list(ck)[:10000]
    t0 = time.perf_counter()
    for key in some:
        r.locate(key)
    t_loc = (time.perf_counter() - t0) / len(some)
    shutil.rmtree(root)
    print(f"index: {n_keys:,} keys in {len(r.segments)} segments: reader open (index build) {t_open:.2f}s, "
          f"committed_keys() {t_keys:.2f}s, key lookup {t_loc * 1e6:.1f} us")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=150)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--nv", type=int, default=64)
    ap.add_argument("--rand", type=int, default=1000)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--index-keys", type=int, default=1_000_000)
    a = ap.parse_args()
    t0 = time.perf_counter()
    samples, pools = gen_samples(a.samples, a.vocab, a.k, a.nv)
    tp = sum(s.text.num_positions for s in samples)
    vp = sum(s.visual.num_positions for s in samples if s.visual is not None)
    positions = tp + vp
    raw = positions * (a.k * 8 + 4) + sum(s.autocorr.size * 4 for s in samples if s.autocorr is not None)
    t = pools["text"]
    p1 = np.exp(t.logprobs[:, 0])
    print(f"data: {a.samples} samples, {tp} text + {vp} visual positions, vocab={a.vocab} k={a.k} Nv={a.nv}; "
          f"generated in {time.perf_counter() - t0:.1f}s", flush=True)
    for name, msk in (("peaked", ~pools["text_profile"]), ("heavy", pools["text_profile"])):
        print(f"  {name:7s} top-1 p median {np.median(p1[msk]):.3f}  tail median {np.median(t.tail[msk]):.2e}  "
              f"tail p90 {np.quantile(t.tail[msk], .9):.2e}  id median {int(np.median(t.ids[msk]))}  "
              f"id p90 {int(np.quantile(t.ids[msk], .9))}")
    print(f"raw float32 logprobs + int32 ids + float32 tail = {a.k * 8 + 4} bytes/position")
    configs = [("f16", 2048, None, 6), ("q8", 2048, None, 5), ("q8", 512, None, 6), ("q8", 2048, None, 6),
               ("q8", 8192, None, 6), ("q8", 512, 8192, 6), ("q8", 2048, None, 9)]
    rows = []
    print(f"{'enc':4s} {'lvl':>3s} {'chunk':>6s} {'shard':>6s} {'write MB/s':>10s} {'B/pos':>7s} {'files':>6s} {'index ms':>8s} "
          f"{'rand/s':>7s} {'rand32/s':>8s} {'seq/s':>7s} {'KL text':>9s} {'KL vis':>9s} {'KL p99':>9s}")
    for enc, cr, sr, lvl in configs:
        res = run_config(samples, positions, raw, a.vocab, a.k, a.nv, enc, cr, sr, lvl, a.workdir, a.rand)
        rows.append(res)
        allkl = np.concatenate([res["kl"]["text"], res["kl"]["visual"]])
        res["kl_mean"] = float(allkl.mean())
        print(f"{enc:4s} {lvl:3d} {cr:6d} {res['shard_rows']:6d} {res['write_mb_s']:10.1f} {res['bytes_per_position']:7.1f} "
              f"{res['files']:6d} {res['index_ms']:8.1f} {res['rand']:7.0f} {res['rand_batch']:8.0f} {res['seq']:7.0f} "
              f"{res['kl']['text'].mean():9.2e} {res['kl']['visual'].mean():9.2e} {np.quantile(allkl, .99):9.2e}",
              flush=True)
    ac_per_sample = rows[0]["autocorr_bytes"] / max(1, sum(s.autocorr is not None for s in samples))
    print(f"autocorr (Nv={a.nv}, fp16 upper triangle): {ac_per_sample:.0f} stored bytes per image sample "
          f"(raw fp32 full matrix {a.nv * a.nv * 4})")
    bench_index(a.index_keys, a.vocab, a.k, a.workdir)
    best = next(r for r in rows if r["enc"] == "q8" and r["chunk_rows"] == 2048 and r["clevel"] == 6
                and not r["shard_rows"])
    print(f"RESULT bytes_per_position={best['bytes_per_position']:.1f} kl_err_nats={best['kl_mean']:.2e} "
          f"rand_read_samples_per_s={best['rand']:.0f}")


if __name__ == "__main__":
    main()
