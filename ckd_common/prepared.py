"""The prepared dataset on disk: made once by ``ckd data prepare`` (or the first process that needs
it), opened by every trainer rank, fill, cascade and test instead of re-preparing
(docs/prepared-data.md is the format and its rationale).

A prepared dataset is one directory of flat NumPy arrays (memory-mapped, O(1) random access) plus
``manifest.json``, written last as the commit marker. It is made for one :class:`PrepareSpec` —
data file, image root, template, tokenizer hash, visual-token count, image token id, max_length,
image preprocessing, pixel limit, image-path policy — and lives under a root
(``$CKD_PREPARED_DIR``, default ``~/.cache/llava-ckd/prepared``) in a directory named after it.

* :func:`obtain` opens the dataset of a spec, or builds it (in parallel: ``ckd_common.prepare_build``)
  when it is missing, damaged or **stale** — the data file's bytes, a referenced image's bytes or
  the image set changed since — and then rebuilds it; a stale dataset is never reused.
* :func:`use_prepared` opens a dataset a caller names explicitly (``--prepared DIR``): one made for
  other inputs, or a stale one, is **refused** with the differences, never rebuilt behind the
  caller's back.
* Consumers apply their own bad-record policy on open: the dataset holds the good samples and the
  record of the bad ones; ``on_error='raise'`` fails naming the first bad record.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckd_common.data import (DEFAULT_MAX_LENGTH, MAX_IMAGE_PIXELS, DataError, PreparedSample,
                             dataset_fingerprint)
from ckd_common.templates import IGNORE_INDEX

FORMAT = "ckd-prepared-v1"
MANIFEST = "manifest.json"
SKIPPED_IMAGES = "skipped_images.json"  # images of samples left out: their appearance makes the dataset stale
ROOT_ENV = "CKD_PREPARED_DIR"

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"prepared data: {msg}", file=sys.stderr, flush=True)


def default_root() -> Path:
    """Where prepared datasets live: ``$CKD_PREPARED_DIR``, else ``$XDG_CACHE_HOME/llava-ckd/prepared``
    (``~/.cache/llava-ckd/prepared``)."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "llava-ckd" / "prepared"


class PreparedDataError(DataError):
    """A prepared dataset is missing, damaged, stale or made for other inputs (the message says which
    and what to do)."""


# ---------------------------------------------------------------------------------------------
# what a prepared dataset is made for


