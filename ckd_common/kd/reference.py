"""TEST ORACLES: the LLaVA-KD loss computed the plain way, to check the fast path against.

Neither function is used in training; both materialise [B, L, V] tensors.

llava_kd_loss_dense
    The loss from full teacher AND student logits: the exact semantics of the conventions in
    ckd_common/kd/__init__.py (full-vocabulary KL, R = Z Z^T of the logits), correct at any batch
    size. The sparse targets' coarsening is checked against it (with k = V they agree).
kd_loss_from_logits
    The loss training uses (sparse cached targets, per-sample batch reduction) from materialised
    student logits with plain autograd: fused_kd_loss must equal it, values and gradients.
dense_divergence
    A divergence of two full distributions written the way TRL's GKD trainer writes it
    (F.kl_div with log targets, the JSD mixture by logsumexp, beta = 0 / 1 as KL branches): the
    oracle the (k+1)-bucket divergences are checked against, on the full vocabulary (k = V) and on
    explicitly bucketed distributions (k < V).
rel_loss_tail_dense
    The relation term of a factor target with its tail trace, the plain way: rel_loss against the
    dense estimate T = U U^T + c P (c = tau / (Nv - r), P = I - U U^+ the projector onto the
    complement of U's columns). rel_loss_factored(..., tail_trace) must equal it, values and gradients.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ckd_common.kd.batch import BatchTargets, Rows, build_rows
from ckd_common.kd.divergences import divergence_of_rows, teacher_buckets
from ckd_common.kd.objective import KDObjective, check_divergence
from ckd_common.kd.relation import FactorTarget, dense_target
from ckd_common.kd.terms import IGNORE_INDEX, compute_dtype, mean_over_samples, rel_loss, response_mask, zero_like_graph
from ckd_common.kd.weights import KDWeights, require_weights

__all__ = ["dense_divergence", "kd_loss_from_logits", "llava_kd_loss_dense", "rel_loss_tail_dense"]


def rel_loss_tail_dense(student_R: torch.Tensor, u: torch.Tensor, tail_trace: float, variant: str = "flat"
                        ) -> torch.Tensor:
    """rel_loss of student_R [Nv, Nv] against the tail-corrected estimate of a factor target (module
    docstring), every matrix materialised. Float64."""
    u = u.detach().double()
    nv, r = u.shape
    p = torch.eye(nv, dtype=torch.float64) - u @ torch.linalg.pinv(u)
    c = tail_trace / (nv - r) if nv > r else 0.0
    return rel_loss(student_R.double(), u @ u.T + c * p, variant)


def dense_divergence(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str = "forward_kl",
                     beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between teacher log-probs log_p and student log-probs log_q, [N, V] -> [N].

    TRL's generalized_jsd_loss per row: beta = 0 KL(p || q), beta = 1 KL(q || p), otherwise
    beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q. "forward_kl",
    "reverse_kl" and "tv" are the plain definitions. Inputs must have no zero-probability entry
    (F.kl_div would give 0 * -inf); temperature is the caller's (divide the logits first)."""
    check_divergence(divergence)
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    if divergence == "reverse_kl":
        return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    if divergence == "tv":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    b = torch.tensor(beta, dtype=log_q.dtype)
    log_m = torch.logsumexp(torch.stack([log_q + torch.log1p(-b), log_p + torch.log(b)]), dim=0)
    kl_p = F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
    kl_q = F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
    return b * kl_p + (1 - b) * kl_q


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


