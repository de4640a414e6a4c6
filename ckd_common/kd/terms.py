"""The loss terms on one sample's positions: relation loss, the Gram-trick autocorrelation, and the
small helpers every other module of ckd_common.kd shares (arithmetic dtype, empty-term zeros, the
response mask). The sparse divergences (KL and the others) live in divergences.py.

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
