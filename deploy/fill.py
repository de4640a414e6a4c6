"""``logit_cache fill`` (= ``ckd fill``): stream a prepared dataset through teacher servers into a cache.

    logit_cache fill --server URL [--server URL ...] --data FILE.json --images DIR \\
        --template pretrain|qwen2_base --k 64 --out cache/NAME

Steps: ask every server for /v1/info (they must all run the same teacher) and the tokenizer
(/v1/tokenizer, or --tokenizer DIR, whose hash must equal the server's); prepare the data with
ckd_common exactly as the trainer will; open (or create) the group for (dataset, template) under
``--out``, refusing one filled with another teacher/tokenizer/vocabulary/k; skip every committed
key (resume); send the rest in requests of similar-length samples to all servers, ``--concurrency``
requests in flight per server; write results into immutable, committed segments. The resolved
config is printed at start and saved in the group as ``fill_config.json`` (the last run's).

Failures: connection errors, timeouts, 429/5xx are retried with exponential back-off (honouring
Retry-After), on any server; a request still failing after ``--retries`` attempts, or any 4xx
(the server names the sample and the problem), stops the fill. Ctrl-C (or SIGTERM) stops
cleanly: in-flight requests are dropped, everything received is committed, exit code 130.
Whatever was committed is kept; re-running the same command resumes. Exit codes: 0 done,
1 failed (invalid config, server or cache problem), 130 interrupted.

Only one fill writes a group at a time (``deploy.fill_lock``: a lock file in the group, taken
over when its holder is gone); a second one stops at once and names the first. A full disk stops
the fill with one line (where, how many samples are committed); what was committed stays valid.

The fill is the client -> cache-writer pipeline: HTTP goes through ``teacher_server.client``,
storage through ``logit_cache``; it lives in ``deploy`` because it joins the two. This module is
the command (config, server checks, data, group); ``deploy.fill_pipeline`` streams the requests
and writes the answers with ``--writers`` threads (``deploy.fill_frames``: frame -> segment arrays).
Throughput of everything but the teacher: ``bench/fill_host.py`` (a ``--engine null`` server).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ckd_common.config import CommandConfig, ConfigError, add_arguments, from_args
from ckd_common.protocol import Info, read_token_file
from ckd_common.templates import PRETRAIN, TEMPLATE_NAMES
from logit_cache import VALUE_ENCODINGS, CacheError, CacheMeta, open_group
from logit_cache.meta import DEFAULT_VALUE_ENCODING
from logit_cache.store import DEFAULT_CLEVEL, DEFAULT_SEGMENT_BYTES
from teacher_server.client import ClientError, RetryableError, RetryPolicy, TeacherClient, Unauthorized

from .fill_lock import FillLock, GroupLocked
from .fill_pipeline import FillError, FillStats, is_disk_full, make_chunks, stream_targets

INFO_FIELDS_THAT_MUST_AGREE = ("teacher_fingerprint", "tokenizer_hash", "vocab_size", "tokenizer_vocab_size",
                               "num_visual_tokens", "vision_strategy", "image_size", "image_aspect_ratio",
                               "image_token_id")
ON_ERROR = ("raise", "skip")
CONFIG_FILE = "fill_config.json"  # saved inside the filled group


def _help(text: str, **more) -> dict:
    return {"help": text, **more}


@dataclass
class FillConfig(CommandConfig):
    """One fill. ``--token-file`` names the token: the config itself never holds a secret. The
    command line is derived from these fields (``ckd_common.config.add_arguments``)."""

    servers: list[str] = field(default_factory=list, metadata=_help(
        "teacher server base URL, e.g. http://127.0.0.1:8000 (repeat for several servers)", flag="--server",
        metavar="URL"))
    data: str = field(default="", metadata=_help("LLaVA JSON (or JSON lines) file", metavar="FILE"))
    images: str | None = field(default=None, metadata=_help(
        "image root the data's 'image' paths are relative to", metavar="DIR"))
    template: str = field(default="", metadata=_help(
        f"template the data is prepared with: {', '.join(TEMPLATE_NAMES)}", choices=TEMPLATE_NAMES))
    k: int = field(default=64, metadata=_help("top-k per position"))
    out: str = field(default="", metadata=_help("cache root (local path or fsspec URL), e.g. cache/NAME",
                                                metavar="ROOT"))
    tokenizer: str | None = field(default=None, metadata=_help(
        "tokenizer directory (default: the server's own)", metavar="DIR"))
    vocab_limit: int | None = field(default=None, metadata=_help(
        "targets over the first N ids only (default: the teacher's common vocabulary)", metavar="N"))
    encoding: str = field(default=DEFAULT_VALUE_ENCODING, metadata=_help(
        f"stored log-prob encoding: {', '.join(VALUE_ENCODINGS)}", choices=VALUE_ENCODINGS))
    batch_samples: int = field(default=16, metadata=_help("samples per request"))
    concurrency: int = field(default=4, metadata=_help(
        "requests in flight per server (the next ones travel while answers are written)"))
    writers: int = field(default=2, metadata=_help(
        "writer threads; each decodes answers and compresses and commits its own segments"))
    segment_rows: int = field(default=4096, metadata=_help("samples per committed segment (at most)"))
    segment_mb: int = field(default=DEFAULT_SEGMENT_BYTES >> 20, metadata=_help(
        "encoded MiB per segment before compression (at most; ~2,400 image samples at 728 visual tokens, k=64, "
        "q8); a writer holds one segment in memory (about twice this while committing)"))
    clevel: int = field(default=DEFAULT_CLEVEL, metadata=_help(
        "Blosc (zstd) level of the written segments, 1-9: lower writes faster, a little larger"))
    retries: int = field(default=6, metadata=_help("attempts per request before giving up"))
    backoff_s: float = field(default=0.5, metadata=_help(
        "first back-off after a failed request, seconds (doubles)", flag="--backoff", metavar="S"))
    max_backoff_s: float = field(default=30.0, metadata=_help(
        "longest back-off between attempts, seconds", flag="--max-backoff", metavar="S"))
    timeout_s: float = field(default=600.0, metadata=_help("seconds per request", flag="--timeout", metavar="S"))
    wait_ready_s: float = field(default=120.0, metadata=_help(
        "seconds to wait for the servers' /readyz at start", flag="--wait-ready", metavar="S"))
    max_length: int = field(default=2048, metadata=_help("longest prepared sample in tokens"))
    on_error: str = field(default="raise", metadata=_help(
        "for samples that fail preparation: raise or skip", choices=ON_ERROR))
    prepared: str | None = field(default=None, metadata=_help(
        "the prepared dataset to fill (a directory `ckd data prepare` printed); refused if made for other inputs or "
        "stale. Default: opened, or built once, under $CKD_PREPARED_DIR", metavar="DIR"))
    token_file: str | None = field(default=None, metadata=_help("file holding the servers' bearer token",
                                                                metavar="FILE"))
    progress: bool = field(default=True, metadata=_help("progress bar"))

    def problems(self) -> list[str]:
        p = []
        urls = [u.rstrip("/") for u in self.servers]
        if not urls:
            p.append("give at least one --server URL")
        if len(set(urls)) != len(urls):
            p.append(f"--server lists a URL twice: {urls}")
        p += [f"--server {u}: not an http:// or https:// URL" for u in urls
              if not u.startswith(("http://", "https://"))]
        if not self.data:
            p.append("--data is required")
        elif not Path(self.data).is_file():
            p.append(f"--data {self.data} does not exist")
        p += [f"--{n.replace('_', '-')} {v} is not a directory" for n, v in
              (("images", self.images), ("tokenizer", self.tokenizer), ("prepared", self.prepared))
              if v and not Path(v).is_dir()]
        if self.token_file and not Path(self.token_file).is_file():
            p.append(f"--token-file {self.token_file} does not exist")
        if self.template not in TEMPLATE_NAMES:
            p.append(f"--template {self.template!r}: choose one of {', '.join(TEMPLATE_NAMES)}")
        if not self.out:
            p.append("--out is required")
        if self.encoding not in VALUE_ENCODINGS:
            p.append(f"--encoding {self.encoding!r}: choose one of {', '.join(VALUE_ENCODINGS)}")
        if self.on_error not in ON_ERROR:
            p.append(f"--on-error {self.on_error!r}: choose one of {', '.join(ON_ERROR)}")
        for name in ("k", "batch_samples", "concurrency", "writers", "segment_rows", "segment_mb", "retries",
                     "max_length"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if not 1 <= self.clevel <= 9:
            p.append(f"--clevel must be in 1..9 (got {self.clevel})")
        if self.vocab_limit is not None and self.vocab_limit < 1:
            p.append(f"--vocab-limit must be at least 1 (got {self.vocab_limit})")
        if self.timeout_s <= 0 or self.backoff_s < 0 or self.max_backoff_s < 0 or self.wait_ready_s < 0:
            p.append("timeout_s must be positive and backoff_s, max_backoff_s, wait_ready_s not negative")
        return p

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(self.retries, self.backoff_s, self.max_backoff_s)


# ---------------------------------------------------------------------------------------------
# before sending: the servers must agree with each other and with the data


def check_infos(infos: dict[str, Info], template: str, k: int) -> Info:
    """All servers must run the same teacher; return the first info."""
    urls = list(infos)
    ref = infos[urls[0]]
    for url in urls[1:]:
        diffs = [f"{f}: {urls[0]} has {getattr(ref, f)!r}, {url} has {getattr(infos[url], f)!r}"
                 for f in INFO_FIELDS_THAT_MUST_AGREE if getattr(infos[url], f) != getattr(ref, f)]
        if diffs:
            raise FillError("the servers do not run the same teacher, refusing to mix their targets:\n  "
                            + "\n  ".join(diffs))
    for url, info in infos.items():
        if template not in info.supported_templates:
            raise FillError(f"server {url} does not support template {template!r} "
                            f"(supports {info.supported_templates})")
        if not 1 <= k <= info.max_k:
            raise FillError(f"--k {k} is out of range for server {url}: it allows 1..{info.max_k}")
    return ref


def load_tokenizer(cfg: FillConfig, server: TeacherClient, info: Info):
    """--tokenizer DIR, or the server's own tokenizer files; either way its hash must match."""
    from ckd_common.tokenizer import tokenizer_hash

    if cfg.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.tokenizer, local_files_only=True)
        where = f"--tokenizer {cfg.tokenizer}"
    else:
        try:
            tok = server.tokenizer()
        except RetryableError as e:  # no answer (or 5xx) right after /readyz and /v1/info succeeded
            raise FillError(f"server {server.url} stopped answering while its tokenizer was downloaded ({e}); "
                            f"check that it still runs, then re-run") from None
        except ClientError as e:
            raise FillError(f"{e}; pass --tokenizer DIR instead") from None
        where = f"the tokenizer of {server.url}"
    h = tokenizer_hash(tok)
    if h != info.tokenizer_hash:
        raise FillError(f"{where} has hash {h}, but the teacher's tokenizer has {info.tokenizer_hash}: "
                        f"samples prepared with it would not line up with the teacher's vocabulary")
    return tok


