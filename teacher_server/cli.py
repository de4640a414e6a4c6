"""``teacher_server serve --model DIR [--device cpu|cuda:0] [--dtype bf16|fp32] [--host 127.0.0.1]
[--port 8000] [--max-batch-tokens N] [--token-file F] ...``: run one teacher behind HTTP."""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from pathlib import Path

from .config import ServerConfig
from .engines import ENGINES

log = logging.getLogger("teacher_server")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="teacher_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="load a teacher and serve /v1/targets")
    s.add_argument("--model", required=True, help="HF llava model directory (ckd model init/convert/compose)")
    s.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    s.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    s.add_argument("--engine", choices=ENGINES, default="hf",
                   help="hf (default) or vllm (optional extra, GPU only, no autocorrelation)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (see --port-file)")
    s.add_argument("--port-file", default=None, help="write the bound port here once listening")
    s.add_argument("--token-file", default=None, help="file holding a bearer token required on every "
                   "endpoint except /healthz and /readyz")
    d = ServerConfig("")
    s.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                   help="padded tokens (samples x longest) per forward (default %(default)s)")
    s.add_argument("--max-queue-tokens", type=int, default=None,
                   help="tokens admitted and unfinished before 503 + Retry-After (default 8 x max-batch-tokens)")
    s.add_argument("--max-inflight-requests", type=int, default=d.max_inflight_requests)
    s.add_argument("--max-request-samples", type=int, default=d.max_request_samples)
    s.add_argument("--max-request-tokens", type=int, default=None, help="default 4 x max-batch-tokens")
    s.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2 ** 20)
    s.add_argument("--max-k", type=int, default=d.max_k)
    s.add_argument("--chunk-size", type=int, default=d.chunk_size, help="positions per lm_head chunk")
    s.add_argument("--graceful-timeout", type=int, default=d.graceful_timeout_s,
                   help="seconds to finish in-flight requests on SIGTERM/SIGINT")
    s.add_argument("--torch-threads", type=int, default=None,
                   help="intra-op CPU threads for torch (CPU serving; default: torch's choice)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _read_token(path: str) -> str:
    f = Path(path)
    if not f.is_file():
        raise SystemExit(f"teacher_server: --token-file {f} does not exist")
    token = f.read_text().strip()
    if not token or any(c.isspace() for c in token):
        raise SystemExit(f"teacher_server: --token-file {f} must hold one non-empty token without spaces")
    return token


def serve(a: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not Path(a.model, "config.json").is_file():
        print(f"teacher_server: --model {a.model} is not a model directory (no config.json)", file=sys.stderr)
        return 2
    try:
        cfg = ServerConfig(model_dir=a.model, device=a.device, dtype=a.dtype, engine=a.engine, host=a.host,
                           port=a.port, token=_read_token(a.token_file) if a.token_file else None,
                           max_batch_tokens=a.max_batch_tokens, max_queue_tokens=a.max_queue_tokens,
                           max_inflight_requests=a.max_inflight_requests, max_request_samples=a.max_request_samples,
                           max_request_tokens=a.max_request_tokens, max_body_bytes=int(a.max_body_mb * 2 ** 20),
                           max_k=a.max_k, chunk_size=a.chunk_size, graceful_timeout_s=a.graceful_timeout)
    except ValueError as e:
        print(f"teacher_server: {e}", file=sys.stderr)
        return 2
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.token:
        log.warning("binding %s without --token-file: anyone who can reach this port can use the teacher", cfg.host)
    if a.torch_threads:
        import torch

        torch.set_num_threads(a.torch_threads)
    try:
        app = create_app(cfg)
    except ImportError as e:  # e.g. --engine vllm without the optional extra
        print(f"teacher_server: {e}", file=sys.stderr)
        return 2
    # Bind ourselves so that --port 0 works and the real port can be reported before serving.
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        print(f"teacher_server: cannot bind {cfg.host}:{cfg.port}: {e}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    if a.port_file:
        tmp = Path(a.port_file + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(a.port_file)
    log.info("listening on http://%s:%d (docs at /docs)", cfg.host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level=a.log_level, access_log=False,
                                           timeout_graceful_shutdown=cfg.graceful_timeout_s))
    # uvicorn handles SIGTERM/SIGINT itself (stop accepting, finish in-flight requests, run the
    # lifespan shutdown that drains the engine), then re-raises the signal to the handlers that
    # were installed before it: make those no-ops so a graceful shutdown exits 0, not -15.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    svc = app.state.service
    if svc.load_error:
        print(f"teacher_server: the model failed to load: {svc.load_error}", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.cmd == "serve":
        return serve(a)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
