"""What the KD terms measure: the divergence, its temperature and how much of the stored top-k is used.

Plain Python (no torch), so that configs and command lines (student_trainer.config) can import the
choices. The arithmetic lives in ckd_common.kd.divergences; the definitions are docs/design.md §4.7.

KDObjective(divergence, beta, temperature, t2_scale, top_k):

divergence  "forward_kl"  KL(p_T || q_S)                      (the default: LLaVA-KD)
            "reverse_kl"  KL(q_S || p_T)
            "jsd"         TRL's generalised Jensen-Shannon divergence with ``beta``:
                              beta = 0      exactly forward KL(p_T || q_S)
                              beta = 1      exactly reverse KL(q_S || p_T)
                              0 < beta < 1  beta KL(p_T || M) + (1 - beta) KL(q_S || M),
                                            M = beta p_T + (1 - beta) q_S
                          (as in TRL's GKD trainer: the interior is NOT rescaled, so it tends to 0,
                          not to a KL, as beta approaches 0 or 1; the endpoints are TRL's branches)
            "tv"          total variation 1/2 sum |p_T - q_S|
temperature T > 0: the teacher's stored T=1 log-probs are rescaled to p^(1/T) and renormalised over
            the k+1 buckets (the tail bucket's tempered mass is estimated, see divergences.py),
            the student's logits are divided by T.
t2_scale    multiply the KD terms by T^2 (Hinton et al.), so that their gradients keep their size
            as T changes. No effect at T = 1.
top_k       k' <= k: use only the k' most probable of the stored entries per position; the others
            join the tail bucket (a k-ablation from one cache). None: all stored entries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv")
DEFAULT_JSD_BETA = 0.5  # TRL's GKDConfig default


def check_divergence(divergence: str) -> str:
    """``divergence`` if it is one of DIVERGENCES, else ValueError naming the choices."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    return divergence


@dataclass(frozen=True)
class KDObjective:
    """The divergence of the KD terms (kl_text, kl_vis) and how the teacher's targets enter it.

    The default is the LLaVA-KD objective: forward KL at temperature 1 on every stored entry.
    Every problem is reported at once (ValueError)."""

    divergence: str = "forward_kl"
    beta: float = DEFAULT_JSD_BETA   # jsd only (TRL's convention)
    temperature: float = 1.0
    t2_scale: bool = True
    top_k: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.divergence not in DIVERGENCES:
            problems.append(f"divergence {self.divergence!r} is not one of {DIVERGENCES}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0.0 <= self.beta <= 1.0:
            problems.append(f"beta={self.beta!r} must be a number in [0, 1]")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            problems.append(f"temperature={t!r} must be a finite number > 0")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            problems.append(f"top_k={self.top_k!r} must be an integer >= 1 (or None: every stored entry)")
        if problems:
            raise ValueError("KDObjective: " + "; ".join(problems))
        object.__setattr__(self, "beta", float(self.beta))
        object.__setattr__(self, "temperature", float(self.temperature))

    @property
    def kind(self) -> str:
        """The divergence actually computed: jsd at beta 0 / 1 is forward / reverse KL exactly."""
        if self.divergence == "jsd" and self.beta == 0.0:
            return "forward_kl"
        if self.divergence == "jsd" and self.beta == 1.0:
            return "reverse_kl"
        return self.divergence

    @property
    def scale(self) -> float:
        """The factor of the KD terms: T^2 with t2_scale, else 1."""
        return self.temperature ** 2 if self.t2_scale else 1.0

    def describe(self) -> str:
        name = f"jsd(beta={self.beta:g})" if self.divergence == "jsd" else self.divergence
        parts = [name]
        if self.temperature != 1.0:
            parts.append(f"T={self.temperature:g}" + (" (x T^2)" if self.t2_scale else ""))
        if self.top_k is not None:
            parts.append(f"top-{self.top_k} of the stored k")
        return ", ".join(parts)
