"""Cache roots, groups, segments, manifests and the writer (the commit protocol of FORMAT.md).

A root (local path or fsspec URL) holds one Zarr v3 group per (dataset, template). Each writer
owns its own immutable segment (a Zarr subgroup ``segments/<id>``); a segment becomes visible
only when its manifest ``manifests/<id>.json`` (counts + sha256 of every array) is written, last
and atomically. Readers list manifests, never segment directories.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

from ckd_common.keys import KEY_HEX_CHARS
from ckd_common.targets import SampleTargets, SparseTopK

from .encoding import decode_q8, encode_q8, pack_autocorr, triu_size, unpack_autocorr
from .errors import CacheCorruptError, CacheError, GroupNotFoundError, UnknownFormatVersion
from .meta import ATTR_KEY, FORMAT_VERSION, SUPPORTED_VERSIONS, CacheMeta, group_name

SEGMENTS = "segments"
MANIFESTS = "manifests"
KEY_BYTES = KEY_HEX_CHARS // 2
DEFAULT_CHUNK_ROWS = 2048          # position rows per chunk (docs/environment.md + bench/cache_io.py)
DEFAULT_AUTOCORR_CHUNK = 1 << 18   # max autocorr values per chunk (512 KiB of fp16); Nv=576 -> 166,176 per sample


DEFAULT_CLEVEL = 6                 # Blosc clevel (zstd 11): bench/cache_io.py, 2% smaller than 5; 9 is ~10x slower


def compressor(dtype: str, clevel: int = DEFAULT_CLEVEL) -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=clevel, shuffle="shuffle" if np.dtype(dtype).itemsize > 1 else "noshuffle")


# ---------------------------------------------------------------------------------------------
# storage helpers
class Storage:
    """A root location: an fsspec filesystem for manifests/listing and a URL base for zarr."""

    def __init__(self, root: str | os.PathLike, storage_options: dict | None = None) -> None:
        self.root = str(root).rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self.path = fsspec.core.url_to_fs(self.root, **self.storage_options)
        self.path = self.path.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)  # file:// URLs too: LocalStore + rename

    def url(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def fpath(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def zgroup(self, *parts: str, mode: str = "r", **kw: Any) -> zarr.Group:
        if self.local:
            return zarr.open_group(self.fpath(*parts), mode=mode, **kw)
        return zarr.open_group(self.url(*parts), mode=mode, storage_options=self.storage_options or None, **kw)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.fpath(*parts))

    def ls(self, *parts: str) -> list[str]:
        p = self.fpath(*parts)
        try:
            self.fs.invalidate_cache(p)
            return sorted(x.rstrip("/").rsplit("/", 1)[-1] for x in self.fs.ls(p, detail=False))
        except FileNotFoundError:
            return []

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.fpath(*parts))

    def write_atomic(self, data: bytes, *parts: str) -> None:
        """Readers see either no file or the whole file (rename locally; one PUT on object stores)."""
        p = self.fpath(*parts)
        if self.local:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            tmp = f"{p}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        else:
            self.fs.pipe_file(p, data)

    def rm(self, *parts: str, recursive: bool = False) -> None:
        p = self.fpath(*parts)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=recursive)

    def du(self, *parts: str) -> int:
        p = self.fpath(*parts)
        try:
            return int(self.fs.du(p, total=True))
        except FileNotFoundError:
            return 0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()  # hashed in place


def new_segment_id() -> str:
    host = "".join(c if c.isalnum() else "-" for c in socket.gethostname())[:24] or "host"
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------------------------
# manifests
@dataclass
class Manifest:
    segment: str
    num_samples: int
    text_positions: int
    visual_positions: int
    autocorr_values: int
    arrays: dict[str, dict[str, Any]]          # name -> {"shape", "dtype", "sha256"}
    replaces: list[str] = field(default_factory=list)
    created_utc: str = ""
    writer: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Manifest":
        d = json.loads(data)
        if d.get("format_version") not in SUPPORTED_VERSIONS:
            raise UnknownFormatVersion(d.get("format_version"), SUPPORTED_VERSIONS, where)
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# segment arrays <-> SampleTargets
def encode_samples(samples: list[SampleTargets], meta: CacheMeta) -> dict[str, np.ndarray]:
    """Encode a list of samples into the flat arrays of one segment (FORMAT.md)."""
    k, enc = meta.k, meta.value_encoding
    out: dict[str, np.ndarray] = {}
    keys = np.zeros((len(samples), KEY_BYTES), dtype=np.uint8)
    for i, s in enumerate(samples):
        keys[i] = np.frombuffer(bytes.fromhex(s.key), dtype=np.uint8)
    out["keys"] = keys
    for kind in ("text", "visual"):
        parts = [getattr(s, kind) for s in samples]
        counts = np.array([0 if p is None else p.num_positions for p in parts], dtype=np.int64)
        out[f"{kind}_offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        present = [p for p in parts if p is not None and p.num_positions]
        ids = np.concatenate([p.ids for p in present]) if present else np.zeros((0, k))
        lp = np.concatenate([p.logprobs for p in present]) if present else np.zeros((0, k), np.float32)
        tail = np.concatenate([p.tail for p in present]) if present else np.zeros((0,), np.float32)
        out[f"{kind}_ids"] = ids.astype(meta.ids_dtype)
        if enc == "q8":
            out[f"{kind}_lp"], out[f"{kind}_lp0"] = encode_q8(lp)
        else:
            out[f"{kind}_lp"] = np.asarray(lp, dtype=np.float16)
        out[f"{kind}_tail"] = np.clip(tail, 0.0, 1.0).astype(np.float16)
    acs = [pack_autocorr(s.autocorr) if s.autocorr is not None else np.zeros(0, np.float16) for s in samples]
    out["autocorr_offsets"] = np.concatenate([[0], np.cumsum([len(a) for a in acs])]).astype(np.int64)
    out["autocorr"] = np.concatenate(acs) if acs else np.zeros(0, np.float16)
    return out


def concat_blocks(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several blocks of samples in the segment layout (``encode_samples``' output) as one: arrays
    concatenated, ``*_offsets`` re-based. One block is returned as it is (no copy)."""
    if len(blocks) == 1:
        return blocks[0]
    out: dict[str, np.ndarray] = {}
    for name in blocks[0]:
        if name.endswith("_offsets"):
            base = np.cumsum([0] + [int(b[name][-1]) for b in blocks[:-1]])
            out[name] = np.concatenate([blocks[0][name][:1]] + [b[name][1:] + o for b, o in zip(blocks, base)])
        else:
            out[name] = np.concatenate([b[name] for b in blocks])
    return out


