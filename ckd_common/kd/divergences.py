"""The KD divergences on sparse targets, in the exact (k+1)-bucket form (docs/design.md §4.3, §4.7).

Per position the teacher stored its top-k ids K, their log-probs and the tail mass tau. Both
distributions are coarsened to the same k+1 buckets: the k ids of K and one bucket for every other
id. The teacher's buckets are (p_K, tau); the student's are (q_K, Q_tail) with q = softmax(z / T)
over the student's FULL vocabulary and Q_tail = exp(lse(z/T outside K) - lse(z/T)), computed in log
space so it stays exact when the student's tail underflows. Every divergence is then the ordinary
divergence of these two (k+1)-point distributions, so it equals the full-vocabulary divergence when
K holds all the teacher's mass and is never larger otherwise (all four are f-divergences, which
coarse-graining cannot increase).

The pieces, shared by the autograd path (sparse_divergence, reference.kd_loss_from_logits) and the
fused kernel (fused.py, which needs the closed-form gradient):

truncate_topk(ids, logprobs, tail, k')      top-k' of the stored k, the rest folded into the tail
teacher_buckets(...)                        k', temperature -> teacher bucket log-probs (once per call)
student_buckets(z, lse, ids, valid)         student bucket log-probs (per chunk of rows)
bucket_divergence(lp, lq, kind, beta)       per-row divergence of two [N, B] bucket log-prob tensors
bucket_divergence_grad(lp, lq, kind, beta)  its closed-form gradient w.r.t. lq
sparse_divergence / sparse_kl               the per-position divergence from student logits

Gradient w.r.t. the student's (tempered) logits, with g_b = dD/d log Q_b, s_j = q_j / Q_tail:
    dD/dz_j = g_j [j in K] + g_tail s_j [j not in K] - q_j sum_b g_b
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ckd_common.kd.objective import KDObjective, check_divergence
from ckd_common.kd.terms import compute_dtype

__all__ = [
    "TAIL_FLOOR",
    "TAIL_RULES",
    "TeacherBuckets",
    "bucket_divergence",
    "bucket_divergence_grad",
    "sparse_divergence",
    "sparse_kl",
    "student_buckets",
    "teacher_buckets",
    "tempered_tail_log",
    "truncate_topk",
]

# Reverse KL is the one divergence in which a teacher bucket of mass 0 that the student fills is
# +inf. The only such bucket is an empty stored tail (tau = 0 while ids remain outside K): the cache
# stores tau in float16, so tau = 0 means tau < 3e-8. Reverse KL takes it as TAIL_FLOOR instead.
TAIL_FLOOR = 1e-8
_LOG_TAIL_FLOOR = math.log(TAIL_FLOOR)
# How the tail bucket's mass is estimated at T != 1 (its inner distribution is not stored):
#   "powerlaw" (used)  the tail continues the k-th stored probability with a power law in rank,
#                      p(r) = c (r/k)^-s for r = k+1 .. V, c and s such that p(k) = p_min and the tail
#                      sums to tau; tempered mass = sum_r p(r)^(1/T)
#   "uniform"          tau spread evenly over the V - k tail ids: (V - k)^(1 - 1/T) tau^(1/T)
# bench/temperature.py measures both against the exact tempered tail.
TAIL_RULES = ("powerlaw", "uniform")
_EXPONENT_MAX = 200.0  # bisection range of the power-law exponent s


# --------------------------------------------------------------------------------------------
# teacher side
# --------------------------------------------------------------------------------------------
def truncate_topk(ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor, k: int | None):
    """The k most probable stored entries per row; the others' mass is added to the tail.

    ids, logprobs [N, k_stored], tail [N]. Returns (ids [N, k], logprobs [N, k], tail [N]) with
    k = min(k, k_stored). The sort is stable, so among equal (e.g. quantised) log-probs the stored
    order wins, which is the teacher's own descending order: the result has the same ids and the
    same log-probs as targets stored at k, and a tail that differs from the stored one only by the
    rounding of the stored values (docs/design.md §4.7)."""
    if k is None or k >= ids.shape[-1]:
        return ids, logprobs, tail
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    vals, order = torch.sort(logprobs, dim=-1, descending=True, stable=True)
    kept, dropped = vals[..., :k], vals[..., k:]
    ids_k = ids.gather(-1, order[..., :k])
    ids_k = torch.where(torch.isfinite(kept), ids_k, torch.zeros_like(ids_k))  # padding stays id 0
    moved = torch.where(torch.isfinite(dropped), dropped.exp(), torch.zeros_like(dropped)).sum(-1)
    return ids_k, kept, (tail + moved.to(tail.dtype)).clamp(0.0, 1.0)


def _log_rank_sum(s: torch.Tensor, k: torch.Tensor, vocab: int) -> torch.Tensor:
    """log sum_{r=k+1}^{vocab} (r/k)^-s, by the midpoint integral k * int_{(k+1/2)/k}^{(V+1/2)/k} x^-s dx.

    float64 [N] tensors; s >= 0. With u = 1 - s and L = log(x1/x0) the integral is
    k x0^u (e^{uL} - 1) / u, whose limit at u = 0 is k L."""
    x0 = (k + 0.5) / k
    big_l = torch.log((vocab + 0.5) / (k + 0.5))
    u = 1.0 - s
    ul = u * big_l
    small = u.abs() < 1e-6
    ratio = torch.where(small, big_l * (1 + ul / 2), torch.expm1(ul) / torch.where(small, torch.ones_like(u), u))
    return torch.log(k) + u * torch.log(x0) + torch.log(ratio)


def tempered_tail_log(lp_k: torch.Tensor, valid: torch.Tensor, log_tail: torch.Tensor, temperature: float,
                      vocab: int, rule: str = "powerlaw") -> torch.Tensor:
    """log of the estimated sum over the tail ids of p_j^(1/T) (unnormalised), float64 [N].

    lp_k [N, k] stored log-probs (valid entries only count), log_tail [N] = log tau (-inf: no
    tail), vocab = the teacher's vocabulary (the common vocabulary the targets were taken over).
    The exact value lies between the two extreme tails consistent with what is stored (every tail
    id <= p_min, the smallest stored probability): as many ids at p_min as tau allows, and tau spread
    evenly over the V - k tail ids; rule picks the estimate (TAIL_RULES)."""
    if rule not in TAIL_RULES:
        raise ValueError(f"tail rule must be one of {TAIL_RULES}, got {rule!r}")
    a = 1.0 / temperature
    lp = lp_k.double()
    lt = log_tail.double()
    k_valid = valid.sum(-1).double()
    n_tail = float(vocab) - k_valid
    none = torch.isneginf(lt) | (n_tail < 1)
    if rule == "uniform":
        out = (1.0 - a) * torch.log(n_tail.clamp_min(1.0)) + a * torch.where(none, torch.zeros_like(lt), lt)
    else:
        lp_min = torch.where(valid, lp, torch.full_like(lp, math.inf)).amin(-1)
        k = k_valid.clamp_min(1.0)
        lp_min = torch.where(torch.isfinite(lp_min), lp_min, torch.zeros_like(lp_min))  # no entry: any anchor
        lt_safe = torch.where(none, torch.zeros_like(lt), lt)
        target = lt_safe - lp_min  # log(tau / p_min) = log sum_r (r/k)^-s at the exponent sought
        lo, hi = torch.zeros_like(lt), torch.full_like(lt, _EXPONENT_MAX)
        for _ in range(60):  # log_rank_sum decreases in s; 60 halvings reach float64 resolution
            mid = (lo + hi) / 2
            too_big = _log_rank_sum(mid, k, vocab) > target
            lo, hi = torch.where(too_big, mid, lo), torch.where(too_big, hi, mid)
        s = (lo + hi) / 2
        log_c = lt_safe - _log_rank_sum(s, k, vocab)  # = log p_min unless s hit a bound
        out = a * log_c + _log_rank_sum(a * s, k, vocab)
    return torch.where(none, torch.full_like(out, -math.inf), out)


class TeacherBuckets(NamedTuple):
    """The teacher's side of the (k+1) buckets for a set of rows (k = k' after truncation).

    ids [N, k] (padding: id 0), valid [N, k] (entry is a bucket), lp_k [N, k] bucket log-probs
    (-inf on padding), lp_tail [N] (-inf: empty tail or no tail ids), has_tail [N] (the student
    has ids outside K, so the tail bucket exists)."""

    ids: torch.Tensor
    valid: torch.Tensor
    lp_k: torch.Tensor
    lp_tail: torch.Tensor
    has_tail: torch.Tensor

    def rows(self, s: int, e: int) -> "TeacherBuckets":
        return TeacherBuckets(*(t[s:e] for t in self))


def teacher_buckets(ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor, objective: KDObjective,
                    student_vocab: int, teacher_vocab: int | None = None, tail_rule: str = "powerlaw"
                    ) -> TeacherBuckets:
    """Stored targets -> the teacher's bucket log-probs under ``objective`` (top_k, temperature).

    At T = 1 the stored values are used as they are (log-probs and tau, no renormalisation). At
    T != 1 the top-k entries become p_i^(1/T), the tail its estimate (tempered_tail_log), and all
    k+1 are renormalised. teacher_vocab: the vocabulary the teacher's softmax ran over (the
    cache's common vocabulary), default the student's; it only sizes the tail estimate."""
    ids, logprobs, tail = truncate_topk(ids, logprobs, tail, objective.top_k)
    valid = torch.isfinite(logprobs)
    has_tail = valid.sum(-1) < student_vocab
    neg_inf = torch.full_like(tail, -math.inf)
    lp_k = torch.where(valid, logprobs, torch.full_like(logprobs, -math.inf))
    log_tail = torch.where(has_tail & (tail > 0), tail.clamp_min(torch.finfo(tail.dtype).tiny).log(), neg_inf)
    if objective.temperature != 1.0:
        lt = tempered_tail_log(lp_k, valid, log_tail, objective.temperature, teacher_vocab or student_vocab,
                               tail_rule).to(lp_k.dtype)
        scaled = lp_k / objective.temperature
        log_z = torch.logsumexp(torch.cat([scaled, lt[:, None]], -1), -1)
        log_z = torch.where(torch.isfinite(log_z), log_z, torch.zeros_like(log_z))  # rows without any mass
        lp_k, log_tail = scaled - log_z[:, None], lt - log_z
    return TeacherBuckets(ids, valid, lp_k, log_tail, has_tail)


# --------------------------------------------------------------------------------------------
# student side
# --------------------------------------------------------------------------------------------
def _topk_mask_logits(z: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Copy of z [N, V] with the valid top-k ids set to -inf (the tail bucket's logits).

    scatter_reduce(amin) instead of scatter: padding entries share id 0 with a possibly real
    id 0, and a plain scatter with duplicate indices has an unspecified winner."""
    src = torch.where(valid, torch.full_like(z[:, :1], float("-inf")).expand_as(ids), z.gather(-1, ids))
    return z.clone().scatter_reduce_(-1, ids, src, reduce="amin", include_self=True)


