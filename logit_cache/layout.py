"""The arrays of one segment, per format version (FORMAT.md §3): what a sample is encoded into,
how its slices are found, and how slices become SampleTargets again.

A sample's *record* is a dict name -> its rows of every position/autocorrelation array (already
encoded), its key row and its per-sample values; ``concat_records`` turns records into a segment's
arrays (offsets from the row counts), ``SegmentData.record`` / the reader's fetches give records back,
``assemble`` decodes one. Compaction copies records between segments without decoding them.

Format 3 is written; format 2 (no per-sample tail trace) and format 1 (float16 autocorrelation
triangle, uint32 ids, no chunk checksums) are read only.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ckd_common.keys import KEY_HEX_CHARS
from ckd_common.targets import AutocorrFactor, SampleTargets, SparseTopK

from .encoding import decode_q8, encode_q8, ids_hi_bits, join_ids, split_ids, unpack_autocorr
from .meta import FORMAT_VERSION, CacheMeta

KEY_BYTES = KEY_HEX_CHARS // 2
POSITION_KINDS = ("text", "visual")
DEFAULT_CHUNK_ROWS = 2048              # position rows per chunk (docs/environment.md + bench/cache_io.py)
AUTOCORR_CHUNK_BYTES = 1 << 18         # format 2: ~256 KiB of factor columns per chunk (256 columns at Nv=728)
SCALE_CHUNK = 1 << 14                  # format 2: per-column scales per chunk
V1_AUTOCORR_CHUNK = 1 << 18            # format 1: max triangle values per chunk


def position_suffixes(meta: CacheMeta) -> list[str]:
    """The arrays of one position kind, e.g. text_ids, text_ids_hi, text_lp, text_lp0, text_tail."""
    out = ["ids"]
    if meta.format_version >= 2 and ids_hi_bits(meta.vocab_size):
        out.append("ids_hi")
    out.append("lp")
    if meta.value_encoding == "q8":
        out.append("lp0")
    return out + ["tail"]


def autocorr_arrays(meta: CacheMeta) -> list[str]:
    """Arrays sliced per sample by autocorr_offsets."""
    return ["autocorr"] if meta.format_version == 1 else ["autocorr", "autocorr_scale"]


def per_sample_autocorr(meta: CacheMeta) -> list[str]:
    """One value per sample: the factor's captured share (format >= 2) and tail trace (format >= 3)."""
    return ["autocorr_share"][:meta.format_version >= 2] + ["autocorr_tail"][:meta.format_version >= 3]


def index_arrays(meta: CacheMeta) -> list[str]:
    """Small per-sample arrays a reader loads whole when it opens a segment."""
    names = ["keys", "text_offsets", "visual_offsets", "autocorr_offsets"]
    return names + per_sample_autocorr(meta)


def array_names(meta: CacheMeta) -> list[str]:
    names = ["keys"]
    for kind in POSITION_KINDS:
        names += [f"{kind}_offsets"] + [f"{kind}_{s}" for s in position_suffixes(meta)]
    names += ["autocorr_offsets", *autocorr_arrays(meta)]
    return names + per_sample_autocorr(meta)


