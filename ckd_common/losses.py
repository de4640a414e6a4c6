"""The LLaVA-KD distillation loss (DESIGN.md §4), shared by the teacher server and the trainer.

Contents
--------
Reference (dense, exact paper semantics, for tests and small runs)
    llava_kd_loss_dense(student_logits, teacher_logits, labels, visual_mask, weights, rel_variant)

Teacher side (sparse targets, no [N, V] tensor beyond one chunk)
    topk_with_tail(logits, k, vocab_limit)                  -> ids, logprobs, tail
    teacher_targets_from_hidden(hidden, weight, k, ...)     -> ids, logprobs, tail
    lm_head_gram(weight)                                     -> W^T W  [d, d]
    normalized_autocorr(hidden, weight | gram)               -> R / ||R||_F  [Nv, Nv] float32

Student side
    sparse_kl(student_logits, ids, logprobs, tail)           -> per-position (k+1)-bucket KL
    gram_autocorr(hidden, weight | gram)                     -> R = H W^T W H^T (differentiable)
    rel_loss(student_R, teacher_R, variant)                  -> 1 - cosine
    BatchTargets / collate_targets(list[SampleTargets])      -> batched sparse targets
    fused_kd_loss(hidden, weight, labels, targets, visual_start, ...)   chunked, lm_head fused
    kd_loss_from_logits(logits, labels, targets, visual_start, ...)     same loss, dense logits

Conventions shared by every function here
-----------------------------------------
* Forward KL(p_teacher || q_student), temperature 1, sum over the vocabulary, mean over positions.
* Text positions of a sample are R = {t : labels[t+1] != -100} (the logits at t predict t+1);
  visual positions are the visual span [v0, v0+Nv), unshifted.
* Batch reduction: every term is averaged over a sample's own positions, then over the samples
  that have the term (a text-only sample contributes no visual terms; a sample without any
  supervised position contributes no text terms). A term nobody has is 0 (still attached to the
  graph, so ``total.backward()`` always works).
* Arithmetic dtype: float32 for half / bfloat16 / float32 inputs, float64 for float64 inputs
  (the promotion of the input dtype with float32). float64 exists for gradcheck-level tests.
* Vocabulary: the teacher distribution is taken over the *common* vocabulary, i.e. the first
  ``vocab_limit`` ids (the teacher softmax is renormalised over them), so ids the student cannot
  represent (Qwen2.5-7B has 152,064 rows, the small models 151,936) never appear in targets and
  the teacher's p sums to 1 over ids the student has. The student q is always normalised over the
  student's FULL vocabulary.
* Sparse targets: per position the teacher's top-k ids, their log-probs and the tail mass
  tau = 1 - sum_{i in K} p_i. An entry is part of the top-k bucket set K iff its log-prob is
  finite; entries with log-prob -inf are padding (k larger than the vocabulary; id 0 by
  convention) and are ignored wherever they appear.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ckd_common.targets import SampleTargets, SparseTopK

IGNORE_INDEX = -100
REL_VARIANTS = ("flat", "column")

__all__ = [
    "IGNORE_INDEX",
    "REL_VARIANTS",
    "BatchTargets",
    "collate_targets",
    "fused_kd_loss",
    "gram_autocorr",
    "kd_loss_from_logits",
    "llava_kd_loss_dense",
    "lm_head_gram",
    "normalized_autocorr",
    "rel_loss",
    "response_mask",
    "sparse_kl",
    "teacher_targets_from_hidden",
    "topk_with_tail",
]


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32 for low-precision / float32 inputs, float64 when any input is float64."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def _zero_like_graph(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A scalar 0 that is attached to ``t``'s graph without touching its values.

    ``t.reshape(-1)[:0].sum()`` is an empty sum: exactly 0 even if t holds inf/NaN, and calling
    backward through it gives t a zero gradient instead of raising "does not require grad".
    Its backward materialises a t-sized zero gradient, so it is only used where a term is empty."""
    return t.reshape(-1)[:0].sum().to(dtype)