class StudentBuckets(NamedTuple):
    lq_k: torch.Tensor      # [N, k] log q on K (-inf on padding)
    lq_tail: torch.Tensor   # [N] log Q_tail (-inf where there is no tail bucket)
    has_tail: torch.Tensor  # [N]
    lse_tail: torch.Tensor  # [N] logsumexp of the logits outside K (placeholder where no tail)
    zm: torch.Tensor        # [N, V] the logits outside K (-inf on K; placeholder 0 rows where no tail)


def student_buckets(z: torch.Tensor, lse: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> StudentBuckets:
    """The student's bucket log-probs from its (tempered) logits z [N, V] and lse = logsumexp(z)."""
    lq_k = torch.where(valid, z.gather(-1, ids) - lse[:, None], torch.full_like(valid, -math.inf, dtype=z.dtype))
    zm = _topk_mask_logits(z, ids, valid)
    # A row whose top-k covers the whole vocabulary has no tail bucket: its masked logits are all
    # -inf and logsumexp's backward would be exp(-inf - -inf) = NaN even behind a `where`, so such
    # rows are replaced by zeros before the logsumexp (their tail bucket is -inf on both sides).
    has_tail = (zm > float("-inf")).any(-1)
    if zm.requires_grad:
        zm = torch.where(has_tail[:, None], zm, torch.zeros_like(zm[:, :1]))
    else:  # fused kernel (no autograd): in place, to keep one [chunk, V] buffer fewer alive
        zm.masked_fill_(~has_tail[:, None], 0.0)
    lse_tail = torch.logsumexp(zm, dim=-1)
    lq_tail = torch.where(has_tail, lse_tail - lse, torch.full_like(lse, -math.inf))
    return StudentBuckets(lq_k, lq_tail, has_tail, lse_tail, zm)


# --------------------------------------------------------------------------------------------
# divergences of two bucket distributions
# --------------------------------------------------------------------------------------------
def _masked(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x where mask, else 0: the inner half of the double-`where` that keeps -inf out of gradients."""
    return torch.where(mask, x, torch.zeros_like(x))


def bucket_divergence(lp: torch.Tensor, lq: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence of two distributions given as log-probs over the last dim, [N, B] -> [N].

    lp: the teacher (constant), lq: the student (differentiable). -inf = a bucket of mass 0.
    kind: "forward_kl" | "reverse_kl" | "jsd" (0 < beta < 1; KDObjective.kind maps its endpoints to
    the KLs) | "tv". Terms with zero weight are exactly 0 (0 log 0 = 0), never NaN, also in the
    gradient. Reverse KL takes a teacher bucket of mass 0 that the student fills as TAIL_FLOOR.
    A row whose teacher has no mass at all (no entry, tau = 0: CE-only targets) is 0."""
    check_divergence(kind)
    p_pos, q_pos = torch.isfinite(lp), torch.isfinite(lq)
    p, q = _masked(p_pos, lp).exp() * p_pos, _masked(q_pos, lq).exp() * q_pos
    if kind == "forward_kl":
        d = torch.where(p_pos, p * (_masked(p_pos, lp) - _masked(p_pos, lq)), torch.zeros_like(p)).sum(-1)
    elif kind == "reverse_kl":
        lp_eff = torch.where(p_pos, lp, torch.full_like(lp, _LOG_TAIL_FLOOR))
        d = torch.where(q_pos, q * (_masked(q_pos, lq) - lp_eff), torch.zeros_like(q)).sum(-1)
    elif kind == "jsd":
        _check_interior(beta)
        any_pos = p_pos | q_pos
        lm = torch.logaddexp(math.log(beta) + torch.where(any_pos, lp, torch.zeros_like(lp)),
                             math.log1p(-beta) + torch.where(any_pos, lq, torch.zeros_like(lq)))
        lm = _masked(any_pos, lm)
        kl_p = torch.where(p_pos, p * (_masked(p_pos, lp) - lm), torch.zeros_like(p)).sum(-1)
        kl_q = torch.where(q_pos, q * (_masked(q_pos, lq) - lm), torch.zeros_like(q)).sum(-1)
        d = beta * kl_p + (1.0 - beta) * kl_q
    else:
        d = 0.5 * (p - q).abs().sum(-1)
    return torch.where(p_pos.any(-1), d, torch.zeros_like(d))  # a teacher without mass: no term


def bucket_divergence_grad(lp: torch.Tensor, lq: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """d bucket_divergence / d lq in closed form, [N, B] (0 on buckets the student leaves empty).

        forward KL  -p_b
        reverse KL  q_b (log q_b - log p_b + 1)
        jsd         (1 - beta) q_b (log q_b - log m_b),   m = beta p + (1 - beta) q
        tv          1/2 sign(q_b - p_b) q_b
    """
    check_divergence(kind)
    p_pos, q_pos = torch.isfinite(lp), torch.isfinite(lq)
    p, q = _masked(p_pos, lp).exp() * p_pos, _masked(q_pos, lq).exp() * q_pos
    lq_s = _masked(q_pos, lq)
    if kind == "forward_kl":
        g = -p
    elif kind == "reverse_kl":
        lp_eff = torch.where(p_pos, lp, torch.full_like(lp, _LOG_TAIL_FLOOR))
        g = torch.where(q_pos, q * (lq_s - lp_eff + 1.0), torch.zeros_like(q))
    elif kind == "jsd":
        _check_interior(beta)
        lm = torch.logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq_s)  # finite wherever q > 0
        g = torch.where(q_pos, (1.0 - beta) * q * (lq_s - lm), torch.zeros_like(q))
    else:
        g = 0.5 * torch.sign(q - p) * q
    return torch.where(p_pos.any(-1, keepdim=True), g, torch.zeros_like(g))


def _check_interior(beta: float) -> None:
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1 here (KDObjective.kind maps the endpoints to the KLs), got {beta}")


# --------------------------------------------------------------------------------------------
# the per-position divergence from student logits (autograd)
# --------------------------------------------------------------------------------------------
def bucket_logprobs(tb: TeacherBuckets, sb: StudentBuckets) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, k+1] teacher and student bucket log-probs (tail last); no tail bucket -> -inf on both sides."""
    lp_tail = torch.where(sb.has_tail, tb.lp_tail, torch.full_like(tb.lp_tail, -math.inf))
    return torch.cat([tb.lp_k, lp_tail[:, None]], -1), torch.cat([sb.lq_k, sb.lq_tail[:, None]], -1)


def sparse_divergence(student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor,
                      objective: KDObjective = KDObjective(), teacher_vocab: int | None = None) -> torch.Tensor:
    """Per-position divergence of the (k+1)-bucket coarsening, differentiable by autograd, [N].

    student_logits [N, V] (q = softmax(z / T) over the student's FULL vocabulary), ids [N, k] (< V),
    logprobs [N, k] (-inf = padding), tail [N]. The T^2 factor is NOT applied here (the loss
    functions apply objective.scale). Rows whose teacher carries no mass (no entry, tau = 0) are 0."""
    if student_logits.ndim != 2 or ids.shape[0] != student_logits.shape[0]:
        raise ValueError("sparse_divergence: student_logits [N, V] and ids [N, k] must share N")
    dt = compute_dtype(student_logits.dtype)
    z = student_logits.to(dt)
    ids = ids.to(z.device).long()
    if ids.numel() and int(ids.max()) >= z.shape[-1]:
        raise ValueError(f"sparse_divergence: target id {int(ids.max())} >= student vocab {z.shape[-1]}")
    tb = teacher_buckets(ids, logprobs.to(z.device, dt), tail.to(z.device, dt), objective, z.shape[-1], teacher_vocab)
    return divergence_of_rows(z, tb, objective)


def divergence_of_rows(z: torch.Tensor, tb: TeacherBuckets, objective: KDObjective) -> torch.Tensor:
    """[N] divergence of student logits z [N, V] (untempered) against prepared teacher buckets."""
    zt = z / objective.temperature if objective.temperature != 1.0 else z
    sb = student_buckets(zt, torch.logsumexp(zt, dim=-1), tb.ids, tb.valid)
    lp, lq = bucket_logprobs(tb, sb)
    return bucket_divergence(lp, lq, objective.kind, objective.beta)


def sparse_kl(student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor
              ) -> torch.Tensor:
    """Per-position forward KL of the (k+1)-bucket coarsening at T = 1 (docs/design.md §4.3), [N]:
        sum_{i in K} p_i (log p_i - log q_i) + tau (log tau - log(1 - sum_{i in K} q_i)).
    Equals the full KL when the top-k covers the teacher's support (tau = 0) and is <= it otherwise."""
    return sparse_divergence(student_logits, ids, logprobs, tail)
