"""A server's targets frame straight into the cache's segment arrays: the one place of the fill that
knows both representations (the wire's, ``ckd_common.wire`` v2, and the store's, logit_cache
FORMAT.md v2).

The plain path decodes a frame into ``SampleTargets`` (``wire.decode_response``: every row and
factor copied per sample) and the writer encodes each sample again into a record
(``layout.encode_record``: ids split, values quantised, per sample) that ``concat_records`` joins.
Here the frame's arrays are converted once, for all samples of a response together: top-k rows split
into text and visual rows, ids split into their low 16 bits and packed high bits, values encoded
(``logit_cache.encoding``), and the autocorrelation factor's int8 codes and scales taken as they
travel (the wire's codes are the stored codes, sample by sample). The result is exactly
``concat_records([encode_record(t) for t in decode_response(frame).targets])``
(tests/test_fill_frames.py), handed to ``CacheWriter.add_encoded``.

Every value is checked first as ``CacheWriter.add`` checks a sample (ids in the vocabulary,
log-probs <= 0, tails in [0, 1], factor codes in [-127, 127], scales finite and >= 0, shares in
[0, 1], the group's k and visual-token count), and the answer must match the request (keys,
positions per sample): a server that answers wrongly stops the fill (:class:`FrameError`) before
anything of it is written.
"""
from __future__ import annotations

import numpy as np

from ckd_common.keys import KEY_HEX_CHARS
from ckd_common.wire import RESPONSE_MAGIC, WireError, decode_frame
from logit_cache import CacheMeta
from logit_cache.encoding import encode_q8, ids_hi_bits, split_ids


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
    """Stored ids / values / tail of top-k rows (FORMAT.md §3, as ``encode_record`` writes them)."""
    out = {}
    out[f"{kind}_ids"], hi = split_ids(ids, ids_hi_bits(meta.vocab_size))
    if hi is not None:
        out[f"{kind}_ids_hi"] = hi
    if meta.value_encoding == "q8":
        out[f"{kind}_lp"], out[f"{kind}_lp0"] = encode_q8(lp)
    else:
        out[f"{kind}_lp"] = lp.astype(np.float16)
    out[f"{kind}_tail"] = np.clip(tail, 0.0, 1.0).astype(np.float16)
    return out