def _check_weights(weights: Sequence[float]) -> tuple[float, float, float, float]:
    if len(weights) != 4:
        raise ValueError(f"weights must be (alpha_ce, beta_kl_text, gamma_kl_vis, delta_rel), got {weights}")
    return tuple(float(w) for w in weights)  # type: ignore[return-value]


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] bool, True at the response positions R = {t : labels[t+1] != -100}.

    The last position never predicts anything (no t+1), so it is always False."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def _align_teacher_vocab(teacher_logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Restrict the teacher to the common vocabulary [0, min(V_teacher, V_student)).

    A larger teacher vocabulary is cut (its extra rows are ids the student cannot emit); a smaller
    one is padded with -inf so that p = 0 on student ids the teacher does not have."""
    vt = teacher_logits.shape[-1]
    if vt > vocab:
        return teacher_logits[..., :vocab]
    if vt < vocab:
        pad = teacher_logits.new_full((*teacher_logits.shape[:-1], vocab - vt), float("-inf"))
        return torch.cat([teacher_logits, pad], dim=-1)
    return teacher_logits


def _full_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(softmax(t) || softmax(s)) summed over the last dim, NaN-free.

    Terms with p = 0 are exactly 0 (lim p log p = 0); ``where`` keeps -inf * 0 out of both the
    value and the gradient."""
    log_p = torch.log_softmax(teacher_logits, dim=-1)
    log_q = torch.log_softmax(student_logits, dim=-1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1)


