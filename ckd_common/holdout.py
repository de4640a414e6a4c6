"""The held-out slice: samples no training step sees, where `ckd gap` measures a student against its
teachers (docs/design.md §4.8). The one owner of the rule; the trainer and the gap import it.

A sample is held out iff a salted hash of its sample key (ckd_common.keys.sample_key) falls below
the fraction: deterministic, independent of the data's order, of the number of ranks and of which
other samples exist, and the same in every step that reads the same prepared sample (SFT and DFT
share their instruction samples' keys, so SFT does not train on DFT's held-out slice either).
"""
from __future__ import annotations

import hashlib

DEFAULT_HOLDOUT = 0.01  # 1 in 100 samples: 6.7k of LLaVA-1.5's 665k instruction samples
_SALT = b"ckd-holdout-v1\0"
_SCALE = float(1 << 64)


def holdout_score(key: str) -> float:
    """A number in [0, 1) that is uniform over keys and fixed for a key."""
    digest = hashlib.sha256(_SALT + key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def is_held_out(key: str, fraction: float) -> bool:
    """True if the sample with this key belongs to the held-out slice of ``fraction``."""
    return fraction > 0 and holdout_score(key) < fraction


def split_positions(keys, fraction: float) -> tuple[list[int], list[int]]:
    """(positions of training samples, positions of held-out samples) of a sequence of sample keys:
    what a memory-mapped prepared dataset splits by (ckd_common.prepared.subset keeps it a view)."""
    train: list[int] = []
    held: list[int] = []
    if fraction <= 0:
        return list(range(len(keys))), held
    for i, k in enumerate(keys):
        (held if holdout_score(k) < fraction else train).append(i)
    return train, held


def split_held_out(samples, fraction: float, key=lambda s: s.key) -> tuple[list, list]:
    """(training samples, held-out samples), each in the input order."""
    train, held = [], []
    for s in samples:
        (held if is_held_out(key(s), fraction) else train).append(s)
    return train, held
