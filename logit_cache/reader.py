"""Reading a group: a key -> (segment, row) index built once, O(1) random access, batch reads.

Random reads issue every array slice a sample needs concurrently on zarr's event loop (one
round trip instead of ~10). The reader is thread-safe, survives ``fork`` (zarr arrays are
re-opened per process) and pickles for spawn-based data-loader workers.

Integrity: a reader refuses a group with a damaged manifest; in format 2 every chunk it decodes is
checked against its crc32c and a missing chunk is an error, so corrupted bytes raise
CacheCorruptError naming the segment and array instead of becoming targets. Format-1 chunks carry
no checksums: :func:`verify_segments` checks such segments against their manifests' sha256 (the
trainer does this when it opens a format-1 group).
"""
from __future__ import annotations

import asyncio
import os
from typing import Any, Iterable, Iterator

import numpy as np
from zarr.core.sync import sync

from ckd_common.targets import SampleTargets

from .errors import CacheError, KeyNotCachedError
from .layout import KEY_BYTES, assemble, index_arrays, record_of, sample_slices
from .meta import CacheMeta
from .storage import Storage
from .store import CacheGroup, Manifest, corrupt_segment, find_group, open_group, verify_manifest_arrays


class CacheReader:
    """Random and sequential access to the committed samples of one group."""

    def __init__(self, group: CacheGroup) -> None:
        self.group, self.meta = group, group.meta
        group.check_no_damage()
        self.manifests = group.committed()
        self.segments = [m.segment for m in self.manifests]
        self._pid = -1
        self._arrays: list[dict[str, Any]] = []
        self._build_index()

    # -- index ---------------------------------------------------------------------------------
    def _open_arrays(self) -> list[dict[str, Any]]:
        if self._pid != os.getpid():
            arrays = []
            for seg in self.segments:
                try:
                    arrays.append(self.group.segment_arrays(seg))
                except Exception as e:  # noqa: BLE001 - unreadable array metadata
                    raise corrupt_segment(self.group, seg, "zarr.json", e) from e
            self._arrays, self._pid = arrays, os.getpid()
        return self._arrays

    def _build_index(self) -> None:
        arrays = self._open_arrays()
        names = index_arrays(self.meta)

        async def load(si: int, name: str):
            try:
                return await arrays[si][name].async_array.getitem(slice(None))
            except Exception as e:  # noqa: BLE001 - checksum / missing chunk
                raise corrupt_segment(self.group, self.segments[si], name, e) from e

        async def load_all():
            return await asyncio.gather(*[load(si, n) for si in range(len(arrays)) for n in names])

        flat = sync(load_all()) if arrays else []
        self.index: list[dict[str, np.ndarray]] = []
        key_blocks, seg_of, row_of = [], [], []
        for si in range(len(arrays)):
            idx = dict(zip(names, flat[si * len(names):(si + 1) * len(names)]))
            self.index.append(idx)
            keys = idx["keys"]
            key_blocks.append(np.ascontiguousarray(keys, dtype=np.uint8).reshape(-1, KEY_BYTES))
            seg_of.append(np.full(len(keys), si, dtype=np.int32))
            row_of.append(np.arange(len(keys), dtype=np.int64))
        allkeys = np.concatenate(key_blocks) if key_blocks else np.zeros((0, KEY_BYTES), np.uint8)
        b = allkeys.tobytes()
        n = len(allkeys)
        kb = [b[i:i + KEY_BYTES] for i in range(0, n * KEY_BYTES, KEY_BYTES)]
        # built from the end so that the FIRST occurrence (smallest segment id) of a duplicate wins
        self._index: dict[bytes, int] = dict(zip(reversed(kb), range(n - 1, -1, -1)))
        self.duplicates = n - len(self._index)
        self._seg = np.concatenate(seg_of) if seg_of else np.zeros(0, np.int32)
        self._row = np.concatenate(row_of) if row_of else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        try:
            return bytes.fromhex(key) in self._index
        except ValueError:
            return False

    def keys(self) -> Iterator[str]:
        return (k.hex() for k in self._index)

    def locate(self, key: str) -> tuple[str, int]:
        """(segment id, row within the segment) of a committed key."""
        si, r = self._loc(key)
        return self.segments[si], r

    def _loc(self, key: str) -> tuple[int, int]:
        try:
            i = self._index[bytes.fromhex(key)]
        except (KeyError, ValueError):
            raise KeyNotCachedError(f"sample key {key!r} is not in cache group {self.group.url} "
                                    f"({len(self)} committed samples). Fix: fill the cache for this sample "
                                    f"(a resumed `logit_cache fill` adds the missing keys).") from None
        return int(self._seg[i]), int(self._row[i])

    # -- reads -----------------------------------------------------------------------------------
    async def _fetch(self, si: int, name: str, sl: slice) -> np.ndarray:
        arr = self._arrays[si][name]
        if sl.stop <= sl.start:
            return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
        try:
            return await arr.async_array.getitem(sl)
        except Exception as e:  # noqa: BLE001 - checksum / decompression / missing chunk
            raise corrupt_segment(self.group, self.segments[si], name, e) from e

    def get_many(self, keys: Iterable[str]) -> list[SampleTargets]:
        """Read several samples with all their slices fetched concurrently. CacheCorruptError
        (naming the segment and the array) if any byte read differs from what was committed."""
        keys = list(keys)
        self._open_arrays()
        plans = []
        for key in keys:
            si, r = self._loc(key)
            plans.append((si, r, list(sample_slices(self.meta, self.index[si], r).items())))

        async def run():
            return await asyncio.gather(*[self._fetch(si, name, sl) for si, _, p in plans for name, sl in p])

        flat = sync(run()) if plans else []
        out, i = [], 0
        for key, (si, r, p) in zip(keys, plans):
            parts = {name: flat[i + j] for j, (name, _) in enumerate(p)}
            i += len(p)
            out.append(assemble(key, self.meta, record_of(self.meta, self.index[si], r, parts)))
        return out

    def get(self, key: str) -> SampleTargets:
        return self.get_many([key])[0]

    __getitem__ = get

    def iter_samples(self) -> Iterator[SampleTargets]:
        """Every committed sample, segment by segment (bulk reads: the fast sequential path)."""
        for si, seg in enumerate(self.segments):
            try:
                data = self.group.load_segment(seg)
            except Exception as e:  # noqa: BLE001 - checksum / missing chunk
                raise corrupt_segment(self.group, seg, "(segment)", e) from e
            for r in range(len(data)):
                key = data.key(r)
                if self._loc(key) != (si, r):
                    continue  # a duplicate shadowed by an earlier segment
                yield data.sample(r)

    # -- pickling for spawn-based loader workers -------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["_arrays"], d["_pid"] = [], -1
        d["_root"], d["_opts"], d["_name"] = self.group.storage.root, self.group.storage.storage_options, self.group.name
        d.pop("group")
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        root, opts, name = d.pop("_root"), d.pop("_opts"), d.pop("_name")
        self.__dict__.update(d)
        self.group = CacheGroup(Storage(root, opts), name)


