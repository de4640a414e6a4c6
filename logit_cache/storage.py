"""A cache root's storage: an fsspec filesystem for manifests and listings, Zarr stores for the
arrays (local paths and fsspec URLs alike), atomic writes, and the strict read store of format 2."""
from __future__ import annotations

import os
import uuid
from typing import Any

import fsspec
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.storage import FsspecStore, LocalStore, WrapperStore


class MissingChunkError(KeyError):
    """A chunk of a format-2 array is absent (every chunk of those is written)."""


class _StrictChunks(WrapperStore):
    """Reads through to a store, but a missing chunk key is an error instead of the fill value
    (zarr's default): format-2 writers write every chunk, so an absent one is damage."""

    async def get(self, key, prototype=None, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        if buf is None and (key.startswith("c/") or "/c/" in key):
            raise MissingChunkError(f"chunk {key} is missing")
        return buf


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

    def zgroup(self, *parts: str, mode: str = "r", strict: bool = False, **kw: Any) -> zarr.Group:
        """The Zarr group at ``parts``. ``strict`` (reading format 2): a missing chunk raises."""
        if strict:
            store = (LocalStore(self.fpath(*parts), read_only=True) if self.local else
                     FsspecStore.from_url(self.url(*parts), storage_options=self.storage_options or None,
                                          read_only=True))
            return zarr.open_group(_StrictChunks(store), mode="r", **kw)
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
