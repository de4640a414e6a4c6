"""The fill's sending half: requests of similar-length samples, streamed to several teacher servers
at once (``concurrency`` in flight per server), their answers decoded and written by a pool of
writer threads while the next requests are already on the wire.

    senders (event loop, per server x slot)      writer threads (``writers``, each its own CacheWriter)
    encode request -> POST -> response frame ->  decode straight into segment arrays
                                                 (deploy.fill_frames) -> add -> commit segments

Each writer thread owns its own segments (a CacheWriter is never shared), so segments are encoded,
compressed (Blosc releases the GIL) and committed in parallel; at most ``2 x writers`` answers wait
for a writer (back-pressure: the senders pause, memory stays bounded). A request that fails in a
retryable way (``teacher_server.client.RetryableError``) goes back to the front of the queue, so
any server may take it; the server that failed backs off first (``RetryPolicy.delay``). The fill
gives up when one request failed ``attempts`` times, or every server failed that many times in a
row. SIGINT/SIGTERM stop sending; everything received is committed. A full disk stops the fill
at once with one line (where, how many samples are committed); nothing committed is lost.
``deploy.fill`` prepares the data and the group and calls :func:`stream_targets`.
"""
from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from teacher_server.client import AsyncTeacherClient, ClientError, RetryableError, RetryPolicy

from .fill_frames import FrameError, decode_block

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class FillError(RuntimeError):
    """The fill cannot go on; the message says why and what was kept."""


@dataclass
class FillStats:
    samples: int = 0                 # unique samples in the prepared dataset
    already_committed: int = 0       # skipped (resume)
    written: int = 0                 # committed by this run
    tokens: int = 0                  # tokens of the samples received by this run
    requests: int = 0                # answered by a server (any status)
    retries: int = 0
    send_seconds: float = 0.0        # first request to last commit
    cpu_seconds: float = 0.0         # CPU time of this process meanwhile (all threads)
    # busy time per stage, summed over the concurrent senders / writer threads
    encode_seconds: float = 0.0      # building request frames (reading the image files)
    http_seconds: float = 0.0        # waiting for answers (server work + transfer)
    decode_seconds: float = 0.0      # response frame -> segment arrays (checks included)
    write_seconds: float = 0.0       # in the cache writers (compression, checksums, segment commits)
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


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL


# ---------------------------------------------------------------------------------------------
# the writers: threads, each owning one CacheWriter


class WriterPool:
    """``n`` writer threads; each creates its own writer (``new_writer()``: a logit_cache
    CacheWriter, so its own segments) the first time it writes. ``write`` runs in a pool thread."""

    def __init__(self, n: int, new_writer: Callable[[], object], meta, stats: FillStats) -> None:
        self.executor = ThreadPoolExecutor(n, thread_name_prefix="fill-writer")
        self.new_writer, self.meta, self.stats = new_writer, meta, stats
        self.writers: list = []
        self._local = threading.local()
        self._lock = threading.Lock()

    def _writer(self):
        w = getattr(self._local, "writer", None)
        if w is None:
            w = self._local.writer = self.new_writer()
            with self._lock:
                self.writers.append(w)
        return w

    def write(self, chunk: Chunk, frame: bytes, url: str) -> None:
        t0 = time.perf_counter()
        block = decode_block(frame, chunk.samples, self.meta, url)
        del frame
        t1 = time.perf_counter()
        self._writer().add_encoded(block)  # may commit a segment
        t2 = time.perf_counter()
        with self._lock:
            self.stats.decode_seconds += t1 - t0
            self.stats.write_seconds += t2 - t1

    def commit_all(self) -> list[BaseException]:
        """Commit every writer's buffered samples, in parallel; the errors (none: []) are returned."""
        def commit(w) -> BaseException | None:
            try:
                w.commit()
            except Exception as e:  # noqa: BLE001 - reported by the caller, with what was kept
                return e
            return None

        t0 = time.perf_counter()
        errors = [e for e in self.executor.map(commit, list(self.writers)) if e is not None]
        self.stats.write_seconds += time.perf_counter() - t0
        return errors

    def abort_all(self) -> None:
        for w in self.writers:
            w.abort()

    def committed(self) -> list:
        return [m for w in self.writers for m in w.committed]

    def close(self) -> None:
        self.executor.shutdown(wait=True)


def remove_own_partial_segments(group) -> list[str]:
    """Segment directories this process started and never committed (a write that failed, e.g. on
    a full disk): nobody else can finish them; removing them frees the space at once."""
    mine = f"-{socket.gethostname()}-{os.getpid()}-"
    mine = "".join(c if c.isalnum() or c == "-" else "-" for c in mine)
    removed = []
    try:
        for seg in group.uncommitted_segments():
            if mine in seg:
                group.storage.rm(group.name, "segments", seg, recursive=True)
                removed.append(seg)
    except OSError:
        pass  # `logit_cache gc` removes what is left later
    return removed


# ---------------------------------------------------------------------------------------------
# the async pipeline: one sender task per (server, concurrency slot), the writer pool


