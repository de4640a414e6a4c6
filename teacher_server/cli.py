"""``teacher_server serve --model DIR [--device cpu|cuda:0] [--dtype bf16|fp32] [--host 127.0.0.1]
[--port 8000] [--port-file F] [--config-out F] [--max-batch-tokens N] [--token-file F] ...``: run one
teacher behind HTTP. Every flag is a field of ``teacher_server.config.ServerConfig`` (derived with
``ckd_common.config.add_arguments``); the resolved config is logged at start and saved to
--config-out (default: next to --port-file, ``NAME.config.json``)."""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from pathlib import Path

from ckd_common.config import ConfigError, add_arguments, from_args
from ckd_common.protocol import read_token_file

from .config import ServerConfig

log = logging.getLogger("teacher_server")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:  # no "(default: None)"
        return action.help if action.default is None else super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="teacher_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="load a teacher and serve /v1/targets", formatter_class=_Formatter)
    add_arguments(s, ServerConfig)  # the token is no flag: it is read from --token-file
    return p


def config_from_args(a: argparse.Namespace) -> ServerConfig:
    return from_args(ServerConfig, a)


def serve(a: argparse.Namespace) -> int:
    from .app import create_app
    from .connections import uvicorn_server

    cfg = config_from_args(a)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg.validate()
    except ConfigError as e:
        print(f"teacher_server: {e}", file=sys.stderr)
        return 2
    if cfg.token_file:
        cfg.token = read_token_file(cfg.token_file)
    log.info("%s", cfg.describe())
    if cfg.config_path is not None:
        cfg.save(cfg.config_path)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.token:
        log.warning("binding %s without --token-file: anyone who can reach this port can use the teacher", cfg.host)
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
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
    if cfg.port_file:
        tmp = Path(cfg.port_file + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(cfg.port_file)
    log.info("listening on http://%s:%d (docs at /docs)", cfg.host, port)
    server = uvicorn_server(app, cfg)
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
