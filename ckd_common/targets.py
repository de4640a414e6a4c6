"""Teacher targets for one sample: the unit that the server produces, the cache stores and the
trainer consumes (docs/design.md §3-§4). Plain numpy so it crosses process and HTTP boundaries."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SparseTopK:
    """The teacher's top-k at N positions, plus the probability mass outside the top-k.

    ids      [N, k] integer token ids (< the common vocabulary size)
    logprobs [N, k] float32 log p of those ids under the teacher's full softmax; padded entries
             (when k exceeds the vocabulary) are -inf with id 0
    tail     [N] float32, 1 - sum(exp(logprobs)), clipped to [0, 1]
    """

    ids: np.ndarray
    logprobs: np.ndarray
    tail: np.ndarray

    def __post_init__(self) -> None:
        if self.ids.ndim != 2 or self.logprobs.shape != self.ids.shape:
            raise ValueError(
                f"SparseTopK: ids {self.ids.shape} and logprobs {self.logprobs.shape} must both be [N, k]"
            )
        if self.tail.shape != (self.ids.shape[0],):
            raise ValueError(f"SparseTopK: tail {self.tail.shape} must be [N]={self.ids.shape[0]}")

    @property
    def num_positions(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])


# The stated share of the factored autocorrelation and its column budget (the teacher's defaults;
# torch-free so storage code can name them). A sample's rank is the smallest that captures 99.995 % of
# ||R||_F^2 with its eigenvalues, within a byte budget: the leading columns, up to 99.5 % of ||R||_F^2,
# are full int8 ("head", codes in [-127, 127]); the trailing ones are coarse (codes in [-7, 7], about
# half the stored bytes once zstd has them: bench/cache_io.py), and head columns count two against
# AUTOCORR_MAX_RANK. So a noise-dominated sample keeps ~120-150 columns instead of 80 within ~150 KiB
# per image sample; a coarse column's quantisation error is ~4 % of its own (small) eigenvalue's
# energy, far below what dropping it would cost. What the budget still cuts is estimated in the
# student's term from the stored tail trace (AutocorrFactor.tail_trace, docs/design.md §4.4).
AUTOCORR_SHARE = 0.99995
AUTOCORR_HEAD_SHARE = 0.995
AUTOCORR_MAX_RANK = 160


@dataclass
class AutocorrFactor:
    """The normalised visual autocorrelation R/||R||_F as a low-rank factor: R/||R||_F ~ U U^T.

    codes [r, Nv] int8, scale [r] float32: column j of U (Nv values) is codes[j] * scale[j]
          (one symmetric int8 scale per column: scale = max|U[:, j]| / 127).
    share float: 1 - ||R/||R||_F - U U^T||_F^2, i.e. the share of ||R||_F^2 the stored factor
          captures, quantisation included. It bounds the relation-loss error of the uncorrected
          term for ANY student: |delta (1 - cos)| <= 2 sqrt(1 - share) (docs/design.md §4.4).
    tail_trace float or None: tr(R/||R||_F) - ||U||_F^2, the trace of what the factor leaves out
          (>= 0 up to quantisation: the residual of a PSD R's leading eigenpairs is PSD). The
          student's term uses it to estimate the left-out part (isotropic in the factor's
          complement). None: not known (format-2 caches, an older server): the uncorrected term.

    r = 0 is the zero matrix (an all-zero R), stored exactly (share 1). The factor is computed by
    the teacher (ckd_common.kd.relation.factor_autocorr) and is stored and sent verbatim.
    ``np.asarray(factor)`` gives the dense [Nv, Nv] float32 U U^T (tests, tools).
    """

    codes: np.ndarray
    scale: np.ndarray
    share: float
    tail_trace: float | None = None

    def __post_init__(self) -> None:
        if self.codes.ndim != 2 or self.codes.dtype != np.int8:
            raise ValueError(f"AutocorrFactor: codes must be int8 [r, Nv], got {self.codes.dtype} {self.codes.shape}")
        if self.scale.shape != (self.codes.shape[0],):
            raise ValueError(f"AutocorrFactor: scale {self.scale.shape} must be [r]={self.codes.shape[0]}")
        self.share = float(self.share)
        self.tail_trace = None if self.tail_trace is None else float(self.tail_trace)

    @property
    def rank(self) -> int:
        return int(self.codes.shape[0])

    @property
    def num_visual(self) -> int:
        return int(self.codes.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the matrix it stands for, [Nv, Nv] (as a dense autocorr would have)."""
        return self.num_visual, self.num_visual

    def factor(self) -> np.ndarray:
        """U [Nv, r] float32."""
        return (self.codes.astype(np.float32) * np.asarray(self.scale, np.float32)[:, None]).T

    def dense(self) -> np.ndarray:
        """U U^T [Nv, Nv] float32 (materialises Nv^2 values: for tests, tools and format-1 writers)."""
        u = self.factor()
        return u @ u.T

    def __array__(self, dtype=None, copy=None):
        d = self.dense()
        return d if dtype is None else d.astype(dtype)


def dense_autocorr(autocorr: "np.ndarray | AutocorrFactor | None") -> np.ndarray | None:
    """The [Nv, Nv] float32 matrix a sample's autocorrelation target stands for (None stays None)."""
    if autocorr is None:
        return None
    if isinstance(autocorr, AutocorrFactor):
        return autocorr.dense()
    return np.asarray(autocorr, dtype=np.float32)


@dataclass
class SampleTargets:
    """Everything the teacher emits for one prepared sample.

    key       the sample key (ckd_common.keys.sample_key), hex string
    text      top-k at the response positions R = {t : labels[t+1] != -100}, ascending t
    visual    top-k at the visual span [v0, v0+Nv), unshifted; None for text-only samples
    autocorr  the visual autocorrelation R = Z Z^T divided by its Frobenius norm; None without
              image. An AutocorrFactor (what the teacher sends and a format-2 cache stores), or a
              dense [Nv, Nv] float32 symmetric matrix (the teacher's dense oracle path, format-1
              caches).
    """

    key: str
    text: SparseTopK
    visual: SparseTopK | None = None
    autocorr: "np.ndarray | AutocorrFactor | None" = None
