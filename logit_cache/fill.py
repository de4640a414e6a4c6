"""``logit_cache fill``: stream a prepared dataset through one or more teacher servers into a cache.

    logit_cache fill --server URL [--server URL ...] --data FILE.json --images DIR \\
        --template pretrain|qwen2_base --k 64 --out cache/NAME

Steps: ask every server for /v1/info (they must all run the same teacher) and the tokenizer
(/v1/tokenizer, or --tokenizer DIR, whose hash must equal the server's); prepare the data with
ckd_common exactly as the trainer will; open (or create) the group for (dataset, template) under
``--out``, refusing one filled with another teacher/tokenizer/vocabulary/k; skip every committed
key (resume); send the rest in requests of similar-length samples to all servers, ``--concurrency``
requests in flight per server; write results into immutable, committed segments.

Failures: connection errors, timeouts, 429/5xx are retried with exponential back-off (honouring
Retry-After), on any server; a request still failing after ``--retries`` attempts, or any 4xx
(the server names the sample and the problem), stops the fill. Ctrl-C (or SIGTERM) stops
cleanly: in-flight requests are dropped, everything received is committed, exit code 130.
Whatever was committed is kept; re-running the same command resumes.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import random
import signal
import sys
import tempfile
import time
import zipfile
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ckd_common.targets import SampleTargets

from .errors import CacheError
from .meta import CacheMeta
from .store import open_group

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
INFO_FIELDS_THAT_MUST_AGREE = ("teacher_fingerprint", "tokenizer_hash", "vocab_size", "tokenizer_vocab_size",
                               "num_visual_tokens", "vision_strategy", "image_size", "image_aspect_ratio",
                               "image_token_id")


class FillError(RuntimeError):
    """The fill cannot go on; the message says why and what was kept."""


@dataclass
class FillOptions:
    servers: list[str]
    data: str
    images: str | None
    template: str
    k: int
    out: str
    tokenizer: str | None = None
    vocab_limit: int | None = None
    encoding: str = "f16"
    batch_samples: int = 16
    concurrency: int = 2
    segment_rows: int = 1024
    retries: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    timeout_s: float = 600.0
    wait_ready_s: float = 120.0
    max_length: int = 2048
    on_error: str = "raise"
    token: str | None = None
    progress: bool = True


@dataclass
class FillStats:
    samples: int = 0                 # unique samples in the prepared dataset
    already_committed: int = 0       # skipped (resume)
    written: int = 0                 # committed by this run
    tokens: int = 0                  # tokens of the samples written by this run
    requests: int = 0
    retries: int = 0
    send_seconds: float = 0.0        # first request to last commit
    write_seconds: float = 0.0       # in the cache writer (encoding, compression, segment commits)
    prepare_seconds: float = 0.0
    interrupted: bool = False
    group: str = ""
    segments: list[str] = field(default_factory=list)
    per_server: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# talking to servers (synchronous part: info, tokenizer)


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _error_detail(r) -> str:
    try:
        j = r.json()
        return str(j.get("detail", j))
    except Exception:  # noqa: BLE001 - not JSON
        return r.text[:500]


def wait_ready(client, url: str, wait_s: float) -> None:
    """Poll /readyz until the model is loaded (a just-started server answers 503 meanwhile)."""
    import httpx

    deadline = time.monotonic() + wait_s
    last = "no answer"
    while True:
        try:
            r = client.get(f"{url}/readyz", timeout=10)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {_error_detail(r)}"
        except httpx.TransportError as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            raise FillError(f"server {url} is not ready after {wait_s:.0f}s ({last}); is it running "
                            f"(teacher_server serve ...) and is the URL right?")
        time.sleep(0.5)


def get_info(client, url: str, token: str | None) -> dict:
    r = client.get(f"{url}/v1/info", headers=_headers(token), timeout=30)
    if r.status_code == 401:
        raise FillError(f"server {url} requires a bearer token: pass --token-file (HTTP 401: {_error_detail(r)})")
    if r.status_code != 200:
        raise FillError(f"server {url}: GET /v1/info failed with HTTP {r.status_code}: {_error_detail(r)}")
    return r.json()


def check_infos(infos: dict[str, dict], template: str, k: int) -> dict:
    """All servers must run the same teacher; return the first info."""
    urls = list(infos)
    ref = infos[urls[0]]
    for url in urls[1:]:
        diffs = [f"{f}: {urls[0]} has {ref.get(f)!r}, {url} has {infos[url].get(f)!r}"
                 for f in INFO_FIELDS_THAT_MUST_AGREE if infos[url].get(f) != ref.get(f)]
        if diffs:
            raise FillError("the servers do not run the same teacher, refusing to mix their targets:\n  "
                            + "\n  ".join(diffs))
    for url, info in infos.items():
        if template not in info.get("supported_templates", []):
            raise FillError(f"server {url} does not support template {template!r} "
                            f"(supports {info.get('supported_templates')})")
        if not 1 <= k <= int(info["max_k"]):
            raise FillError(f"--k {k} is out of range for server {url}: it allows 1..{info['max_k']}")
    return ref


def load_tokenizer(opts: FillOptions, client, info: dict):
    """--tokenizer DIR, or the server's own tokenizer files; either way its hash must match."""
    from transformers import AutoTokenizer

    from ckd_common.tokenizer import tokenizer_hash

    if opts.tokenizer:
        tok = AutoTokenizer.from_pretrained(opts.tokenizer, local_files_only=True)
        where = f"--tokenizer {opts.tokenizer}"
    else:
        url = opts.servers[0]
        r = client.get(f"{url}/v1/tokenizer", headers=_headers(opts.token), timeout=60)
        if r.status_code != 200:
            raise FillError(f"server {url}: GET /v1/tokenizer failed with HTTP {r.status_code}: {_error_detail(r)}; "
                            f"pass --tokenizer DIR instead")
        with tempfile.TemporaryDirectory() as d:
            zipfile.ZipFile(io.BytesIO(r.content)).extractall(d)
            tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        where = f"the tokenizer of {url}"
    h = tokenizer_hash(tok)
    if h != info["tokenizer_hash"]:
        raise FillError(f"{where} has hash {h}, but the teacher's tokenizer has {info['tokenizer_hash']}: "
                        f"samples prepared with it would not line up with the teacher's vocabulary")
    return tok


