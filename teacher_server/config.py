"""Server settings (one object, filled by the CLI or by tests)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    model_dir: str
    device: str = "cpu"
    dtype: str | None = None              # 'bf16' | 'fp32'; default bf16 on CUDA, fp32 on CPU
    engine: str = "hf"                    # 'hf' | 'vllm' (optional extra)
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None              # bearer token; None = no auth
    max_batch_tokens: int = 16384         # padded tokens (batch x longest) per forward
    max_queue_tokens: int | None = None   # admitted but unfinished tokens; default 8 x max_batch_tokens
    max_inflight_requests: int = 32       # requests admitted at once: bodies in memory <= this x max_body_bytes
    max_request_samples: int = 256
    max_request_tokens: int | None = None  # default 4 x max_batch_tokens
    max_body_bytes: int = 64 << 20
    max_k: int = 256
    chunk_size: int = 1024                # positions per lm_head chunk (bounds the [chunk, V] tensor)
    graceful_timeout_s: int = 60

    def __post_init__(self) -> None:
        if self.max_queue_tokens is None:
            self.max_queue_tokens = 8 * self.max_batch_tokens
        if self.max_request_tokens is None:
            self.max_request_tokens = 4 * self.max_batch_tokens
        if self.max_batch_tokens < 1 or self.max_k < 1:
            raise ValueError("max_batch_tokens and max_k must be positive")
