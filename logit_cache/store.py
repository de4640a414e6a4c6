"""Cache roots, groups, segments, manifests and the writer (the commit protocol of FORMAT.md).

A root (local path or fsspec URL) holds one Zarr v3 group per (dataset, template). Each writer
owns its own immutable segment (a Zarr subgroup ``segments/<id>``); a segment becomes visible
only when its manifest ``manifests/<id>.json`` (counts + sha256 of every array) is written, last
and atomically. Readers list manifests, never segment directories. What a segment's arrays hold
is layout.py's business (per format version).

Integrity (format 2): every chunk ends in a crc32c (the zarr v3 core codec), checked by zarr on
every read, and every chunk is written (none is left implicit as "all fill value"), so a flipped
byte or a missing chunk file stops a reader instead of being decoded into targets. Manifests are
written by rename (or one PUT), so a manifest that exists but does not parse is damage, not a torn
write: it is reported, never taken for "not committed".
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import uuid
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Iterable

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync

from ckd_common.targets import AUTOCORR_MAX_RANK, AUTOCORR_SHARE, AutocorrFactor, SampleTargets

from .errors import CacheCorruptError, CacheError, GroupNotFoundError, UnknownFormatVersion
from .layout import (DEFAULT_CHUNK_ROWS, KEY_BYTES, POSITION_KINDS, array_names, assemble, chunk_shape, concat_blocks,
                     concat_records, encode_record, record_nbytes, record_of, sample_slices, take_rows)
from .meta import ATTR_KEY, FORMAT_VERSION, SUPPORTED_VERSIONS, CacheMeta, group_name
from .storage import MissingChunkError, Storage

SEGMENTS = "segments"
MANIFESTS = "manifests"
DEFAULT_CLEVEL = 3                 # Blosc clevel of a writer (zstd 5): an image sample in ~6 ms of CPU, 4 % larger ...
COMPACT_CLEVEL = 6                 # ... than clevel 6 (zstd 11, ~18 ms), which compact uses (bench/cache_io.py)
DEFAULT_SEGMENT_ROWS = 4096        # samples per segment ...
DEFAULT_SEGMENT_BYTES = 512 << 20  # ... or encoded bytes buffered (~2,400 image samples at Nv=728, k=64)


def compressors(dtype: str, clevel: int = DEFAULT_CLEVEL, checksum: bool = True) -> tuple:
    """Blosc zstd (byte shuffle for multi-byte types), then a crc32c of the compressed chunk."""
    blosc = BloscCodec(cname="zstd", clevel=clevel, shuffle="shuffle" if np.dtype(dtype).itemsize > 1 else "noshuffle")
    return (blosc, Crc32cCodec()) if checksum else (blosc,)


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
    autocorr_values: int                       # format 1: triangle values; format 2: 0
    arrays: dict[str, dict[str, Any]]          # name -> {"shape", "dtype", "sha256"}
    replaces: list[str] = field(default_factory=list)
    created_utc: str = ""
    writer: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    autocorr_columns: int = 0                  # format 2: factor columns (sum of the ranks)

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Manifest":
        d = json.loads(data)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        if d.get("format_version") not in SUPPORTED_VERSIONS:
            raise UnknownFormatVersion(d.get("format_version"), SUPPORTED_VERSIONS, where)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------------
# a segment loaded in memory
class SegmentData:
    """All arrays of one committed segment, loaded in memory (verify, compact, sequential reads)."""

    def __init__(self, meta: CacheMeta, arrays: dict[str, np.ndarray]) -> None:
        self.meta, self.arrays = meta, arrays

    def __len__(self) -> int:
        return len(self.arrays["keys"])

    def key(self, i: int) -> str:
        return key_hex(self.arrays["keys"][i])

    def record(self, i: int) -> dict[str, np.ndarray]:
        """Sample i's record (layout.py): its encoded rows, key and per-sample values."""
        a = self.arrays
        parts = {name: a[name][sl] for name, sl in sample_slices(self.meta, a, i).items()}
        return record_of(self.meta, a, i, parts)

    def sample(self, i: int) -> SampleTargets:
        return assemble(self.key(i), self.meta, self.record(i))

    def take(self, rows: Iterable[int]) -> dict[str, np.ndarray]:
        """Samples ``rows`` as one block of their stored bytes (``layout.take_rows``; format 2):
        compaction moves them without decoding anything."""
        return take_rows(self.meta, self.arrays, list(rows))

    def samples(self) -> Iterable[SampleTargets]:
        for i in range(len(self)):
            yield self.sample(i)


