"""What a prepared dataset is made for (:class:`PrepareSpec`), where prepared datasets live, and the
names of the format (docs/prepared-data.md)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ckd_common.data import DEFAULT_MAX_LENGTH, MAX_IMAGE_PIXELS, DataError

FORMAT = "ckd-prepared-v1"
MANIFEST = "manifest.json"
SKIPPED_IMAGES = "skipped_images.json"  # images of samples left out: their appearance makes the dataset stale
ROOT_ENV = "CKD_PREPARED_DIR"

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"prepared data: {msg}", file=sys.stderr, flush=True)


def default_root() -> Path:
    """Where prepared datasets live: ``$CKD_PREPARED_DIR``, else ``$XDG_CACHE_HOME/llava-ckd/prepared``
    (``~/.cache/llava-ckd/prepared``)."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "llava-ckd" / "prepared"


class PreparedDataError(DataError):
    """A prepared dataset is missing, damaged, stale or made for other inputs (the message says which
    and what to do)."""



@dataclass(frozen=True)
class PrepareSpec:
    """Every input a prepared dataset depends on. The content fields fix the samples; the policy fields
    (pixel limit, images outside the root) decide which records are accepted."""

    data: str                       # the data file, absolute
    images: str | None              # the image root, absolute (None: image paths as given)
    template: str
    tokenizer_hash: str
    num_visual_tokens: int
    image_token_id: int
    max_length: int = DEFAULT_MAX_LENGTH
    image_aspect_ratio: str = "square"   # the pixels the loaders make of the images (docs/design.md §2.3)
    max_image_pixels: int = MAX_IMAGE_PIXELS
    allow_outside_images: bool = False

    CONTENT = ("data", "images", "template", "tokenizer_hash", "num_visual_tokens", "image_token_id", "max_length",
               "image_aspect_ratio")

    @classmethod
    def of(cls, data: str | Path, images: str | Path | None, template: str, model, max_length: int = DEFAULT_MAX_LENGTH,
           **policy) -> "PrepareSpec":
        """``model``: what the data is prepared for — anything with ``tokenizer_hash``,
        ``num_visual_tokens``, ``image_token_id`` and ``image_aspect_ratio`` (ckd_common.model.ModelInfo
        or DataContract, the server's /v1/info)."""
        return cls(str(Path(data).resolve()), str(Path(images).resolve()) if images else None, template,
                   model.tokenizer_hash, int(model.num_visual_tokens), int(model.image_token_id), int(max_length),
                   getattr(model, "image_aspect_ratio", "square"), **policy)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps({"format": FORMAT, **self.to_dict()}, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def dirname(self) -> str:
        return f"{Path(self.data).stem}.{self.template}.{self.key}"

    def differences(self, other: "PrepareSpec", fields: Sequence[str] = CONTENT) -> list[str]:
        return [f"{f}: prepared for {getattr(self, f)!r}, this run has {getattr(other, f)!r}"
                for f in fields if getattr(self, f) != getattr(other, f)]