# --------------------------------------------------------------------------------------------
# the LLaVA-KD loss from full teacher and student logits
# --------------------------------------------------------------------------------------------
def llava_kd_loss_dense(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    visual_mask: torch.Tensor,
    weights: KDWeights = KDWeights(),
    rel_variant: str = "flat",
) -> dict[str, torch.Tensor]:
    """The LLaVA-KD loss from full logits: exact docs/design.md §4 semantics, correct at any batch size.

    student_logits [B, L, V], teacher_logits [B, L, V'] (V' != V is restricted/padded to the
    common vocabulary, see module doc), labels [B, L] unshifted with -100 = ignored (as the model's
    inputs), visual_mask [B, L] bool, True on the visual span. Right padding is simply positions
    with label -100 and visual_mask False.

    Returns float tensors {total, ce, kl_text, kl_vis, rel}; total = weights.total(ce, kl_text,
    kl_vis, rel). Every term is differentiable w.r.t. student_logits.
    This is a reference: it holds several [B, L, V] tensors; training uses fused_kd_loss.
    """
    weights = require_weights(weights)
    if student_logits.ndim != 3 or labels.shape != student_logits.shape[:2]:
        raise ValueError("student_logits must be [B, L, V] and labels [B, L]")
    if visual_mask.shape != labels.shape or teacher_logits.shape[:2] != labels.shape:
        raise ValueError("teacher_logits [B, L, V'] and visual_mask [B, L] must match labels")
    dt = compute_dtype(student_logits.dtype, teacher_logits.dtype)
    s_logits = student_logits.to(dt)
    t_logits = _align_teacher_vocab(teacher_logits.detach().to(dt), s_logits.shape[-1])
    visual_mask = visual_mask.bool()
    resp = response_mask(labels)
    zero = zero_like_graph(s_logits, dt)

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
        "ce": mean_over_samples(ce_s, zero),
        "kl_text": mean_over_samples(klt_s, zero),
        "kl_vis": mean_over_samples(klv_s, zero),
        "rel": mean_over_samples(rel_s, zero),
    }
    out["total"] = weights.total(out["ce"], out["kl_text"], out["kl_vis"], out["rel"])
    return out


# --------------------------------------------------------------------------------------------
# the sparse loss from materialised student logits (the fused path's oracle)
# --------------------------------------------------------------------------------------------
def _rel_term(
    per_sample_R,  # callable (b, v0, nv) -> student R [nv, nv]
    rows: Rows,
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
        if isinstance(r_t, FactorTarget) and r_t.tail_trace is not None:
            terms.append(rel_loss_tail_dense(per_sample_R(b, v0, nv), r_t.u, r_t.tail_trace, variant))
        else:
            terms.append(rel_loss(per_sample_R(b, v0, nv), dense_target(r_t), variant))
    return mean_over_samples(terms, zero)


def kd_loss_from_logits(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    targets: BatchTargets,
    visual_start: Sequence[int] | torch.Tensor | None = None,
    *,
    weights: KDWeights = KDWeights(),
    objective: KDObjective = KDObjective(),
    rel_variant: str = "flat",
    visual_len: Sequence[int] | torch.Tensor | None = None,
    teacher_vocab: int | None = None,
) -> dict[str, torch.Tensor]:
    """The same loss as fused_kd_loss but from materialised logits [B, L, V], plain autograd.

    KD terms use the objective's sparse divergence (divergences.divergence_of_rows) against the
    cached targets, times objective.scale; rel uses the naive Z Z^T of the logits.
    With k = V (tail 0) and the default objective this equals llava_kd_loss_dense; the fused path
    must equal this."""
    weights = require_weights(weights)
    dt = compute_dtype(student_logits.dtype)
    z = student_logits.to(dt)
    rows = build_rows(labels, targets, visual_start, visual_len, dt)
    zero = zero_like_graph(z, dt)
    zr = z[rows.b, rows.t]
    valid_label = rows.label != IGNORE_INDEX
    ce_r = F.cross_entropy(zr, rows.label.clamp_min(0), reduction="none")
    ce_r = torch.where(valid_label, ce_r, torch.zeros_like(ce_r))
    teacher = teacher_buckets(rows.ids, rows.logprobs, rows.tail, objective, z.shape[-1], teacher_vocab)
    kl_r = divergence_of_rows(zr, teacher, objective) * objective.scale
    out = {
        "ce": (rows.w_text * ce_r).sum(),
        "kl_text": (rows.w_text * kl_r).sum(),
        "kl_vis": (rows.w_vis * kl_r).sum(),
    }
    if not rows.b.numel():  # an empty sum is detached from z: attach it (see zero_like_graph)
        out = {k: v + zero for k, v in out.items()}

    def student_R(b, v0, nv):
        zv = z[b, v0 : v0 + nv]
        return zv @ zv.T

    out["rel"] = _rel_term(student_R, rows, targets, rel_variant, zero)
    out["total"] = weights.total(out["ce"], out["kl_text"], out["kl_vis"], out["rel"])
    return out