def key_hex(row: np.ndarray) -> str:
    return bytes(row).hex()


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
    def scan_manifests(self) -> tuple[dict[str, Manifest], dict[str, str]]:
        """(segment -> parseable manifest, segment -> why its manifest file is damaged).

        Manifests are written atomically, so a ``<id>.json`` that exists but does not parse (or
        names another segment) is damage. Temporary files of an in-flight write are skipped."""
        good, damaged = {}, {}
        for fn in self.storage.ls(self.name, MANIFESTS):
            if not fn.endswith(".json"):
                continue
            seg = fn[:-len(".json")]
            where = f"{self.url}/{MANIFESTS}/{fn}"
            try:
                m = Manifest.from_json(self.storage.read_bytes(self.name, MANIFESTS, fn), where=where)
                if m.segment != seg:
                    raise ValueError(f"it names segment {m.segment!r}")
            except UnknownFormatVersion:
                raise
            except Exception as e:  # noqa: BLE001 - reported as damage by every caller
                damaged[seg] = f"{type(e).__name__}: {e}"[:200]
                continue
            good[seg] = m
        return good, damaged

    def manifests(self) -> dict[str, Manifest]:
        """Every parseable manifest (including segments that a compaction replaced)."""
        return self.scan_manifests()[0]

    def damaged_manifests(self) -> dict[str, str]:
        """segment -> the problem, for every manifest file that exists but cannot be read."""
        return self.scan_manifests()[1]

    def check_no_damage(self) -> None:
        """CacheCorruptError naming every damaged manifest: what those segments hold is unknown, so
        neither "committed" nor "absent" is safe to assume."""
        damaged = self.damaged_manifests()
        if damaged:
            seg, why = next(iter(damaged.items()))
            raise CacheCorruptError(
                f"{self.url}/{MANIFESTS}/{seg}.json is damaged ({why})" +
                (f", and {len(damaged) - 1} more manifest(s)" if len(damaged) > 1 else "") +
                f": what segment {seg} holds is unknown. Fix: restore the file from a backup, or drop the "
                f"segment(s) with `logit_cache gc --remove-damaged {self.storage.root} {self.name}` and re-run the "
                f"fill to redo their samples.")

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
        """Segment directories without a manifest file: in-flight writers or killed ones. A segment
        whose manifest file exists but is damaged is not among them (see check_no_damage)."""
        files = {fn[:-len(".json")] for fn in self.storage.ls(self.name, MANIFESTS) if fn.endswith(".json")}
        return [s for s in self.storage.ls(self.name, SEGMENTS) if s not in files and s != "zarr.json"]

    def num_samples(self) -> int:
        return sum(m.num_samples for m in self.committed())

    def segment_arrays(self, segment: str) -> dict[str, zarr.Array]:
        g = self.storage.zgroup(self.name, SEGMENTS, segment, mode="r", strict=self.meta.format_version >= 2)
        return {n: g[n] for n in array_names(self.meta)}

    def load_segment(self, segment: str, names: Iterable[str] | None = None) -> SegmentData:
        arrs = self.segment_arrays(segment)
        return SegmentData(self.meta, {n: a[...] for n, a in arrs.items() if names is None or n in names})

    def committed_keys(self) -> set[str]:
        """Keys of every committed sample (one read of each segment's small key array). Refuses a
        group with a damaged manifest: a fill must not take that segment's samples for missing."""
        self.check_no_damage()
        out: set[str] = set()
        for m in self.committed():
            try:
                keys = self.segment_arrays(m.segment)["keys"][...]
            except Exception as e:  # noqa: BLE001 - checksum / missing chunk / unreadable metadata
                raise corrupt_segment(self, m.segment, "keys", e) from e
            b = keys.tobytes()
            out.update(b[i:i + KEY_BYTES].hex() for i in range(0, len(b), KEY_BYTES))
        return out

    # -- writing (reading: logit_cache.reader.CacheReader(group), which builds on this module) -------
    def writer(self, **kwargs: Any) -> "CacheWriter":
        return CacheWriter(self, **kwargs)

    def check_writable(self) -> None:
        if self.meta.format_version != FORMAT_VERSION:
            raise CacheError(
                f"{self.url}: the group is logit_cache format {self.meta.format_version}, which this version "
                f"reads but does not write (it writes format {FORMAT_VERSION}: FORMAT.md). Fix: fill into a new "
                f"root (or delete this group) to write format {FORMAT_VERSION}; training from this group works as it is.")

    def write_segment(self, arrays: dict[str, np.ndarray], chunk_rows: int = DEFAULT_CHUNK_ROWS,
                      shard_rows: int | None = None, replaces: list[str] | None = None,
                      clevel: int = DEFAULT_CLEVEL) -> Manifest:
        """Write one immutable segment (format 2), then (last) its manifest. Returns the manifest."""
        self.check_writable()
        seg = new_segment_id()
        g = self.storage.zgroup(self.name, SEGMENTS, seg, mode="w-", attributes={
            "writer": {"host": socket.gethostname(), "pid": os.getpid(), "started_utc": _now()}})
        info, pending = {}, []
        for name in array_names(self.meta):
            a = arrays[name]
            chunks = chunk_shape(name, a, chunk_rows)
            shards = None
            if shard_rows and name != "keys" and not name.endswith(("offsets", "share")) and len(a) > chunks[0]:
                srows = max(chunks[0], (min(shard_rows, len(a)) // chunks[0]) * chunks[0])
                shards = (srows, *chunks[1:])
            # every chunk is written, even an all-zero one: a missing chunk is then detectable damage (and
            # zarr skips comparing each chunk with the fill value: ~10% of a segment's commit at real shapes)
            z = g.create_array(name, shape=a.shape, dtype=a.dtype, chunks=chunks, shards=shards,
                               compressors=compressors(str(a.dtype), clevel), fill_value=0,
                               config={"write_empty_chunks": True})
            if a.size:
                pending.append((z, a))
            info[name] = {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": _sha(a)}

        async def write_all() -> None:  # every array's chunks compressed and written concurrently
            await asyncio.gather(*(z.async_array.setitem(..., a) for z, a in pending))

        sync(write_all())
        m = Manifest(segment=seg, num_samples=len(arrays["keys"]),
                     text_positions=int(arrays["text_offsets"][-1]), visual_positions=int(arrays["visual_offsets"][-1]),
                     autocorr_values=0, autocorr_columns=int(arrays["autocorr_offsets"][-1]), arrays=info,
                     replaces=list(replaces or []), created_utc=_now(),
                     writer={"host": socket.gethostname(), "pid": os.getpid()})
        self.storage.write_atomic(m.to_json(), self.name, MANIFESTS, f"{seg}.json")
        return m


def corrupt_segment(group: CacheGroup, segment: str, array: str, e: BaseException) -> CacheCorruptError:
    """The error for bytes of a committed segment that cannot be read back as written."""
    why = "a chunk file is missing" if isinstance(e, MissingChunkError) else (
        "a chunk failed its checksum" if "checksum" in str(e) else f"{type(e).__name__}: {e}")
    return CacheCorruptError(
        f"{group.url}/{SEGMENTS}/{segment}/{array}: the stored data is corrupted ({why}). Fix: run "
        f"`logit_cache verify {group.storage.root} {group.name}`; remove manifests/{segment}.json and "
        f"segments/{segment}, then re-run the fill to redo that segment's samples.")


class CacheWriter:
    """Buffers samples and commits them as immutable segments.

    ``add`` validates each sample and encodes it (so the buffer holds the compact encoded form:
    ~210 KB per image sample at Nv=728, k=64, q8); when the buffer reaches ``segment_rows`` samples
    or ``segment_bytes`` encoded bytes, it is written as one segment and committed (manifest last).
    ``commit()`` flushes the rest. As a context manager it commits on a clean exit and discards the
    uncommitted buffer on an exception (those samples are simply not cached; a resumed fill redoes
    them). A dense autocorrelation is factorised here (host CPU, ~0.1 s at Nv=728); teacher servers
    send factors, so a fill does no conversion.
    """

    def __init__(self, group: CacheGroup, segment_rows: int = DEFAULT_SEGMENT_ROWS,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 shard_rows: int | None = None, clevel: int = DEFAULT_CLEVEL,
                 autocorr_share: float = AUTOCORR_SHARE, autocorr_max_rank: int = AUTOCORR_MAX_RANK) -> None:
        group.check_writable()
        self.group, self.meta = group, group.meta
        self.segment_rows, self.segment_bytes = segment_rows, segment_bytes
        self.chunk_rows, self.shard_rows, self.clevel = chunk_rows, shard_rows, clevel
        self.autocorr_share, self.autocorr_max_rank = autocorr_share, autocorr_max_rank
        self._buf: list[dict[str, np.ndarray]] = []   # blocks in the segment layout (layout.concat_blocks)
        self._buf_keys: set[str] = set()
        self._buf_bytes = 0
        self.committed: list[Manifest] = []
        self.num_added = 0

    def _check(self, s: SampleTargets) -> None:
        m = self.meta
        if not (isinstance(s.key, str) and len(s.key) == 2 * KEY_BYTES and all(c in "0123456789abcdef" for c in s.key)):
            raise ValueError(f"sample key {s.key!r} is not a {2 * KEY_BYTES}-char lowercase hex string "
                             f"(ckd_common.keys.sample_key)")
        if s.key in self._buf_keys:
            raise ValueError(f"sample {s.key} was added twice to this writer")
        for kind in POSITION_KINDS:
            t = getattr(s, kind)
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
            if s.autocorr is not None and tuple(s.autocorr.shape) != (nv, nv):
                raise ValueError(f"sample {s.key}: autocorr {tuple(s.autocorr.shape)} must be [Nv, Nv]=({nv}, {nv})")
            f = s.autocorr
            if isinstance(f, AutocorrFactor) and (not 0.0 <= f.share <= 1.0 or not np.isfinite(f.scale).all()
                                                  or (f.scale < 0).any() or (f.codes == -128).any()):
                raise ValueError(f"sample {s.key}: autocorr factor out of range (share {f.share} must lie in [0, 1], "
                                 f"scales finite and >= 0, codes in [-127, 127])")

    def add(self, s: SampleTargets) -> None:
        self._check(s)
        if s.autocorr is not None and not isinstance(s.autocorr, AutocorrFactor) and "autocorr" in self.meta.target_kinds:
            from ckd_common.kd.relation import factor_dense  # dense targets (oracle path, tests): host-side

            s = SampleTargets(s.key, s.text, s.visual, factor_dense(s.autocorr, self.autocorr_share,
                                                                   self.autocorr_max_rank))
        self._add_block(concat_records([encode_record(s, self.meta)], self.meta), [s.key])

    def add_encoded(self, block: dict[str, np.ndarray]) -> None:
        """Add samples already encoded, as a block in the segment layout (``layout.concat_blocks``),
        e.g. decoded straight from a server's response by the fill (``deploy.fill_frames``): no
        SampleTargets in between. The caller has checked their values as :meth:`add` does; here the
        block's layout and keys are checked."""
        m = self.meta
        names = array_names(m)
        if sorted(block) != sorted(names):
            raise ValueError(f"an encoded block must hold exactly the arrays {names}, not {sorted(block)}")
        n = len(block["keys"])
        if block["keys"].shape != (n, KEY_BYTES) or block["autocorr_share"].shape != (n,) or \
                block["autocorr_tail"].shape != (n,):
            raise ValueError(f"encoded block: keys {block['keys'].shape} / autocorr_share "
                             f"{block['autocorr_share'].shape} / autocorr_tail {block['autocorr_tail'].shape} "
                             f"are not [{n}, {KEY_BYTES}] / [{n}] / [{n}]")
        for kind, rows in (("text", "text_ids"), ("visual", "visual_ids"), ("autocorr", "autocorr")):
            o = block[f"{kind}_offsets"]
            if len(o) != n + 1 or o[0] != 0 or (np.diff(o) < 0).any() or o[-1] != len(block[rows]):
                raise ValueError(f"encoded block: {kind}_offsets do not index its {len(block[rows])} {rows} rows")
        for kind in POSITION_KINDS:
            ids = block[f"{kind}_ids"]
            if ids.ndim != 2 or ids.shape[1] != m.k:
                raise ValueError(f"encoded block: {kind}_ids {ids.shape} are not [N, k={m.k}]")
        if len(block["autocorr_scale"]) != len(block["autocorr"]):
            raise ValueError("encoded block: autocorr_scale does not hold one scale per factor column")
        keys = [key_hex(r) for r in block["keys"]]
        seen = self._buf_keys.intersection(keys)
        if seen or len(set(keys)) != n:
            raise ValueError(f"sample {min(seen) if seen else keys[0]} was added twice to this writer")
        self._add_block(block, keys)

    def _add_block(self, block: dict[str, np.ndarray], keys: list[str]) -> None:
        self._buf.append(block)
        self._buf_keys.update(keys)
        self.num_added += len(keys)
        self._buf_bytes += record_nbytes(block)
        if len(self._buf_keys) >= self.segment_rows or self._buf_bytes >= self.segment_bytes:
            self.flush()

    def flush(self) -> Manifest | None:
        """Write and commit the buffered samples as one segment (no-op when empty)."""
        if not self._buf:
            return None
        arrays = concat_blocks(self._buf, self.meta)
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
    data = {}
    try:
        arrs = group.segment_arrays(m.segment)
    except Exception as e:  # noqa: BLE001 - unreadable array metadata = corruption
        raise CacheCorruptError(f"{where}: cannot open the segment's arrays ({type(e).__name__}: {e}). "
                                f"Fix: remove manifests/{m.segment}.json and segments/{m.segment}, then re-run the "
                                f"fill to redo its samples.") from e
    for name, arr in arrs.items():
        try:
            data[name] = arr[...]
        except Exception as e:  # noqa: BLE001 - checksum / decompression / missing chunk
            raise corrupt_segment(group, m.segment, name, e) from e
    for name, info in m.arrays.items():
        a = data.get(name)
        if a is None or list(a.shape) != info["shape"] or str(a.dtype) != info["dtype"]:
            raise CacheCorruptError(f"{where}/{name}: shape/dtype {None if a is None else (a.shape, a.dtype)} "
                                    f"!= manifest {info['shape']} {info['dtype']}")
        if _sha(a) != info["sha256"]:
            raise CacheCorruptError(f"{where}/{name}: sha256 differs from the manifest: the stored chunks are "
                                    f"corrupted. Fix: remove manifests/{m.segment}.json and segments/{m.segment}, "
                                    f"then re-run the fill to redo its samples.")
    return SegmentData(group.meta, data)


__all__ = ["CacheGroup", "CacheWriter", "Manifest", "SegmentData", "Storage", "find_group", "list_groups",
           "open_group", "verify_manifest_arrays", "corrupt_segment", "DEFAULT_SEGMENT_ROWS", "DEFAULT_SEGMENT_BYTES"]
