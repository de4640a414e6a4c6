"""``--engine null``: a teacher without a forward pass, for measuring everything around it.

It reads the model directory's ``config.json`` and tokenizer only (no weights), so ``/v1/info``,
``/v1/tokenizer`` and the sample checks are those of that teacher (vocabulary, visual tokens,
image size), and answers ``/v1/targets`` at once with precomputed targets of the real shapes:
teacher-like top-k rows and visual autocorrelations as the low-rank int8 factors a real teacher
sends (``logit_cache.synthetic``'s TeacherLikeModel, factored by ``ckd_common.kd.relation``: the
distribution and ranks the cache benches measure, so the bytes moved and stored are a teacher's). Use it to size the host side of a fill (request encoding,
HTTP, response decoding, cache writing: ``bench/fill_host.py``) or a deployment's network and
storage before a GPU teacher is involved::

    teacher_server serve --engine null --model DIR      # DIR: any llava checkpoint (weights unread)

Its targets are synthetic: its fingerprint is ``null-...`` (never a real teacher's), so a cache
filled from it can never be mistaken for one. Each sample gets a window of a fixed pool chosen by
a hash of its key: the same sample always gets the same targets, on every replica.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckd_common.targets import AutocorrFactor, SampleTargets, SparseTopK
from ckd_common.teacher import TeacherInput

from ..errors import NotReady
from .base import BatchObserver, Engine, EngineDescription

log = logging.getLogger("teacher_server.null")

POOL_ROWS = 4096          # distinct top-k rows (generating one costs a softmax over the vocabulary)
POOL_AUTOCORR = 8         # distinct autocorrelation factors
DEFAULT_K = 64            # the pool generated at load; another k or vocab_limit builds one on first use
AUTOCORR_MAX_D = 512      # hidden width of the synthetic teacher-like states (the real one, up to this: load time)


@dataclass
class _Pool:
    ids: np.ndarray        # int32 [POOL_ROWS, k], descending probability per row
    logprobs: np.ndarray   # float32 [POOL_ROWS, k]
    tail: np.ndarray       # float32 [POOL_ROWS]


def _window(h: bytes, n: int) -> np.ndarray | slice:
    """Rows of the pool for a sample's n positions: a contiguous slice (a view) when it fits."""
    start = int.from_bytes(h, "little")
    if n <= POOL_ROWS:
        start %= POOL_ROWS - n + 1
        return slice(start, start + n)
    return np.arange(start, start + n) % POOL_ROWS


class NullEngine(Engine):
    name = "null"
    needs_pixels = False   # the service checks the image header only; nothing here looks at pixels

    def __init__(self, config, observer: BatchObserver | None = None) -> None:
        self.cfg = config
        self.observer = observer
        self._pools: dict[int, _Pool] = {}      # vocab_limit -> pool at the largest k asked so far
        self._lock = threading.Lock()
        self._autocorr: dict[int, list[AutocorrFactor]] = {}  # Nv -> POOL_AUTOCORR factors
        self._num_visual = 0
        self._hidden = 0
        self._stopping = False
        self.description: EngineDescription | None = None

    def load(self) -> EngineDescription:
        from transformers import AutoConfig, AutoTokenizer

        from ckd_common.model import info_from_config

        d = Path(self.cfg.model_dir)
        config = AutoConfig.from_pretrained(str(d), local_files_only=True)
        if getattr(config, "model_type", None) != "llava":
            raise ValueError(f"{d}: model_type is {config.model_type!r}; the null engine needs a llava config")
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        raw = json.loads((d / "config.json").read_text())
        fingerprint = "null-" + hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:27]
        info = info_from_config(config, tok, fingerprint)
        self._num_visual, self._hidden = info.num_visual_tokens, info.hidden_size
        self._pool(info.common_vocab, min(DEFAULT_K, self.cfg.max_k, info.common_vocab))
        self._autocorr_pool(self._num_visual)
        log.warning("engine null: targets are SYNTHETIC (no model forward), for measuring the host side only; "
                    "teacher fingerprint %s", fingerprint)
        self.description = EngineDescription(model=info, dtype="none", device="none", tokenizer=tok)
        return self.description

    # -- the precomputed targets ---------------------------------------------------------------
    def _pool(self, vocab_limit: int, k: int) -> _Pool:
        with self._lock:
            pool = self._pools.get(vocab_limit)
            if pool is None or pool.ids.shape[1] < k:
                from logit_cache.synthetic import teacher_like_topk

                t = teacher_like_topk(POOL_ROWS, vocab_limit, k, seed=vocab_limit)
                # int32 ids: what the wire carries, so answering costs no conversion
                pool = self._pools[vocab_limit] = _Pool(t.ids.astype(np.int32), t.logprobs, t.tail)
            return pool

    def _autocorr_pool(self, nv: int) -> list[AutocorrFactor]:
        """Factors of teacher-like autocorrelations of Nv visual tokens, as a teacher sends them
        (``factor_autocorr`` at its default share and rank cap: 10-160 int8 columns at Nv = 728)."""
        with self._lock:
            if nv not in self._autocorr:
                import torch

                from ckd_common.kd.relation import factor_autocorr, factor_to_numpy
                from logit_cache.synthetic import TeacherLikeModel

                rng = np.random.default_rng(nv)
                model = TeacherLikeModel(max(8, min(self._hidden or AUTOCORR_MAX_D, AUTOCORR_MAX_D)), rng)
                dense = np.stack([model.autocorr(model.hidden(nv, rng)) for _ in range(POOL_AUTOCORR)])
                outs = (t.numpy() for t in factor_autocorr(torch.from_numpy(dense)))
                self._autocorr[nv] = [factor_to_numpy(*f) for f in zip(*outs)]
            return self._autocorr[nv]

    @staticmethod
    def _topk(pool: _Pool, rows: np.ndarray | slice, k: int) -> SparseTopK:
        ids, lp = pool.ids[rows], pool.logprobs[rows]
        if k == ids.shape[1]:
            return SparseTopK(ids, lp, pool.tail[rows])
        ids, lp = ids[:, :k], lp[:, :k]
        tail = np.clip(1.0 - np.exp(lp.astype(np.float64)).sum(1), 0.0, 1.0).astype(np.float32)
        return SparseTopK(ids, lp, tail)

    def sample_targets(self, x: TeacherInput, k: int, vocab_limit: int) -> SampleTargets:
        pool = self._pool(vocab_limit, k)
        h = hashlib.sha256(x.key.encode()).digest()
        text = self._topk(pool, _window(h[:8], len(x.response_positions)), k)
        if not x.num_visual:
            return SampleTargets(x.key, text)
        visual = self._topk(pool, _window(h[8:16], x.num_visual), k)
        autocorr = self._autocorr_pool(x.num_visual)[int.from_bytes(h[16:20], "little") % POOL_AUTOCORR]
        return SampleTargets(x.key, text, visual, autocorr)

    async def targets(self, inputs: Sequence[TeacherInput], k: int, vocab_limit: int) -> list[SampleTargets]:
        if self._stopping or self.description is None:
            raise NotReady("the server is shutting down" if self._stopping else "the engine is not loaded yet")
        pool = self._pools.get(vocab_limit)
        if pool is None or pool.ids.shape[1] < k:  # another k / vocab_limit: build its pool off the loop
            await asyncio.to_thread(self._pool, vocab_limit, k)
        return [self.sample_targets(x, k, vocab_limit) for x in inputs]

    @property
    def queued_tokens(self) -> int:
        return 0

    @property
    def queued_samples(self) -> int:
        return 0

    def close(self, drain: bool = True) -> None:
        self._stopping = True