def array_names(meta: CacheMeta) -> list[str]:
    names = ["keys"]
    for kind in ("text", "visual"):
        names += [f"{kind}_offsets", f"{kind}_ids", f"{kind}_lp", f"{kind}_tail"]
        if meta.value_encoding == "q8":
            names.append(f"{kind}_lp0")
    return names + ["autocorr_offsets", "autocorr"]


def decode_topk(meta: CacheMeta, ids: np.ndarray, lp: np.ndarray, tail: np.ndarray,
                lp0: np.ndarray | None) -> SparseTopK:
    logprobs = decode_q8(lp, lp0) if meta.value_encoding == "q8" else lp.astype(np.float32)
    return SparseTopK(ids=ids.astype(np.int64), logprobs=logprobs, tail=tail.astype(np.float32))


def assemble(key: str, meta: CacheMeta, parts: dict[str, np.ndarray]) -> SampleTargets:
    """Build a SampleTargets from the per-sample slices of a segment's arrays."""
    text = decode_topk(meta, parts["text_ids"], parts["text_lp"], parts["text_tail"], parts.get("text_lp0"))
    visual = None
    if len(parts["visual_ids"]):
        visual = decode_topk(meta, parts["visual_ids"], parts["visual_lp"], parts["visual_tail"],
                             parts.get("visual_lp0"))
    ac = unpack_autocorr(parts["autocorr"]) if len(parts["autocorr"]) else None
    return SampleTargets(key=key, text=text, visual=visual, autocorr=ac)


