"""The visual autocorrelation as a low-rank factor: the teacher factorises, the student's relation
term reads the factor (docs/design.md §4.4; the stored layout: logit_cache/FORMAT.md).

Teacher side
    factor_autocorr(R)  R / ||R||_F ~ U U^T with U = codes * scale (int8 codes, one float scale per
                        column), r chosen per sample as the smallest rank whose eigenvalues capture
                        ``share`` of ||R||_F^2, within a column budget (head columns full int8,
                        trailing ones coarse: ckd_common.targets). Returns, per sample, the share
                        the *stored* (quantised) factor really captures, 1 - ||R^ - U U^T||_F^2, so
                        every target's error is known, and the trace of what it leaves out.
Student side
    relation_loss(h, G, target, variant)   1 - cos between R_S = H G H^T and the teacher's target,
                        a dense [Nv, Nv] tensor (rel_loss, as before) or a FactorTarget. From a
                        factor the teacher's Nv x Nv matrix is never built: <R_S, U U^T> = tr(U^T R_S U),
                        ||U U^T||_F = ||U^T U||_F, column norms from U (U^T U). The student's R_S is
                        built (Nv^2 floats, 2 MiB at Nv = 729) when Nv <= d, because that is the
                        cheapest exact way to get ||R_S||_F there (Nv d^2 + Nv^2 d multiply-adds);
                        when Nv > d everything goes through d x d Grams instead (A = H^T U,
                        M = H^T H: Nv d^2 + 2 d^3), and no Nv x Nv tensor exists at all. Both relation
                        variants are exact from the factor; parity with the dense term is tested.
                        With the target's tail trace (tau) the term is rel_loss against the estimate
                        T = U U^T + c P, c = tau / (Nv - r), P the projector onto the complement of
                        U's columns: the part the factor leaves out is PSD, so dropping it biases the
                        cosine one way (on noise-dominated R, 2-5x the error), and spread evenly over
                        the complement it costs tr(R_S) - tr(Q^T R_S Q) (Q = orth(U)) in Grams;
                        ||T||_F^2 = ||U^T U||_F^2 + c^2 (Nv - r), ||T[:, j]||^2 likewise per column.
                        reference.rel_loss_tail_dense is the plain version.

Why a factor: R = H G H^T is PSD and, for a teacher, dominated by few directions (a common component
shared by all visual tokens, image regions, smooth spatial structure), so ~10-70 columns keep
>= 99.99 % of ||R||_F^2 for most images, and a noise-dominated one keeps ~99.96 % in ~120-150 (int8
head, coarse tail), instead of the 265,356 float16 of the triangle (bench/cache_io.py measures bytes
and the loss error on teacher-like distributions).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ckd_common.kd.terms import compute_dtype, gram_autocorr, rel_loss
from ckd_common.kd.weights import check_rel_variant
from ckd_common.targets import AUTOCORR_HEAD_SHARE, AUTOCORR_MAX_RANK, AUTOCORR_SHARE, AutocorrFactor

__all__ = ["DEFAULT_HEAD_SHARE", "DEFAULT_MAX_RANK", "DEFAULT_SHARE", "FactorTarget", "dense_target", "factor_autocorr", "factor_dense",
           "factor_to_numpy", "rel_loss_factored", "relation_loss", "relation_target", "share_error_bound"]

DEFAULT_SHARE = AUTOCORR_SHARE        # the stated share and rank cap (their reasons: ckd_common.targets)
DEFAULT_MAX_RANK = AUTOCORR_MAX_RANK
DEFAULT_HEAD_SHARE = AUTOCORR_HEAD_SHARE
CODE_MAX = 127          # int8 codes in [-127, 127]: symmetric, so a sign flip is exact
COARSE_CODE_MAX = 7     # trailing columns: 15 levels (~3 bits of entropy, zstd stores ~0.45 B per code)
_OVERSAMPLE = 16        # extra columns of the subspace iteration (Halko, Martinsson & Tropp 2011)
_POWER_ITERS = 2        # 2 iterations matched a full eigh's captured share within ~5 % of 1 - share


def share_error_bound(share: float) -> float:
    """Largest |delta (1 - cos)| a factor capturing ``share`` can cause, for any student R_S:
    ||a/|a| - b/|b| || <= 2 ||a - b|| / |a|, and ||R^ - U U^T||_F = sqrt(1 - share)."""
    return 2.0 * float(np.sqrt(max(0.0, 1.0 - share)))


# --------------------------------------------------------------------------------------------
# teacher side
# --------------------------------------------------------------------------------------------
def _top_eigen(r: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m leading eigenpairs of symmetric PSD [B, n, n]: (values [B, m] descending, vectors [B, n, m]).

    A full eigh when m is close to n (small visual grids); otherwise a randomized subspace iteration
    (matrix products and thin QRs only, batched, deterministic: the start block has a fixed seed),
    then Rayleigh-Ritz on an [m, m] matrix."""
    n = r.shape[-1]
    if 2 * m >= n:
        w, v = torch.linalg.eigh(r)
        return w.flip(-1)[:, :m], v.flip(-1)[:, :, :m]
    gen = torch.Generator(device=r.device).manual_seed(0)
    y = r @ torch.randn(n, m, generator=gen, device=r.device, dtype=r.dtype)
    for _ in range(_POWER_ITERS):
        y = r @ torch.linalg.qr(y).Q
    q = torch.linalg.qr(y).Q
    w, v = torch.linalg.eigh(q.transpose(-1, -2) @ r @ q)
    return w.flip(-1), q @ v.flip(-1)


