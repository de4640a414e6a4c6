"""The teacher forward: prepared inputs -> SampleTargets (top-k + tail at the response positions
and the visual span, normalised visual autocorrelation). One implementation, used by the teacher
server's HF engine, by tests, and by online distillation baselines.

The model runs prefill only; everything vocab-sized stays on the model's device and lives one
chunk of positions at a time; results cross to the host once per batch. The autocorrelation leaves
the device as its int8 low-rank factor (ckd_common.kd.relation.factor_autocorr: matrix products on
the device, ~Nv x r bytes to the host); ``autocorr="dense"`` keeps the full float32 R/||R||_F, the
oracle the factor is tested against.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ckd_common.kd import lm_head_gram, normalized_autocorr, teacher_targets_from_hidden
from ckd_common.kd.relation import DEFAULT_MAX_RANK, DEFAULT_SHARE, factor_autocorr, factor_to_numpy
from ckd_common.model import lm_head_weight
from ckd_common.targets import SampleTargets, SparseTopK


@dataclass
class TeacherInput:
    """What the teacher needs of one prepared sample (no labels: positions are given)."""

    key: str
    input_ids: np.ndarray              # int64 [L]
    response_positions: np.ndarray     # int64 [Nt], ascending
    visual_start: int = -1
    num_visual: int = 0
    pixel_values: np.ndarray | None = None  # float32 [3, H, W], preprocessed

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def from_prepared(cls, sample, image_size: int | None = None, pixel_values: np.ndarray | None = None,
                      aspect_ratio: str | None = None):
        """``image_size`` and ``aspect_ratio`` are the teacher's (ModelInfo), unless ``pixel_values``
        are given."""
        from pathlib import Path

        from ckd_common.data import load_image, preprocess_image

        pix = pixel_values
        if pix is None and sample.has_image:
            if image_size is None or aspect_ratio is None:
                raise ValueError("TeacherInput.from_prepared: image_size and aspect_ratio are required for a "
                                 "sample with an image")
            pix = preprocess_image(load_image(Path(sample.image_path), sample.id), image_size, aspect_ratio)
        return cls(sample.key, sample.input_ids, sample.response_positions, sample.visual_start,
                   sample.num_visual, pix)


class TeacherRunner:
    """Holds a teacher model and produces targets for batches of :class:`TeacherInput`.

    ``vocab_limit`` is the common vocabulary (targets never hold ids >= it); W^T W for the Gram
    trick is computed once, since the teacher's lm_head is frozen. ``autocorr``: "factor" (the
    stored form: rank chosen per sample to capture ``autocorr_share`` of ||R||_F^2, at most
    ``autocorr_max_rank`` columns) or "dense" (the float32 matrix: the oracle)."""

    AUTOCORR_FORMS = ("factor", "dense")

    def __init__(self, model, vocab_limit: int | None = None, chunk_size: int = 1024, autocorr: str = "factor",
                 autocorr_share: float = DEFAULT_SHARE, autocorr_max_rank: int = DEFAULT_MAX_RANK):
        if autocorr not in self.AUTOCORR_FORMS:
            raise ValueError(f"TeacherRunner: autocorr={autocorr!r}; choose one of {self.AUTOCORR_FORMS}")
        self.autocorr, self.autocorr_share, self.autocorr_max_rank = autocorr, autocorr_share, autocorr_max_rank
        self.model = model.eval()
        self.weight = lm_head_weight(model)
        self.vocab_limit = int(vocab_limit or self.weight.shape[0])
        if self.vocab_limit > self.weight.shape[0]:
            raise ValueError(f"vocab_limit {self.vocab_limit} exceeds the teacher's vocab {self.weight.shape[0]}")
        self.chunk_size = chunk_size
        self.gram = lm_head_gram(self.weight.detach())
        self.image_token_id = int(model.config.image_token_id)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def hidden_states(self, inputs: Sequence[TeacherInput]) -> torch.Tensor:
        """Final-norm hidden states [B, L, d] of a right-padded batch."""
        dev = self.device
        L = max(x.length for x in inputs)
        ids = torch.zeros((len(inputs), L), dtype=torch.long)
        mask = torch.zeros((len(inputs), L), dtype=torch.long)
        for i, x in enumerate(inputs):
            ids[i, :x.length] = torch.from_numpy(np.asarray(x.input_ids, dtype=np.int64))
            mask[i, :x.length] = 1
        pix = [x.pixel_values for x in inputs if x.pixel_values is not None]
        kwargs = {}
        if pix:
            kwargs["pixel_values"] = torch.from_numpy(np.stack(pix)).to(dev, self.weight.dtype)
        out = self.model.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False, **kwargs)
        return out.last_hidden_state

    @torch.no_grad()
    def targets(self, inputs: Sequence[TeacherInput], k: int) -> list[SampleTargets]:
        if not inputs:
            return []
        h = self.hidden_states(inputs)
        rows_b, rows_t, spans = [], [], []
        for i, x in enumerate(inputs):
            rows_b.append(np.full(len(x.response_positions), i))
            rows_t.append(np.asarray(x.response_positions, dtype=np.int64))
            if x.num_visual:
                rows_b.append(np.full(x.num_visual, i))
                rows_t.append(np.arange(x.visual_start, x.visual_start + x.num_visual))
        b = torch.from_numpy(np.concatenate(rows_b).astype(np.int64)).to(h.device)
        t = torch.from_numpy(np.concatenate(rows_t).astype(np.int64)).to(h.device)
        ids, logprobs, tail = teacher_targets_from_hidden(h[b, t], self.weight, k, self.vocab_limit,
                                                          self.chunk_size)
        autocorr = self._autocorr(h, inputs)
        # one transfer per batch: everything to host together
        ids, logprobs, tail = ids.to(torch.int32).cpu().numpy(), logprobs.cpu().numpy(), tail.cpu().numpy()
        out, row, a = [], 0, 0
        for x in inputs:
            nt = len(x.response_positions)
            text = SparseTopK(ids[row:row + nt], logprobs[row:row + nt], tail[row:row + nt])
            row += nt
            visual = ac = None
            if x.num_visual:
                nv = x.num_visual
                visual = SparseTopK(ids[row:row + nv], logprobs[row:row + nv], tail[row:row + nv])
                row += nv
                ac = autocorr[a]
                a += 1
            out.append(SampleTargets(x.key, text, visual, ac))
        return out

    def _autocorr(self, h: torch.Tensor, inputs: Sequence[TeacherInput]) -> list:
        """Per image sample (in order): R/||R||_F as an AutocorrFactor, or dense float32 (host)."""
        rs = [normalized_autocorr(h[i, x.visual_start:x.visual_start + x.num_visual], gram=self.gram)
              for i, x in enumerate(inputs) if x.num_visual]
        if self.autocorr == "dense" or not rs:
            return [a.cpu().numpy() for a in rs]
        out: list = [None] * len(rs)
        by_nv: dict[int, list[int]] = {}
        for j, a in enumerate(rs):  # samples of one model share Nv: in practice one batched call
            by_nv.setdefault(a.shape[0], []).append(j)
        for idx in by_nv.values():
            codes, scale, rank, share, tail = (t.cpu().numpy() for t in factor_autocorr(
                torch.stack([rs[j] for j in idx]), self.autocorr_share, self.autocorr_max_rank))
            for b, j in enumerate(idx):
                out[j] = factor_to_numpy(codes[b], scale[b], rank[b], share[b], tail[b])
        return out
