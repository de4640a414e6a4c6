"""The server's one typed config (``teacher_server serve``; tests build it directly).

Declared once here (``cli.py`` maps each flag to a field), validated with every problem in one
``ConfigError``, logged at start and saved as JSON — the bearer token redacted — to
``--config-out``, by default next to ``--port-file`` (``NAME.port`` -> ``NAME.config.json``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ckd_common.config import CommandConfig
from ckd_common.protocol import read_token_file

from .engines import ENGINES

DTYPES = ("bf16", "fp32")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class ServerConfig(CommandConfig):
    model_dir: str = field(metadata=_help("HF llava model directory (ckd model init/convert/compose)"))
    device: str = field(default="cpu", metadata=_help("cpu or cuda[:N]"))
    dtype: str | None = field(default=None, metadata=_help("bf16 | fp32; default: bf16 on CUDA, fp32 on CPU"))
    engine: str = field(default="hf", metadata=_help(
        "hf, vllm (optional extra, GPU only, no autocorrelation) or null (no forward: synthetic targets "
        "of the model's shapes, to measure a fill's host side)"))
    host: str = field(default="127.0.0.1", metadata=_help("bind address; the default accepts loopback only"))
    port: int = field(default=8000, metadata=_help("0 picks a free port (see --port-file)"))
    port_file: str | None = field(default=None, metadata=_help("write the bound port here once listening"))
    config_out: str | None = field(default=None, metadata=_help(
        "save the resolved config (token redacted) here; default: next to --port-file as NAME.config.json"))
    token_file: str | None = field(default=None, metadata=_help(
        "file holding a bearer token required on every endpoint except /healthz and /readyz"))
    # the token itself: read from token_file by the CLI, or set by a test; never printed or saved
    token: str | None = field(default=None, repr=False, metadata=_help("bearer token (from --token-file)",
                                                                       secret=True))
    max_batch_tokens: int = field(default=16384, metadata=_help(
        "padded tokens (samples x longest) per forward"))
    max_queue_tokens: int | None = field(default=None, metadata=_help(
        "tokens admitted and unfinished before 503 + Retry-After (default 8 x max-batch-tokens)"))
    max_inflight_requests: int = field(default=32, metadata=_help(
        "requests admitted at once: bodies in memory <= this x max-body"))
    max_request_samples: int = field(default=256, metadata=_help("samples per request"))
    max_request_tokens: int | None = field(default=None, metadata=_help(
        "tokens per request (default 4 x max-batch-tokens)"))
    max_body_bytes: int = field(default=64 << 20, metadata=_help("request body bytes (CLI: --max-body-mb)"))
    max_k: int = field(default=256, metadata=_help("largest top-k a request may ask for"))
    chunk_size: int = field(default=1024, metadata=_help(
        "positions per lm_head chunk (bounds the [chunk, V] tensor)"))
    graceful_timeout_s: int = field(default=60, metadata=_help(
        "seconds to finish in-flight requests on SIGTERM/SIGINT"))
    torch_threads: int | None = field(default=None, metadata=_help(
        "intra-op CPU threads for torch (CPU serving; default: torch's choice)"))
    log_level: str = field(default="info", metadata=_help("debug, info, warning or error"))

    def __post_init__(self) -> None:
        if self.max_queue_tokens is None:
            self.max_queue_tokens = 8 * self.max_batch_tokens
        if self.max_request_tokens is None:
            self.max_request_tokens = 4 * self.max_batch_tokens

    def problems(self) -> list[str]:
        p = []
        if not Path(self.model_dir, "config.json").is_file():
            p.append(f"--model {self.model_dir} is not a model directory (no config.json)")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            p.append(f"--device {self.device!r}: use cpu or cuda[:N]")
        if self.dtype not in (None, *DTYPES):
            p.append(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.engine not in ENGINES:
            p.append(f"--engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.log_level not in LOG_LEVELS:
            p.append(f"--log-level {self.log_level!r}: choose one of {', '.join(LOG_LEVELS)}")
        if not 0 <= self.port <= 65535:
            p.append(f"--port {self.port} is not a TCP port (0-65535)")
        if self.token_file:
            try:
                read_token_file(self.token_file)
            except ValueError as e:
                p.append(str(e))
        for name in ("max_batch_tokens", "max_queue_tokens", "max_inflight_requests", "max_request_samples",
                     "max_request_tokens", "max_body_bytes", "max_k", "chunk_size"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be positive (got {getattr(self, name)})")
        if self.graceful_timeout_s < 0 or (self.torch_threads is not None and self.torch_threads < 1):
            p.append("graceful_timeout_s must not be negative and torch_threads, when set, positive")
        return p

    @property
    def config_path(self) -> Path | None:
        """Where the resolved config is saved (None: nowhere, only logged)."""
        if self.config_out:
            return Path(self.config_out)
        return Path(self.port_file).with_suffix(".config.json") if self.port_file else None

    def to_dict(self) -> dict:
        return {**super().to_dict(), "token": "<redacted>" if self.token else None}