# ---------------------------------------------------------------------------------------------
# work units


@dataclass(eq=False)
class Chunk:
    samples: list             # PreparedSample
    attempts: int = 0
    last_error: str = ""

    @property
    def tokens(self) -> int:
        return sum(s.length for s in self.samples)


def make_chunks(samples: Sequence, batch_samples: int, max_tokens: int, max_bytes: int) -> list[Chunk]:
    """Requests of similar-length samples (sorted by length: little padding in the server's
    batches), each within the server's per-request caps."""
    chunks: list[Chunk] = []
    cur: list = []
    cur_tokens = cur_bytes = 0
    for s in sorted(samples, key=lambda s: (s.length, s.key)):
        nbytes = 8 * s.length + (Path(s.image_path).stat().st_size if s.image_path else 0) + 512
        if cur and (len(cur) >= batch_samples or cur_tokens + s.length > max_tokens or cur_bytes + nbytes > max_bytes):
            chunks.append(Chunk(cur))
            cur, cur_tokens, cur_bytes = [], 0, 0
        cur.append(s)
        cur_tokens += s.length
        cur_bytes += nbytes
    if cur:
        chunks.append(Chunk(cur))
    return chunks


def encode_chunk(chunk: Chunk, k: int, vocab_limit: int, template: str) -> bytes:
    from ckd_common.wire import TargetsRequest, WireSample, encode_request

    ws = [WireSample(s.key, s.input_ids, s.response_positions, s.visual_start, s.num_visual,
                     Path(s.image_path).read_bytes() if s.has_image else None, s.id) for s in chunk.samples]
    return encode_request(TargetsRequest(ws, k, vocab_limit, template))


def decode_checked(body: bytes, chunk: Chunk, k: int, url: str) -> list[SampleTargets]:
    """Decode a response and check it answers this chunk (keys, counts, k)."""
    from ckd_common.wire import WireError, decode_response

    try:
        resp = decode_response(body)
    except WireError as e:
        raise FillError(f"server {url} sent an undecodable targets frame: {e}") from None
    if len(resp.targets) != len(chunk.samples):
        raise FillError(f"server {url} answered {len(resp.targets)} samples for a request of {len(chunk.samples)}")
    for s, t in zip(chunk.samples, resp.targets):
        nt = len(s.response_positions)
        nv = t.visual.num_positions if t.visual is not None else 0
        if t.key != s.key or t.text.num_positions != nt or nv != s.num_visual or t.text.k != k or \
                (s.has_image and t.autocorr is None):
            raise FillError(f"server {url} answered sample {s.id!r} inconsistently (key {t.key[:12]} vs "
                            f"{s.key[:12]}, {t.text.num_positions}/{nt} text and {nv}/{s.num_visual} visual "
                            f"positions, k {t.text.k}/{k})")
    return resp.targets


# ---------------------------------------------------------------------------------------------
# the async pipeline