def _header(frame: bytes, url: str):
    """(k, keys, num_text, num_visual, rank (-1: no factor), share, arrays) of a response frame."""
    try:
        head, arrays = decode_frame(frame, RESPONSE_MAGIC)
        metas = list(head["samples"])
        k = int(head["k"])
        keys = [str(m["key"]) for m in metas]
        nt = np.array([int(m["num_text"]) for m in metas], dtype=np.int64)
        nv = np.array([int(m["num_visual"]) for m in metas], dtype=np.int64)
        rank = np.array([-1 if m.get("autocorr_rank") is None else int(m["autocorr_rank"]) for m in metas],
                        dtype=np.int64)
        share = np.array([float(m.get("autocorr_share") or 0.0) for m in metas], dtype=np.float64)
        # the tail trace: NaN = not sent (a server that predates it), stored as unknown
        arrays = dict(arrays, autocorr_tail=np.array([np.nan if m.get("autocorr_tail") is None
                                                      else float(m["autocorr_tail"]) for m in metas], np.float64))
        arrays = {n: arrays[n] for n in ("ids", "logprobs", "tail", "autocorr_codes", "autocorr_scale", "autocorr_tail")}
    except WireError as e:
        raise FrameError(f"server {url} sent an undecodable targets frame: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise FrameError(f"server {url} sent a targets frame with a malformed header ({type(e).__name__}: {e})") from None
    return k, keys, nt, nv, rank, share, arrays


def decode_block(frame: bytes, samples, meta: CacheMeta, url: str) -> dict[str, np.ndarray]:
    """The response ``frame`` to the request of ``samples`` (prepared samples, in request order) as
    a block of their segment arrays (format 2); FrameError when it does not answer them or is invalid."""
    k, keys, nt, nv, rank, share, a = _header(frame, url)
    ids, lp, tail, codes, scale = (a[n] for n in ("ids", "logprobs", "tail", "autocorr_codes", "autocorr_scale"))
    if len(keys) != len(samples):
        raise FrameError(f"server {url} answered {len(keys)} samples for a request of {len(samples)}")
    if ((rank >= 0) & ((rank > nv) | (share < 0) | (share > 1) | np.isnan(share))).any():
        raise FrameError(f"server {url} sent an autocorr_rank outside [0, num_visual] or a share outside [0, 1]")
    if np.isinf(a["autocorr_tail"]).any():
        raise FrameError(f"server {url} sent an autocorr_tail that is not a finite number")
    has = rank >= 0
    rows, cols = int((nt + nv).sum()), int(rank[has].sum())
    if ids.ndim != 2 or ids.shape != (rows, k) or lp.shape != ids.shape or tail.shape != (rows,) or \
            codes.shape != (int((rank * nv)[has].sum()),) or scale.shape != (cols,) or \
            codes.dtype != np.int8 or scale.dtype != np.float32:
        raise FrameError(f"server {url} sent a targets frame whose arrays do not match its header "
                         f"(ids {ids.shape}, logprobs {lp.shape}, tail {tail.shape} for {rows} rows of k={k}; "
                         f"autocorr_codes {codes.dtype} {codes.shape}, autocorr_scale {scale.dtype} {scale.shape} "
                         f"for {cols} factor columns)")
    want_ac = "autocorr" in meta.target_kinds
    for s, key, t, v, h in zip(samples, keys, nt, nv, has):
        if key != s.key or t != len(s.response_positions) or v != s.num_visual or k != meta.k:
            raise FrameError(f"server {url} answered sample {s.id!r} inconsistently (key {key[:12]} vs "
                             f"{s.key[:12]}, {t}/{len(s.response_positions)} text and {v}/{s.num_visual} visual "
                             f"positions, k {k}/{meta.k})")
        if v and meta.num_visual_tokens and v != meta.num_visual_tokens:
            raise FrameError(f"server {url}: sample {s.id!r} has {v} visual positions, the group's "
                             f"num_visual_tokens is {meta.num_visual_tokens}")
        if v and want_ac and not h:
            raise FrameError(f"server {url}: sample {s.id!r} lacks a visual autocorrelation, but the group's "
                             f"target kinds are {meta.target_kinds}")
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
    out.update(_factors(codes, scale, nv, rank, share, has & (nv > 0) & want_ac, meta, samples, url))
    out["autocorr_tail"] = np.where(has & (nv > 0) & want_ac, a["autocorr_tail"], 0.0).astype(np.float32)
    return out


def _factors(codes: np.ndarray, scale: np.ndarray, nv: np.ndarray, rank: np.ndarray, share: np.ndarray,
             keep: np.ndarray, meta: CacheMeta, samples, url: str) -> dict[str, np.ndarray]:
    """The factors of the samples ``keep`` (the others' are not stored, as ``encode_record`` drops
    them) as the stored ``autocorr`` [columns, Nv] int8, ``autocorr_scale`` [columns] float32,
    ``autocorr_share`` [samples] float32 and ``autocorr_offsets`` (columns per sample); the caller
    adds ``autocorr_tail``."""
    has = rank >= 0
    ncols = np.where(keep, rank, 0)
    width = {int(v) for v in nv[keep & (rank > 0)]}
    if len(width) > 1:
        raise FrameError(f"server {url} sent autocorrelations of different Nv {sorted(width)} in one response")
    w = width.pop() if width else max(meta.num_visual_tokens, 1)
    # each sample's codes are rank x Nv, row-major: the stored rows as they are, when every sample is
    # kept (copied: the block must not hold the whole frame alive while its segment fills)
    if (keep == has).all() or not has.any():
        col_codes, col_scale = codes.copy(), scale.copy()
    else:
        code_ends = np.cumsum(np.where(has, rank * nv, 0))
        scale_ends = np.cumsum(np.where(has, rank, 0))
        parts = [(codes[e - r * v:e], scale[f - r:f]) for e, f, r, v, kp in
                 zip(code_ends, scale_ends, rank, nv, keep) if kp and r > 0]
        col_codes = np.concatenate([c for c, _ in parts]) if parts else codes[:0]
        col_scale = np.concatenate([s for _, s in parts]) if parts else scale[:0]
    col_codes = col_codes.reshape(-1, w)
    for bad, what in (((col_codes == -128).any(1), "autocorr codes must lie in [-127, 127]"),
                      (~np.isfinite(col_scale) | (col_scale < 0), "autocorr scales must be finite and >= 0")):
        if bad.any():
            owner = np.repeat(np.arange(len(samples)), ncols)
            raise FrameError(f"server {url} sent invalid targets for {_where(samples, owner, bad)}: {what}")
    return {"autocorr_offsets": np.concatenate([[0], np.cumsum(ncols)]).astype(np.int64),
            "autocorr": col_codes, "autocorr_scale": col_scale.astype(np.float32),
            "autocorr_share": np.where(keep, share, 0.0).astype(np.float32)}


__all__ = ["FrameError", "decode_block"]