def key_hex(row: np.ndarray) -> str:
    return bytes(row).hex()


class SegmentData:
    """All arrays of one committed segment, loaded in memory (verify, compact, sequential reads)."""

    def __init__(self, meta: CacheMeta, arrays: dict[str, np.ndarray]) -> None:
        self.meta, self.arrays = meta, arrays

    def __len__(self) -> int:
        return len(self.arrays["keys"])

    def key(self, i: int) -> str:
        return key_hex(self.arrays["keys"][i])

    def slices(self, i: int) -> dict[str, np.ndarray]:
        a = self.arrays
        parts: dict[str, np.ndarray] = {}
        for kind in ("text", "visual"):
            lo, hi = int(a[f"{kind}_offsets"][i]), int(a[f"{kind}_offsets"][i + 1])
            for suf in ("ids", "lp", "tail", "lp0"):
                name = f"{kind}_{suf}"
                if name in a:
                    parts[name] = a[name][lo:hi]
        lo, hi = int(a["autocorr_offsets"][i]), int(a["autocorr_offsets"][i + 1])
        parts["autocorr"] = a["autocorr"][lo:hi]
        return parts

    def sample(self, i: int) -> SampleTargets:
        return assemble(self.key(i), self.meta, self.slices(i))

    def take(self, rows: Iterable[int]) -> dict[str, np.ndarray]:
        """Samples ``rows`` in the segment layout (what ``encode_samples`` makes of them), copied
        without decoding anything: compaction moves stored bytes only."""
        a, rows = self.arrays, np.asarray(list(rows), dtype=np.int64)
        out = {"keys": a["keys"][rows]}
        for prefix, names in (("text", ("ids", "lp", "tail", "lp0")), ("visual", ("ids", "lp", "tail", "lp0")),
                              ("autocorr", ("",))):
            o = a[f"{prefix}_offsets"]
            lo, hi = o[rows], o[rows + 1]
            out[f"{prefix}_offsets"] = np.concatenate([[0], np.cumsum(hi - lo)]).astype(np.int64)
            for n in names:
                name = f"{prefix}_{n}" if n else prefix
                if name in a:
                    parts = [a[name][int(x):int(y)] for x, y in zip(lo, hi)]
                    out[name] = np.concatenate(parts) if parts else a[name][:0]
        return out

    def samples(self) -> Iterable[SampleTargets]:
        for i in range(len(self)):
            yield self.sample(i)


# ---------------------------------------------------------------------------------------------
# groups
def _read_meta(storage: Storage, name: str) -> CacheMeta:
    where = storage.url(name)
    try:
        attrs = dict(storage.zgroup(name, mode="r").attrs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError if hasattr(zarr.errors, "GroupNotFoundError") else FileNotFoundError) as e:  # noqa: E501
        raise GroupNotFoundError(f"{where}: no Zarr group here ({e}). Fix: check the path, or list the root "
                                 f"with `logit_cache ls {storage.root}`.") from e
    if ATTR_KEY not in attrs:
        raise CacheError(f"{where}: a Zarr group without '{ATTR_KEY}' metadata is not a logit_cache group. "
                         f"Fix: point at a group created by logit_cache.")
    return CacheMeta.from_dict(attrs[ATTR_KEY], where=where)


def list_groups(root: str | os.PathLike, storage_options: dict | None = None) -> dict[str, CacheMeta | Exception]:
    """Every group in a root: name -> CacheMeta (or the error that prevented reading it)."""
    st = Storage(root, storage_options)
    out: dict[str, CacheMeta | Exception] = {}
    for name in st.ls():
        if not st.exists(name, "zarr.json"):
            continue
        try:
            out[name] = _read_meta(st, name)
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            out[name] = e
    return out


