"""Helpers (no tests) shared by the server and fill tests: real uvicorn servers (a process, or the
production server on a thread), raw HTTP over a socket, and a tolerant comparison of targets that
went through the cache's float16 encoding."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

READY_TIMEOUT_S = 300  # 2 shared, busy cores: imports + model load can take minutes (a dead server fails at once)


class ServerProc:
    """``python -m teacher_server serve`` on a free port (the server binds port 0 and reports it)."""

    def __init__(self, model_dir, workdir: Path, *extra: str, name: str = "server") -> None:
        self.model_dir, self.workdir, self.extra, self.name = str(model_dir), Path(workdir), extra, name
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        f = self.workdir / f"{self.name}.log"
        return f.read_text()[-4000:] if f.exists() else ""

    def start(self) -> "ServerProc":
        from teacher_server.client import TeacherClient

        self.workdir.mkdir(parents=True, exist_ok=True)
        port_file = self.workdir / f"{self.name}.port"
        port_file.unlink(missing_ok=True)
        self.port = None
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        logf = open(self.workdir / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "teacher_server", "serve", "--model", self.model_dir, "--port", "0",
             "--port-file", str(port_file), "--log-level", "warning", *self.extra],
            stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[1])
        logf.close()

        def alive() -> None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before ready:\n{self.log}")

        deadline = time.monotonic() + READY_TIMEOUT_S
        while not port_file.exists() and time.monotonic() < deadline:
            alive()
            time.sleep(0.2)
        try:
            self.port = int(port_file.read_text())
            with TeacherClient(self.url) as server:
                server.wait_ready(max(deadline - time.monotonic(), 0), poll_s=0.2, check=alive)
            return self
        except (OSError, ValueError, RuntimeError) as e:  # no port file, or never ready (NotReady)
            self.kill()
            raise RuntimeError(f"{self.name} not ready within {READY_TIMEOUT_S}s ({e}):\n{self.log}") from None

    def kill(self) -> None:
        """SIGKILL: no chance to finish anything (the crash case)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM: graceful shutdown; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def __enter__(self) -> "ServerProc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


class InProcessServer:
    """``create_app(cfg, engine)`` served on a thread by the production uvicorn server
    (``teacher_server.connections.uvicorn_server``: the same protocol, limits and timeouts as
    ``teacher_server serve``), on a free loopback port. Cheaper than a process when a test needs
    several servers with different limits; ``ServerProc`` tests the command itself."""

    def __init__(self, cfg, engine=None) -> None:
        self.cfg, self.engine = cfg, engine
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "InProcessServer":
        import socket
        import threading

        from teacher_server.app import create_app
        from teacher_server.client import TeacherClient
        from teacher_server.connections import uvicorn_server

        self.app = create_app(self.cfg, self.engine, exit_on_load_failure=False)
        self.server = uvicorn_server(self.app, self.cfg)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        with TeacherClient(self.url) as client:
            client.wait_ready(READY_TIMEOUT_S, poll_s=0.1)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def metric(self, line_start: str) -> float:
        """The value of the first /metrics line starting with ``line_start`` (0.0 when absent)."""
        import httpx

        for line in httpx.get(f"{self.url}/metrics", timeout=60).text.splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def read_http_response(sock, timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from a raw socket: (status, lower-cased headers, body). Raises
    ConnectionError when the server closes (or resets) the connection before a whole answer."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} bytes of a response: {data[:200]!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the middle of a response body")
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _assert_topk_close(a, b, what: str, atol: float) -> None:
    assert a.ids.shape == b.ids.shape, f"{what}: shapes {a.ids.shape} vs {b.ids.shape}"
    la, lb = a.logprobs.astype(np.float32), b.logprobs.astype(np.float32)
    assert np.array_equal(np.isfinite(la), np.isfinite(lb)), f"{what}: -inf padding differs"
    fin = np.isfinite(la)
    np.testing.assert_allclose(la[fin], lb[fin], atol=atol, rtol=2e-3, err_msg=f"{what}: log-probs")
    np.testing.assert_allclose(a.tail, b.tail, atol=2e-3, err_msg=f"{what}: tail")
    # ids must agree except where the teacher has (near) ties, whose order the encoding may swap
    diff = a.ids != b.ids
    if diff.any():
        gaps = np.abs(np.diff(np.where(fin, lb, -1e9), axis=1))
        near_tie = np.zeros_like(diff)
        near_tie[:, 1:] |= gaps < 2 * atol
        near_tie[:, :-1] |= gaps < 2 * atol
        assert not (diff & ~near_tie).any(), f"{what}: top-k ids differ away from ties"


def assert_targets_close(a, b, atol: float = 1e-2) -> None:
    """``a`` and ``b`` equal up to the cache's float16 encoding of log-probs, tails and autocorr."""
    assert a.key == b.key
    _assert_topk_close(a.text, b.text, f"{a.key} text", atol)
    assert (a.visual is None) == (b.visual is None), f"{a.key}: visual presence differs"
    if a.visual is not None:
        _assert_topk_close(a.visual, b.visual, f"{a.key} visual", atol)
        np.testing.assert_allclose(a.autocorr, b.autocorr, atol=2e-3, err_msg=f"{a.key}: autocorr")