class _Fatal(Exception):
    pass


async def _pipeline(opts: FillOptions, chunks: list[Chunk], writer, vocab_limit: int, stats: FillStats,
                    bar) -> None:
    import httpx

    pending: deque[Chunk] = deque(chunks)   # a failed chunk goes back to the FRONT: order is kept
    remaining = len(chunks)
    results: asyncio.Queue = asyncio.Queue()
    stop = asyncio.Event()                   # stop sending: all done, fatal error, or interrupted
    fatal: list[str] = []
    failures = {url: 0 for url in opts.servers}  # consecutive failures per server (its back-off)
    loop = asyncio.get_running_loop()

    def interrupt() -> None:
        stats.interrupted = True
        stop.set()

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, interrupt)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / platform
            pass

    async def send(client: httpx.AsyncClient, url: str) -> None:
        nonlocal remaining
        while not stop.is_set():
            if not pending:
                await asyncio.sleep(0.05)  # another worker holds the rest; it may give them back
                continue
            chunk = pending.popleft()
            delay = None
            try:
                body = await asyncio.to_thread(encode_chunk, chunk, opts.k, vocab_limit, opts.template)
                r = await client.post(f"{url}/v1/targets", content=body, headers={
                    **_headers(opts.token), "Content-Type": "application/x-ckd-targets-request"})
                stats.requests += 1
                if r.status_code == 200:
                    targets = await asyncio.to_thread(decode_checked, r.content, chunk, opts.k, url)
                    failures[url] = 0
                    stats.per_server[url] = stats.per_server.get(url, 0) + len(targets)
                    await results.put((chunk, targets))
                    remaining -= 1
                    if remaining == 0:
                        stop.set()
                    continue
                detail = f"HTTP {r.status_code} from {url}: {_error_detail(r)}"
                if r.status_code not in RETRYABLE_STATUS:
                    raise _Fatal(detail)
                ra = r.headers.get("retry-after")
                delay = float(ra) if ra and ra.replace(".", "", 1).isdigit() else None
                chunk.last_error = detail
            except httpx.TransportError as e:  # connection refused/reset, timeouts: the server may come back
                chunk.last_error = f"{type(e).__name__} talking to {url}: {e}"
            except (_Fatal, FillError) as e:
                fatal.append(str(e))
                stop.set()
                return
            chunk.attempts += 1
            failures[url] += 1
            stats.retries += 1
            # give up when this request failed everywhere it was tried `retries` times, or when
            # every server has failed `retries` times in a row (all down)
            if chunk.attempts >= opts.retries or min(failures.values()) >= opts.retries:
                fatal.append(f"giving up after {chunk.attempts} attempts of a request of {len(chunk.samples)} "
                             f"samples ({min(failures.values())} consecutive failures on every server); "
                             f"last error: {chunk.last_error}")
                stop.set()
                return
            pending.appendleft(chunk)  # any server may take it; this one backs off first
            backoff = min(opts.max_backoff_s, opts.backoff_s * 2 ** (failures[url] - 1)) * (0.5 + random.random())
            try:
                await asyncio.wait_for(stop.wait(), timeout=max(backoff, delay or 0.0))
            except asyncio.TimeoutError:
                pass

    async def write() -> None:
        written: set[str] = set()
        while True:
            item = await results.get()
            if item is None:
                return
            chunk, targets = item
            new = [t for t in targets if t.key not in written]
            tw = time.perf_counter()
            try:
                await asyncio.to_thread(_add_all, writer, new)
            except Exception as e:  # noqa: BLE001 - e.g. a target the cache refuses: stop, keep the rest
                fatal.append(f"the cache writer refused targets from the server: {type(e).__name__}: {e}")
                stop.set()
                return
            stats.write_seconds += time.perf_counter() - tw
            written.update(t.key for t in new)
            stats.written += len(new)
            stats.tokens += sum(s.length for s in chunk.samples)
            if bar is not None:
                bar.update(len(new))
                el = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(tok_s=f"{stats.tokens / el:,.0f}", refresh=False)

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=opts.concurrency, max_keepalive_connections=opts.concurrency)
    timeout = httpx.Timeout(opts.timeout_s, connect=10.0)
    clients = [httpx.AsyncClient(limits=limits, timeout=timeout) for _ in opts.servers]  # one per server, reused
    writer_task = asyncio.create_task(write())
    senders = [asyncio.create_task(send(c, url)) for c, url in zip(clients, opts.servers)
               for _ in range(opts.concurrency)]
    try:
        stop_task = asyncio.create_task(stop.wait())
        all_sent = asyncio.gather(*senders, return_exceptions=True)
        await asyncio.wait({stop_task, all_sent}, return_when=asyncio.FIRST_COMPLETED)
        for t in senders:
            t.cancel()  # on stop: drop in-flight requests; their samples are simply not written
        await asyncio.gather(*senders, return_exceptions=True)
        stop_task.cancel()
    finally:
        await results.put(None)
        await writer_task
        tw = time.perf_counter()
        await asyncio.to_thread(writer.commit)
        stats.write_seconds += time.perf_counter() - tw
        for c in clients:
            await c.aclose()
        for sig in installed:
            loop.remove_signal_handler(sig)
        stats.send_seconds = time.perf_counter() - t0
    if fatal:
        raise FillError(fatal[0])