def _describe_root(root: str, groups: dict[str, CacheMeta | Exception]) -> str:
    if not groups:
        return f"the root {root} holds no logit_cache groups"
    lines = [f"the root {root} holds:"]
    for n, m in groups.items():
        if isinstance(m, CacheMeta):
            lines.append(f"  {n}: dataset_fingerprint={m.dataset_fingerprint} template={m.template} k={m.k}")
        else:
            lines.append(f"  {n}: unreadable ({type(m).__name__}: {m})")
    return "\n".join(lines)


def find_group(root: str | os.PathLike, dataset_fingerprint: str, template: str,
               storage_options: dict | None = None) -> str:
    """Name of the group filled for (dataset_fingerprint, template); GroupNotFoundError listing
    the root's groups otherwise."""
    name = group_name(dataset_fingerprint, template)
    groups = list_groups(root, storage_options)
    m = groups.get(name)
    if isinstance(m, CacheMeta) and m.dataset_fingerprint == dataset_fingerprint and m.template == template:
        return name
    if isinstance(m, Exception):
        raise m
    raise GroupNotFoundError(
        f"no cache group for dataset_fingerprint={dataset_fingerprint!r} template={template!r} "
        f"(looked for '{name}'); {_describe_root(str(root), groups)}. Fix: fill the cache for this "
        f"dataset/template (logit_cache fill) or point at the right root.")


def open_group(root: str | os.PathLike, name: str | None = None, meta: CacheMeta | None = None,
               create: bool = False, storage_options: dict | None = None) -> "CacheGroup":
    """Open (or with ``create=True`` create) a group. ``name`` defaults to ``meta.group_name``.

    With ``meta`` given and the group existing, every content field must match (CacheMismatchError
    otherwise): several fillers may call this concurrently with the same meta.
    """
    st = Storage(root, storage_options)
    if name is None:
        if meta is None:
            raise ValueError("open_group needs a group name or a CacheMeta to derive it from")
        name = meta.group_name
    if not st.exists(name, "zarr.json"):
        if not create:
            raise GroupNotFoundError(f"no cache group '{name}'; {_describe_root(st.root, list_groups(root, storage_options))}. "
                                     f"Fix: create it by filling (create=True) or pick one listed.")
        if meta is None:
            raise ValueError(f"creating group '{name}' needs a CacheMeta")
        # the metadata goes into the group's first (atomic) zarr.json write: a concurrent filler
        # never sees a group without it
        for parts, kw in (((name,), {"attributes": {ATTR_KEY: meta.to_dict()}}), ((name, SEGMENTS), {})):
            try:
                st.zgroup(*parts, mode="a", **kw)
            except Exception:  # noqa: BLE001 - another filler created it between zarr's check and write
                if not st.exists(*parts, "zarr.json"):
                    raise
    group = CacheGroup(st, name)
    if meta is not None:
        group.meta.check_compatible(meta, where=st.url(name))
    return group


