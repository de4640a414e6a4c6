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


@dataclass
class SampleTargets:
    """Everything the teacher emits for one prepared sample.

    key       the sample key (ckd_common.keys.sample_key), hex string
    text      top-k at the response positions R = {t : labels[t+1] != -100}, ascending t
    visual    top-k at the visual span [v0, v0+Nv), unshifted; None for text-only samples
    autocorr  [Nv, Nv] float32 symmetric R = Z Z^T divided by its Frobenius norm; None without image
    """

    key: str
    text: SparseTopK
    visual: SparseTopK | None = None
    autocorr: np.ndarray | None = None