def _add_all(writer, targets: list[SampleTargets]) -> None:
    for t in targets:
        writer.add(t)


# ---------------------------------------------------------------------------------------------
# the whole fill


def fill(opts: FillOptions) -> FillStats:
    import httpx

    from ckd_common.data import DataError, prepare_file

    if not opts.servers:
        raise FillError("give at least one --server URL")
    opts.servers = [u.rstrip("/") for u in opts.servers]
    if len(set(opts.servers)) != len(opts.servers):
        raise FillError(f"--server lists a URL twice: {opts.servers}")
    stats = FillStats()
    with httpx.Client() as client:
        for url in opts.servers:
            wait_ready(client, url, opts.wait_ready_s)
        infos = {url: get_info(client, url, opts.token) for url in opts.servers}
        info = check_infos(infos, opts.template, opts.k)
        tok = load_tokenizer(opts, client, info)

    common = int(info["common_vocab_size"])
    vocab_limit = common if opts.vocab_limit is None else int(opts.vocab_limit)
    if not 1 <= vocab_limit <= common:
        raise FillError(f"--vocab-limit {vocab_limit} must be in [1, {common}] (the teacher's common vocabulary)")
    if opts.k > vocab_limit:
        raise FillError(f"--k {opts.k} exceeds the vocabulary limit {vocab_limit}")
    if "autocorr" not in info.get("target_kinds", []) and opts.template == "pretrain":
        print(f"logit_cache fill: note: engine {info.get('engine')} produces no visual autocorrelation",
              file=sys.stderr)

    t0 = time.perf_counter()
    try:
        ds = prepare_file(opts.data, tok, opts.template, int(info["num_visual_tokens"]), int(info["image_token_id"]),
                          opts.images, max_length=opts.max_length, on_error=opts.on_error, progress=opts.progress)
    except DataError as e:
        raise FillError(f"cannot prepare {opts.data}: {e} (use --on-error skip to leave such samples out)") from None
    stats.prepare_seconds = time.perf_counter() - t0
    if not ds.samples:
        raise FillError(f"{opts.data}: no usable samples (skipped: {ds.skipped})")
    for s in ds.samples:  # a tokenizer/model mismatch would otherwise surface as 422s mid-fill
        if int(s.input_ids.max()) >= int(info["vocab_size"]):
            raise FillError(f"sample {s.id}: token id {int(s.input_ids.max())} >= the teacher's vocabulary "
                            f"{info['vocab_size']}")

    has_image = any(s.has_image for s in ds.samples)
    meta = CacheMeta(teacher_fingerprint=info["teacher_fingerprint"], tokenizer_hash=info["tokenizer_hash"],
                     template=opts.template, dataset_fingerprint=ds.fingerprint, vocab_size=vocab_limit, k=opts.k,
                     # same convention as student_trainer.cachefill: text-only data has no vision fields
                     vision_strategy=info["vision_strategy"] if has_image else "none",
                     num_visual_tokens=int(info["num_visual_tokens"]) if has_image else 0,
                     image_aspect_ratio=info.get("image_aspect_ratio", "square"),
                     value_encoding=opts.encoding,
                     target_kinds=[t for t in ("text", "visual", "autocorr") if t in info.get("target_kinds", [])])
    try:
        group = open_group(opts.out, meta=meta, create=True)
        done = group.committed_keys()
    except CacheError as e:
        raise FillError(f"cannot use the cache at {opts.out}: {e}") from None
    stats.group = group.name

    unique: dict[str, object] = {}
    for s in ds.samples:
        unique.setdefault(s.key, s)
    stats.samples = len(unique)
    todo = [s for key, s in unique.items() if key not in done]
    stats.already_committed = stats.samples - len(todo)
    if not todo:
        return stats
    max_tokens = min(int(i["max_request_tokens"]) for i in infos.values())
    max_bytes = min(int(i["max_body_bytes"]) for i in infos.values()) // 2
    max_samples = min([opts.batch_samples] + [int(i["max_request_samples"]) for i in infos.values()])
    chunks = make_chunks(todo, max_samples, max_tokens, max_bytes)

    bar = None
    if opts.progress:
        from tqdm import tqdm
        bar = tqdm(total=stats.samples, initial=stats.already_committed, unit="sample", desc=f"fill {group.name}",
                   dynamic_ncols=True)
    writer = group.writer(segment_rows=opts.segment_rows)
    try:
        asyncio.run(_pipeline(opts, chunks, writer, vocab_limit, stats, bar))
    finally:
        if bar is not None:
            bar.close()
        stats.segments = [m.segment for m in writer.committed]
    return stats


