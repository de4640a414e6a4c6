"""An opened prepared dataset: memory-mapped arrays, samples rebuilt on access, and the checks that
tell whether it still describes its inputs (docs/prepared-data.md)."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ckd_common.data import DataError, PreparedSample
from ckd_common.templates import IGNORE_INDEX

from .spec import FORMAT, MANIFEST, SKIPPED_IMAGES, PreparedDataError, PrepareSpec


class PreparedData:
    """A committed prepared dataset, memory-mapped. The interface of ``ckd_common.data.PreparedDataset``
    (``samples``, ``fingerprint``, ``template``, ``num_visual_tokens``, ``skipped``, ``notes``,
    ``warnings``) plus cheap whole-dataset arrays (``lengths``, ``key_array``) for code that must not
    touch every sample."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise PreparedDataError(f"{self.path} is not a prepared dataset (no {MANIFEST}: never made, or its "
                                    f"preparation was interrupted); run ckd data prepare")
        try:
            m = json.loads(mpath.read_text())
            if m.get("format") != FORMAT:
                raise PreparedDataError(f"{self.path}: format {m.get('format')!r}, this version reads {FORMAT!r}; "
                                        f"prepare the data again")
            self.spec = PrepareSpec(**m["spec"])
            arrays = {name: self._map(name, a) for name, a in m["arrays"].items()}
        except PreparedDataError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise PreparedDataError(f"{self.path} is damaged ({type(e).__name__}: {e}); delete it and prepare "
                                    f"the data again") from None
        self.manifest = m
        self.template, self.num_visual_tokens = self.spec.template, self.spec.num_visual_tokens
        self.fingerprint: str = m["fingerprint"]
        self.skipped: dict[str, int] = m["skipped"]
        self.notes: dict[str, int] = m["notes"]
        self.warnings: list[str] = m["warnings"]
        self.max_token_id: int = m["max_token_id"]  # of the text; the image token id is added below
        self._a = arrays
        self._off = arrays["token_offsets"]
        self._vs = arrays["visual_start"]
        self.key_array: np.ndarray = arrays["keys"]        # |S32 [N]: the sample keys, in order
        text_len = np.diff(self._off)
        self.lengths: np.ndarray = text_len + np.where(self._vs >= 0, self.num_visual_tokens, 0)
        self.has_images = bool((self._vs >= 0).any())
        if self.has_images:
            self.max_token_id = max(self.max_token_id, self.spec.image_token_id)
        self.samples = SampleView(self)

    def _map(self, name: str, a: dict) -> np.ndarray:
        f = self.path / a["file"]
        want = a["offset"] + a["bytes"]
        if not f.is_file() or f.stat().st_size != want:
            raise PreparedDataError(f"{self.path}: array {name} is truncated or missing ({f}); delete the "
                                    f"directory and prepare the data again")
        if a["bytes"] == 0:  # mmap cannot map an empty array
            return np.zeros(a["shape"], dtype=a["dtype"])
        return np.load(f, mmap_mode="r")

    def __len__(self) -> int:
        return len(self._vs)

    @property
    def keys(self) -> list[str]:
        """Every sample key, in order (a fresh list: 1.2M keys are ~100 MB)."""
        return [k.decode() for k in self.key_array.tolist()]

    def __repr__(self) -> str:
        return f"PreparedData({self.path}, {len(self)} samples, template {self.template}, fingerprint {self.fingerprint})"

    # -- one sample --------------------------------------------------------------------------
    def _text(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self._off[i]), int(self._off[i + 1])
        return self._a["tokens"][a:b], self._a["label_mask"][a:b]

    def input_ids(self, i: int) -> np.ndarray:
        t, _ = self._text(i)
        vs = int(self._vs[i])
        if vs < 0:
            return t.astype(np.int64)
        return np.concatenate([t[:vs], np.full(self.num_visual_tokens, self.spec.image_token_id, np.int64),
                               t[vs:]]).astype(np.int64)

    def labels(self, i: int) -> np.ndarray:
        t, m = self._text(i)
        lab = np.where(m, t.astype(np.int64), IGNORE_INDEX)
        vs = int(self._vs[i])
        if vs < 0:
            return lab
        return np.concatenate([lab[:vs], np.full(self.num_visual_tokens, IGNORE_INDEX, np.int64), lab[vs:]])

    def _blob(self, name: str, i: int) -> str:
        off = self._a[name + "_offsets"]
        return self._a[name][int(off[i]):int(off[i + 1])].tobytes().decode()

    def image_path(self, i: int) -> str | None:
        if self._vs[i] < 0:
            return None
        p = self._blob("image_paths", i)
        return str(Path(self.spec.images) / p) if self.spec.images else p

    def sample(self, i: int) -> "StoredSample":
        return StoredSample(self, int(i))

    # -- checks ------------------------------------------------------------------------------
    def stale_reasons(self, images: bool = True) -> list[str]:
        """Why this dataset no longer describes its inputs (empty: it does). The data file and every
        referenced image are compared by size and mtime first and, where those moved, by content hash;
        ``images=False`` checks the data file only (for processes that trust a check made just before)."""
        reasons = []
        d = self.manifest["data"]
        p = Path(self.spec.data)
        try:
            st = p.stat()
            if (st.st_size, st.st_mtime_ns) != (d["size"], d["mtime_ns"]) and _sha256_file(p) != d["sha256"]:
                reasons.append(f"the data file {p} changed since it was prepared")
        except OSError:
            reasons.append(f"the data file {p} is gone")
        if images:
            reasons += self._image_changes()
        return reasons

    def _image_changes(self) -> list[str]:
        # one pass over plain Python objects: a stat per image dominates (~1.2M at LLaVA scale)
        with_image = np.nonzero(self._vs >= 0)[0]
        blob, off = self._a["image_paths"].tobytes(), self._a["image_paths_offsets"]
        starts, ends = off[with_image].tolist(), off[with_image + 1].tolist()
        stats = self._a["image_stat"][with_image].tolist()
        root = self.spec.images
        changed, gone = [], []
        for j, (a, b, (size, mtime)) in enumerate(zip(starts, ends, stats)):
            rel = blob[a:b].decode()
            path = os.path.join(root, rel) if root else rel
            try:
                st = os.stat(path)
            except OSError:
                gone.append(path)
                continue
            if st.st_size != size or st.st_mtime_ns != mtime:
                if _sha256_file(Path(path)) != bytes(self._a["image_sha"][with_image[j]]).hex():
                    changed.append(path)
        out = []
        if changed:
            out.append(f"{len(changed)} image(s) changed since preparation (first: {changed[0]})")
        if gone:
            out.append(f"{len(gone)} image(s) are gone (first: {gone[0]})")
        skipped = self.path / SKIPPED_IMAGES
        if skipped.is_file():
            moved = [p for p, size, mtime in json.loads(skipped.read_text())
                     if _stat(p) != (None if size < 0 else (size, mtime))]
            if moved:
                out.append(f"{len(moved)} image(s) of left-out samples appeared or changed (first: {moved[0]})")
        return out

    def verify(self) -> list[str]:
        """Arrays whose bytes differ from the checksums recorded at preparation (damage on disk)."""
        bad = []
        for name, a in self.manifest["arrays"].items():
            h = hashlib.sha256()
            with open(self.path / a["file"], "rb") as f:
                f.seek(a["offset"])
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            if h.hexdigest() != a["sha256"]:
                bad.append(name)
        return bad

    def check_errors(self, on_error: str) -> "PreparedData":
        """``on_error='raise'``: a DataError naming the first bad record when preparation left any out."""
        n = sum(self.skipped.values())
        if on_error == "raise" and n:
            first = self.manifest["errors"][0]
            more = f" (and {n - 1} more bad record(s))" if n > 1 else ""
            raise DataError(f"{first}{more}. The prepared dataset {self.path} leaves them out: to use it without "
                            f"them, pass --on-error skip (student_trainer: --data-on-error skip)")
        return self