def ask_servers(cfg: FillConfig, urls: list[str], token: str | None) -> tuple[dict[str, Info], object]:
    """Wait for every server, read and compare their /v1/info; return (infos, tokenizer)."""
    clients = [TeacherClient(u, token) for u in urls]
    try:
        for c in clients:
            c.wait_ready(cfg.wait_ready_s)
        infos = {c.url: c.info() for c in clients}
        info = check_infos(infos, cfg.template, cfg.k)
        return infos, load_tokenizer(cfg, clients[0], info)
    except Unauthorized as e:
        raise FillError(f"{e}; pass --token-file") from None
    except ClientError as e:
        raise FillError(str(e)) from None
    finally:
        for c in clients:
            c.close()


# ---------------------------------------------------------------------------------------------
# the whole fill


def server_pixel_limit(infos: dict[str, Info]) -> int:
    """The largest image every server decodes: the lowest limit its /v1/info reports, at most ours
    (ckd_common.data.MAX_IMAGE_PIXELS, also what a server that reports none applies)."""
    from ckd_common.data import MAX_IMAGE_PIXELS

    return min([MAX_IMAGE_PIXELS] + [int(getattr(i, "max_image_pixels", None) or MAX_IMAGE_PIXELS)
                                     for i in infos.values()])


def prepared_for_fill(cfg: FillConfig, info: Info, tok, pixel_limit: int):
    """The prepared dataset of the fill's data, for the teacher's tokenizer and visual tokens: the one
    ``--prepared`` names (checked), else opened or built under $CKD_PREPARED_DIR."""
    from ckd_common.data import MAX_IMAGE_PIXELS
    from ckd_common.prepared import PrepareSpec, obtain, use_prepared

    spec = PrepareSpec.of(cfg.data, cfg.images, cfg.template, info, cfg.max_length, max_image_pixels=pixel_limit)
    if cfg.prepared:
        return use_prepared(cfg.prepared, spec, on_error=cfg.on_error, max_image_pixels=pixel_limit)
    if pixel_limit < MAX_IMAGE_PIXELS:
        print(f"fill: note: the servers decode at most {pixel_limit} pixels per image (less than the default "
              f"{MAX_IMAGE_PIXELS}): larger images are left out of this data", file=sys.stderr)
    return obtain(spec, tok, on_error=cfg.on_error, progress=cfg.progress)


