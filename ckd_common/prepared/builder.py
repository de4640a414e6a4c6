"""Building a prepared dataset: records -> samples in parallel, appended to flat
arrays in a temporary directory, committed by writing ``manifest.json`` last and renaming the
directory into place (docs/prepared-data.md).

The parent reads the data file and hands chunks of records to ``workers`` spawned processes; each
runs the per-record rule of ``ckd_common.data.Preparer`` (header-only image checks + image hash +
tokenisation) and returns compact arrays; the parent appends them in record order, so the result
does not depend on the number of workers (tested). Small files are prepared in-process.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import shutil
import signal
import time
import uuid
from collections import Counter, deque
from pathlib import Path

import numpy as np

from ckd_common.data import DataError, Preparer, decode_text, iter_records

from .spec import FORMAT, MANIFEST, SKIPPED_IMAGES

CHUNK_RECORDS = 256   # records per task: big enough to amortise pickling, small enough for a smooth bar
MAX_ERRORS_KEPT = 20  # bad records named in the manifest (all are counted)
_HEADER = 128         # bytes reserved for each .npy header (written when the length is known)
_IMAGE_REASONS = ("image not found", "image unreadable", "image over the pixel limit")


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class _ArrayFile:
    """An .npy file appended to in pieces; the header (with the final length) is written on close."""

    def __init__(self, path: Path, dtype, inner: tuple[int, ...] = ()):
        self.path, self.dtype, self.inner = path, np.dtype(dtype), tuple(inner)
        self.f = open(path, "wb")
        self.f.write(b"\0" * _HEADER)
        self.n, self.nbytes, self.h = 0, 0, hashlib.sha256()

    def append(self, arr) -> None:
        a = np.ascontiguousarray(arr, dtype=self.dtype)
        assert a.shape[1:] == self.inner, (self.path, a.shape, self.inner)
        b = a.tobytes()
        self.f.write(b)
        self.h.update(b)
        self.n += a.shape[0]
        self.nbytes += len(b)

    def close(self) -> dict:
        header = io.BytesIO()
        shape = (self.n, *self.inner)
        np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": shape})
        head = header.getvalue()
        if len(head) != _HEADER:
            raise RuntimeError(f"npy header of {self.path} is {len(head)} bytes, expected {_HEADER}")
        self.f.seek(0)
        self.f.write(head)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"file": self.path.name, "dtype": self.dtype.str, "shape": list(shape), "offset": _HEADER,
                "bytes": self.nbytes, "sha256": self.h.hexdigest()}


# ---------------------------------------------------------------------------------------------
# the per-chunk work (in a worker process, or in-process for small files)

_PREPARER: Preparer | None = None
_SOURCE = ""
_ROOT: Path | None = None


def _make_preparer(spec: dict, tokenizer) -> Preparer:
    return Preparer(tokenizer, spec["template"], spec["num_visual_tokens"], spec["image_token_id"], spec["images"],
                    spec["max_length"], max_image_pixels=spec["max_image_pixels"],
                    allow_outside_images=spec["allow_outside_images"])


def _init_worker(spec: dict, tokenizer_json: str) -> None:
    global _PREPARER, _SOURCE, _ROOT
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the parent decides what Ctrl-C stops
    from tokenizers import Tokenizer

    _PREPARER = _make_preparer(spec, Tokenizer.from_str(tokenizer_json))
    _SOURCE, _ROOT = spec["data"], Path(spec["images"]) if spec["images"] else None


def _stored_path(rel: str, root: Path | None) -> str:
    """How an image path is stored: relative to the root as the record gives it, else absolute."""
    return rel if root is not None and not os.path.isabs(rel) else str(Path(rel).absolute())


def _prepare_chunk(task: tuple[int, list, int]) -> dict:
    start, records, end = task
    prep = _PREPARER
    toks, masks, tok_lens, vstart, keys, shas, stats = [], [], [], [], [], [], []
    ids, paths, errors, skipped_images = [], [], [], []
    n_tokens = n_response = 0
    notes_before = Counter(prep.notes)
    for j, rec in enumerate(records):
        try:
            s = prep.prepare(rec)
        except DataError as e:
            errors.append((start + j, str(e.located(_SOURCE, start + j)), e.category))
            if e.category in _IMAGE_REASONS and isinstance(rec, dict) and isinstance(rec.get("image"), str):
                p = str(prep.image_root / rec["image"]) if prep.image_root is not None else rec["image"]
                st = _stat(p)
                skipped_images.append((p, *(st or (-1, -1))))
            continue
        vs = s.visual_start
        ids_ = s.input_ids
        n_tokens += s.length
        n_response += len(s.response_positions)
        lab = s.labels
        if vs >= 0:  # the span is nv copies of the image token: stored as its start only
            ids_ = np.concatenate([ids_[:vs], ids_[vs + s.num_visual:]])
            lab = np.concatenate([lab[:vs], lab[vs + s.num_visual:]])
        toks.append(ids_)
        masks.append(lab != -100)
        tok_lens.append(len(ids_))
        vstart.append(vs)
        keys.append(s.key)
        ids.append(s.id.encode())
        if vs >= 0:
            paths.append(_stored_path(rec["image"], _ROOT).encode())
            shas.append(bytes.fromhex(s.image_sha))
            stats.append(s.image_stat)
        else:
            paths.append(b"")
            shas.append(b"\0" * 32)
            stats.append((0, 0))
    n = len(keys)
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    tokens = cat(toks, np.int64)
    return {
        "records": len(records), "end": end, "tokens": tokens, "label_mask": cat(masks, bool),
        "tok_lens": np.asarray(tok_lens, np.int64), "visual_start": np.asarray(vstart, np.int32),
        "keys": np.asarray(keys, dtype="S32").reshape(n), "ids": ids, "paths": paths,
        "image_sha": np.frombuffer(b"".join(shas), np.uint8).reshape(n, 32),
        "image_stat": np.asarray(stats, np.int64).reshape(n, 2), "errors": errors, "skipped_images": skipped_images,
        "notes": dict(Counter(prep.notes) - notes_before), "n_tokens": n_tokens, "n_response": n_response, "max_token": int(tokens.max()) if len(tokens) else -1,
    }


def _stat(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


# ---------------------------------------------------------------------------------------------
# the whole build


class _Writer:
    """Appends chunk results to the dataset's arrays in record order."""

    def __init__(self, d: Path):
        self.files = {
            "tokens": _ArrayFile(d / "tokens.npy", np.uint32),            # text ids, visual span left out
            "label_mask": _ArrayFile(d / "label_mask.npy", np.bool_),     # labels != -100 for those ids
            "token_offsets": _ArrayFile(d / "token_offsets.npy", np.int64),
            "visual_start": _ArrayFile(d / "visual_start.npy", np.int32),  # -1: no image
            "keys": _ArrayFile(d / "keys.npy", "S32"),
            "sample_ids": _ArrayFile(d / "sample_ids.npy", np.uint8),     # UTF-8, concatenated
            "sample_ids_offsets": _ArrayFile(d / "sample_ids_offsets.npy", np.int64),
            "image_paths": _ArrayFile(d / "image_paths.npy", np.uint8),   # UTF-8, relative to spec.images
            "image_paths_offsets": _ArrayFile(d / "image_paths_offsets.npy", np.int64),
            "image_sha": _ArrayFile(d / "image_sha.npy", np.uint8, (32,)),  # sha256 of the file's bytes
            "image_stat": _ArrayFile(d / "image_stat.npy", np.int64, (2,)),  # (size, mtime_ns) when hashed
        }
        self.ends = {"token_offsets": 0, "sample_ids_offsets": 0, "image_paths_offsets": 0}
        for name in self.ends:
            self.files[name].append(np.zeros(1, np.int64))

    def _offsets(self, name: str, lengths) -> None:
        ends = self.ends[name] + np.cumsum(np.asarray(lengths, np.int64))
        if len(ends):
            self.files[name].append(ends)
            self.ends[name] = int(ends[-1])

    def add(self, r: dict) -> None:
        f = self.files
        if r["max_token"] >= 1 << 32:
            raise DataError(f"token id {r['max_token']} does not fit the prepared dataset's uint32 ids")
        f["tokens"].append(r["tokens"])
        f["label_mask"].append(r["label_mask"])
        self._offsets("token_offsets", r["tok_lens"])
        f["visual_start"].append(r["visual_start"])
        f["keys"].append(r["keys"])
        f["sample_ids"].append(np.frombuffer(b"".join(r["ids"]), np.uint8))
        self._offsets("sample_ids_offsets", [len(x) for x in r["ids"]])
        f["image_paths"].append(np.frombuffer(b"".join(r["paths"]), np.uint8))
        self._offsets("image_paths_offsets", [len(x) for x in r["paths"]])
        f["image_sha"].append(r["image_sha"])
        f["image_stat"].append(r["image_stat"])

    def close(self) -> dict:
        return {name: af.close() for name, af in self.files.items()}