class CacheGroup:
    """One (dataset, template) group: metadata, committed segments and writers."""

    def __init__(self, storage: Storage, name: str) -> None:
        self.storage, self.name = storage, name
        self.meta = _read_meta(storage, name)
        self.url = storage.url(name)

    # -- segments ------------------------------------------------------------------------------
    def manifests(self) -> dict[str, Manifest]:
        """Every parseable manifest (including segments that a compaction replaced)."""
        out = {}
        for fn in self.storage.ls(self.name, MANIFESTS):
            if not fn.endswith(".json"):
                continue  # temporary files of an in-flight atomic write
            try:
                m = Manifest.from_json(self.storage.read_bytes(self.name, MANIFESTS, fn), where=f"{self.url}/{MANIFESTS}/{fn}")
            except UnknownFormatVersion:
                raise
            except Exception:  # noqa: BLE001 - a torn manifest means 'not committed'
                continue
            out[m.segment] = m
        return out

    def committed(self) -> list[Manifest]:
        """Visible segments, in segment-id order: committed and not replaced by a compaction."""
        ms = self.manifests()
        replaced = {r for m in ms.values() for r in m.replaces}
        return [ms[s] for s in sorted(ms) if s not in replaced]

    def replaced_segments(self) -> list[str]:
        ms = self.manifests()
        replaced = {r for m in ms.values() for r in m.replaces}
        return sorted(replaced & (set(ms) | set(self.storage.ls(self.name, SEGMENTS))))

    def uncommitted_segments(self) -> list[str]:
        """Segment directories without a manifest: in-flight writers or killed ones."""
        ms = self.manifests()
        return [s for s in self.storage.ls(self.name, SEGMENTS) if s not in ms and s != "zarr.json"]

    def num_samples(self) -> int:
        return sum(m.num_samples for m in self.committed())

    def segment_arrays(self, segment: str) -> dict[str, zarr.Array]:
        g = self.storage.zgroup(self.name, SEGMENTS, segment, mode="r")
        return {n: g[n] for n in array_names(self.meta)}

    def load_segment(self, segment: str, names: Iterable[str] | None = None) -> SegmentData:
        arrs = self.segment_arrays(segment)
        return SegmentData(self.meta, {n: a[...] for n, a in arrs.items() if names is None or n in names})

    def committed_keys(self) -> set[str]:
        """Keys of every committed sample (one read of each segment's small key array)."""
        out: set[str] = set()
        for m in self.committed():
            keys = self.storage.zgroup(self.name, SEGMENTS, m.segment, mode="r")["keys"][...]
            b = keys.tobytes()
            out.update(b[i:i + KEY_BYTES].hex() for i in range(0, len(b), KEY_BYTES))
        return out

    # -- writing (reading: logit_cache.reader.CacheReader(group), which builds on this module) -------
    def writer(self, **kwargs: Any) -> "CacheWriter":
        return CacheWriter(self, **kwargs)

    def write_segment(self, arrays: dict[str, np.ndarray], chunk_rows: int = DEFAULT_CHUNK_ROWS,
                      shard_rows: int | None = None, replaces: list[str] | None = None,
                      clevel: int = DEFAULT_CLEVEL) -> Manifest:
        """Write one immutable segment, then (last) its manifest. Returns the manifest."""
        seg = new_segment_id()
        g = self.storage.zgroup(self.name, SEGMENTS, seg, mode="w-", attributes={
            "writer": {"host": socket.gethostname(), "pid": os.getpid(), "started_utc": _now()}})
        info, pending = {}, []
        for name in array_names(self.meta):
            a = arrays[name]
            if a.ndim == 1:
                if name == "autocorr":  # about one sample's triangle per chunk: a read decodes ~1-2 chunks
                    per = int(np.diff(arrays["autocorr_offsets"]).max(initial=0))
                    rows = int(min(DEFAULT_AUTOCORR_CHUNK, max(1 << 12, 1 << max(per - 1, 1).bit_length())))
                elif name.endswith("offsets"):
                    rows = max(len(a), 1)
                else:
                    rows = chunk_rows
                chunks: tuple[int, ...] = (max(1, min(rows, max(len(a), 1))),)
            else:
                rows = max(len(a), 1) if name == "keys" else chunk_rows
                chunks = (max(1, min(rows, max(len(a), 1))), a.shape[1])
            shards = None
            if shard_rows and a.ndim >= 1 and name not in ("keys",) and not name.endswith("offsets") and len(a) > chunks[0]:
                srows = max(chunks[0], (min(shard_rows, len(a)) // chunks[0]) * chunks[0])
                shards = (srows, *chunks[1:])
            # write_empty_chunks: every chunk is written, without zarr first comparing it with the
            # fill value (an element-wise pass that cost ~10% of a segment's commit at real shapes)
            z = g.create_array(name, shape=a.shape, dtype=a.dtype, chunks=chunks, shards=shards,
                               compressors=compressor(str(a.dtype), clevel), fill_value=0,
                               config={"write_empty_chunks": True})
            if a.size:
                pending.append((z, a))
            info[name] = {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": _sha(a)}

        async def write_all() -> None:  # every array's chunks compressed and written concurrently
            await asyncio.gather(*(z.async_array.setitem(..., a) for z, a in pending))

        sync(write_all())
        m = Manifest(segment=seg, num_samples=len(arrays["keys"]),
                     text_positions=int(arrays["text_offsets"][-1]), visual_positions=int(arrays["visual_offsets"][-1]),
                     autocorr_values=int(arrays["autocorr_offsets"][-1]), arrays=info, replaces=list(replaces or []),
                     created_utc=_now(), writer={"host": socket.gethostname(), "pid": os.getpid()})
        self.storage.write_atomic(m.to_json(), self.name, MANIFESTS, f"{seg}.json")
        return m


class CacheWriter:
    """Buffers samples and commits them as immutable segments.

    ``add`` validates each sample; when the buffer reaches ``segment_rows`` samples or
    ``segment_bytes`` of raw data, it is written as one segment and committed (manifest last).
    ``commit()`` flushes the rest. As a context manager it commits on a clean exit and discards
    the uncommitted buffer on an exception (those samples are simply not cached; a resumed fill
    redoes them).
    """

    def __init__(self, group: CacheGroup, segment_rows: int = 4096, segment_bytes: int = 256 << 20,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, shard_rows: int | None = None,
                 clevel: int = DEFAULT_CLEVEL) -> None:
        self.group, self.meta = group, group.meta
        self.segment_rows, self.segment_bytes = segment_rows, segment_bytes
        self.chunk_rows, self.shard_rows, self.clevel = chunk_rows, shard_rows, clevel
        self._buf: list[dict[str, np.ndarray]] = []   # blocks in the segment layout (stored bytes only)
        self._buf_keys: set[str] = set()
        self._buf_bytes = 0
        self.committed: list[Manifest] = []
        self.num_added = 0

    def _check(self, s: SampleTargets) -> None:
        m = self.meta
        if not (isinstance(s.key, str) and len(s.key) == KEY_HEX_CHARS and all(c in "0123456789abcdef" for c in s.key)):
            raise ValueError(f"sample key {s.key!r} is not a {KEY_HEX_CHARS}-char lowercase hex string "
                             f"(ckd_common.keys.sample_key)")
        if s.key in self._buf_keys:
            raise ValueError(f"sample {s.key} was added twice to this writer")
        for kind, t in (("text", s.text), ("visual", s.visual)):
            if t is None:
                continue
            if t.k != m.k:
                raise ValueError(f"sample {s.key}: {kind} top-k has k={t.k}, the group stores k={m.k}")
            if t.num_positions and (t.ids.min() < 0 or t.ids.max() >= m.vocab_size):
                raise ValueError(f"sample {s.key}: {kind} ids outside [0, vocab_size={m.vocab_size})")
            if t.num_positions and (np.isnan(t.logprobs).any() or (t.logprobs > 1e-3).any()):
                raise ValueError(f"sample {s.key}: {kind} log-probs must be <= 0 and not NaN (pass log-softmax "
                                 f"values, not logits)")
            if t.num_positions and (np.isnan(t.tail).any() or t.tail.min() < -1e-3 or t.tail.max() > 1 + 1e-3):
                raise ValueError(f"sample {s.key}: {kind} tail masses must lie in [0, 1]")
        if s.text is None:
            raise ValueError(f"sample {s.key}: text targets are required (may have 0 positions)")
        if (s.visual is None) != (s.autocorr is None) and "autocorr" in m.target_kinds:
            raise ValueError(f"sample {s.key}: visual and autocorr must both be present (image) or both None")
        if s.visual is not None:
            nv = s.visual.num_positions
            if m.num_visual_tokens and nv != m.num_visual_tokens:
                raise ValueError(f"sample {s.key}: {nv} visual positions, the group's num_visual_tokens is "
                                 f"{m.num_visual_tokens}")
            if s.autocorr is not None and s.autocorr.shape != (nv, nv):
                raise ValueError(f"sample {s.key}: autocorr {s.autocorr.shape} must be [Nv, Nv]=({nv}, {nv})")

    def add(self, s: SampleTargets) -> None:
        self._check(s)
        self._add_block(encode_samples([s], self.meta), [s.key])

    def add_encoded(self, block: dict[str, np.ndarray]) -> None:
        """Add samples already in the segment layout (``encode_samples``' output for them, e.g.
        decoded straight from a server's response by the fill): no SampleTargets in between. The
        caller has checked their values as :meth:`add` does; here the layout and keys are checked."""
        names = array_names(self.meta)
        if sorted(block) != sorted(names):
            raise ValueError(f"an encoded block must hold exactly the arrays {names}, not {sorted(block)}")
        n = len(block["keys"])
        keys = [key_hex(r) for r in block["keys"]]
        for kind in ("text", "visual"):
            o = block[f"{kind}_offsets"]
            if len(o) != n + 1 or o[0] != 0 or (np.diff(o) < 0).any() or o[-1] != len(block[f"{kind}_ids"]):
                raise ValueError(f"encoded block: {kind}_offsets do not index its {kind} rows")
            if block[f"{kind}_ids"].ndim != 2 or block[f"{kind}_ids"].shape[1] != self.meta.k:
                raise ValueError(f"encoded block: {kind}_ids {block[f'{kind}_ids'].shape} are not [N, k={self.meta.k}]")
        o = block["autocorr_offsets"]
        if len(o) != n + 1 or o[0] != 0 or o[-1] != len(block["autocorr"]):
            raise ValueError("encoded block: autocorr_offsets do not index its autocorrelation values")
        seen = self._buf_keys.intersection(keys)
        if seen or len(set(keys)) != n:
            raise ValueError(f"sample {min(seen) if seen else keys[0]} was added twice to this writer")
        self._add_block(block, keys)

    def _add_block(self, block: dict[str, np.ndarray], keys: list[str]) -> None:
        self._buf.append(block)
        self._buf_keys.update(keys)
        self.num_added += len(keys)
        self._buf_bytes += sum(a.nbytes for a in block.values())
        if len(self._buf_keys) >= self.segment_rows or self._buf_bytes >= self.segment_bytes:
            self.flush()

    def flush(self) -> Manifest | None:
        """Write and commit the buffered samples as one segment (no-op when empty)."""
        if not self._buf:
            return None
        arrays = concat_blocks(self._buf)
        m = self.group.write_segment(arrays, chunk_rows=self.chunk_rows, shard_rows=self.shard_rows,
                                     clevel=self.clevel)
        self.committed.append(m)
        self._buf, self._buf_keys, self._buf_bytes = [], set(), 0
        return m

    def commit(self) -> list[Manifest]:
        self.flush()
        return self.committed

    def abort(self) -> None:
        self._buf, self._buf_keys, self._buf_bytes = [], set(), 0

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def verify_manifest_arrays(group: CacheGroup, m: Manifest) -> SegmentData:
    """Load a segment and check it against its manifest; CacheCorruptError on any difference."""
    where = f"{group.url}/{SEGMENTS}/{m.segment}"
    try:
        data = group.load_segment(m.segment)
    except Exception as e:  # noqa: BLE001 - decompression/IO failure = corruption
        raise CacheCorruptError(f"{where}: cannot read the segment ({type(e).__name__}: {e}). "
                                f"Fix: delete its manifest and re-fill the missing keys.") from e
    for name, info in m.arrays.items():
        a = data.arrays.get(name)
        if a is None or list(a.shape) != info["shape"] or str(a.dtype) != info["dtype"]:
            raise CacheCorruptError(f"{where}/{name}: shape/dtype {None if a is None else (a.shape, a.dtype)} "
                                    f"!= manifest {info['shape']} {info['dtype']}")
        if _sha(a) != info["sha256"]:
            raise CacheCorruptError(f"{where}/{name}: sha256 differs from the manifest: the stored chunks are "
                                    f"corrupted. Fix: remove manifests/{m.segment}.json and re-fill those keys.")
    return data


__all__ = ["CacheGroup", "CacheWriter", "Manifest", "SegmentData", "Storage", "find_group", "list_groups",
           "open_group", "encode_samples", "concat_blocks", "assemble", "triu_size", "verify_manifest_arrays"]
