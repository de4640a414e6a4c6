"""The JSON half of the teacher server's HTTP protocol: the models of /healthz, /readyz, /v1/info
and of every error body. The binary half (the POST /v1/targets frames) is ``ckd_common.wire``;
``teacher_server/PROTOCOL.md`` specifies both. Both sides import these models: the server
(``teacher_server.routes`` / ``service``) answers with them and the client
(``teacher_server.client``) parses into them, so a field renamed on one side cannot be read by
string key on the other.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from ckd_common.data import MAX_IMAGE_PIXELS


class Health(BaseModel):
    status: str = Field(description="'ok' while the process serves requests")


class Ready(BaseModel):
    ready: bool
    detail: str = ""


class Info(BaseModel):
    """What a client checks before sending anything (the fill compares it with its data)."""

    engine: str = Field(description="engine name: 'hf' or 'vllm'")
    teacher_fingerprint: str = Field(description="sha256 over the teacher's config and weights "
                                                 "(ckd_common.model.model_fingerprint)")
    tokenizer_hash: str
    vocab_size: int = Field(description="rows of the teacher's lm_head")
    tokenizer_vocab_size: int
    common_vocab_size: int = Field(description="the teacher's ModelInfo.common_vocab: ids a target may hold; "
                                               "the default vocab_limit")
    hidden_size: int
    num_visual_tokens: int
    vision_strategy: str
    image_size: int
    image_aspect_ratio: str = Field("square", description="image preprocessing: 'square' or 'pad' (expand to a "
                                    "square with the mean colour, then resize)")
    image_token_id: int
    dtype: str
    device: str
    max_k: int
    max_batch_tokens: int
    max_request_samples: int
    max_request_tokens: int
    max_body_bytes: int
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, description="largest image (width x height) the server "
                                  "decodes (ckd_common.data.MAX_IMAGE_PIXELS or lower); data preparation for "
                                  "this server refuses larger images up front")
    supported_templates: list[str]
    target_kinds: list[str] = Field(description="subset of text, visual, autocorr this engine produces")
    wire_version: int


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable kind, e.g. invalid_sample, overloaded")
    detail: str = Field(description="human-readable message naming the sample and the problem")


def read_token_file(path: str) -> str:
    """The bearer token in ``path`` (``--token-file`` of the server and of its clients): one
    non-empty word; ValueError naming the file otherwise. Tokens live in files, never in argv or
    in a saved config."""
    f = Path(path)
    if not f.is_file():
        raise ValueError(f"--token-file {f} does not exist")
    token = f.read_text().strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"--token-file {f} must hold one non-empty token without spaces")
    return token
