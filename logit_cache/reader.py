"""Reading a group: a key -> (segment, row) index built once, O(1) random access, batch reads.

Random reads issue every array slice a sample needs concurrently on zarr's event loop (one
round trip instead of ~10). The reader is thread-safe, survives ``fork`` (zarr arrays are
re-opened per process) and pickles for spawn-based data-loader workers.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any, Iterable, Iterator

import numpy as np
from zarr.core.sync import sync

from ckd_common.targets import SampleTargets

from .errors import CacheError, KeyNotCachedError
from .meta import CacheMeta
from .store import KEY_BYTES, CacheGroup, Storage, assemble, find_group, open_group


class CacheReader:
    """Random and sequential access to the committed samples of one group."""

    def __init__(self, group: CacheGroup) -> None:
        self.group, self.meta = group, group.meta
        self.manifests = group.committed()
        self.segments = [m.segment for m in self.manifests]
        self._pid = -1
        self._arrays: list[dict[str, Any]] = []
        self._build_index()

    # -- index ---------------------------------------------------------------------------------
    def _open_arrays(self) -> list[dict[str, Any]]:
        if self._pid != os.getpid():
            self._arrays = [self.group.segment_arrays(s) for s in self.segments]
            self._pid = os.getpid()
        return self._arrays

    def _build_index(self) -> None:
        arrays = self._open_arrays()
        names = ("keys", "text_offsets", "visual_offsets", "autocorr_offsets")

        async def load_all():
            return await asyncio.gather(*[a[n].async_array.getitem(slice(None)) for a in arrays for n in names])

        flat = sync(load_all()) if arrays else []
        self.offsets: list[dict[str, np.ndarray]] = []
        key_blocks, seg_of, row_of = [], [], []
        for si in range(len(arrays)):
            keys, *offs = flat[si * len(names):(si + 1) * len(names)]
            self.offsets.append(dict(zip(names[1:], offs)))
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
    def _requests(self, si: int, r: int) -> list[tuple[str, Any, slice]]:
        arrays = self._arrays[si]
        offs = self.offsets[si]
        req = []
        for kind in ("text", "visual"):
            o = offs[f"{kind}_offsets"]
            sl = slice(int(o[r]), int(o[r + 1]))
            for suf in ("ids", "lp", "tail", "lp0"):
                name = f"{kind}_{suf}"
                if name in arrays:
                    req.append((name, arrays[name], sl))
        o = offs["autocorr_offsets"]
        req.append(("autocorr", arrays["autocorr"], slice(int(o[r]), int(o[r + 1]))))
        return req

    @staticmethod
    async def _fetch(arr: Any, sl: slice) -> np.ndarray:
        if sl.stop <= sl.start:
            shape = (0, *arr.shape[1:])
            return np.zeros(shape, dtype=arr.dtype)
        return await arr.async_array.getitem(sl)

    def get_many(self, keys: Iterable[str]) -> list[SampleTargets]:
        """Read several samples with all their slices fetched concurrently."""
        keys = list(keys)
        self._open_arrays()
        plans = []
        for key in keys:
            si, r = self._loc(key)
            plans.append(self._requests(si, r))

        async def run():
            return await asyncio.gather(*[self._fetch(a, sl) for p in plans for _, a, sl in p])

        flat = sync(run()) if plans else []
        out, i = [], 0
        for key, p in zip(keys, plans):
            parts = {name: flat[i + j] for j, (name, _, _) in enumerate(p)}
            i += len(p)
            out.append(assemble(key, self.meta, parts))
        return out

    def get(self, key: str) -> SampleTargets:
        return self.get_many([key])[0]

    __getitem__ = get

    def iter_samples(self) -> Iterator[SampleTargets]:
        """Every committed sample, segment by segment (bulk reads: the fast sequential path)."""
        for si, seg in enumerate(self.segments):
            data = self.group.load_segment(seg)
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