def fill(cfg: FillConfig) -> FillStats:
    """Run one fill (ConfigError for an invalid config, FillError when it cannot go on)."""
    from ckd_common.data import DataError

    cfg.validate()
    urls = [u.rstrip("/") for u in cfg.servers]
    try:
        token = read_token_file(cfg.token_file) if cfg.token_file else None
    except ValueError as e:
        raise FillError(str(e)) from None
    stats = FillStats()
    infos, tok = ask_servers(cfg, urls, token)
    info = infos[urls[0]]

    common = info.common_vocab_size
    vocab_limit = common if cfg.vocab_limit is None else int(cfg.vocab_limit)
    if not 1 <= vocab_limit <= common:
        raise FillError(f"--vocab-limit {vocab_limit} must be in [1, {common}] (the teacher's common vocabulary)")
    if cfg.k > vocab_limit:
        raise FillError(f"--k {cfg.k} exceeds the vocabulary limit {vocab_limit}")
    if "autocorr" not in info.target_kinds and cfg.template == PRETRAIN:
        print(f"fill: note: engine {info.engine} produces no visual autocorrelation", file=sys.stderr)

    t0 = time.perf_counter()
    try:
        ds = prepared_for_fill(cfg, info, tok, server_pixel_limit(infos))
    except DataError as e:
        raise FillError(f"cannot prepare {cfg.data}: {e}") from None
    stats.prepare_seconds = time.perf_counter() - t0
    if not len(ds):
        raise FillError(f"{cfg.data}: no usable samples (skipped: {ds.skipped})")
    if ds.max_token_id >= info.vocab_size:  # a tokenizer/model mismatch would otherwise surface as 422s mid-fill
        raise FillError(f"{cfg.data}: token id {ds.max_token_id} >= the teacher's vocabulary {info.vocab_size}")

    meta = CacheMeta.for_dataset(ds, teacher_fingerprint=info.teacher_fingerprint, tokenizer_hash=info.tokenizer_hash,
                                 vocab_size=vocab_limit, k=cfg.k, vision_strategy=info.vision_strategy,
                                 num_visual_tokens=info.num_visual_tokens, value_encoding=cfg.encoding,
                                 image_aspect_ratio=info.image_aspect_ratio, target_kinds=info.target_kinds)
    try:
        group = open_group(cfg.out, meta=meta, create=True)
        lock = FillLock(group).acquire()  # before reading what is committed: no other fill adds to it
    except GroupLocked as e:
        raise FillError(str(e)) from None
    except CacheError as e:
        raise FillError(f"cannot use the cache at {cfg.out}: {e}") from None
    except OSError as e:  # e.g. a full disk or no permission where the group would be created
        raise FillError(f"cannot create the cache group in {cfg.out}: {_os_problem(e)}") from None
    try:
        if lock.note:
            print(f"fill: note: {lock.note}", file=sys.stderr)
        stats.group = group.name
        return _fill_group(cfg, ds, group, infos, urls, token, vocab_limit, stats)
    finally:
        lock.release()


