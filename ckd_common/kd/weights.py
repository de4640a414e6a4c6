"""The weights of the four loss terms and the relation-loss variants: the one owner of both rules.

Every caller (the fused loss, the test oracles, the trainer's config and its per-micro-batch
reweighting) passes the weights as a :class:`KDWeights`, never as a positional tuple, so a term's
weight cannot be swapped with another's by position.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

# The relation loss between two autocorrelation matrices (see terms.rel_loss):
#   "flat"   1 - cos(vec(R_T), vec(R_S))            (the default, LLaVA-KD Eq. 4)
#   "column" 1 - mean_j cos(R_T[:, j], R_S[:, j])   (the paper's per-column form)
REL_VARIANTS = ("flat", "column")


def check_rel_variant(variant: str) -> str:
    """``variant`` if it is one of REL_VARIANTS, else ValueError naming the choices."""
    if variant not in REL_VARIANTS:
        raise ValueError(f"rel variant must be one of {REL_VARIANTS}, got {variant!r}")
    return variant


@dataclass(frozen=True)
class KDWeights:
    """total = ce * CE + kl_text * KL_text + kl_vis * KL_vis + rel * REL.

    The paper's alpha (CE on the response tokens), beta (KL on the response positions), gamma (KL
    on the visual span) and delta (relation loss of the visual autocorrelation). Each weight is a
    finite number >= 0 (0 switches a term off); they are stored as floats. The default weighs
    every term 1, the LLaVA-KD recipe for the distilled steps.
    """

    ce: float = 1.0
    kl_text: float = 1.0
    kl_vis: float = 1.0
    rel: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if isinstance(value, bool) or not math.isfinite(number) or number < 0:
                problems.append(f"{f.name}={value!r}")
                continue
            object.__setattr__(self, f.name, number)
        if problems:
            raise ValueError(f"KDWeights: {', '.join(problems)}: every weight must be a finite number >= 0")

    @classmethod
    def from_sequence(cls, values: Sequence[float]) -> "KDWeights":
        """KDWeights from (ce, kl_text, kl_vis, rel) in that order, e.g. a config file's list."""
        if isinstance(values, (str, bytes)) or len(values) != 4:
            raise ValueError(f"KDWeights.from_sequence needs 4 values (ce, kl_text, kl_vis, rel), got {values!r}")
        return cls(*values)

    def total(self, ce, kl_text, kl_vis, rel):
        """The weighted sum of the four terms (floats or tensors)."""
        return self.ce * ce + self.kl_text * kl_text + self.kl_vis * kl_vis + self.rel * rel


def require_weights(weights: object) -> KDWeights:
    """``weights`` if it is a KDWeights; a TypeError that names the fix for anything else."""
    if not isinstance(weights, KDWeights):
        raise TypeError(f"weights must be a KDWeights(ce, kl_text, kl_vis, rel), got {type(weights).__name__} "
                        f"{weights!r}; use KDWeights.from_sequence(...) to convert a sequence")
    return weights