# ---------------------------------------------------------------------------------------------
# CLI


def add_fill_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--server", action="append", required=True, metavar="URL",
                   help="teacher server base URL, e.g. http://127.0.0.1:8000 (repeat for several servers)")
    p.add_argument("--data", required=True, help="LLaVA JSON (or JSON lines) file")
    p.add_argument("--images", default=None, help="image root the data's 'image' paths are relative to")
    p.add_argument("--template", required=True, choices=["pretrain", "qwen2_base"])
    p.add_argument("--k", type=int, default=64, help="top-k per position (default %(default)s)")
    p.add_argument("--out", required=True, help="cache root (local path or fsspec URL), e.g. cache/NAME")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the server's own)")
    p.add_argument("--vocab-limit", type=int, default=None,
                   help="targets over the first N ids only (default: the teacher's common vocabulary)")
    p.add_argument("--encoding", choices=["f16", "q8"], default="f16", help="stored log-prob encoding")
    d = FillOptions([], "", None, "", 0, "")
    p.add_argument("--batch-samples", type=int, default=d.batch_samples, help="samples per request")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="requests in flight per server")
    p.add_argument("--segment-rows", type=int, default=d.segment_rows, help="samples per committed segment")
    p.add_argument("--retries", type=int, default=d.retries, help="attempts per request before giving up")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds per request")
    p.add_argument("--wait-ready", type=float, default=d.wait_ready_s,
                   help="seconds to wait for the servers' /readyz at start")
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="for samples that fail preparation")
    p.add_argument("--token-file", default=None, help="file holding the servers' bearer token")
    p.add_argument("--no-progress", action="store_true")
    return p


def add_fill_parser(subparsers) -> argparse.ArgumentParser:
    return add_fill_arguments(subparsers.add_parser(
        "fill", help="fill a cache by streaming a dataset through teacher servers",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))


def options_from_args(a: argparse.Namespace) -> FillOptions:
    token = None
    if a.token_file:
        f = Path(a.token_file)
        if not f.is_file():
            raise FillError(f"--token-file {f} does not exist")
        token = f.read_text().strip()
    return FillOptions(servers=list(a.server), data=a.data, images=a.images, template=a.template, k=a.k,
                       out=a.out, tokenizer=a.tokenizer, vocab_limit=a.vocab_limit, encoding=a.encoding,
                       batch_samples=a.batch_samples, concurrency=a.concurrency, segment_rows=a.segment_rows,
                       retries=a.retries, timeout_s=a.timeout, wait_ready_s=a.wait_ready, max_length=a.max_length,
                       on_error=a.on_error, token=token,
                       progress=not (a.no_progress or getattr(a, "quiet", False)))


def run_fill(a: argparse.Namespace) -> int:
    """Run from parsed arguments; prints a summary line; exit code 0 / 1 (failed) / 130 (interrupted)."""
    stats = FillStats()
    try:
        opts = options_from_args(a)
        stats = fill(opts)
    except KeyboardInterrupt:
        print("logit_cache fill: interrupted before sending; nothing new was written", file=sys.stderr)
        return 130
    except FillError as e:
        print(f"logit_cache fill: {e}\nCommitted samples are kept; re-run the same command to resume.",
              file=sys.stderr)
        return 1
    rate = stats.written / stats.send_seconds if stats.send_seconds else 0.0
    print(f"logit_cache fill: group {stats.group}: {stats.written} written, {stats.already_committed} already "
          f"committed, {stats.samples} in the dataset; {stats.requests} requests, {stats.retries} retries; "
          f"{rate:.1f} samples/s" + (" (interrupted)" if stats.interrupted else ""), file=sys.stderr)
    if stats.interrupted:
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m logit_cache.fill ...`` (the same as ``logit_cache fill ...``)."""
    p = add_fill_arguments(argparse.ArgumentParser(prog="logit_cache fill", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    return run_fill(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