@dataclass(frozen=True)
class PrepareSpec:
    """Every input a prepared dataset depends on. The content fields fix the samples; the policy fields
    (pixel limit, images outside the root) decide which records are accepted."""

    data: str                       # the data file, absolute
    images: str | None              # the image root, absolute (None: image paths as given)
    template: str
    tokenizer_hash: str
    num_visual_tokens: int
    image_token_id: int
    max_length: int = DEFAULT_MAX_LENGTH
    image_aspect_ratio: str = "square"   # the pixels the loaders make of the images (docs/design.md §2.3)
    max_image_pixels: int = MAX_IMAGE_PIXELS
    allow_outside_images: bool = False

    CONTENT = ("data", "images", "template", "tokenizer_hash", "num_visual_tokens", "image_token_id", "max_length",
               "image_aspect_ratio")

    @classmethod
    def of(cls, data: str | Path, images: str | Path | None, template: str, model, max_length: int = DEFAULT_MAX_LENGTH,
           **policy) -> "PrepareSpec":
        """``model``: what the data is prepared for — anything with ``tokenizer_hash``,
        ``num_visual_tokens``, ``image_token_id`` and ``image_aspect_ratio`` (ckd_common.model.ModelInfo
        or DataContract, the server's /v1/info)."""
        return cls(str(Path(data).resolve()), str(Path(images).resolve()) if images else None, template,
                   model.tokenizer_hash, int(model.num_visual_tokens), int(model.image_token_id), int(max_length),
                   getattr(model, "image_aspect_ratio", "square"), **policy)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps({"format": FORMAT, **self.to_dict()}, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def dirname(self) -> str:
        return f"{Path(self.data).stem}.{self.template}.{self.key}"

    def differences(self, other: "PrepareSpec", fields: Sequence[str] = CONTENT) -> list[str]:
        return [f"{f}: prepared for {getattr(self, f)!r}, this run has {getattr(other, f)!r}"
                for f in fields if getattr(self, f) != getattr(other, f)]


# ---------------------------------------------------------------------------------------------
# the opened dataset


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
        stat, sha = self._a["image_stat"], self._a["image_sha"]
        changed, gone = [], []
        for i in np.nonzero(self._vs >= 0)[0]:
            path = self.image_path(i)
            now = _stat(path)
            if now != (int(stat[i, 0]), int(stat[i, 1])):
                if now is None:
                    gone.append(path)
                elif _sha256_file(Path(path)) != bytes(sha[i]).hex():
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
    """A sample of a prepared dataset on disk: its small fields read at once, its token arrays built
    from the memory-mapped arrays on each access (so holding many samples costs little memory)."""

    def __init__(self, data: PreparedData, i: int):  # noqa: D107 - not the dataclass __init__
        self._data, self._i = data, i
        self.id = data._blob("sample_ids", i)
        self.key = data.key_array[i].decode()
        vs = int(data._vs[i])
        self.visual_start, self.num_visual = vs, (data.num_visual_tokens if vs >= 0 else 0)
        self.image_path = data.image_path(i)
        self.image_sha = bytes(data._a["image_sha"][i]).hex() if vs >= 0 else None
        self.image_stat = None

    input_ids = property(lambda self: self._data.input_ids(self._i))
    labels = property(lambda self: self._data.labels(self._i))

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


# ---------------------------------------------------------------------------------------------
# opening: by spec under a root (built when needed), or an explicit directory


@contextlib.contextmanager
def _lock(root: Path, name: str, exclusive: bool) -> Iterator[None]:
    """Readers of a dataset share the lock; its builder holds it alone (also across processes)."""
    with open(root / f".{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _try_open(path: Path, spec: PrepareSpec, images: bool) -> tuple[PreparedData | None, str | None]:
    """(the dataset, None) if it is committed, intact and current; else (None, why not)."""
    if not (path / MANIFEST).is_file():
        return None, None
    try:
        ds = PreparedData(path)
    except PreparedDataError as e:
        return None, str(e)
    diffs = ds.spec.differences(spec, tuple(f.name for f in dataclasses.fields(PrepareSpec)))
    if diffs:  # only a hash collision of the directory name gets here
        return None, "made for other inputs: " + "; ".join(diffs)
    reasons = ds.stale_reasons(images=images)
    return (None, "stale: " + "; ".join(reasons)) if reasons else (ds, None)


def open_current(spec: PrepareSpec, root: str | Path | None = None) -> PreparedData | None:
    """The prepared dataset of ``spec`` under ``root`` if it exists, is intact and is current, else None."""
    root = Path(root) if root is not None else default_root()
    if not (root / spec.dirname / MANIFEST).is_file():
        return None
    with _lock(root, spec.dirname, exclusive=False):
        return _try_open(root / spec.dirname, spec, True)[0]


def obtain(spec: PrepareSpec, tokenizer, *, root: str | Path | None = None, on_error: str = "raise",
           workers: int | None = None, progress: bool = False, rebuild: bool = False, log: Log | None = _stderr,
           check_images: bool = True, chunk_records: int | None = None) -> PreparedData:
    """The prepared dataset of ``spec`` under ``root``: opened when it exists, is intact and is current;
    built (``workers`` processes, default all cores) when it is missing, damaged or stale — a stale
    dataset is rebuilt, never reused. Concurrent callers build it once (a lock per dataset).
    ``tokenizer`` (with ``spec.tokenizer_hash``) is used only to build."""
    from ckd_common.prepare_build import build

    log = log if log is not None else (lambda _msg: None)
    root = Path(root) if root is not None else default_root()
    root.mkdir(parents=True, exist_ok=True)
    path = root / spec.dirname
    why = None
    if not rebuild:
        with _lock(root, spec.dirname, exclusive=False):
            ds, why = _try_open(path, spec, check_images)
        if ds is not None:
            log(f"opened {path} ({len(ds)} samples, fingerprint {ds.fingerprint})")
            return ds.check_errors(on_error)
    with _lock(root, spec.dirname, exclusive=True):
        if not rebuild:
            ds, why = _try_open(path, spec, check_images)  # another process may have built it meanwhile
            if ds is not None:
                log(f"opened {path} ({len(ds)} samples, fingerprint {ds.fingerprint})")
                return ds.check_errors(on_error)
        if why:
            log(f"{path} is {why if why.startswith('stale') else 'unusable: ' + why}; rebuilding it")
        build(spec, tokenizer, root, spec.dirname, workers=workers, progress=progress, log=log,
              chunk_records=chunk_records)
        ds = PreparedData(path)
    return ds.check_errors(on_error)


def use_prepared(path: str | Path, expect: PrepareSpec, *, on_error: str = "raise", check_images: bool = True,
                 max_image_pixels: int | None = None, log: Log | None = _stderr) -> PreparedData:
    """The prepared dataset at ``path``, which the caller named explicitly: refused (PreparedDataError)
    when it was made for other content inputs than ``expect``, accepted images over
    ``max_image_pixels`` (e.g. a server's lower limit), or is stale. Its own pixel limit and image-path
    policy are accepted as prepared."""
    ds = PreparedData(path)
    diffs = ds.spec.differences(expect)
    if diffs:
        raise PreparedDataError(f"--prepared {path} was made for other inputs than this run's:\n  " + "\n  ".join(diffs)
                                + "\nprepare this run's data (ckd data prepare) or leave --prepared out")
    if max_image_pixels is not None and ds.spec.max_image_pixels > max_image_pixels:
        raise PreparedDataError(f"--prepared {path} accepted images up to {ds.spec.max_image_pixels} pixels, more than "
                                f"the {max_image_pixels} allowed here; prepare it with --max-image-pixels "
                                f"{max_image_pixels}")
    reasons = ds.stale_reasons(images=check_images)
    if reasons:
        raise PreparedDataError(f"--prepared {path} is stale: " + "; ".join(reasons)
                                + "; prepare the data again (ckd data prepare rebuilds it)")
    if log is not None:
        log(f"using {path} ({len(ds)} samples, fingerprint {ds.fingerprint})")
    return ds.check_errors(on_error)


__all__ = ["PrepareSpec", "PreparedData", "PreparedDataError", "StoredSample", "SampleView", "obtain", "use_prepared",
           "open_current",
           "default_root", "sample_keys", "keys_digest", "subset", "sample_lengths", "dataset_fingerprint", "ROOT_ENV",
           "FORMAT", "MANIFEST"]
