"""A server's targets frame straight into the cache's segment arrays: the one place of the fill that
knows both representations (the wire's, ``ckd_common.wire``, and the store's, logit_cache FORMAT.md).

The plain path decodes a frame into ``SampleTargets`` (``wire.decode_response``: every triangle
unpacked to an [Nv, Nv] float32 matrix) and the writer encodes them again (``encode_samples``:
the triangle packed again, ids and values converted per sample). Here the frame's arrays are
converted once, for all samples of a response together: top-k rows split into text and visual
rows, ids viewed as unsigned, values encoded (``logit_cache.encoding``), and the wire's float32
triangles become the stored float16 triangles without ever forming a matrix. The result is
exactly ``encode_samples(decode_response(frame).targets, meta)`` (tests/test_fill_frames.py),
handed to ``CacheWriter.add_encoded``.

Every value is checked first as ``CacheWriter.add`` checks a sample (ids in the vocabulary,
log-probs <= 0, tails in [0, 1], the group's k and visual-token count), and the answer must match
the request (keys, positions per sample): a server that answers wrongly stops the fill
(:class:`FrameError`) before anything of it is written.
"""
from __future__ import annotations

import numpy as np

from ckd_common.keys import KEY_HEX_CHARS
from ckd_common.wire import RESPONSE_MAGIC, WireError, decode_frame
from logit_cache import CacheMeta
from logit_cache.encoding import encode_q8, triu_size



class FrameError(ValueError):
    """A response that does not answer its request, or holds values the cache refuses."""


def _where(samples, row_owner: np.ndarray, bad: np.ndarray) -> str:
    s = samples[int(row_owner[np.flatnonzero(bad)[0]])]
    return f"sample {s.id!r} [key {s.key[:12]}...]"


def _check_values(kind: str, ids: np.ndarray, lp: np.ndarray, tail: np.ndarray, meta: CacheMeta, samples,
                  owner: np.ndarray, url: str) -> None:
    """The value rules of ``CacheWriter.add`` for all rows at once; the message names a sample."""
    if not len(ids):
        return
    problems = ((((ids < 0) | (ids >= meta.vocab_size)).any(1), f"{kind} ids outside [0, vocab_size={meta.vocab_size})"),
                ((np.isnan(lp) | (lp > 1e-3)).any(1), f"{kind} log-probs must be <= 0 and not NaN"),
                (np.isnan(tail) | (tail < -1e-3) | (tail > 1 + 1e-3), f"{kind} tail masses must lie in [0, 1]"))
    for bad, what in problems:
        if bad.any():
            raise FrameError(f"server {url} sent invalid targets for {_where(samples, owner, bad)}: {what}")


def _encode_topk(kind: str, ids: np.ndarray, lp: np.ndarray, tail: np.ndarray, meta: CacheMeta) -> dict:
    """Stored ids / values / tail of top-k rows (FORMAT.md §3, as ``encode_samples`` writes them)."""
    dtype = np.dtype(meta.ids_dtype)  # wire ids are int32, checked >= 0: a 32-bit store only relabels them
    out = {f"{kind}_ids": ids.view(dtype) if dtype.itemsize == ids.dtype.itemsize else ids.astype(dtype)}
    if meta.value_encoding == "q8":
        out[f"{kind}_lp"], out[f"{kind}_lp0"] = encode_q8(lp)
    else:
        out[f"{kind}_lp"] = lp.astype(np.float16)
    out[f"{kind}_tail"] = np.clip(tail, 0.0, 1.0).astype(np.float16)
    return out


def decode_block(frame: bytes, samples, meta: CacheMeta, url: str) -> dict[str, np.ndarray]:
    """The response ``frame`` to the request of ``samples`` (prepared samples, in request order) as
    the segment arrays of those samples; FrameError when it does not answer them or is invalid."""
    try:
        head, arrays = decode_frame(frame, RESPONSE_MAGIC)
        metas = list(head["samples"])
        k = int(head["k"])
        keys = [str(m["key"]) for m in metas]
        nt = np.array([int(m["num_text"]) for m in metas], dtype=np.int64)
        nv = np.array([int(m["num_visual"]) for m in metas], dtype=np.int64)
        has_ac = np.array([bool(m.get("autocorr", m["num_visual"] > 0)) for m in metas], dtype=bool) & (nv > 0)
        ids, lp, tail, ac = (arrays[n] for n in ("ids", "logprobs", "tail", "autocorr"))
    except WireError as e:
        raise FrameError(f"server {url} sent an undecodable targets frame: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise FrameError(f"server {url} sent a targets frame with a malformed header ({type(e).__name__}: {e})") from None
    if len(metas) != len(samples):
        raise FrameError(f"server {url} answered {len(metas)} samples for a request of {len(samples)}")
    rows = int((nt + nv).sum())
    tri = np.array([triu_size(int(v)) for v in nv], dtype=np.int64) * has_ac
    if ids.ndim != 2 or ids.shape != (rows, k) or lp.shape != ids.shape or tail.shape != (rows,) or \
            ac.shape != (int(tri.sum()),):
        raise FrameError(f"server {url} sent a targets frame whose arrays do not match its header "
                        f"(ids {ids.shape}, logprobs {lp.shape}, tail {tail.shape} for {rows} rows of k={k}; "
                        f"autocorr {ac.shape} for {int(tri.sum())} values)")
    for s, key, t, v, a in zip(samples, keys, nt, nv, has_ac):
        if key != s.key or t != len(s.response_positions) or v != s.num_visual or k != meta.k:
            raise FrameError(f"server {url} answered sample {s.id!r} inconsistently (key {key[:12]} vs "
                            f"{s.key[:12]}, {t}/{len(s.response_positions)} text and {v}/{s.num_visual} visual "
                            f"positions, k {k}/{meta.k})")
        if v and meta.num_visual_tokens and v != meta.num_visual_tokens:
            raise FrameError(f"server {url}: sample {s.id!r} has {v} visual positions, the group's "
                            f"num_visual_tokens is {meta.num_visual_tokens}")
        if v and bool(a) != ("autocorr" in meta.target_kinds):
            raise FrameError(f"server {url}: sample {s.id!r} {'has' if a else 'lacks'} a visual autocorrelation, "
                            f"but the group's target kinds are {meta.target_kinds}")

    # rows are sample by sample, text rows then visual rows: one mask splits them
    owner = np.repeat(np.arange(len(samples)), nt + nv)
    starts = np.repeat(np.cumsum(nt + nv) - (nt + nv), nt + nv)
    is_text = (np.arange(rows) - starts) < np.repeat(nt, nt + nv)
    out: dict[str, np.ndarray] = {"keys": np.frombuffer(b"".join(bytes.fromhex(key) for key in keys),
                                                        dtype=np.uint8).reshape(len(keys), KEY_HEX_CHARS // 2)}
    for kind, sel, counts in (("text", is_text, nt), ("visual", ~is_text, nv)):
        idx = np.flatnonzero(sel)
        k_ids, k_lp, k_tail = ids[idx], lp[idx], tail[idx]
        _check_values(kind, k_ids, k_lp, k_tail, meta, samples, owner[idx], url)
        out[f"{kind}_offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        out.update(_encode_topk(kind, k_ids, k_lp, k_tail, meta))
    # FORMAT v1 stores the wire's triangle (same order), as float16
    out["autocorr_offsets"] = np.concatenate([[0], np.cumsum(tri)]).astype(np.int64)
    out["autocorr"] = ac.astype(np.float16)
    return out


__all__ = ["FrameError", "decode_block"]