def _safe_unit(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """x / ||x|| with a scale pre-division so that squares cannot overflow float32.

    R entries reach 1e6-1e8 (1e13 for extreme logits); dividing by max|x| first keeps
    sum(x^2) small. A zero vector maps to zero (cosine 0), never NaN."""
    if dim is None:
        scale = x.detach().abs().amax()
    else:
        scale = x.detach().abs().amax(dim=dim, keepdim=True)
    one = torch.ones_like(scale)
    x = x / torch.where(scale > 0, scale, one)
    norm = x.norm() if dim is None else x.norm(dim=dim, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def rel_loss(student_R: torch.Tensor, teacher_R: torch.Tensor, variant: str = "flat") -> torch.Tensor:
    """Relation loss between two [Nv, Nv] autocorrelation matrices (DESIGN §4).

    variant "flat":   1 - cos(vec(R_T), vec(R_S))                  (the default, LLaVA-KD Eq. 4)
    variant "column": 1 - mean_j cos(R_T[:, j], R_S[:, j])          (the paper's per-column form)
    Both are scale invariant, so the teacher's target may be Frobenius-normalised. Computed in
    float32 (float64 for float64 inputs)."""
    if variant not in REL_VARIANTS:
        raise ValueError(f"rel variant must be one of {REL_VARIANTS}, got {variant!r}")
    if student_R.shape != teacher_R.shape or student_R.ndim != 2:
        raise ValueError(f"rel_loss: shapes {tuple(student_R.shape)} vs {tuple(teacher_R.shape)}")
    dt = _compute_dtype(student_R.dtype, teacher_R.dtype)
    s = student_R.to(dt)
    t = teacher_R.to(device=s.device, dtype=dt)
    if variant == "flat":
        return 1.0 - (_safe_unit(s) * _safe_unit(t)).sum()
    return 1.0 - (_safe_unit(s, dim=0) * _safe_unit(t, dim=0)).sum(0).mean()


def _mean_over_samples(per_sample: list[torch.Tensor], zero: torch.Tensor) -> torch.Tensor:
    return torch.stack(per_sample).mean() if per_sample else zero


# --------------------------------------------------------------------------------------------
# 1. dense reference
# --------------------------------------------------------------------------------------------
def llava_kd_loss_dense(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    visual_mask: torch.Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    rel_variant: str = "flat",
) -> dict[str, torch.Tensor]:
    """The LLaVA-KD loss from full logits: exact DESIGN §4 semantics, correct at any batch size.

    student_logits [B, L, V], teacher_logits [B, L, V'] (V' != V is restricted/padded to the
    common vocabulary, see module doc), labels [B, L] unshifted with -100 = ignored (as the model's
    inputs), visual_mask [B, L] bool, True on the visual span. Right padding is simply positions
    with label -100 and visual_mask False.

    Returns float tensors {total, ce, kl_text, kl_vis, rel}; total = a*ce + b*kl_text + g*kl_vis
    + d*rel with weights = (a, b, g, d). Every term is differentiable w.r.t. student_logits.
    This is a reference: it holds several [B, L, V] tensors; training uses fused_kd_loss.
    """
    alpha, beta, gamma, delta = _check_weights(weights)
    if student_logits.ndim != 3 or labels.shape != student_logits.shape[:2]:
        raise ValueError("student_logits must be [B, L, V] and labels [B, L]")
    if visual_mask.shape != labels.shape or teacher_logits.shape[:2] != labels.shape:
        raise ValueError("teacher_logits [B, L, V'] and visual_mask [B, L] must match labels")
    dt = _compute_dtype(student_logits.dtype, teacher_logits.dtype)
    s_logits = student_logits.to(dt)
    t_logits = _align_teacher_vocab(teacher_logits.detach().to(dt), s_logits.shape[-1])
    visual_mask = visual_mask.bool()
    resp = response_mask(labels)
    zero = _zero_like_graph(s_logits, dt)

    ce_s, klt_s, klv_s, rel_s = [], [], [], []
    for b in range(labels.shape[0]):
        pos = resp[b].nonzero().squeeze(-1)
        if pos.numel():
            targets = labels[b, pos + 1]
            ce_s.append(F.cross_entropy(s_logits[b, pos], targets, reduction="mean"))
            klt_s.append(_full_kl(t_logits[b, pos], s_logits[b, pos]).mean())
        vis = visual_mask[b].nonzero().squeeze(-1)
        if vis.numel():
            zs, zt = s_logits[b, vis], t_logits[b, vis]
            klv_s.append(_full_kl(zt, zs).mean())
            # R = Z Z^T from the raw logits; the teacher's -inf padding (V' < V) would poison the
            # product, and those columns carry no teacher information, so they count as 0.
            zt_fin = torch.where(torch.isfinite(zt), zt, torch.zeros_like(zt))
            rel_s.append(rel_loss(zs @ zs.T, zt_fin @ zt_fin.T, rel_variant))
    out = {
        "ce": _mean_over_samples(ce_s, zero),
        "kl_text": _mean_over_samples(klt_s, zero),
        "kl_vis": _mean_over_samples(klv_s, zero),
        "rel": _mean_over_samples(rel_s, zero),
    }
    out["total"] = alpha * out["ce"] + beta * out["kl_text"] + gamma * out["kl_vis"] + delta * out["rel"]
    return out


# --------------------------------------------------------------------------------------------
# 2. sparse targets: teacher side
# --------------------------------------------------------------------------------------------
def topk_with_tail(
    logits: torch.Tensor, k: int, vocab_limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher top-k targets for one chunk of logits [N, V'].

    The teacher distribution is softmax over the first ``vocab_limit`` ids (the common vocabulary;
    default: all V'), i.e. restricted BEFORE the softmax, so p sums to 1 over ids the student can
    represent and no id >= vocab_limit is ever emitted.

    Returns ids int64 [N, k], logprobs float32 [N, k] (descending), tail float32 [N] in [0, 1].
    When k exceeds the vocabulary the extra columns are padding: id 0, log-prob -inf.
    The tail is computed as exp(logsumexp of the log-probs outside the top-k) rather than
    1 - sum(exp(top-k)), which would lose all precision when the tail is tiny.
    """
    if logits.ndim != 2:
        raise ValueError(f"topk_with_tail expects [N, V] logits, got {tuple(logits.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if vocab_limit is not None:
        logits = logits[:, :vocab_limit]
    n, vocab = logits.shape
    log_p = torch.log_softmax(logits.to(_compute_dtype(logits.dtype)), dim=-1)
    kk = min(k, vocab)
    vals, ids = log_p.topk(kk, dim=-1)
    rest = log_p.scatter(-1, ids, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1).exp().clamp(0.0, 1.0) if kk < vocab else log_p.new_zeros(n)
    if kk < k:
        vals = torch.cat([vals, vals.new_full((n, k - kk), float("-inf"))], dim=-1)
        ids = torch.cat([ids, ids.new_zeros((n, k - kk))], dim=-1)
    return ids.long(), vals.float(), tail.float()


@torch.no_grad()
def teacher_targets_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    k: int,
    vocab_limit: int | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_with_tail(hidden @ W^T) computed ``chunk_size`` positions at a time.

    hidden [N, d] (final-norm hidden states), lm_head_weight [V', d]. Only the first vocab_limit
    rows of W are multiplied (the common vocabulary), and no [N, V] tensor exists beyond one
    [chunk_size, V] chunk. The matmul runs in the inputs' dtype (bf16 on a GPU server, as the
    model's own lm_head would), the softmax/top-k in float32. Outputs stay on the input device.
    """
    if hidden.ndim != 2:
        raise ValueError(f"hidden must be [N, d], got {tuple(hidden.shape)}")
    w = lm_head_weight if vocab_limit is None else lm_head_weight[:vocab_limit]
    parts = [
        topk_with_tail(hidden[s : s + chunk_size] @ w.T, k)
        for s in range(0, hidden.shape[0], max(1, chunk_size))
    ]
    if not parts:
        dev = hidden.device
        return (
            torch.zeros((0, k), dtype=torch.long, device=dev),
            torch.zeros((0, k), dtype=torch.float32, device=dev),
            torch.zeros((0,), dtype=torch.float32, device=dev),
        )
    return tuple(torch.cat(x) for x in zip(*parts))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# 4. autocorrelation by the Gram trick
# --------------------------------------------------------------------------------------------
class _Gram(torch.autograd.Function):
    """G = W^T W with the one-buffer backward dW = W (dG + dG^T).

    Plain autograd of ``w.T @ w`` produces two [V, d] partial gradients and their sum (three
    W-sized buffers at V = 151,936); this produces one."""

    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return w.T @ w

    @staticmethod
    def backward(ctx, grad_g):
        (w,) = ctx.saved_tensors
        return w @ (grad_g + grad_g.T)


def lm_head_gram(lm_head_weight: torch.Tensor) -> torch.Tensor:
    """G = W^T W [d, d] in float32 (float64 for float64 W); differentiable w.r.t. W.

    This is the only O(V d^2) step of the Gram trick: compute it once and reuse it for every
    sample of a batch (fused_kd_loss does) or, when W is frozen (teacher server; a DPT stage
    where the LLM is frozen), once for the whole run."""
    dt = _compute_dtype(lm_head_weight.dtype)
    with torch.autocast(device_type=lm_head_weight.device.type, enabled=False):
        return _Gram.apply(lm_head_weight.to(dt))


def gram_autocorr(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor | None = None,
    *,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """R = Z Z^T with Z = H W^T, computed as H (W^T W) H^T without any [Nv, V] tensor.

    hidden [Nv, d] (final-norm hidden states on the visual span), lm_head_weight [V, d] or a
    precomputed ``gram`` = lm_head_gram(W). Differentiable w.r.t. hidden and W (through G).
    Float32 accumulation even under autocast (R entries reach 1e6-1e8: bf16 would ruin them).
    Cost: Nv d^2 + Nv^2 d given G (+ V d^2 to build G).
    """
    if gram is None:
        if lm_head_weight is None:
            raise ValueError("gram_autocorr needs lm_head_weight or gram")
        gram = lm_head_gram(lm_head_weight)
    dt = _compute_dtype(hidden.dtype, gram.dtype)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        h = hidden.to(dt)
        return (h @ gram.to(dt)) @ h.T


@torch.no_grad()
def normalized_autocorr(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor | None = None,
    *,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher target: gram_autocorr(...) / ||R||_F as float32 [Nv, Nv] (zeros if R == 0).

    Stored normalised because the cosine in rel_loss is scale invariant and raw entries overflow
    fp16. The normalisation divides by max|R| first so the squared sum cannot overflow."""
    r = gram_autocorr(hidden, lm_head_weight, gram=gram)
    return _safe_unit(r).float()


# --------------------------------------------------------------------------------------------
# 2. sparse targets: student side
# --------------------------------------------------------------------------------------------
def _topk_mask_logits(z: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Copy of z [N, V] with the valid top-k ids set to -inf (the tail bucket's logits).

    scatter_reduce(amin) instead of scatter: padding entries share id 0 with a possibly real
    id 0, and a plain scatter with duplicate indices has an unspecified winner."""
    src = torch.where(valid, torch.full_like(z[:, :1], float("-inf")).expand_as(ids), z.gather(-1, ids))
    return z.clone().scatter_reduce_(-1, ids, src, reduce="amin", include_self=True)


def _sparse_parts(
    z: torch.Tensor, lse: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor
):
    """Shared by sparse_kl (autograd) and the fused kernel (manual gradient).

    Returns (kl [N], p [N, k] teacher probs with padding 0, tau_eff [N], lse_tail_safe [N], zm).
    tau_eff is the tail mass, forced to 0 where the top-k covers the whole vocabulary (there is no
    tail bucket on the student side; a float-rounding tail must not meet log(0))."""
    valid = torch.isfinite(logprobs)
    lp = torch.where(valid, logprobs, torch.zeros_like(logprobs))
    p = torch.where(valid, lp.exp(), torch.zeros_like(lp))
    log_q_k = z.gather(-1, ids) - lse.unsqueeze(-1)
    kl_k = torch.where(p > 0, p * (lp - log_q_k), torch.zeros_like(p)).sum(-1)

    zm = _topk_mask_logits(z, ids, valid)
    # A row whose top-k covers the whole vocabulary has no tail bucket: its masked logits are all
    # -inf and logsumexp's backward would be exp(-inf - -inf) = NaN even behind a `where`, so such
    # rows are replaced by zeros before the logsumexp (their tail term is forced to 0 below).
    has_tail = (zm > float("-inf")).any(-1)
    if zm.requires_grad:
        zm = torch.where(has_tail[:, None], zm, torch.zeros_like(zm[:, :1]))
    else:  # fused kernel (no autograd): in place, to keep one [chunk, V] buffer fewer alive
        zm.masked_fill_(~has_tail[:, None], 0.0)
    lse_tail_safe = torch.logsumexp(zm, dim=-1)
    tau = torch.where(has_tail, tail.clamp(0.0, 1.0), torch.zeros_like(tail))
    tau_log = torch.where(tau > 0, tau, torch.ones_like(tau)).log()
    # tau (log tau - log Q_tail), log Q_tail = lse(z outside K) - lse(z): exact even when the
    # student's tail mass underflows (1 - sum q_K would be 0 there and give log 0).
    kl_tail = torch.where(tau > 0, tau * (tau_log - (lse_tail_safe - lse)), torch.zeros_like(tau))
    return kl_k + kl_tail, p, tau, lse_tail_safe, zm


def sparse_kl(
    student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor
) -> torch.Tensor:
    """Per-position KL of the (k+1)-bucket coarsening (DESIGN §4), differentiable by autograd.

    student_logits [N, V] (q = softmax over the student's FULL vocabulary), ids [N, k] (< V),
    logprobs [N, k] (-inf = padding), tail [N]. Returns [N]:
        sum_{i in K} p_i (log p_i - log q_i) + tau (log tau - log(1 - sum_{i in K} q_i)).
    Equals the full KL when the top-k covers the teacher's support (tau = 0) and is <= it
    otherwise (coarse-graining never increases a KL divergence).
    """
    if student_logits.ndim != 2 or ids.shape[0] != student_logits.shape[0]:
        raise ValueError("sparse_kl: student_logits [N, V] and ids [N, k] must share N")
    dt = _compute_dtype(student_logits.dtype)
    z = student_logits.to(dt)
    ids = ids.to(z.device).long()
    if ids.numel() and int(ids.max()) >= z.shape[-1]:
        raise ValueError(f"sparse_kl: target id {int(ids.max())} >= student vocab {z.shape[-1]}")
    lse = torch.logsumexp(z, dim=-1)
    kl, *_ = _sparse_parts(z, lse, ids, logprobs.to(z.device, dt), tail.to(z.device, dt))
    return kl


# --------------------------------------------------------------------------------------------
# batched targets
# --------------------------------------------------------------------------------------------
@dataclass
class BatchTargets:
    """Sparse teacher targets of a batch, flattened across samples.

    text_ids [Nt, k] int64, text_logprobs [Nt, k], text_tail [Nt]: rows
        text_offsets[b]:text_offsets[b+1] belong to sample b, one per response position
        t in R_b = {t : labels[b, t+1] != -100}, ascending t (same order as SampleTargets.text).
    vis_ids [Nvis, k], vis_logprobs, vis_tail: rows vis_offsets[b]:vis_offsets[b+1] are sample b's
        visual span v0_b .. v0_b + Nv_b - 1 (zero rows for a text-only sample).
    autocorr: per sample the teacher's [Nv_b, Nv_b] (Frobenius-normalised) R, or None.
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
    autocorr: list[torch.Tensor | None]

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
        autocorr=[
            None if s.autocorr is None else torch.as_tensor(np.asarray(s.autocorr, np.float32), device=device)
            for s in samples
        ],
    )


@dataclass
class _Rows:
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


def _build_rows(
    labels: torch.Tensor,
    targets: BatchTargets,
    visual_start: Sequence[int] | torch.Tensor | None,
    visual_len: Sequence[int] | torch.Tensor | None,
    dtype: torch.dtype,
) -> _Rows:
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
    return _Rows(
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


def _rel_term(
    per_sample_R,  # callable (b, v0, nv) -> student R [nv, nv]
    rows: _Rows,
    targets: BatchTargets,
    variant: str,
    zero: torch.Tensor,
) -> torch.Tensor:
    """Mean over samples with an image AND a teacher autocorr of rel_loss(R_S, R_T)."""
    terms = []
    for b, v0, nv in rows.vis_spans:
        r_t = targets.autocorr[b]
        if r_t is None:
            continue
        if tuple(r_t.shape) != (nv, nv):
            raise ValueError(f"sample {b}: teacher autocorr {tuple(r_t.shape)} != ({nv}, {nv})")
        terms.append(rel_loss(per_sample_R(b, v0, nv), r_t, variant))
    return _mean_over_samples(terms, zero)


# --------------------------------------------------------------------------------------------
# dense-logits path of the sparse loss (parity reference for the fused path)
# --------------------------------------------------------------------------------------------
def kd_loss_from_logits(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    targets: BatchTargets,
    visual_start: Sequence[int] | torch.Tensor | None = None,
    *,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    rel_variant: str = "flat",
    visual_len: Sequence[int] | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The same loss as fused_kd_loss but from materialised logits [B, L, V], plain autograd.

    KL terms use sparse_kl against the cached targets; rel uses the naive Z Z^T of the logits.
    With k = V (tail 0) this equals llava_kd_loss_dense; the fused path must equal this."""
    alpha, beta, gamma, delta = _check_weights(weights)
    dt = _compute_dtype(student_logits.dtype)
    z = student_logits.to(dt)
    rows = _build_rows(labels, targets, visual_start, visual_len, dt)
    zero = _zero_like_graph(z, dt)
    zr = z[rows.b, rows.t]
    valid_label = rows.label != IGNORE_INDEX
    ce_r = F.cross_entropy(zr, rows.label.clamp_min(0), reduction="none")
    ce_r = torch.where(valid_label, ce_r, torch.zeros_like(ce_r))
    kl_r = sparse_kl(zr, rows.ids, rows.logprobs, rows.tail)
    out = {
        "ce": (rows.w_text * ce_r).sum(),
        "kl_text": (rows.w_text * kl_r).sum(),
        "kl_vis": (rows.w_vis * kl_r).sum(),
    }
    if not rows.b.numel():  # an empty sum is detached from z: attach it (see _zero_like_graph)
        out = {k: v + zero for k, v in out.items()}

    def student_R(b, v0, nv):
        zv = z[b, v0 : v0 + nv]
        return zv @ zv.T

    out["rel"] = _rel_term(student_R, rows, targets, rel_variant, zero)
    out["total"] = alpha * out["ce"] + beta * out["kl_text"] + gamma * out["kl_vis"] + delta * out["rel"]
    return out


# --------------------------------------------------------------------------------------------
# 3. chunked fused student loss
# --------------------------------------------------------------------------------------------
class _FusedLinearKD(torch.autograd.Function):
    """alpha ce + beta kl_text + gamma kl_vis + delta rel from h_rows and W, by chunks of rows.

    KD part: sum_r [alpha w_text_r ce_r + (beta w_text_r + gamma w_vis_r) kl_r], z_r = h_r W^T.
    Liger-Kernel style: the gradient w.r.t. the logits of a chunk is known in closed form, so it is
    turned into dH (rows of the chunk) and dW (accumulated in place) during the forward and the
    chunk's logits are freed; the backward only scales the stored dH, dW by grad_output. Memory
    beyond the inputs: two [chunk, V] buffers + dW [V, d] + dH [M, d], never [M, V], and dW is
    handed to autograd as the gradient itself (no second W-sized copy).

    d/dz_j of the per-row terms (q = softmax(z), K = valid top-k ids, s = softmax of z outside K):
        ce:  q_j - [j = y]
        kl:  q_j (P_K + tau) - p_j [j in K] - tau s_j [j not in K],   P_K = sum_{i in K} p_i
    (the last term is d/dz of -tau log Q_tail; s_j = q_j / Q_tail, computed stably; rows without
    a tail bucket have tau = 0, so their placeholder zm row contributes nothing.)

    rel part: the visual rows of h_rows are the visual spans, so R_S = H_v G H_v^T with
    G = W^T W is computed here too; its gradient w.r.t. (H_v, G) comes from a small local autograd
    graph ([Nv, d] and [d, d] tensors) and dW_rel = W (dG + dG^T) is added into the same dW buffer.
    """

    @staticmethod
    def forward(ctx, h, weight, gram, label, ids, logprobs, tail, w_text, w_vis, coefs, chunk_size, rel_spec, reusable,
                grad_mode):
        alpha, beta, gamma, delta = coefs
        device_type = h.device.type
        if torch.is_autocast_enabled(device_type):
            mm_dtype = torch.get_autocast_dtype(device_type)  # what the model's lm_head would use
        else:
            mm_dtype = torch.promote_types(h.dtype, weight.dtype)
        dt = _compute_dtype(mm_dtype, h.dtype, weight.dtype)
        # needs_input_grad ignores torch.no_grad(); grad_mode is the caller's is_grad_enabled()
        need_h, need_w = grad_mode and ctx.needs_input_grad[0], grad_mode and ctx.needs_input_grad[1]
        need_grad = need_h or need_w
        with torch.autocast(device_type=device_type, enabled=False):
            w_mm = weight.to(mm_dtype)
            grad_h = torch.zeros(h.shape, dtype=dt, device=h.device) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=dt, device=h.device) if need_w else None
            sums = torch.zeros(3, dtype=dt, device=h.device)  # ce, kl_text, kl_vis (weighted)
            for s in range(0, h.shape[0], chunk_size):
                e = min(s + chunk_size, h.shape[0])
                h_c = h[s:e].to(mm_dtype)
                z = (h_c @ w_mm.T).to(dt)  # [C, V]
                lse = torch.logsumexp(z, dim=-1)
                lab = label[s:e]
                has_y = lab != IGNORE_INDEX
                y = lab.clamp_min(0)
                ce = torch.where(has_y, lse - z.gather(-1, y[:, None]).squeeze(-1), torch.zeros_like(lse))
                kl, p, tau, lse_tail, zm = _sparse_parts(z, lse, ids[s:e], logprobs[s:e], tail[s:e])
                wt, wv = w_text[s:e], w_vis[s:e]
                sums += torch.stack([(wt * ce).sum(), (wt * kl).sum(), (wv * kl).sum()])
                if not need_grad:
                    continue
                c_ce = alpha * wt * has_y.to(dt)
                c_kl = beta * wt + gamma * wv
                p_k = p.sum(-1)
                # dZ built in place in the logits buffer: q * (c_ce + c_kl (P_K + tau)) ...
                zm.sub_(lse_tail[:, None]).exp_().mul_((c_kl * tau)[:, None])  # tau s_j, 0 in K
                dz = z.sub_(lse[:, None]).exp_()
                dz.mul_((c_ce + c_kl * (p_k + tau))[:, None])
                dz.scatter_add_(-1, ids[s:e], -(c_kl[:, None] * p))  # - p_j on K (padding p = 0)
                dz.scatter_add_(-1, y[:, None], -c_ce[:, None])  # - [j = y] (c_ce = 0 if no label)
                dz.sub_(zm)
                del zm
                dz_mm = dz.to(mm_dtype)
                if grad_h is not None:
                    grad_h[s:e] = (dz_mm @ w_mm).to(dt)
                if grad_w is not None:
                    if dz_mm.dtype == dt:
                        grad_w.addmm_(dz_mm.T, h_c)  # in place: no [V, d] temporary per chunk
                    else:
                        grad_w += (dz_mm.T @ h_c).to(dt)
                del dz, dz_mm, z

            rel = torch.zeros((), dtype=dt, device=h.device)
            if rel_spec:  # [(row offset, Nv, teacher R)] for samples with image and autocorr
                w32 = weight.to(dt)
                g = (w32.T @ w32) if gram is None else gram.to(dt)
                with torch.enable_grad():
                    g_leaf = g.detach().requires_grad_(need_w)
                    hv = h.detach().to(dt).requires_grad_(need_h)
                    rel = torch.stack(
                        [rel_loss(gram_autocorr(hv[o : o + n], gram=g_leaf), r_t, rel_spec.variant) for o, n, r_t in rel_spec]
                    ).mean()
                    wanted = [x for x in (hv, g_leaf) if x.requires_grad]
                    grads = torch.autograd.grad(delta * rel, wanted) if wanted and delta != 0 else [None, None]
                rel = rel.detach()
                if need_h and grads[0] is not None:
                    grad_h += grads[0]
                if need_w and grads[-1] is not None:
                    d_g = grads[-1]
                    grad_w.addmm_(w32, d_g + d_g.T)  # d/dW of <dG, W^T W> = W (dG + dG^T)
        ctx.grads = (grad_h, grad_w)
        ctx.reusable = reusable
        ctx.dtypes = (h.dtype, weight.dtype)
        total = alpha * sums[0] + beta * sums[1] + gamma * sums[2] + delta * rel
        ce, klt, klv = sums.unbind()
        ctx.mark_non_differentiable(ce, klt, klv, rel)
        return total, ce, klt, klv, rel

    @staticmethod
    def backward(ctx, grad_total, *_unused):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_kd_loss: backward ran twice on one forward; pass reusable_backward=True "
                "for retain_graph / gradcheck use"
            )
        grad_h, grad_w = ctx.grads
        if ctx.reusable:  # keep the buffers intact for the next call: scaled copies
            gh = None if grad_h is None else (grad_h * grad_total).to(ctx.dtypes[0])
            gw = None if grad_w is None else (grad_w * grad_total).to(ctx.dtypes[1])
        else:
            ctx.grads = None  # drop our reference so autograd can use dW as W.grad without a copy
            gh = None if grad_h is None else grad_h.mul_(grad_total).to(ctx.dtypes[0])
            gw = None if grad_w is None else grad_w.mul_(grad_total).to(ctx.dtypes[1])
        return gh, gw, None, None, None, None, None, None, None, None, None, None, None, None


class _RelSpec(list):
    """[(row offset into h_rows, Nv, teacher R)] plus the rel variant; a list so it is falsy when empty."""

    def __init__(self, items, variant: str):
        super().__init__(items)
        self.variant = variant


def fused_kd_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    targets: BatchTargets,
    visual_start: Sequence[int] | torch.Tensor | None = None,
    *,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    chunk_size: int = 128,
    rel_variant: str = "flat",
    visual_len: Sequence[int] | torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
    reusable_backward: bool = False,
) -> dict[str, torch.Tensor]:
    """Student-side LLaVA-KD loss from final hidden states, lm_head fused, chunked over positions.

    hidden [B, L, d] final-norm hidden states; lm_head_weight [V, d] (pass the embedding matrix for
    a tied head: gradients from both uses accumulate on the same tensor); labels [B, L] unshifted
    (-100 = ignored, right padding allowed); targets: BatchTargets (collate_targets) whose text
    rows align with R_b and visual rows with [visual_start[b], visual_start[b] + Nv_b);
    visual_start [B] (ignored for text-only samples); visual_len optional [B] cross-check.
    gram: optional precomputed lm_head_gram(W) (e.g. cached while W is frozen); otherwise G = W^T W
    is built once per call, only when some sample needs rel. The rel gradient still reaches W.

    Returns {total, ce, kl_text, kl_vis, rel} with the per-sample averaging of
    llava_kd_loss_dense; rel averages over samples with an image and a teacher autocorr.
    Only ``total`` carries gradients: the other entries are detached values for logging, because
    the fused kernel computes the gradient of the weighted sum during the forward (so no
    [positions, V] tensor lives until the backward). By default backward may run once: the
    stored dW buffer itself becomes W's gradient (no W-sized copy); reusable_backward=True keeps
    the buffers for retain_graph / gradcheck at the cost of one copy per backward. Logits exist only ``chunk_size`` rows at a time.
    Under autocast the lm_head matmuls run in the autocast dtype; all loss math, the dW
    accumulation and the autocorrelation are float32.
    """
    alpha, beta, gamma, delta = _check_weights(weights)
    if rel_variant not in REL_VARIANTS:
        raise ValueError(f"rel variant must be one of {REL_VARIANTS}, got {rel_variant!r}")
    if hidden.ndim != 3 or hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [B, L, d] matching labels {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    vocab = lm_head_weight.shape[0]
    dt = _compute_dtype(hidden.dtype, lm_head_weight.dtype)
    rows = _build_rows(labels, targets, visual_start, visual_len, dt)
    if rows.ids.numel() and int(rows.ids.max()) >= vocab:
        raise ValueError(f"target id {int(rows.ids.max())} >= student vocab {vocab}")

    # visual rows follow the text rows, span after span, in rows.vis_spans order
    rel_items, offset = [], targets.text_offsets[-1]
    for b, _v0, nv in rows.vis_spans:
        r_t = targets.autocorr[b]
        if r_t is not None:
            if tuple(r_t.shape) != (nv, nv):
                raise ValueError(f"sample {b}: teacher autocorr {tuple(r_t.shape)} != ({nv}, {nv})")
            rel_items.append((offset, nv, r_t.to(hidden.device)))
        offset += nv
    if not rows.b.numel():
        zero = _zero_like_graph(hidden, dt) + _zero_like_graph(lm_head_weight, dt)
        return {"total": zero, "ce": zero.detach(), "kl_text": zero.detach(), "kl_vis": zero.detach(), "rel": zero.detach()}
    h_rows = hidden[rows.b, rows.t]  # [M, d]; the index backward scatters dH into hidden
    total, ce, klt, klv, rel = _FusedLinearKD.apply(
        h_rows, lm_head_weight, gram, rows.label, rows.ids, rows.logprobs, rows.tail,
        rows.w_text, rows.w_vis, (alpha, beta, gamma, delta), int(chunk_size), _RelSpec(rel_items, rel_variant), bool(reusable_backward),
        torch.is_grad_enabled(),
    )
    return {"total": total, "ce": ce, "kl_text": klt, "kl_vis": klv, "rel": rel}
