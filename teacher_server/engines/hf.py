"""The default engine: a transformers teacher (CPU or GPU) behind a dynamic batcher.

Request handlers enqueue samples and await futures; one worker thread forms batches across all
concurrent requests and runs :class:`ckd_common.teacher.TeacherRunner` (prefill only, top-k +
tail and the Gram-trick autocorrelation on device, the autocorrelation factorised there too, one host
transfer per batch).

Batching: the oldest waiting sample anchors the next batch (so nothing starves); among waiting
samples with the same (k, vocab_limit) it adds the ones closest in length (sorted by length, so
little padding) while batch size x longest length stays within ``max_batch_tokens``.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ckd_common.model import load_vlm, model_info
from ckd_common.targets import SampleTargets
from ckd_common.teacher import TeacherInput, TeacherRunner

from ..errors import EngineFailure, NotReady
from .base import BatchObserver, Engine, EngineDescription

log = logging.getLogger("teacher_server.hf")

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_dtype(name: str | None, device: str) -> tuple[str, torch.dtype]:
    """bf16 on GPU and fp32 on CPU unless asked otherwise."""
    if name is None:
        name = "bf16" if str(device).startswith("cuda") else "fp32"
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return name, DTYPES[name]


@dataclass(eq=False)
class _Item:
    inp: TeacherInput
    k: int
    vocab_limit: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    seq: int


def _resolve(item: _Item, result=None, error: BaseException | None = None) -> None:
    """Complete an item's future from the worker thread (futures belong to the event loop)."""
    def done() -> None:
        if item.future.done():  # the request was cancelled (client went away)
            return
        if error is not None:
            item.future.set_exception(error)
        else:
            item.future.set_result(result)
    try:
        item.loop.call_soon_threadsafe(done)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


class HFEngine(Engine):
    name = "hf"

    def __init__(self, config, observer: BatchObserver | None = None) -> None:
        self.cfg = config
        self.observer = observer
        self.runner: TeacherRunner | None = None
        self._cv = threading.Condition()
        self._pending: list[_Item] = []
        self._queued_tokens = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seq = itertools.count()
        self._tps = 0.0

    # -- lifecycle -------------------------------------------------------------------------------
    def load(self) -> EngineDescription:
        dtype_name, dtype = resolve_dtype(self.cfg.dtype, self.cfg.device)
        model, tok = load_vlm(self.cfg.model_dir, dtype=dtype, device=self.cfg.device)
        info = model_info(model, tok)
        self.runner = TeacherRunner(model, vocab_limit=info.common_vocab, chunk_size=self.cfg.chunk_size)
        self._thread = threading.Thread(target=self._work, name="teacher-batcher", daemon=True)
        self._thread.start()
        return EngineDescription(model=info, dtype=dtype_name, device=str(self.runner.device), tokenizer=tok)

    def close(self, drain: bool = True) -> None:
        with self._cv:
            self._stopping = True
            if not drain:
                dropped, self._pending = self._pending, []
                for it in dropped:
                    _resolve(it, error=NotReady("the server is shutting down"))
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()

    # -- queue -------------------------------------------------------------------------------------
    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def queued_samples(self) -> int:
        return len(self._pending)

    def tokens_per_second(self) -> float:
        return self._tps

    async def targets(self, inputs: Sequence[TeacherInput], k: int, vocab_limit: int) -> list[SampleTargets]:
        loop = asyncio.get_running_loop()
        items = [_Item(x, k, vocab_limit, loop.create_future(), loop, next(self._seq)) for x in inputs]
        with self._cv:
            if self._stopping or self.runner is None:
                raise NotReady("the server is shutting down" if self._stopping else "the model is not loaded yet")
            self._pending.extend(items)
            self._queued_tokens += sum(x.length for x in inputs)
            self._cv.notify()
        try:
            return list(await asyncio.gather(*(it.future for it in items)))
        except BaseException:
            for it in items:  # the worker skips samples nobody waits for any more
                it.future.cancel()
            raise

    def _take_batch(self) -> list[_Item]:
        """Remove and return the next batch from ``_pending`` (caller holds the lock)."""
        anchor = min(self._pending, key=lambda it: it.seq)
        group = sorted((it for it in self._pending if (it.k, it.vocab_limit) == (anchor.k, anchor.vocab_limit)),
                       key=lambda it: (it.inp.length, it.seq))
        i = group.index(anchor)
        lo, hi, longest = i, i + 1, anchor.inp.length
        budget = self.cfg.max_batch_tokens
        while True:
            cands = []
            if lo > 0:
                cands.append((abs(group[lo - 1].inp.length - anchor.inp.length), lo - 1))
            if hi < len(group):
                cands.append((abs(group[hi].inp.length - anchor.inp.length), hi))
            grown = False
            for _, j in sorted(cands):
                new_longest = max(longest, group[j].inp.length)
                if new_longest * (hi - lo + 1) <= budget:
                    lo, hi, longest = (j, hi, new_longest) if j < lo else (lo, j + 1, new_longest)
                    grown = True
                    break
            if not grown:
                break
        batch = group[lo:hi]
        taken = set(map(id, batch))
        self._pending = [it for it in self._pending if id(it) not in taken]
        return batch

    # -- worker ------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stopping:
                    self._cv.wait()
                if not self._pending:  # stopping and drained
                    return
                batch = self._take_batch()
            try:
                live = [it for it in batch if not it.future.cancelled()]
                if live:
                    self._run(live)
            finally:
                with self._cv:
                    self._queued_tokens -= sum(it.inp.length for it in batch)

    def _run(self, batch: list[_Item]) -> None:
        assert self.runner is not None
        try:
            t0 = time.perf_counter()
            self.runner.vocab_limit = batch[0].vocab_limit
            results = self.runner.targets([it.inp for it in batch], batch[0].k)
            dt = time.perf_counter() - t0
        except torch.OutOfMemoryError:
            if len(batch) > 1:  # halve and retry rather than failing every request of the batch
                log.warning("out of memory on a batch of %d samples; splitting it", len(batch))
                if self.runner.device.type == "cuda":
                    torch.cuda.empty_cache()
                half = len(batch) // 2
                self._run(batch[:half])
                self._run(batch[half:])
                return
            err = EngineFailure(f"out of memory on a single sample of {batch[0].inp.length} tokens; "
                                f"lower --max-batch-tokens or use a larger GPU")
            for it in batch:
                _resolve(it, error=err)
            return
        except Exception as e:  # noqa: BLE001 - reported to the request of the sample that failed
            if len(batch) > 1:  # the batch mixes requests (clients): retry alone so only the bad sample fails
                log.warning("a batch of %d samples failed (%s: %s); retrying its samples one by one",
                            len(batch), type(e).__name__, e)
                for it in batch:
                    if not it.future.done():  # its request may have failed (or gone) meanwhile
                        self._run([it])
                return
            log.exception("sample %s failed", batch[0].inp.key)
            err = EngineFailure(f"the teacher failed on the sample with key {batch[0].inp.key}: "
                                f"{type(e).__name__}: {e}")
            _resolve(batch[0], error=err)
            return
        tokens = sum(it.inp.length for it in batch)
        rate = tokens / max(dt, 1e-9)
        self._tps = rate if self._tps == 0 else 0.8 * self._tps + 0.2 * rate
        if self.observer is not None:
            self.observer.on_batch(len(batch), tokens, len(batch) * max(it.inp.length for it in batch), dt)
        for it, r in zip(batch, results):
            _resolve(it, result=r)
