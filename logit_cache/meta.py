"""Group metadata (CacheMeta), fingerprints and deterministic group naming."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from .errors import CacheMismatchError, UnknownFormatVersion

FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
ATTR_KEY = "logit_cache"  # the group attribute holding CacheMeta
VALUE_ENCODINGS = ("f16", "q8")
TARGET_KINDS = ("text", "visual", "autocorr")
# Fields that describe provenance, not content: never part of a compatibility check.
INFORMATIONAL = ("producer_version", "created_utc", "format_version")


def _producer_version() -> str:
    try:
        from importlib.metadata import version
        return f"llava-ckd {version('llava-ckd')}"
    except Exception:  # not installed (running from a checkout)
        return "llava-ckd (unversioned checkout)"


def teacher_fingerprint(config: dict[str, Any], weights_hash: str) -> str:
    """Hash of the teacher's architecture config (JSON, sorted keys) and its weights hash."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(b"\0" + weights_hash.encode())
    return h.hexdigest()[:32]


@dataclass
class CacheMeta:
    """Everything a trainer must agree with before it may use a group's targets.

    Stored as the group attribute ``logit_cache`` (JSON) and checked on open.
    """

    teacher_fingerprint: str
    tokenizer_hash: str
    template: str
    dataset_fingerprint: str
    vocab_size: int
    k: int
    vision_strategy: str = "none"          # e.g. 'full' / 'default'; 'none' for text-only data
    num_visual_tokens: int = 0             # Nv per image sample; 0 for text-only data
    image_aspect_ratio: str = "square"     # the teacher's image preprocessing: 'square' or 'pad' (groups
                                           # written before the field existed were all 'square')
    value_encoding: str = "f16"            # 'f16' or 'q8' (see FORMAT.md)
    target_kinds: list[str] = field(default_factory=lambda: ["text", "visual", "autocorr"])
    temperature: float = 1.0
    format_version: int = FORMAT_VERSION
    producer_version: str = field(default_factory=_producer_version)
    created_utc: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        if self.value_encoding not in VALUE_ENCODINGS:
            raise ValueError(f"CacheMeta.value_encoding={self.value_encoding!r}; choose one of {VALUE_ENCODINGS}")
        bad = [t for t in self.target_kinds if t not in TARGET_KINDS]
        if bad:
            raise ValueError(f"CacheMeta.target_kinds has unknown kind(s) {bad}; known: {TARGET_KINDS}")
        if self.vocab_size <= 0 or self.k <= 0:
            raise ValueError(f"CacheMeta: vocab_size={self.vocab_size} and k={self.k} must be positive")
        self.target_kinds = sorted(set(self.target_kinds), key=TARGET_KINDS.index)

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "cache group") -> "CacheMeta":
        if not isinstance(d, dict) or "format_version" not in d:
            raise UnknownFormatVersion(None, SUPPORTED_VERSIONS, where)
        if d["format_version"] not in SUPPORTED_VERSIONS:
            raise UnknownFormatVersion(d["format_version"], SUPPORTED_VERSIONS, where)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def ids_dtype(self) -> str:
        """Smallest unsigned dtype that holds every id < vocab_size."""
        return "uint16" if self.vocab_size <= 1 << 16 else "uint32"

    @property
    def group_name(self) -> str:
        return group_name(self.dataset_fingerprint, self.template)

    # -- compatibility -------------------------------------------------------------------------
    def differences(self, expected: "CacheMeta | dict[str, Any]") -> list[tuple[str, Any, Any]]:
        """``(field, expected, found)`` for every field of ``expected`` this cache disagrees with.

        ``expected`` may be a CacheMeta (every content field is compared) or a dict holding only
        the fields the caller cares about. ``target_kinds`` passes when the expected kinds are a
        subset of the stored ones. Provenance fields (producer_version, created_utc) are ignored.
        """
        if isinstance(expected, CacheMeta):
            exp = {k: v for k, v in expected.to_dict().items() if k not in INFORMATIONAL}
        else:
            names = {f.name for f in fields(self)}
            unknown = sorted(set(expected) - names)
            if unknown:
                raise ValueError(f"expected metadata has unknown field(s) {unknown}; known: {sorted(names)}")
            exp = {k: v for k, v in expected.items() if k not in INFORMATIONAL}
        diffs = []
        for name, want in exp.items():
            have = getattr(self, name)
            if name == "target_kinds":
                if not set(want) <= set(have):
                    diffs.append((name, sorted(want), have))
            elif name == "temperature":
                if abs(float(want) - float(have)) > 1e-9:
                    diffs.append((name, want, have))
            elif want != have:
                diffs.append((name, want, have))
        return diffs

    def check_compatible(self, expected: "CacheMeta | dict[str, Any]", where: str = "cache group") -> None:
        """Raise CacheMismatchError naming every differing field with both values."""
        diffs = self.differences(expected)
        if diffs:
            raise CacheMismatchError(where, diffs)


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def group_name(dataset_fingerprint: str, template: str) -> str:
    """Deterministic group name for (dataset, template): ``<template>__<first 16 chars of the
    dataset fingerprint>``, with characters outside ``[A-Za-z0-9_.-]`` replaced by ``-``."""
    t = _SAFE.sub("-", template).strip("-") or "template"
    d = _SAFE.sub("-", dataset_fingerprint)[:16] or "dataset"
    return f"{t}__{d}"