async def stream_targets(chunks: list[Chunk], urls: list[str], *, token: str | None, k: int, vocab_limit: int,
                         template: str, concurrency: int, timeout_s: float, retry: RetryPolicy, group,
                         new_writer: Callable[[], object], writers: int, stats: FillStats, bar=None) -> None:
    """Send every chunk and write every answer into ``group`` (writers from ``new_writer``, all
    committed at the end whatever happens); FillError when the fill cannot go on."""
    pending: deque[Chunk] = deque(chunks)   # a failed chunk goes back to the FRONT: order is kept
    remaining = len(chunks)
    stop = asyncio.Event()                   # stop sending: all done, fatal error, or interrupted
    fatal: list[str] = []
    disk_full: list[BaseException] = []
    failures = {url: 0 for url in urls}      # consecutive failures per server (its back-off)
    loop = asyncio.get_running_loop()
    pool = WriterPool(writers, new_writer, group.meta, stats)
    room = asyncio.Semaphore(2 * writers)    # answers waiting for (or in) a writer
    writes: set[asyncio.Future] = set()
    t0, cpu0 = time.perf_counter(), time.process_time()

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

    def written(fut: asyncio.Future, chunk: Chunk, url: str) -> None:
        nonlocal remaining
        room.release()
        writes.discard(fut)
        if fut.cancelled():
            return
        e = fut.exception()
        if e is None:
            remaining -= 1
            stats.tokens += chunk.tokens
            stats.per_server[url] = stats.per_server.get(url, 0) + len(chunk.samples)
            if bar is not None:
                bar.update(len(chunk.samples))
                bar.set_postfix(tok_s=f"{stats.tokens / max(time.perf_counter() - t0, 1e-9):,.0f}", refresh=False)
            if remaining == 0:
                stop.set()
            return
        if is_disk_full(e):
            disk_full.append(e)
        elif isinstance(e, FrameError):
            fatal.append(str(e))
        else:  # e.g. a target the cache refuses, an unwritable root
            fatal.append(f"the cache writer failed: {type(e).__name__}: {e}")
        stop.set()

    async def send(server: AsyncTeacherClient) -> None:
        url = server.url
        while not stop.is_set():
            if not pending:
                await asyncio.sleep(0.05)  # another worker holds the rest; it may give them back
                continue
            chunk = pending.popleft()
            retry_after = None
            try:
                te = time.perf_counter()
                body = await asyncio.to_thread(encode_chunk, chunk, k, vocab_limit, template)
                th = time.perf_counter()
                frame = await server.targets_frame(body)
                stats.encode_seconds += th - te
                stats.http_seconds += time.perf_counter() - th
                stats.requests += 1
                failures[url] = 0
                await room.acquire()
                fut = loop.run_in_executor(pool.executor, pool.write, chunk, frame, url)
                writes.add(fut)
                fut.add_done_callback(lambda f, c=chunk, u=url: written(f, c, u))
                continue
            except ClientError as e:
                stats.requests += e.status is not None
                if not isinstance(e, RetryableError):  # a final answer: the server named the problem
                    fatal.append(str(e))
                    stop.set()
                    return
                chunk.last_error, retry_after = str(e), e.retry_after  # the server may come back
            except Exception as e:  # noqa: BLE001 - e.g. an image file gone since the data was prepared:
                fatal.append(f"a request failed: {type(e).__name__}: {e}")  # stop, never hang the others
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

    servers = [AsyncTeacherClient(url, token, concurrency, timeout_s) for url in urls]  # reused
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
        # never raise from here: every outcome is reported below, with what was kept
        for t in senders:
            t.cancel()
        while writes:  # answers already received are written (unless the disk is full)
            await asyncio.wait(set(writes))
            await asyncio.sleep(0)  # their done-callbacks
        if not disk_full:
            for e in await asyncio.to_thread(pool.commit_all):
                if is_disk_full(e):
                    disk_full.append(e)
                else:
                    fatal.append(f"committing the last segments failed: {type(e).__name__}: {e}")
        if disk_full:  # writing more cannot succeed; what failed half-way only takes space
            pool.abort_all()
            await asyncio.to_thread(remove_own_partial_segments, group)
        await asyncio.to_thread(pool.close)
        for s in servers:
            await s.aclose()
        for sig in installed:
            loop.remove_signal_handler(sig)
        committed = pool.committed()
        stats.segments = [m.segment for m in committed]
        stats.written = sum(m.num_samples for m in committed)
        stats.send_seconds = time.perf_counter() - t0
        stats.cpu_seconds = time.process_time() - cpu0
    kept = (f"{stats.already_committed + stats.written} of {stats.samples} samples are committed "
            f"({stats.written} by this run)")
    if disk_full:
        raise FillError(f"disk full at {group.url} ({os.strerror(disk_full[0].errno)}); {kept}; free space and "
                        f"re-run the same command to resume")
    if fatal:
        raise FillError(f"{fatal[0]}; {kept}: re-run the same command to resume")
