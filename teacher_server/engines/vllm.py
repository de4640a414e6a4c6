"""Optional vLLM engine (``pip install llava-ckd[vllm]``; GPU only; NOT tested in CI — there is no
CPU build of vllm, see docs/environment.md). Imported only when ``--engine vllm`` is chosen.

What it does: one prefill per sample through ``LLM.generate(..., SamplingParams(max_tokens=1,
prompt_logprobs=k, logprobs=k))``; vLLM's prompt log-prob entry t is the distribution over token t
given tokens < t, i.e. the teacher's logits at position t-1, so the targets at position t come
from entry t+1 (and from the generated step's log-probs for the last position). vLLM batches
internally (continuous batching), so this engine forwards each request as it comes.

Known differences from the HF engine, which is the reference:
- no hidden states: the visual autocorrelation is not produced (``target_kinds`` = text, visual);
- the softmax runs over the full lm_head vocabulary, not the common vocabulary, so ids >= the
  common vocabulary are dropped after the fact and their mass is added to the tail;
- vLLM may return k+1 entries (the actual token is always included); the top k are kept.
"""
from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence

import numpy as np

from ckd_common.model import load_vlm, model_info
from ckd_common.targets import SampleTargets, SparseTopK
from ckd_common.teacher import TeacherInput

from ..errors import EngineFailure
from .base import BatchObserver, Engine, EngineDescription

try:  # the guard: a clear message instead of an ImportError deep in the server
    import vllm  # noqa: F401
except ImportError as e:  # pragma: no cover - vllm is never installed in CI
    raise ImportError("the vllm engine needs the optional extra: pip install 'llava-ckd[vllm]' "
                      "(GPU only); use --engine hf otherwise") from e


class VLLMEngine(Engine):  # pragma: no cover - needs a GPU and vllm
    name = "vllm"

    def __init__(self, config, observer: BatchObserver | None = None) -> None:
        self.cfg, self.observer = config, observer
        self._inflight_tokens = 0
        self._inflight_samples = 0
        self.llm = None

    def load(self) -> EngineDescription:
        from vllm import LLM

        # the HF model is loaded once on CPU for the fingerprint and tokenizer, then dropped
        model, tok = load_vlm(self.cfg.model_dir)
        info = model_info(model, tok)
        del model
        self.common_vocab = info.common_vocab
        dtype = {"bf16": "bfloat16", "fp32": "float32", None: "bfloat16"}[self.cfg.dtype]
        self.llm = LLM(model=self.cfg.model_dir, dtype=dtype, max_logprobs=self.cfg.max_k + 1,
                       enable_prefix_caching=False)
        return EngineDescription(model=info, dtype=dtype, device=self.cfg.device, tokenizer=tok,
                                 target_kinds=["text", "visual"])

    @property
    def queued_tokens(self) -> int:
        return self._inflight_tokens

    @property
    def queued_samples(self) -> int:
        return self._inflight_samples

    def close(self, drain: bool = True) -> None:
        self.llm = None

    def _topk(self, entries, k: int, vocab_limit: int) -> tuple[np.ndarray, np.ndarray, float]:
        items = sorted(((tid, lp.logprob) for tid, lp in entries.items() if tid < vocab_limit),
                       key=lambda x: -x[1])[:k]
        ids = np.zeros(k, np.int64)
        lps = np.full(k, -np.inf, np.float32)
        for j, (tid, lp) in enumerate(items):
            ids[j], lps[j] = tid, lp
        tail = float(np.clip(1.0 - np.exp(lps[np.isfinite(lps)]).sum(), 0.0, 1.0))
        return ids, lps, tail

    def _run(self, inputs: Sequence[TeacherInput], k: int, vocab_limit: int) -> list[SampleTargets]:
        from vllm import SamplingParams

        prompts = []
        for x in inputs:
            p = {"prompt_token_ids": [int(t) for t in x.input_ids]}
            if getattr(x, "image_bytes", None) is not None:
                from PIL import Image
                p["multi_modal_data"] = {"image": Image.open(io.BytesIO(x.image_bytes)).convert("RGB")}
            prompts.append(p)
        outs = self.llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=k, logprobs=k),
                                 use_tqdm=False)
        results = []
        for x, o in zip(inputs, outs):
            dists = list(o.prompt_logprobs[1:]) + [o.outputs[0].logprobs[0]]  # entry t = logits at t

            def rows(pos):
                parts = [self._topk(dists[int(t)], k, vocab_limit) for t in pos]
                return SparseTopK(np.stack([p[0] for p in parts]).reshape(-1, k),
                                  np.stack([p[1] for p in parts]).reshape(-1, k),
                                  np.array([p[2] for p in parts], np.float32))
            text = rows(x.response_positions)
            visual = rows(range(x.visual_start, x.visual_start + x.num_visual)) if x.num_visual else None
            results.append(SampleTargets(x.key, text, visual, None))
        return results

    async def targets(self, inputs: Sequence[TeacherInput], k: int, vocab_limit: int) -> list[SampleTargets]:
        n = sum(x.length for x in inputs)
        self._inflight_tokens += n
        self._inflight_samples += len(inputs)
        try:
            return await asyncio.to_thread(self._run, inputs, k, vocab_limit)
        except Exception as e:  # noqa: BLE001
            raise EngineFailure(f"vllm failed: {type(e).__name__}: {e}") from e
        finally:
            self._inflight_tokens -= n
            self._inflight_samples -= len(inputs)
