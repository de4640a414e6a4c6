"""Request/response models of the JSON endpoints (the binary /v1/targets frames are specified in
ckd_common.wire and PROTOCOL.md)."""
from __future__ import annotations

from pydantic import BaseModel, Field


class Health(BaseModel):
    status: str = Field(description="'ok' while the process serves requests")


class Ready(BaseModel):
    ready: bool
    detail: str = ""


class Info(BaseModel):
    """What a client checks before sending anything (logit_cache fill compares it with its data)."""

    engine: str = Field(description="engine name: 'hf' or 'vllm'")
    teacher_fingerprint: str = Field(description="sha256 over the teacher's config and weights")
    tokenizer_hash: str
    vocab_size: int = Field(description="rows of the teacher's lm_head")
    tokenizer_vocab_size: int
    common_vocab_size: int = Field(description="min(vocab_size, tokenizer_vocab_size): default vocab_limit")
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
    supported_templates: list[str]
    target_kinds: list[str] = Field(description="subset of text, visual, autocorr this engine produces")
    wire_version: int


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable kind, e.g. invalid_sample, overloaded")
    detail: str = Field(description="human-readable message naming the sample and the problem")