@torch.no_grad()
def factor_autocorr(r: torch.Tensor, share: float = DEFAULT_SHARE, max_rank: int = DEFAULT_MAX_RANK,
                    head_share: float = DEFAULT_HEAD_SHARE
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factorise normalised autocorrelations r [B, Nv, Nv] (or one [Nv, Nv]) for storage.

    Returns (codes int8 [B, max_rank', Nv], scale float32 [B, max_rank'], rank int64 [B],
    share float64 [B], tail_trace float64 [B]) on r's device, max_rank' = min(max_rank, Nv);
    sample b's factor is codes[b, :rank[b]] * scale[b, :rank[b], None] (columns of U as rows), the
    rest is zero. ``share[b]`` = 1 - ||R_b - U U^T||_F^2 / ||R_b||_F^2 of the quantised factor (1 for
    R = 0); ``tail_trace[b]`` = tr(R_b) / ||R_b||_F - ||U||_F^2 (what the factor leaves out).
    Rank: the smallest reaching ``share``, within the budget ``max_rank``, where the head columns
    (up to ``head_share``, full int8) count two and the coarse trailing ones ([-7, 7]) one.
    Any scale of R is accepted; the factor is of R / ||R||_F."""
    if not 0.0 < head_share <= share <= 1.0 or max_rank < 1:
        raise ValueError(f"factor_autocorr: need 0 < head_share={head_share} <= share={share} <= 1 "
                         f"and max_rank={max_rank} >= 1")
    one = r.ndim == 2
    r = (r[None] if one else r).float()
    bsz, n, _ = r.shape
    r = (r + r.transpose(-1, -2)) / 2
    norm = torch.linalg.matrix_norm(r).clamp_min(torch.finfo(torch.float32).tiny)
    r = r / norm[:, None, None]
    cap = min(max_rank, n)
    lam, vec = _top_eigen(r, min(n, cap + _OVERSAMPLE))
    lam = lam.clamp_min(0)[:, :cap].double()
    vec = vec[:, :, :cap]
    total = torch.linalg.matrix_norm(r.double()).square()
    energy = lam.square().cumsum(-1)
    wanted = (energy < share * total[:, None]).sum(-1) + 1        # smallest r reaching the share
    head = torch.clamp((energy < head_share * total[:, None]).sum(-1) + 1, max=max_rank // 2)
    rank = torch.minimum(wanted, max_rank - head)                 # the budget: a head column counts two
    rank = torch.minimum(rank, (lam > 0).sum(-1)).clamp(max=cap)  # no zero columns (R = 0 -> rank 0)
    cols = torch.arange(cap, device=r.device)[None]
    keep = cols < rank[:, None]
    u = vec * (lam.sqrt() * keep).float()[:, None, :]             # [B, Nv, cap]
    # deterministic sign: the largest entry of each column is positive
    big = u.abs().argmax(1, keepdim=True)
    u = u * torch.where(u.gather(1, big) < 0, -1.0, 1.0)
    levels = torch.where(cols < head[:, None], float(CODE_MAX), float(COARSE_CODE_MAX))  # [B, cap]
    scale = u.abs().amax(1) / levels                              # [B, cap]
    codes = torch.round(u / torch.where(scale > 0, scale, 1.0)[:, None, :]).clamp(-CODE_MAX, CODE_MAX)
    uq = (codes * scale[:, None, :]).double()
    rd = r.double()
    resid = (total - 2 * ((rd @ uq) * uq).sum((1, 2))
             + (uq.transpose(-1, -2) @ uq).square().sum((1, 2))).clamp_min(0)
    got = torch.where(total > 0, 1 - resid / torch.where(total > 0, total, 1), torch.ones_like(total)).clamp(0, 1)
    tail = rd.diagonal(dim1=-2, dim2=-1).sum(-1) - uq.square().sum((1, 2))
    codes = codes.to(torch.int8).transpose(-1, -2).contiguous()   # [B, cap, Nv]: column j of U is row j
    if one:
        return codes[0], scale[0], rank[0], got[0], tail[0]
    return codes, scale, rank, got, tail


def factor_to_numpy(codes: np.ndarray, scale: np.ndarray, rank: int, share: float, tail_trace: float
                    ) -> AutocorrFactor:
    """One sample's slice of factor_autocorr's (host) outputs as an AutocorrFactor."""
    r = int(rank)
    return AutocorrFactor(np.ascontiguousarray(codes[:r], dtype=np.int8),
                          np.ascontiguousarray(scale[:r], dtype=np.float32), float(share), float(tail_trace))


def factor_dense(autocorr: np.ndarray, share: float = DEFAULT_SHARE, max_rank: int = DEFAULT_MAX_RANK
                 ) -> AutocorrFactor:
    """A dense [Nv, Nv] autocorrelation -> AutocorrFactor on the host (writers given dense targets)."""
    codes, scale, rank, got, tail = factor_autocorr(torch.as_tensor(np.asarray(autocorr, np.float32)), share, max_rank)
    return factor_to_numpy(codes.numpy(), scale.numpy(), int(rank), float(got), float(tail))


# --------------------------------------------------------------------------------------------
# student side
# --------------------------------------------------------------------------------------------
@dataclass
class FactorTarget:
    """A teacher autocorrelation target held as its factor U [Nv, r] (R/||R||_F ~ U U^T), and the
    trace of what the factor leaves out (None: unknown, the uncorrected term)."""

    u: torch.Tensor
    tail_trace: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the matrix it stands for, [Nv, Nv] (as a dense target has)."""
        return int(self.u.shape[0]), int(self.u.shape[0])

    def to(self, *args, **kwargs) -> "FactorTarget":
        return FactorTarget(self.u.to(*args, **kwargs), self.tail_trace)

    def dense(self) -> torch.Tensor:
        """U U^T (the factor's part; the tail estimate is rel_loss_tail_dense's)."""
        return self.u @ self.u.T


def relation_target(autocorr, device: torch.device | str | None = None) -> "torch.Tensor | FactorTarget | None":
    """ckd_common.targets' autocorr (AutocorrFactor, dense array or None) -> what the loss takes."""
    if autocorr is None:
        return None
    if isinstance(autocorr, AutocorrFactor):
        return FactorTarget(torch.from_numpy(np.ascontiguousarray(autocorr.factor())).to(device), autocorr.tail_trace)
    return torch.as_tensor(np.asarray(autocorr, np.float32), device=device)


def dense_target(target: "torch.Tensor | FactorTarget") -> torch.Tensor:
    """The [Nv, Nv] matrix a target stands for (the test oracles use it)."""
    return target.dense() if isinstance(target, FactorTarget) else target


def _unit_scale(x: torch.Tensor) -> torch.Tensor:
    """x / max|x| (detached): the cosine is scale invariant, and squares of R entries stay finite."""
    if x.numel() == 0:
        return x
    s = x.detach().abs().amax()
    return x / torch.where(s > 0, s, torch.ones_like(s))


def _safe_ratio(num: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """num / sqrt(a2 b2), 0 where a2 b2 = 0 (then num = 0 too), with finite gradients everywhere."""
    den2 = a2 * b2
    return num / torch.where(den2 > 0, den2, torch.ones_like(den2)).sqrt()


def rel_loss_factored(hidden: torch.Tensor, gram: torch.Tensor, u: torch.Tensor, variant: str = "flat",
                      tail_trace: float | None = None) -> torch.Tensor:
    """rel_loss(H G H^T, U U^T, variant) without the teacher's Nv x Nv matrix (module docstring);
    with ``tail_trace`` the term of the tail-corrected estimate (rel_loss_tail_dense's, module docstring).

    hidden [Nv, d] (student final-norm states on the visual span), gram [d, d] = W^T W of the
    student (differentiable), u [Nv, r] the teacher's factor of R/||R||_F (constant). Float32
    arithmetic (float64 for float64 inputs), autocast off."""
    check_rel_variant(variant)
    nv, d = hidden.shape
    if u.ndim != 2 or u.shape[0] != nv:
        raise ValueError(f"rel_loss_factored: factor {tuple(u.shape)} must be [Nv={nv}, r]")
    dt = compute_dtype(hidden.dtype, gram.dtype)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        h = _unit_scale(hidden.to(dt))
        g = _unit_scale(gram.to(dt))
        u = u.detach().to(device=h.device, dtype=dt)
        u_max = u.abs().amax() if u.numel() else torch.ones((), dtype=dt, device=h.device)
        u = _unit_scale(u)                                          # U U^T scaled by 1 / u_max^2
        utu = u.T @ u                                               # [r, r]
        # Written so that every quantity is the same function of (h, g) as the dense rel_loss of
        # h g h^T, for any g: columns of R_S where the dense term takes columns, (g^T M g) for
        # ||R_S||^2. Their gradients then agree exactly, not only on symmetric g.
        build_s = nv <= d
        if build_s:
            s = (h @ g) @ h.T                                       # R_S, [Nv, Nv]
            su = s.T @ u                                            # column j of R_S against U
        else:
            a = h.T @ u                                             # [d, r]
            su = h @ (g.T @ a)                                      # R_S^T U without R_S
        if variant == "flat":
            num = (su * u).sum()                                    # <R_S, U U^T>
            if build_s:
                s2 = s.square().sum()
            else:
                s2 = ((g.T @ (h.T @ h) @ g) * (h.T @ h)).sum()      # tr(R_S^T R_S) = <g^T M g, M>, M = H^T H
        else:
            num_j = (su * u).sum(1)                                 # <R_S[:, j], (U U^T)[:, j]>
            t2_j = ((u @ utu) * u).sum(1)                           # ||(U U^T)[:, j]||^2
            if build_s:
                s2_j = s.square().sum(0)
            else:
                s2_j = ((h @ (g.T @ (h.T @ h) @ g)) * h).sum(1)     # ||R_S[:, j]||^2 = h_j^T g^T M g h_j
        if tail_trace is None:
            if variant == "flat":
                return 1.0 - _safe_ratio(num, s2, utu.square().sum())
            return 1.0 - _safe_ratio(num_j, s2_j, t2_j).mean()
        # the tail estimate T = U U^T + c P (module docstring), in the scaled units of u: T / u_max^2
        r = u.shape[1]
        free = nv - r
        c = float(tail_trace) / free / u_max.square() if free > 0 else torch.zeros((), dtype=dt, device=h.device)
        q = torch.linalg.qr(u).Q if r else u                        # orth(U), constant
        if build_s:
            sq = s.T @ q                                            # R_S^T Q
            diag_s = s.diagonal()
        else:
            sq = h @ (g.T @ (h.T @ q))
            diag_s = ((h @ g) * h).sum(1)                           # R_S[j, j] = h_j g h_j^T
        perp_j = diag_s - (sq * q).sum(1)                           # <R_S[:, j], P[:, j]> = (R_S^T P)_jj
        if variant == "flat":
            return 1.0 - _safe_ratio(num + c * perp_j.sum(), s2, utu.square().sum() + c * c * free)  # ||T||^2
        t2_j = t2_j + c * c * (1.0 - q.square().sum(1))             # ||T[:, j]||^2: U U^T P = 0, P^2 = P
        return 1.0 - _safe_ratio(num_j + c * perp_j, s2_j, t2_j).mean()


def relation_loss(hidden: torch.Tensor, gram: torch.Tensor, target: "torch.Tensor | FactorTarget",
                  variant: str = "flat") -> torch.Tensor:
    """The relation term of one sample: student R_S = hidden G hidden^T against the teacher's
    target, dense [Nv, Nv] (rel_loss) or a FactorTarget (rel_loss_factored)."""
    if isinstance(target, FactorTarget):
        return rel_loss_factored(hidden, gram, target.u, variant, target.tail_trace)
    return rel_loss(gram_autocorr(hidden, gram=gram), target, variant)