def verify_segments(group: CacheGroup, manifests: Iterable[Manifest], progress: bool = False) -> int:
    """Check whole segments against their manifests' sha256 (format 1 has no chunk checksums);
    CacheCorruptError naming the first bad one. Returns the number of samples checked."""
    from tqdm import tqdm

    manifests = list(manifests)
    n = 0
    for m in tqdm(manifests, desc=f"checking {group.name}", unit="segment", disable=not progress):
        n += len(verify_manifest_arrays(group, m))
    return n


def open_for_training(root: str | os.PathLike, expected: CacheMeta | dict[str, Any],
                      storage_options: dict | None = None) -> CacheReader:
    """Find the group for ``expected``'s (dataset_fingerprint, template), check every expected
    field (CacheMismatchError / UnknownFormatVersion) and return its reader."""
    exp = expected.to_dict() if isinstance(expected, CacheMeta) else dict(expected)
    if "dataset_fingerprint" not in exp or "template" not in exp:
        raise CacheError("open_for_training: expected metadata must contain dataset_fingerprint and template "
                         "(they select the group); add them.")
    name = find_group(root, exp["dataset_fingerprint"], exp["template"], storage_options)
    group = open_group(root, name, storage_options=storage_options)
    group.meta.check_compatible(expected, where=group.url)
    return CacheReader(group)

