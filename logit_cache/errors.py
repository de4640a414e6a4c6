"""Errors raised by logit_cache. Every message names the problem and the fix."""
from __future__ import annotations

from typing import Any


class CacheError(Exception):
    """Base class for every logit_cache error."""


class UnknownFormatVersion(CacheError):
    """The group was written with a format version this code cannot read."""

    def __init__(self, found: Any, supported: tuple[int, ...], where: str) -> None:
        self.found = found
        self.supported = supported
        super().__init__(
            f"{where}: logit_cache format version {found!r} is not supported by this code "
            f"(supported: {', '.join(map(str, supported))}). Fix: upgrade llava-ckd to a version that "
            f"reads format {found!r}, or re-fill the cache with this version."
        )


class CacheMismatchError(CacheError):
    """The cache was built for something else than what the caller expects.

    ``differences`` is a list of ``(field, expected, found)``.
    """

    def __init__(self, where: str, differences: list[tuple[str, Any, Any]]) -> None:
        self.differences = differences
        lines = [f"  {f}: expected {e!r}, cache has {c!r}" for f, e, c in differences]
        super().__init__(
            f"{where}: the cache does not match what the trainer expects "
            f"({len(differences)} field(s) differ):\n" + "\n".join(lines) +
            "\nFix: point the trainer at a cache filled with the same teacher/tokenizer/template/"
            "vision strategy/vocabulary/k, or re-fill one (logit_cache fill)."
        )


class GroupNotFoundError(CacheError):
    """No group in the root matches; the message lists what the root holds."""


class CacheCorruptError(CacheError):
    """Stored data failed a checksum, shape, offset or range check."""


class KeyNotCachedError(CacheError, KeyError):
    """The requested sample key has no committed targets in this group."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""
