"""The loss terms on one sample's positions: sparse KL, relation loss, the Gram-trick
autocorrelation, and the small helpers every other module of ckd_common.kd shares (arithmetic
dtype, empty-term zeros, the response mask).

Conventions (KL direction, positions, dtype, vocabulary, padding): ckd_common/kd/__init__.py.
"""
from __future__ import annotations

import torch

from ckd_common.kd.weights import check_rel_variant
from ckd_common.templates import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "compute_dtype",
    "gram_autocorr",
    "lm_head_gram",
    "mean_over_samples",
    "rel_loss",
    "response_mask",
    "safe_unit",
    "sparse_kl",
    "sparse_parts",
    "zero_like_graph",
]


# --------------------------------------------------------------------------------------------
# shared helpers: dtype, empty terms, positions
# --------------------------------------------------------------------------------------------
def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32 for low-precision / float32 inputs, float64 when any input is float64."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def zero_like_graph(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A scalar 0 that is attached to ``t``'s graph without touching its values.

    ``t.reshape(-1)[:0].sum()`` is an empty sum: exactly 0 even if t holds inf/NaN, and calling
    backward through it gives t a zero gradient instead of raising "does not require grad".
    Its backward materialises a t-sized zero gradient, so it is only used where a term is empty."""
    return t.reshape(-1)[:0].sum().to(dtype)


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] bool, True at the response positions R = {t : labels[t+1] != -100}.

    The last position never predicts anything (no t+1), so it is always False."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


# --------------------------------------------------------------------------------------------
# relation loss
# --------------------------------------------------------------------------------------------
def safe_unit(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
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
    """Relation loss between two [Nv, Nv] autocorrelation matrices (docs/design.md §4).

    variant "flat":   1 - cos(vec(R_T), vec(R_S))                  (the default, LLaVA-KD Eq. 4)
    variant "column": 1 - mean_j cos(R_T[:, j], R_S[:, j])          (the paper's per-column form)
    Both are scale invariant, so the teacher's target may be Frobenius-normalised. Computed in
    float32 (float64 for float64 inputs)."""
    check_rel_variant(variant)
    if student_R.shape != teacher_R.shape or student_R.ndim != 2:
        raise ValueError(f"rel_loss: shapes {tuple(student_R.shape)} vs {tuple(teacher_R.shape)}")
    dt = compute_dtype(student_R.dtype, teacher_R.dtype)
    s = student_R.to(dt)
    t = teacher_R.to(device=s.device, dtype=dt)
    if variant == "flat":
        return 1.0 - (safe_unit(s) * safe_unit(t)).sum()
    return 1.0 - (safe_unit(s, dim=0) * safe_unit(t, dim=0)).sum(0).mean()


def mean_over_samples(per_sample: list[torch.Tensor], zero: torch.Tensor) -> torch.Tensor:
    """The batch reduction of a term: mean over the samples that have it, ``zero`` if none does."""
    return torch.stack(per_sample).mean() if per_sample else zero


# --------------------------------------------------------------------------------------------
# autocorrelation by the Gram trick
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
    dt = compute_dtype(lm_head_weight.dtype)
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
    dt = compute_dtype(hidden.dtype, gram.dtype)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        h = hidden.to(dt)
        return (h @ gram.to(dt)) @ h.T


# --------------------------------------------------------------------------------------------
# sparse KL of the (k+1)-bucket coarsening
# --------------------------------------------------------------------------------------------
def _topk_mask_logits(z: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Copy of z [N, V] with the valid top-k ids set to -inf (the tail bucket's logits).

    scatter_reduce(amin) instead of scatter: padding entries share id 0 with a possibly real
    id 0, and a plain scatter with duplicate indices has an unspecified winner."""
    src = torch.where(valid, torch.full_like(z[:, :1], float("-inf")).expand_as(ids), z.gather(-1, ids))
    return z.clone().scatter_reduce_(-1, ids, src, reduce="amin", include_self=True)


def sparse_parts(
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
    """Per-position KL of the (k+1)-bucket coarsening (docs/design.md §4), differentiable by autograd.

    student_logits [N, V] (q = softmax over the student's FULL vocabulary), ids [N, k] (< V),
    logprobs [N, k] (-inf = padding), tail [N]. Returns [N]:
        sum_{i in K} p_i (log p_i - log q_i) + tau (log tau - log(1 - sum_{i in K} q_i)).
    Equals the full KL when the top-k covers the teacher's support (tau = 0) and is <= it
    otherwise (coarse-graining never increases a KL divergence).
    """
    if student_logits.ndim != 2 or ids.shape[0] != student_logits.shape[0]:
        raise ValueError("sparse_kl: student_logits [N, V] and ids [N, k] must share N")
    dt = compute_dtype(student_logits.dtype)
    z = student_logits.to(dt)
    ids = ids.to(z.device).long()
    if ids.numel() and int(ids.max()) >= z.shape[-1]:
        raise ValueError(f"sparse_kl: target id {int(ids.max())} >= student vocab {z.shape[-1]}")
    lse = torch.logsumexp(z, dim=-1)
    kl, *_ = sparse_parts(z, lse, ids, logprobs.to(z.device, dt), tail.to(z.device, dt))
    return kl
