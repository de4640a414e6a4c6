"""The fill's sending half: requests of similar-length samples, streamed to several teacher servers
at once (``concurrency`` in flight per server) and written into a cache group as they come back.

A request that fails in a retryable way (``teacher_server.client.RetryableError``) goes back to the
front of the queue, so any server may take it; the server that failed backs off first
(``RetryPolicy.delay``). The fill gives up when one request failed ``attempts`` times, or every
server failed that many times in a row. SIGINT/SIGTERM stop sending; everything received is
committed. ``deploy.fill`` prepares the data and the group and calls :func:`stream_targets`.
"""
from __future__ import annotations

import asyncio
import signal
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ckd_common.targets import SampleTargets
from teacher_server.client import AsyncTeacherClient, ClientError, RetryableError, RetryPolicy


class FillError(RuntimeError):
    """The fill cannot go on; the message says why and what was kept."""


@dataclass
class FillStats:
    samples: int = 0                 # unique samples in the prepared dataset
    already_committed: int = 0       # skipped (resume)
    written: int = 0                 # committed by this run
    tokens: int = 0                  # tokens of the samples written by this run
    requests: int = 0                # answered by a server (any status)
    retries: int = 0
    send_seconds: float = 0.0        # first request to last commit
    write_seconds: float = 0.0       # in the cache writer (encoding, compression, segment commits)
    prepare_seconds: float = 0.0
    interrupted: bool = False
    group: str = ""
    segments: list[str] = field(default_factory=list)
    per_server: dict[str, int] = field(default_factory=dict)


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
# the async pipeline: one sender task per (server, concurrency slot), one writer task


async def stream_targets(chunks: list[Chunk], urls: list[str], *, token: str | None, k: int, vocab_limit: int,
                         template: str, concurrency: int, timeout_s: float, retry: RetryPolicy, writer,
                         stats: FillStats, bar=None) -> None:
    """Send every chunk, write every answer with ``writer`` (a logit_cache CacheWriter, committed at
    the end whatever happens); FillError when the fill cannot go on."""
    pending: deque[Chunk] = deque(chunks)   # a failed chunk goes back to the FRONT: order is kept
    remaining = len(chunks)
    results: asyncio.Queue = asyncio.Queue()
    stop = asyncio.Event()                   # stop sending: all done, fatal error, or interrupted
    fatal: list[str] = []
    failures = {url: 0 for url in urls}      # consecutive failures per server (its back-off)
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

    async def send(server: AsyncTeacherClient) -> None:
        nonlocal remaining
        url = server.url
        while not stop.is_set():
            if not pending:
                await asyncio.sleep(0.05)  # another worker holds the rest; it may give them back
                continue
            chunk = pending.popleft()
            retry_after = None
            try:
                body = await asyncio.to_thread(encode_chunk, chunk, k, vocab_limit, template)
                frame = await server.targets_frame(body)
                stats.requests += 1
                targets = await asyncio.to_thread(decode_checked, frame, chunk, k, url)
                failures[url] = 0
                stats.per_server[url] = stats.per_server.get(url, 0) + len(targets)
                await results.put((chunk, targets))
                remaining -= 1
                if remaining == 0:
                    stop.set()
                continue
            except ClientError as e:
                stats.requests += e.status is not None
                if not isinstance(e, RetryableError):  # a final answer: the server named the problem
                    fatal.append(str(e))
                    stop.set()
                    return
                chunk.last_error, retry_after = str(e), e.retry_after  # the server may come back
            except FillError as e:
                fatal.append(str(e))
                stop.set()
                return
            chunk.attempts += 1
            failures[url] += 1
            stats.retries += 1
            # give up when this request failed everywhere it was tried `retries` times, or when
            # every server has failed `retries` times in a row (all down)
            if chunk.attempts >= retry.attempts or min(failures.values()) >= retry.attempts:
                fatal.append(f"giving up after {chunk.attempts} attempts of a request of {len(chunk.samples)} "
                             f"samples ({min(failures.values())} consecutive failures on every server); "
                             f"last error: {chunk.last_error}")
                stop.set()
                return
            pending.appendleft(chunk)  # any server may take it; this one backs off first
            try:
                await asyncio.wait_for(stop.wait(), timeout=retry.delay(failures[url], retry_after))
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
    servers = [AsyncTeacherClient(url, token, concurrency, timeout_s) for url in urls]  # reused
    writer_task = asyncio.create_task(write())
    senders = [asyncio.create_task(send(s)) for s in servers for _ in range(concurrency)]
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
        for s in servers:
            await s.aclose()
        for sig in installed:
            loop.remove_signal_handler(sig)
        stats.send_seconds = time.perf_counter() - t0
    if fatal:
        raise FillError(fatal[0])


def _add_all(writer, targets: list[SampleTargets]) -> None:
    for t in targets:
        writer.add(t)
