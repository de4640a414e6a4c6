"""Group metadata (CacheMeta) and deterministic group naming.

The one owner of the cache's metadata rules: what a group records (the factories
:meth:`CacheMeta.for_dataset` / :meth:`CacheMeta.for_group`, used by every writer), what a trainer
requires of it (:meth:`CacheMeta.expected_for`), the value encodings and the target kinds.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .errors import CacheMismatchError, UnknownFormatVersion

if TYPE_CHECKING:
    from ckd_common.data import PreparedDataset

FORMAT_VERSION = 3        # written by this version (FORMAT.md)
SUPPORTED_VERSIONS = (1, 2, 3)  # read by this version: 1 and 2 read-only
ATTR_KEY = "logit_cache"  # the group attribute holding CacheMeta
VALUE_ENCODINGS = ("f16", "q8")  # how stored log-probs are encoded (FORMAT.md, encoding.py)
DEFAULT_VALUE_ENCODING = "f16"
TARGET_KINDS = ("text", "visual", "autocorr")  # what a teacher may produce per sample, in stored order
# Fields that describe provenance, not content: never part of a compatibility check.
INFORMATIONAL = ("producer_version", "created_utc", "format_version")


def _producer_version() -> str:
    try:
        from importlib.metadata import version
        return f"llava-ckd {version('llava-ckd')}"
    except Exception:  # not installed (running from a checkout)
        return "llava-ckd (unversioned checkout)"


def _data_contract(dataset_fingerprint: str, template: str, has_images: bool, tokenizer_hash: str, vocab_size: int,
                   vision_strategy: str, num_visual_tokens: int, image_aspect_ratio: str) -> dict[str, Any]:
    """The fields the prepared data and the vocabulary fix, for writers and trainers alike. The
    vision fields only for data with images: text-only data has no visual positions or pixels to
    agree on."""
    d: dict[str, Any] = {"dataset_fingerprint": dataset_fingerprint, "template": template,
                         "tokenizer_hash": tokenizer_hash, "vocab_size": int(vocab_size)}
    if has_images:
        d.update(vision_strategy=vision_strategy, num_visual_tokens=int(num_visual_tokens),
                 image_aspect_ratio=image_aspect_ratio)
    return d


def _describe_dataset(dataset: "PreparedDataset") -> dict[str, Any]:
    return {"dataset_fingerprint": dataset.fingerprint, "template": dataset.template,
            "has_images": any(s.has_image for s in dataset.samples)}


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
    value_encoding: str = DEFAULT_VALUE_ENCODING  # one of VALUE_ENCODINGS (see FORMAT.md)
    target_kinds: list[str] = field(default_factory=lambda: list(TARGET_KINDS))
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

    # -- the factories: every writer and every reader's expectation is built here ----------------
    @classmethod
    def for_group(cls, *, dataset_fingerprint: str, template: str, has_images: bool, teacher_fingerprint: str,
                  tokenizer_hash: str, vocab_size: int, k: int, vision_strategy: str, num_visual_tokens: int,
                  value_encoding: str, target_kinds: Iterable[str], image_aspect_ratio: str = "square") -> "CacheMeta":
        """The metadata of the group a writer fills. ``vocab_size`` is the id range of the targets
        (the teacher's ModelInfo.common_vocab unless a smaller vocab_limit is asked for);
        ``target_kinds`` what the teacher produces (kinds unknown here are not stored). Data without
        images records no vision fields ('none', 0)."""
        return cls(teacher_fingerprint=teacher_fingerprint, k=int(k), value_encoding=value_encoding,
                   target_kinds=[t for t in TARGET_KINDS if t in set(target_kinds)],
                   **_data_contract(dataset_fingerprint, template, has_images, tokenizer_hash, vocab_size,
                                    vision_strategy, num_visual_tokens, image_aspect_ratio))

    @classmethod
    def for_dataset(cls, dataset: "PreparedDataset", **teacher: Any) -> "CacheMeta":
        """:meth:`for_group` for a prepared dataset (ckd_common.data.PreparedDataset); ``teacher``
        holds the other keywords of :meth:`for_group`."""
        return cls.for_group(**_describe_dataset(dataset), **teacher)

    @staticmethod
    def expected_for(dataset: "PreparedDataset", *, tokenizer_hash: str, vocab_size: int, vision_strategy: str,
                     num_visual_tokens: int, image_aspect_ratio: str = "square",
                     teacher_fingerprint: str | None = None) -> dict[str, Any]:
        """What a trainer requires of a group for its prepared ``dataset`` (a partial CacheMeta for
        :meth:`check_compatible` / ``open_for_training``): the data contract the writers record,
        plus the teacher when the caller names one."""
        exp = _data_contract(**_describe_dataset(dataset), tokenizer_hash=tokenizer_hash, vocab_size=vocab_size,
                             vision_strategy=vision_strategy, num_visual_tokens=num_visual_tokens,
                             image_aspect_ratio=image_aspect_ratio)
        if teacher_fingerprint:
            exp["teacher_fingerprint"] = teacher_fingerprint
        return exp

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
