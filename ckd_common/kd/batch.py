"""Batch collation of sparse teacher targets and the row layout the student losses work on.

``collate_targets`` stacks per-sample ckd_common.targets.SampleTargets (numpy, as read from the
cache or returned by a teacher) into one BatchTargets; ``build_rows`` checks a BatchTargets against
a batch's labels and visual spans and flattens every position the loss touches, with the weights
that implement the batch reduction (mean per sample, then over the samples that have the term).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ckd_common.kd.relation import FactorTarget, relation_target
from ckd_common.kd.terms import IGNORE_INDEX, response_mask
from ckd_common.targets import SampleTargets, SparseTopK

__all__ = ["BatchTargets", "Rows", "build_rows", "collate_targets"]


@dataclass
class BatchTargets:
    """Sparse teacher targets of a batch, flattened across samples.

    text_ids [Nt, k] int64, text_logprobs [Nt, k], text_tail [Nt]: rows
        text_offsets[b]:text_offsets[b+1] belong to sample b, one per response position
        t in R_b = {t : labels[b, t+1] != -100}, ascending t (same order as SampleTargets.text).
    vis_ids [Nvis, k], vis_logprobs, vis_tail: rows vis_offsets[b]:vis_offsets[b+1] are sample b's
        visual span v0_b .. v0_b + Nv_b - 1 (zero rows for a text-only sample).
    autocorr: per sample the teacher's (Frobenius-normalised) R, or None: a FactorTarget (U with
        R ~ U U^T, as a format-2 cache stores it) or a dense [Nv_b, Nv_b] tensor (relation.py).
    Offsets are Python int tuples of length B+1 (no device sync to read them). Text and visual
    share one k (collate_targets pads the smaller with -inf / id 0), so they can be stacked.
    """

    text_ids: torch.Tensor
    text_logprobs: torch.Tensor
    text_tail: torch.Tensor
    text_offsets: tuple[int, ...]
    vis_ids: torch.Tensor
    vis_logprobs: torch.Tensor
    vis_tail: torch.Tensor
    vis_offsets: tuple[int, ...]
    autocorr: list[torch.Tensor | FactorTarget | None]

    @property
    def batch_size(self) -> int:
        return len(self.text_offsets) - 1

    @property
    def k(self) -> int:
        return int(self.text_ids.shape[1])

    def text_counts(self) -> list[int]:
        return [b - a for a, b in zip(self.text_offsets[:-1], self.text_offsets[1:])]

    def vis_counts(self) -> list[int]:
        return [b - a for a, b in zip(self.vis_offsets[:-1], self.vis_offsets[1:])]

    def text_only(self) -> "BatchTargets":
        """These targets without the visual ones (the trainer's --no-visual-kd): no visual rows, so the
        loss neither computes the visual span's logits nor its autocorrelation."""
        k = self.k
        empty = torch.zeros(0, dtype=self.vis_tail.dtype, device=self.vis_tail.device)
        return BatchTargets(
            self.text_ids, self.text_logprobs, self.text_tail, self.text_offsets,
            self.vis_ids.new_zeros((0, k)), self.vis_logprobs.new_zeros((0, k)), empty,
            (0,) * len(self.vis_offsets), [None] * len(self.autocorr),
        )

    def to(self, device: torch.device | str) -> "BatchTargets":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return BatchTargets(
            mv(self.text_ids), mv(self.text_logprobs), mv(self.text_tail), self.text_offsets,
            mv(self.vis_ids), mv(self.vis_logprobs), mv(self.vis_tail), self.vis_offsets,
            [mv(a) for a in self.autocorr],
        )


def _pad_k(topk: SparseTopK | None, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if topk is None:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), np.zeros((0,), np.float32)
    ids = np.asarray(topk.ids, dtype=np.int64)
    lp = np.asarray(topk.logprobs, dtype=np.float32)
    extra = k - ids.shape[1]
    if extra:
        ids = np.concatenate([ids, np.zeros((ids.shape[0], extra), np.int64)], axis=1)
        lp = np.concatenate([lp, np.full((lp.shape[0], extra), -np.inf, np.float32)], axis=1)
    return ids, lp, np.asarray(topk.tail, dtype=np.float32)


def collate_targets(samples: Sequence[SampleTargets], device: torch.device | str | None = None) -> BatchTargets:
    """Stack per-sample ckd_common.targets.SampleTargets (numpy) into one BatchTargets.

    All parts are padded to the largest k present (padding: id 0, log-prob -inf, which every loss
    here ignores). A sample whose ``visual`` is None gets zero visual rows and no autocorr."""
    ks = [s.text.k for s in samples] + [s.visual.k for s in samples if s.visual is not None]
    k = max(ks) if ks else 1
    text = [_pad_k(s.text, k) for s in samples]
    vis = [_pad_k(s.visual, k) for s in samples]

    def offsets(parts):
        return tuple(int(x) for x in np.cumsum([0] + [p[0].shape[0] for p in parts]))

    def cat(parts, i, dtype):
        arr = np.concatenate([p[i] for p in parts]) if parts else np.zeros((0, k) if i < 2 else (0,))
        return torch.from_numpy(np.ascontiguousarray(arr)).to(dtype=dtype, device=device)

    return BatchTargets(
        text_ids=cat(text, 0, torch.long),
        text_logprobs=cat(text, 1, torch.float32),
        text_tail=cat(text, 2, torch.float32),
        text_offsets=offsets(text),
        vis_ids=cat(vis, 0, torch.long),
        vis_logprobs=cat(vis, 1, torch.float32),
        vis_tail=cat(vis, 2, torch.float32),
        vis_offsets=offsets(vis),
        autocorr=[relation_target(s.autocorr, device) for s in samples],
    )


# --------------------------------------------------------------------------------------------
# the rows a loss touches (shared by fused.py and reference.py)
# --------------------------------------------------------------------------------------------
@dataclass
class Rows:
    """Every position the loss touches, flattened: text rows first (batch order, ascending t),
    then visual rows. Weights implement 'mean per sample, then mean over samples that have it'."""

    b: torch.Tensor  # [M] sample index
    t: torch.Tensor  # [M] position index
    label: torch.Tensor  # [M] next-token id for text rows, -100 for visual rows
    ids: torch.Tensor  # [M, k]
    logprobs: torch.Tensor  # [M, k]
    tail: torch.Tensor  # [M]
    w_text: torch.Tensor  # [M] 1/(|R_b| * #samples with text) on text rows, else 0
    w_vis: torch.Tensor  # [M] 1/(Nv_b * #samples with image) on visual rows, else 0
    vis_spans: list[tuple[int, int, int]]  # (b, v0, Nv) for samples with a visual span


def build_rows(
    labels: torch.Tensor,
    targets: BatchTargets,
    visual_start: Sequence[int] | torch.Tensor | None,
    visual_len: Sequence[int] | torch.Tensor | None,
    dtype: torch.dtype,
) -> Rows:
    """Check that ``targets`` align with ``labels`` (and the visual spans) and flatten them into Rows.

    Every mismatch is a ValueError naming the sample or the per-sample counts."""
    device = labels.device
    bsz, seq = labels.shape
    if targets.batch_size != bsz:
        raise ValueError(f"targets hold {targets.batch_size} samples, labels {bsz}")
    resp = response_mask(labels)
    n_text = resp.sum(1).tolist()
    if n_text != targets.text_counts():
        raise ValueError(
            f"text targets do not align with labels: response positions per sample {n_text}, "
            f"target rows per sample {targets.text_counts()}"
        )
    n_vis = targets.vis_counts()
    if visual_len is not None:
        vl = [int(x) for x in (visual_len.tolist() if torch.is_tensor(visual_len) else visual_len)]
        if vl != n_vis:
            raise ValueError(f"visual_len {vl} != visual target rows per sample {n_vis}")
    if any(n_vis):
        if visual_start is None:
            raise ValueError("visual targets present but visual_start is None")
        v0s = [int(x) for x in (visual_start.tolist() if torch.is_tensor(visual_start) else visual_start)]
    else:
        v0s = [0] * bsz
    spans = []
    for b, (v0, nv) in enumerate(zip(v0s, n_vis)):
        if nv:
            if v0 < 0 or v0 + nv > seq:
                raise ValueError(f"sample {b}: visual span [{v0}, {v0 + nv}) outside length {seq}")
            spans.append((b, v0, nv))

    tb, tt = resp.nonzero(as_tuple=True)  # row-major: batch order, ascending t
    vb = torch.tensor([b for b, _, nv in spans for _ in range(nv)], dtype=torch.long, device=device)
    vt = torch.tensor([v0 + i for _, v0, nv in spans for i in range(nv)], dtype=torch.long, device=device)

    s_text = sum(1 for n in n_text if n)
    s_vis = len(spans)
    per_text = torch.tensor([1.0 / (n * s_text) if n else 0.0 for n in n_text], dtype=dtype, device=device)
    per_vis = torch.tensor([1.0 / (n * s_vis) if n else 0.0 for n in n_vis], dtype=dtype, device=device)
    zeros_t = torch.zeros(tb.shape[0], dtype=dtype, device=device)
    zeros_v = torch.zeros(vb.shape[0], dtype=dtype, device=device)
    return Rows(
        b=torch.cat([tb, vb]),
        t=torch.cat([tt, vt]),
        label=torch.cat([labels[tb, tt + 1], torch.full_like(vb, IGNORE_INDEX)]),
        ids=torch.cat([targets.text_ids, targets.vis_ids]).to(device).long(),
        logprobs=torch.cat([targets.text_logprobs, targets.vis_logprobs]).to(device, dtype),
        tail=torch.cat([targets.text_tail, targets.vis_tail]).to(device, dtype),
        w_text=torch.cat([per_text[tb], zeros_v]),
        w_vis=torch.cat([zeros_t, per_vis[vb]]),
        vis_spans=spans,
    )