def _os_problem(e: OSError) -> str:
    return "the disk is full; free space and re-run" if is_disk_full(e) else f"{type(e).__name__}: {e}"


def _fill_group(cfg: FillConfig, ds, group, infos: dict[str, Info], urls: list[str], token: str | None,
                vocab_limit: int, stats: FillStats) -> FillStats:
    try:
        done = group.committed_keys()
        group.storage.write_atomic(json.dumps({"config": type(cfg).__name__, **cfg.to_dict()}, indent=2).encode(),
                                   group.name, CONFIG_FILE)
    except CacheError as e:
        raise FillError(f"cannot use the cache at {cfg.out}: {e}") from None
    except OSError as e:
        raise FillError(f"cannot write {group.url}/{CONFIG_FILE}: {_os_problem(e)}") from None

    unique: dict[str, object] = {}
    for s in ds.samples:
        unique.setdefault(s.key, s)
    stats.samples = len(unique)
    todo = [s for key, s in unique.items() if key not in done]
    stats.already_committed = stats.samples - len(todo)
    if not todo:
        return stats
    max_tokens = min(i.max_request_tokens for i in infos.values())
    max_bytes = min(i.max_body_bytes for i in infos.values()) // 2
    max_samples = min([cfg.batch_samples] + [i.max_request_samples for i in infos.values()])
    chunks = make_chunks(todo, max_samples, max_tokens, max_bytes)

    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=stats.samples, initial=stats.already_committed, unit="sample", desc=f"fill {group.name}",
                   dynamic_ncols=True)

    def new_writer():
        return group.writer(segment_rows=cfg.segment_rows, segment_bytes=cfg.segment_mb << 20, clevel=cfg.clevel)

    try:
        asyncio.run(stream_targets(chunks, urls, token=token, k=cfg.k, vocab_limit=vocab_limit, template=cfg.template,
                                   concurrency=cfg.concurrency, timeout_s=cfg.timeout_s, retry=cfg.retry,
                                   group=group, new_writer=new_writer, writers=cfg.writers, stats=stats, bar=bar))
    finally:
        if bar is not None:
            bar.close()
    return stats