def _chunks(records, size: int):
    """(index of the first record, up to ``size`` records, text offset after the last) from an
    iterator of (record, offset)."""
    chunk, start, pos = [], 0, 0
    for rec, pos in records:
        chunk.append(rec)
        if len(chunk) == size:
            yield start, chunk, pos
            start, chunk = start + size, []
    if chunk:
        yield start, chunk, pos


def _results(spec: dict, tokenizer, chunks, workers: int):
    """Chunk results in record order: in-process for one worker, else from ``workers`` spawned
    processes with at most two chunks each in flight (the records are parsed only as fast as they
    are prepared)."""
    global _PREPARER, _SOURCE, _ROOT
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if workers <= 1:
        _PREPARER = _make_preparer(spec, backend)
        _SOURCE, _ROOT = spec["data"], Path(spec["images"]) if spec["images"] else None
        try:
            yield from map(_prepare_chunk, chunks)
        finally:
            _PREPARER = None
        return
    import multiprocessing as mp

    # spawn, not fork: the caller may be a trainer with threads (gloo, OpenMP) that fork would copy mid-lock
    with mp.get_context("spawn").Pool(workers, _init_worker, (spec, backend.to_str())) as pool:
        pending: deque = deque()
        for task in chunks:
            pending.append(pool.apply_async(_prepare_chunk, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def build(spec, tokenizer, root: Path, name: str, *, workers: int | None = None, progress: bool = False,
          log=None, chunk_records: int | None = None) -> None:
    """Prepare ``spec.data`` into ``root/name`` (replacing a stale one there) with ``tokenizer``, the
    one whose hash is ``spec.tokenizer_hash`` (not re-hashed here: 2 s for Qwen's); the caller holds
    the dataset's exclusive lock."""
    from tqdm import tqdm

    from ckd_common.tokenizer import pad_eos_warning

    log = log if log is not None else (lambda _msg: None)
    t0 = time.perf_counter()
    data = Path(spec.data)
    if not data.is_file():
        raise DataError(f"data file {data} does not exist")
    with open(data, "rb") as f:
        st = os.fstat(f.fileno())
        raw = f.read()
    data_evidence = {"sha256": hashlib.sha256(raw).hexdigest(), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    text = decode_text(raw, data)
    del raw
    chunks = _chunks(iter_records(text, data), chunk_records or CHUNK_RECORDS)
    workers = max(1, workers or default_workers())
    first = list(itertools.islice(chunks, workers))  # a file of fewer chunks needs fewer processes
    workers = max(1, min(workers, len(first)))
    chunks = itertools.chain(first, chunks)
    log(f"building {root / name} from {data} (template {spec.template}, {workers} worker(s))")
    for old in root.iterdir():  # leftovers of an interrupted build or swap (we hold the lock)
        if old.name.startswith((f".{name}.tmp-", f".{name}.old-")):
            shutil.rmtree(old, ignore_errors=True)
    tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writer = _Writer(tmp)
        fp = hashlib.sha256(f"{spec.template}|{spec.num_visual_tokens}|".encode())
        skipped: Counter = Counter()
        notes: Counter = Counter()
        errors, skipped_images, n, n_records, max_token, n_tokens, n_response = [], [], 0, 0, -1, 0, 0
        # the bar follows the file (the number of records of a JSON list is known only at its end)
        bar = tqdm(total=len(text), desc=f"prepare {data.name} [{spec.template}]", disable=not progress,
                   dynamic_ncols=True, bar_format="{l_bar}{bar}| {postfix} [{elapsed}<{remaining}]")
        for r in _results(spec.to_dict(), tokenizer, chunks, workers):
            writer.add(r)
            fp.update(r["keys"].tobytes())
            n += len(r["keys"])
            max_token = max(max_token, r["max_token"])
            n_tokens += r["n_tokens"]
            n_response += r["n_response"]
            notes.update(r["notes"])
            for _, msg, category in r["errors"]:
                skipped[category] += 1
                if len(errors) < MAX_ERRORS_KEPT:
                    errors.append(msg)
            skipped_images += r["skipped_images"]
            n_records += r["records"]
            bar.update(r["end"] - bar.n)
            bar.set_postfix_str(f"{n} samples, {sum(skipped.values())} skipped", refresh=False)
        bar.update(len(text) - bar.n)
        bar.close()
        del text
        arrays = writer.close()
        warn = pad_eos_warning(tokenizer) if spec.template == "qwen2_base" else None
        seconds = time.perf_counter() - t0
        manifest = {
            "format": FORMAT, "spec": spec.to_dict(), "data": data_evidence, "fingerprint": fp.hexdigest()[:32],
            "records": n_records, "samples": n, "tokens": n_tokens, "response_positions": n_response,
            "skipped": dict(skipped), "errors": errors,
            "notes": dict(notes), "warnings": [warn] if warn else [], "max_token_id": max_token,
            "arrays": arrays, "workers": workers, "seconds": round(seconds, 2),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if skipped_images:
            (tmp / SKIPPED_IMAGES).write_text(json.dumps(skipped_images))
        _write_last(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        _swap_into_place(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"built {root / name}: {n} samples, {sum(skipped.values())} left out "
        f"{dict(skipped) if skipped else ''}in {seconds:.1f} s ({n_records / max(seconds, 1e-9):.0f} records/s)")


def _write_last(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished directory into place. A stale one there is moved aside first and deleted
    after (processes that still map it keep their view)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
