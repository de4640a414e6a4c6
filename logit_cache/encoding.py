"""Value encodings of stored log-probs, the packing of wide token ids, and the format-1
autocorrelation triangle (see FORMAT.md).

f16  log-probs as IEEE float16 (-inf kept).
q8   per position, lp0 = max finite log-prob (stored float16) and one uint8 code per entry:
     c = round(Q8_LEVELS * sqrt(min(lp0 - lp, Q8_RANGE) / Q8_RANGE)), c = 255 for -inf (padding);
     decoded lp = lp0 - Q8_RANGE * (c / Q8_LEVELS)**2, with Q8_LEVELS = 127 and Q8_RANGE = 24. Codes are stored delta-encoded along k
     (s[:,0] = c[:,0], s[:,j] = c[:,j] - c[:,j-1] mod 256), so rows sorted by descending
     probability become small numbers that compress well; decode with a uint8 cumsum.
"""
from __future__ import annotations

import numpy as np

# bench/cache_io.py measured (k=64, teacher-like data): levels 254 -> 18 B/pos, KL 1.6e-5 nats;
# 127 -> 14 B/pos, KL 6e-5 nats (target <= 1e-3). 127 levels keep the KL 15x under the target.
Q8_RANGE = 24.0   # log-probs more than 24 nats below the row max are clipped (p ratio < 4e-11)
Q8_LEVELS = 127
Q8_NEG_INF = 255


def encode_q8(logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N,k] float log-probs -> (delta codes uint8 [N,k], lp0 float16 [N])."""
    lp = np.asarray(logprobs, dtype=np.float32)
    finite = np.isfinite(lp)
    lp0 = np.where(finite, lp, -np.inf).max(axis=1, initial=-np.inf) if lp.shape[1] else np.zeros(len(lp), np.float32)
    lp0 = np.where(np.isfinite(lp0), lp0, 0.0).astype(np.float16)
    d = np.clip(lp0.astype(np.float32)[:, None] - np.where(finite, lp, 0.0), 0.0, Q8_RANGE)
    c = np.rint(Q8_LEVELS * np.sqrt(d / Q8_RANGE)).astype(np.uint8)
    c[~finite] = Q8_NEG_INF
    s = c.copy()
    if c.shape[1] > 1:
        s[:, 1:] = c[:, 1:] - c[:, :-1]  # uint8 arithmetic wraps mod 256
    return s, lp0


def decode_q8(codes_delta: np.ndarray, lp0: np.ndarray) -> np.ndarray:
    c = np.cumsum(np.asarray(codes_delta, dtype=np.uint8), axis=1, dtype=np.uint8)
    lp = lp0.astype(np.float32)[:, None] - np.float32(Q8_RANGE) * (c.astype(np.float32) / Q8_LEVELS) ** 2
    lp[c == Q8_NEG_INF] = -np.inf
    return lp.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# token ids (format 2): the low 16 bits as uint16, the bits above them packed MSB-first per id
def ids_hi_bits(vocab_size: int) -> int:
    """Bits above the low 16 that an id < vocab_size needs: 0 up to 65,536 ids, 2 for Qwen's 151,936
    (2**17 = 131,072 is too few: 151,936 ids need 18 bits)."""
    return max(0, (int(vocab_size) - 1).bit_length() - 16)


def split_ids(ids: np.ndarray, hi_bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """[N, k] ids -> (low uint16 [N, k], high bits packed uint8 [N, ceil(k * hi_bits / 8)] or None)."""
    ids = np.asarray(ids)
    lo = (ids & 0xFFFF).astype(np.uint16)
    if not hi_bits:
        return lo, None
    hi = (ids >> 16).astype(np.uint8)
    n, k = ids.shape
    per = 8 // hi_bits
    if 8 % hi_bits == 0 and k % per == 0:
        # whole ids per byte (Qwen's 2 bits: 4 ids): shift and OR them into place, MSB first, which is
        # what packbits of the bits below gives (~5x faster; tests/test_cache_roundtrip.py holds them equal)
        groups = hi.reshape(n, k // per, per)
        packed = np.zeros((n, k // per), np.uint8)
        for j in range(per):
            packed |= groups[:, :, j] << np.uint8(8 - hi_bits * (j + 1))
        return lo, packed
    return lo, _pack_bits(hi, hi_bits)


def _pack_bits(hi: np.ndarray, hi_bits: int) -> np.ndarray:
    """The plain packing: each id's ``hi_bits`` bits MSB first, all of a row's bits packed."""
    bits = (hi[..., None] >> np.arange(hi_bits - 1, -1, -1, dtype=np.uint8)) & 1
    return np.packbits(bits.reshape(hi.shape[0], hi.shape[1] * hi_bits), axis=1)


def join_ids(lo: np.ndarray, packed_hi: np.ndarray | None, hi_bits: int) -> np.ndarray:
    """Inverse of split_ids -> int64 [N, k]."""
    ids = np.asarray(lo).astype(np.int64)
    if hi_bits and packed_hi is not None and ids.size:
        n, k = ids.shape
        bits = np.unpackbits(np.asarray(packed_hi, np.uint8), axis=1, count=k * hi_bits).reshape(n, k, hi_bits)
        weights = (1 << np.arange(hi_bits - 1, -1, -1)).astype(np.int64)
        ids |= (bits.astype(np.int64) @ weights) << 16
    return ids


# ---------------------------------------------------------------------------------------------
# the format-1 autocorrelation: float16 upper triangle (read only)
def triu_size(nv: int) -> int:
    return nv * (nv + 1) // 2


def pack_autocorr(r: np.ndarray) -> np.ndarray:
    """[Nv,Nv] symmetric -> upper triangle (diagonal included), row-major, float16."""
    nv = r.shape[0]
    iu = np.triu_indices(nv)
    return np.asarray(r, dtype=np.float32)[iu].astype(np.float16)


def unpack_autocorr(flat: np.ndarray) -> np.ndarray:
    n = len(flat)
    nv = int(round((np.sqrt(8 * n + 1) - 1) / 2))
    if triu_size(nv) != n:
        raise ValueError(f"autocorr upper triangle has {n} values, not nv*(nv+1)/2 for any nv")
    out = np.zeros((nv, nv), dtype=np.float32)
    iu = np.triu_indices(nv)
    out[iu] = flat.astype(np.float32)
    out.T[iu] = flat.astype(np.float32)
    return out
