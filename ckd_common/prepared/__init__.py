"""The prepared dataset on disk: made once by ``ckd data prepare`` (or the first process that needs
it), opened by every trainer rank, fill, cascade and test instead of re-preparing
(docs/prepared-data.md is the format and its rationale).

A prepared dataset is one directory of flat NumPy arrays (memory-mapped, O(1) random access) plus
``manifest.json``, written last as the commit marker. It is made for one :class:`PrepareSpec` —
data file, image root, template, tokenizer hash, visual-token count, image token id, max_length,
image preprocessing, pixel limit, image-path policy — and lives under a root
(``$CKD_PREPARED_DIR``, default ``~/.cache/llava-ckd/prepared``) in a directory named after it.

* :func:`obtain` opens the dataset of a spec, or builds it (in parallel: ``ckd_common.prepared.builder``)
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
from collections.abc import Iterator
from pathlib import Path

from ckd_common.data import dataset_fingerprint

from .builder import build
from .dataset import (PreparedData, SampleView, StoredSample, keys_digest, sample_keys, sample_lengths,
                      subset)
from .spec import FORMAT, MANIFEST, ROOT_ENV, Log, PreparedDataError, PrepareSpec, _stderr, default_root

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
    log = log if log is not None else (lambda _msg: None)
    root = Path(root) if root is not None else default_root()
    try:
        return _obtain(spec, tokenizer, root, on_error, workers, progress, rebuild, log, check_images, chunk_records)
    except OSError as e:  # a root we may not write, a full disk: one line, nothing half-written (see build)
        raise PreparedDataError(f"preparing {spec.data} under {root} failed: {e}; free space, fix the permissions, "
                                f"or prepare elsewhere ($CKD_PREPARED_DIR, ckd data prepare --root)") from None


def _obtain(spec, tokenizer, root: Path, on_error, workers, progress, rebuild, log, check_images, chunk_records):
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