class StoredSample(PreparedSample):
    """A sample of a prepared dataset on disk: every field is read from the memory-mapped arrays when
    it is used, so making (and holding) many samples costs little time and memory."""

    __slots__ = ("_data", "_i")

    def __init__(self, data: PreparedData, i: int):  # noqa: D107 - not the dataclass __init__
        self._data, self._i = data, i

    id = property(lambda self: self._data._blob("sample_ids", self._i))
    key = property(lambda self: self._data.key_array[self._i].decode())
    input_ids = property(lambda self: self._data.input_ids(self._i))
    labels = property(lambda self: self._data.labels(self._i))
    visual_start = property(lambda self: int(self._data._vs[self._i]))
    num_visual = property(lambda self: self._data.num_visual_tokens if self._data._vs[self._i] >= 0 else 0)
    image_path = property(lambda self: self._data.image_path(self._i))
    image_sha = property(lambda self: bytes(self._data._a["image_sha"][self._i]).hex()
                         if self._data._vs[self._i] >= 0 else None)
    image_stat = None

    @property
    def length(self) -> int:
        return int(self._data.lengths[self._i])


class SampleView(Sequence):
    """The samples of a prepared dataset (or a subset, :meth:`select`) as a read-only sequence."""

    def __init__(self, data: PreparedData, index: np.ndarray | None = None):
        self.data, self.index = data, index

    def __len__(self) -> int:
        return len(self.data) if self.index is None else len(self.index)

    def _pos(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range ({n} samples)")
        i %= n
        return i if self.index is None else int(self.index[i])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.select(np.arange(len(self))[i])
        return self.data.sample(self._pos(int(i)))

    def __iter__(self) -> Iterator[StoredSample]:
        for i in range(len(self)):
            yield self[i]

    def select(self, positions: Sequence[int]) -> "SampleView":
        """The samples at ``positions`` of this view, in that order."""
        pos = np.asarray(positions, dtype=np.int64)
        return SampleView(self.data, pos if self.index is None else self.index[pos])

    @property
    def key_array(self) -> np.ndarray:
        return self.data.key_array if self.index is None else self.data.key_array[self.index]

    @property
    def lengths(self) -> np.ndarray:
        return self.data.lengths if self.index is None else self.data.lengths[self.index]


def sample_keys(samples: Sequence[PreparedSample]) -> list[str]:
    """The keys of ``samples`` (a SampleView reads them from one array, not sample by sample)."""
    if isinstance(samples, SampleView):
        return [k.decode() for k in samples.key_array.tolist()]
    return [s.key for s in samples]


def keys_digest(samples: Sequence[PreparedSample]) -> str:
    """sha256 of the samples' keys concatenated in order (first 32 hex): what a training run trained on."""
    if isinstance(samples, SampleView):  # every key is exactly 32 ASCII characters: the same bytes
        return hashlib.sha256(np.ascontiguousarray(samples.key_array).tobytes()).hexdigest()[:32]
    return hashlib.sha256("".join(s.key for s in samples).encode()).hexdigest()[:32]


def subset(samples: Sequence[PreparedSample], positions: Sequence[int]) -> Sequence[PreparedSample]:
    """The samples at ``positions`` (a view stays a view)."""
    if isinstance(samples, SampleView):
        return samples.select(positions)
    return [samples[i] for i in positions]


def sample_lengths(samples: Sequence[PreparedSample]) -> list[int] | np.ndarray:
    return samples.lengths if isinstance(samples, SampleView) else [s.length for s in samples]


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
