"""Sample keys and content hashes (docs/design.md §3).

A sample's key is a content hash of (template name, token ids, image content hash, visual token
count). The server, the cache and the trainer all call :func:`sample_key`, so a target is found
again only for exactly the same prepared input.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

KEY_HEX_CHARS = 32  # 128-bit keys: collision-free for any realistic dataset, 32 bytes as text
NO_IMAGE = "none"


def image_hash(data: bytes) -> str:
    """Hash of an image file's bytes (the content, not its path)."""
    return hashlib.sha256(data).hexdigest()


def sample_key(template: str, input_ids: Sequence[int] | np.ndarray, image_sha: str | None,
               num_visual_tokens: int) -> str:
    """Key of a prepared sample. ``input_ids`` are the ids after image expansion."""
    ids = np.ascontiguousarray(np.asarray(input_ids, dtype="<i8"))
    h = hashlib.sha256()
    h.update(b"ckd-sample-key-v1\0")
    h.update(template.encode() + b"\0")
    h.update(str(int(num_visual_tokens)).encode() + b"\0")
    h.update((image_sha or NO_IMAGE).encode() + b"\0")
    h.update(ids.tobytes())
    return h.hexdigest()[:KEY_HEX_CHARS]
