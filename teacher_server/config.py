"""The server's one typed config (``teacher_server serve``; tests build it directly).

Declared once here: ``cli.py`` derives every flag from these fields (``ckd_common.config.
add_arguments``; a field's ``flag`` metadata keeps a historical flag name). Validated with every
problem in one ``ConfigError``, logged at start and saved as JSON — the bearer token redacted — to
``--config-out``, by default next to ``--port-file`` (``NAME.port`` -> ``NAME.config.json``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ckd_common.config import CommandConfig
from ckd_common.data import MAX_IMAGE_PIXELS
from ckd_common.protocol import read_token_file

from .engines import ENGINES

DTYPES = ("bf16", "fp32")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class ServerConfig(CommandConfig):
    model_dir: str = field(metadata=_help("HF llava model directory (ckd model init/convert/compose)",
                                          flag="--model", metavar="DIR"))
    device: str = field(default="cpu", metadata=_help("cpu or cuda[:N]"))
    dtype: str | None = field(default=None, metadata=_help("default: bf16 on CUDA, fp32 on CPU", choices=DTYPES))
    engine: str = field(default="hf", metadata=_help(
        "hf, vllm (optional extra, GPU only, no autocorrelation) or null (no forward: synthetic targets "
        "of the model's shapes, to measure a fill's host side)", choices=ENGINES))
    host: str = field(default="127.0.0.1", metadata=_help("bind address; the default accepts loopback only"))
    port: int = field(default=8000, metadata=_help("0 picks a free port (see --port-file)"))
    port_file: str | None = field(default=None, metadata=_help("write the bound port here once listening"))
    config_out: str | None = field(default=None, metadata=_help(
        "save the resolved config (token redacted) here; default: next to --port-file as NAME.config.json"))
    token_file: str | None = field(default=None, metadata=_help(
        "file holding a bearer token required on every endpoint except /healthz and /readyz"))
    # the token itself: read from token_file by the CLI, or set by a test; never a flag, printed or saved
    token: str | None = field(default=None, repr=False, metadata=_help("bearer token (from --token-file)",
                                                                       secret=True, cli=False))
    # -- engine -------------------------------------------------------------------------------------
    max_batch_tokens: int = field(default=16384, metadata=_help(
        "padded tokens (samples x longest) per forward"))
    chunk_size: int = field(default=1024, metadata=_help(
        "positions per lm_head chunk (bounds the [chunk, V] tensor)"))
    torch_threads: int | None = field(default=None, metadata=_help(
        "intra-op CPU threads for torch (CPU serving; default: torch's choice)"))
    # -- admission: work the engine accepts ----------------------------------------------------------
    max_inflight_requests: int = field(default=32, metadata=_help(
        "requests whose body has arrived and that are decoded, queued or computing at once; more get "
        "503 + Retry-After (a request still uploading does not count)"))
    max_queue_tokens: int | None = field(default=None, metadata=_help(
        "tokens admitted and unfinished before 503 + Retry-After (default 8 x max-batch-tokens)"))
    max_request_samples: int = field(default=256, metadata=_help("samples per request"))
    max_request_tokens: int | None = field(default=None, metadata=_help(
        "tokens per request (default 4 x max-batch-tokens)"))
    max_body_mb: float = field(default=64.0, metadata=_help("request body limit in MiB", metavar="MB"))
    max_k: int = field(default=256, metadata=_help("largest top-k a request may ask for"))
    max_image_pixels: int = field(default=MAX_IMAGE_PIXELS, metadata=_help(
        f"largest image (width x height) decoded; at most {MAX_IMAGE_PIXELS} (ckd_common.data."
        f"MAX_IMAGE_PIXELS); served in /v1/info so clients prepare data within it"))
    # -- connections: what a client can hold before its request reaches admission -------------------
    max_connections: int = field(default=64, metadata=_help(
        "open connections served at once; a connection opened beyond gets 503 + Retry-After and is "
        "closed. Bodies being received are at most this x --max-body-mb in memory"))
    idle_timeout_s: float = field(default=5.0, metadata=_help(
        "seconds a connection may wait without sending a byte of a request (after opening, and between "
        "requests: uvicorn's keep-alive timeout); closed quietly after", flag="--idle-timeout", metavar="S"))
    header_timeout_s: float = field(default=10.0, metadata=_help(
        "seconds from a request's first byte to its last header; 408 and close after",
        flag="--header-timeout", metavar="S"))
    body_timeout_s: float = field(default=30.0, metadata=_help(
        "seconds a request body may take, plus 1 s per --min-upload-rate KiB received; 408 and close "
        "after (a slow upload never holds the engine: it is admitted once its body has arrived)",
        flag="--body-timeout", metavar="S"))
    min_upload_kib_s: float = field(default=256.0, metadata=_help(
        "the upload rate (KiB/s) that --body-timeout extends by: an upload at least this fast never "
        "times out", flag="--min-upload-rate", metavar="KIB_S"))
    # -- process --------------------------------------------------------------------------------------
    graceful_timeout_s: int = field(default=60, metadata=_help(
        "seconds to finish in-flight requests on SIGTERM/SIGINT", flag="--graceful-timeout", metavar="S"))
    log_level: str = field(default="info", metadata=_help("log verbosity", choices=LOG_LEVELS))

    def __post_init__(self) -> None:
        if self.max_queue_tokens is None:
            self.max_queue_tokens = 8 * self.max_batch_tokens
        if self.max_request_tokens is None:
            self.max_request_tokens = 4 * self.max_batch_tokens

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2 ** 20)

    def body_deadline(self, started: float, received: int) -> float:
        """When a request body that began arriving at ``started`` (seconds, any monotonic clock) and
        of which ``received`` bytes have arrived must be complete: ``--body-timeout`` plus one second
        per ``--min-upload-rate`` KiB (Apache mod_reqtimeout's MinRate). The one rule, applied by the
        service while it reads a body and by the connection layer to bodies nobody reads."""
        return started + self.body_timeout_s + received / (self.min_upload_kib_s * 1024)

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
                     "max_request_tokens", "max_body_mb", "max_k", "chunk_size", "max_connections",
                     "idle_timeout_s", "header_timeout_s", "body_timeout_s", "min_upload_kib_s"):
            if getattr(self, name) <= 0:
                p.append(f"{name} must be positive (got {getattr(self, name)})")
        if not 1 <= self.max_image_pixels <= MAX_IMAGE_PIXELS:
            p.append(f"max_image_pixels must be in [1, {MAX_IMAGE_PIXELS}] (got {self.max_image_pixels}); "
                     f"larger images are refused by data preparation anyway")
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