def chunk_shape(name: str, a: np.ndarray, chunk_rows: int) -> tuple[int, ...]:
    """The chunk of each array (format 1 and 2): per-sample arrays in one chunk, position arrays
    ``chunk_rows`` rows, factor columns ~AUTOCORR_CHUNK_BYTES (so a read decodes 1-2 chunks)."""
    n = max(len(a), 1)
    if name == "keys" or name.endswith("offsets") or name in ("autocorr_share", "autocorr_tail"):
        rows = n
    elif name == "autocorr" and a.ndim == 2:
        rows = 1 << max(0, (AUTOCORR_CHUNK_BYTES // max(a.shape[1], 1)).bit_length() - 1)
    elif name == "autocorr":  # format 1: about one sample's triangle per chunk
        rows = V1_AUTOCORR_CHUNK
    elif name == "autocorr_scale":
        rows = SCALE_CHUNK
    else:
        rows = chunk_rows
    return (max(1, min(rows, n)), *(max(1, x) for x in a.shape[1:]))


# ---------------------------------------------------------------------------------------------
# encoding (format 3)
def key_row(key: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(key), dtype=np.uint8)


def encode_record(s: SampleTargets, meta: CacheMeta) -> dict[str, np.ndarray]:
    """One sample -> its record (format 3). The autocorrelation must already be an AutocorrFactor.
    A factor without a tail trace (from a server that predates it) stores NaN: unknown."""
    rec: dict[str, np.ndarray] = {"keys": key_row(s.key)[None]}
    hb, k = ids_hi_bits(meta.vocab_size), meta.k
    for kind in POSITION_KINDS:
        t = getattr(s, kind)
        if t is None:
            t = SparseTopK(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), np.zeros(0, np.float32))
        rec[f"{kind}_ids"], hi = split_ids(t.ids, hb)
        if hi is not None:
            rec[f"{kind}_ids_hi"] = hi
        if meta.value_encoding == "q8":
            rec[f"{kind}_lp"], rec[f"{kind}_lp0"] = encode_q8(t.logprobs)
        else:
            rec[f"{kind}_lp"] = np.asarray(t.logprobs, dtype=np.float16)
        rec[f"{kind}_tail"] = np.clip(t.tail, 0.0, 1.0).astype(np.float16)
    f = s.autocorr if "autocorr" in meta.target_kinds else None
    if f is not None and not isinstance(f, AutocorrFactor):
        raise TypeError(f"sample {s.key}: encode_record needs an AutocorrFactor, got {type(f).__name__}")
    nv = s.visual.num_positions if s.visual is not None else 0
    rec["autocorr"] = f.codes if f is not None else np.zeros((0, nv), np.int8)
    rec["autocorr_scale"] = f.scale.astype(np.float32) if f is not None else np.zeros(0, np.float32)
    rec["autocorr_share"] = np.array([f.share if f is not None else 0.0], np.float32)
    tail = np.nan if f is not None and f.tail_trace is None else (f.tail_trace if f is not None else 0.0)
    rec["autocorr_tail"] = np.array([tail], np.float32)
    return rec


def record_nbytes(rec: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in rec.values())


def concat_records(records: Sequence[dict[str, np.ndarray]], meta: CacheMeta) -> dict[str, np.ndarray]:
    """Records -> the arrays of one segment (format 2), offsets derived from the row counts."""
    if meta.format_version != FORMAT_VERSION:
        raise ValueError(f"concat_records writes format {FORMAT_VERSION}, not {meta.format_version}")
    out: dict[str, np.ndarray] = {"keys": np.concatenate([r["keys"] for r in records]) if records
                                  else np.zeros((0, KEY_BYTES), np.uint8)}
    k, hb = meta.k, ids_hi_bits(meta.vocab_size)
    empty = {"ids": np.zeros((0, k), np.uint16), "ids_hi": np.zeros((0, (k * hb + 7) // 8), np.uint8),
             "lp": np.zeros((0, k), np.uint8 if meta.value_encoding == "q8" else np.float16),
             "lp0": np.zeros(0, np.float16), "tail": np.zeros(0, np.float16)}
    for kind in POSITION_KINDS:
        counts = [len(r[f"{kind}_ids"]) for r in records]
        out[f"{kind}_offsets"] = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        for suf in position_suffixes(meta):
            name = f"{kind}_{suf}"
            out[name] = np.concatenate([r[name] for r in records]) if records else empty[suf]
    widths = {r["autocorr"].shape[1] for r in records if r["autocorr"].shape[1]}
    if len(widths) > 1:
        raise ValueError(f"one segment holds autocorrelations of different Nv {sorted(widths)}")
    nv = widths.pop() if widths else max(meta.num_visual_tokens, 1)
    cols = [r["autocorr"].reshape(-1, nv) for r in records]
    out["autocorr_offsets"] = np.concatenate([[0], np.cumsum([len(c) for c in cols], dtype=np.int64)]).astype(np.int64)
    out["autocorr"] = np.concatenate(cols) if cols else np.zeros((0, nv), np.int8)
    out["autocorr_scale"] = (np.concatenate([r["autocorr_scale"] for r in records]) if records
                             else np.zeros(0, np.float32))
    for name in per_sample_autocorr(meta):
        out[name] = np.concatenate([r[name] for r in records]) if records else np.zeros(0, np.float32)
    return out


def _autocorr_width(blocks: Sequence[dict[str, np.ndarray]], meta: CacheMeta) -> int:
    widths = {b["autocorr"].shape[1] for b in blocks if b["autocorr"].size}
    if len(widths) > 1:
        raise ValueError(f"one segment holds autocorrelations of different Nv {sorted(widths)}")
    return widths.pop() if widths else max(meta.num_visual_tokens, 1)


def concat_blocks(blocks: Sequence[dict[str, np.ndarray]], meta: CacheMeta) -> dict[str, np.ndarray]:
    """Blocks (each the arrays of consecutive samples in the segment layout: ``concat_records``'
    output, ``decode_block``'s, ``take_rows``') -> one block: arrays concatenated, ``*_offsets``
    re-based. Equal to ``concat_records`` of all their records (tests/test_fill_frames.py). One
    block is returned as it is (no copy)."""
    if meta.format_version != FORMAT_VERSION:
        raise ValueError(f"concat_blocks writes format {FORMAT_VERSION}, not {meta.format_version}")
    if len(blocks) == 1:
        return blocks[0]
    if not blocks:
        return concat_records([], meta)
    nv = _autocorr_width(blocks, meta)
    out: dict[str, np.ndarray] = {}
    for name in blocks[0]:
        if name.endswith("_offsets"):
            base = np.cumsum([0] + [int(b[name][-1]) for b in blocks[:-1]], dtype=np.int64)
            out[name] = np.concatenate([blocks[0][name][:1]] + [b[name][1:] + o for b, o in zip(blocks, base)])
        elif name == "autocorr":  # an empty block's [0, w] may have another width
            out[name] = np.concatenate([b[name].reshape(-1, nv) for b in blocks])
        else:
            out[name] = np.concatenate([b[name] for b in blocks])
    return out


def take_rows(meta: CacheMeta, arrays: dict[str, np.ndarray], rows: Sequence[int]) -> dict[str, np.ndarray]:
    """Samples ``rows`` of a format-2 segment's ``arrays`` as a block of their stored bytes (nothing
    decoded): ``concat_records([record_of(...) for each row])``, without a dict per sample."""
    if meta.format_version != FORMAT_VERSION:
        raise ValueError(f"take_rows copies format {FORMAT_VERSION}, not {meta.format_version}")
    rows = np.asarray(rows, dtype=np.int64)
    out = {name: arrays[name][rows] for name in ["keys", *per_sample_autocorr(meta)]}
    for prefix, names in [(kind, [f"{kind}_{s}" for s in position_suffixes(meta)]) for kind in POSITION_KINDS] + \
            [("autocorr", autocorr_arrays(meta))]:
        o = arrays[f"{prefix}_offsets"]
        lo, n = o[rows].astype(np.int64), (o[rows + 1] - o[rows]).astype(np.int64)
        ends = np.cumsum(n)
        out[f"{prefix}_offsets"] = np.concatenate([[0], ends]).astype(np.int64)
        # one gather per array: the stored rows of every kept sample's slice, in order
        idx = np.repeat(lo - (ends - n), n) + np.arange(int(ends[-1]) if len(ends) else 0)
        for name in names:
            out[name] = arrays[name][idx]
    return out


# ---------------------------------------------------------------------------------------------
# slicing and decoding (format 1 and 2)
def sample_slices(meta: CacheMeta, index: dict[str, np.ndarray], i: int) -> dict[str, slice]:
    """Array name -> the rows of sample ``i`` (``index``: the segment's index_arrays)."""
    out = {}
    for kind in POSITION_KINDS:
        o = index[f"{kind}_offsets"]
        sl = slice(int(o[i]), int(o[i + 1]))
        for suf in position_suffixes(meta):
            out[f"{kind}_{suf}"] = sl
    o = index["autocorr_offsets"]
    for name in autocorr_arrays(meta):
        out[name] = slice(int(o[i]), int(o[i + 1]))
    return out


def record_of(meta: CacheMeta, index: dict[str, np.ndarray], i: int, parts: dict[str, np.ndarray]
              ) -> dict[str, np.ndarray]:
    """The record of sample ``i`` from its fetched slices (``parts``) and the segment's index."""
    rec = dict(parts)
    rec["keys"] = np.asarray(index["keys"][i:i + 1], np.uint8).reshape(1, KEY_BYTES)
    for name in per_sample_autocorr(meta):
        rec[name] = np.asarray(index[name][i:i + 1], np.float32)
    return rec


def _topk(meta: CacheMeta, rec: dict[str, np.ndarray], kind: str) -> SparseTopK:
    hb = ids_hi_bits(meta.vocab_size) if meta.format_version >= 2 else 0
    ids = join_ids(rec[f"{kind}_ids"], rec.get(f"{kind}_ids_hi"), hb)
    lp = rec[f"{kind}_lp"]
    logprobs = decode_q8(lp, rec[f"{kind}_lp0"]) if meta.value_encoding == "q8" else lp.astype(np.float32)
    return SparseTopK(ids=ids, logprobs=logprobs, tail=rec[f"{kind}_tail"].astype(np.float32))


def assemble(key: str, meta: CacheMeta, rec: dict[str, np.ndarray]) -> SampleTargets:
    """A sample's record -> SampleTargets. Zero visual rows: no image (visual and autocorr None)."""
    text = _topk(meta, rec, "text")
    if not len(rec["visual_ids"]):
        return SampleTargets(key=key, text=text)
    visual = _topk(meta, rec, "visual")
    ac = None
    if meta.format_version == 1:
        ac = unpack_autocorr(rec["autocorr"]) if len(rec["autocorr"]) else None
    elif "autocorr" in meta.target_kinds:
        codes = np.asarray(rec["autocorr"], np.int8)
        if codes.size == 0:  # rank 0: R = 0, the rows come back as [0, Nv] of this sample's width
            codes = codes.reshape(0, visual.num_positions)
        tail = float(rec["autocorr_tail"][0]) if "autocorr_tail" in rec else np.nan  # format 2: unknown
        ac = AutocorrFactor(codes, np.asarray(rec["autocorr_scale"], np.float32), float(rec["autocorr_share"][0]),
                            None if np.isnan(tail) else tail)
    return SampleTargets(key=key, text=text, visual=visual, autocorr=ac)


__all__ = ["DEFAULT_CHUNK_ROWS", "KEY_BYTES", "POSITION_KINDS", "array_names", "assemble", "autocorr_arrays",
           "chunk_shape", "concat_blocks", "concat_records", "encode_record", "index_arrays", "key_row",
           "per_sample_autocorr", "position_suffixes", "record_nbytes", "record_of", "sample_slices", "take_rows"]