# ---------------------------------------------------------------------------------------------
# CLI: derived from FillConfig (flags, help texts, defaults and choices come from its fields)


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:  # no "(default: None)" nor of required ones
        plain = action.default in (None, "") or action.required
        return action.help if plain else super()._get_help_string(action)


def add_fill_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_arguments(p, FillConfig, overrides={name: {"required": True} for name in ("servers", "data", "template", "out")})
    p.formatter_class = _Formatter
    return p


def config_from_args(a: argparse.Namespace, quiet: bool = False) -> FillConfig:
    cfg = from_args(FillConfig, a)
    cfg.progress = cfg.progress and not quiet
    return cfg


def run_fill(a: argparse.Namespace, prog: str = "logit_cache fill", quiet: bool = False) -> int:
    """Run from parsed arguments; prints the config and a summary line; exit code 0 / 1 / 130.
    Every failure is one message (no traceback); a fill that stops keeps what it committed."""
    stats = FillStats()
    try:
        cfg = config_from_args(a, quiet)
        print(cfg.describe(), file=sys.stderr)
        stats = fill(cfg)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted before sending; nothing new was written", file=sys.stderr)
        return 130
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except FillError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    rate = stats.written / stats.send_seconds if stats.send_seconds else 0.0
    print(f"{prog}: group {stats.group}: {stats.written} written, {stats.already_committed} already "
          f"committed, {stats.samples} in the dataset; {stats.requests} requests, {stats.retries} retries; "
          f"{rate:.1f} samples/s" + (" (interrupted)" if stats.interrupted else ""), file=sys.stderr)
    return 130 if stats.interrupted else 0


def main(argv: list[str] | None = None, quiet: bool = False, prog: str = "logit_cache fill") -> int:
    """``logit_cache fill ...`` / ``python -m deploy.fill ...``; ``quiet``: no progress bars."""
    p = add_fill_arguments(argparse.ArgumentParser(prog=prog, description=__doc__))
    return run_fill(p.parse_args(argv), prog, quiet)


__all__ = ["FillConfig", "FillError", "FillStats", "fill", "check_infos", "add_fill_arguments", "config_from_args",
           "run_fill", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
