"""The toolkit's public commands run as child processes and measured, for ``ckd selftest`` and
``bench/real_shapes.py``: a teacher server, a fill, a trainer step, the cache's bytes by array.

Everything goes through the commands a user types (``ckd data prepare``, ``teacher_server serve``,
``logit_cache fill``, ``student_trainer train|distill``, ``logit_cache ls|info``), so the rehearsal
keeps working while their internals change. Each child gets its own session and a high OOM score
(if memory runs out, the kernel ends the child being measured, not a neighbour), and its peak RSS is
read from ``wait4`` — the largest resident set of the child or any of its waited-for descendants.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

GIB = 2 ** 30


class ProbeError(RuntimeError):
    """A command of the pipeline failed (the message names it and the end of its log)."""


def visible_devices(devices: list[str]) -> str:
    """CUDA_VISIBLE_DEVICES for a child that should see ``devices`` (``cuda:N`` as this process numbers
    them, i.e. through its own CUDA_VISIBLE_DEVICES when that is set)."""
    mine = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    idx = [int(d.split(":")[1]) if ":" in d else 0 for d in devices]
    return ",".join(mine[i] if i < len(mine) else str(i) for i in idx)


def child_env(device: str | list[str], threads: int | None = None) -> dict:
    """The environment of a child on ``device`` (``cpu``; ``cuda`` = every GPU; ``cuda:N`` or a list of
    them = those GPUs only, renumbered from 0): offline, its own DeepSpeed build directory
    (docs/environment.md §2)."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    devices = [device] if isinstance(device, str) else list(device)
    if devices == ["cpu"]:
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif devices != ["cuda"]:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices(devices)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _preexec() -> None:  # in the child: first in line for the OOM killer
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


@dataclass
class Measured:
    cmd: list[str]
    rc: int
    seconds: float
    peak_rss_kib: int
    log: Path

    @property
    def peak_rss_gib(self) -> float:
        return self.peak_rss_kib * 1024 / GIB

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def last_line(self) -> str:
        return next((ln.strip() for ln in reversed(self.tail().splitlines()) if ln.strip()), "")

    def check(self, what: str) -> "Measured":
        if self.rc != 0:
            why = "killed (out of memory or time limit?)" if self.rc in (-9, 137) else f"exit code {self.rc}"
            raise ProbeError(f"{what} failed ({why}): {self.last_line()[:300]} (log {self.log})")
        return self


def run_measured(cmd: list[str], log: Path, env: dict, timeout_s: float | None = None) -> Measured:
    """Run ``cmd`` to the end (output to ``log``); wall time and peak RSS."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             start_new_session=True, preexec_fn=_preexec)
        try:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while True:
                pid, status, usage = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    os.killpg(p.pid, signal.SIGKILL)  # rc -9 below
                    deadline = None
                time.sleep(0.2)
        except BaseException:
            _kill_group(p)
            raise
    p.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
    return Measured(cmd, p.returncode, time.perf_counter() - t0, int(usage.ru_maxrss), log)


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        pass


# ---------------------------------------------------------------------------------------------
# teacher server
@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path
    device: str
    load_seconds: float

    def metric(self, name: str) -> float:
        from teacher_server.client import TeacherClient

        with TeacherClient(self.url) as c:
            m = re.search(rf"^{name} ([0-9.e+-]+)$", c.metrics(), re.M)
        return float(m.group(1)) if m else 0.0

    def info(self):
        from teacher_server.client import TeacherClient

        with TeacherClient(self.url) as c:
            return c.info()

    def stop(self, grace_s: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                _kill_group(self.proc)
        return self.proc.returncode


def start_server(model: Path, device: str, workdir: Path, env: dict, *extra: str, wait_s: float = 900.0) -> Server:
    """``teacher_server serve --device DEVICE`` on a free loopback port; returns once /readyz says the
    model is loaded. ``env`` must let it see ``device`` (child_env("cuda") for any GPU)."""
    from teacher_server.client import TeacherClient

    workdir.mkdir(parents=True, exist_ok=True)
    tag = device.replace(":", "")
    port_file, log = workdir / f"server-{tag}.port", workdir / f"server-{tag}.log"
    port_file.unlink(missing_ok=True)
    cmd = python("-m", "teacher_server", "serve", "--model", str(model), "--device", device, "--port", "0",
                 "--port-file", str(port_file), "--log-level", "warning", *extra)
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, preexec_fn=_preexec)

    def alive() -> None:
        if proc.poll() is not None:
            raise ProbeError(f"the teacher server on {device} exited ({proc.returncode}); log {log}:\n"
                             f"{log.read_text(errors='replace')[-3000:]}")

    try:
        deadline = time.monotonic() + wait_s
        while not port_file.exists():
            alive()
            if time.monotonic() > deadline:
                raise ProbeError(f"the teacher server on {device} wrote no port file in {wait_s:.0f}s; log {log}")
            time.sleep(0.2)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        with TeacherClient(url) as c:
            c.wait_ready(max(deadline - time.monotonic(), 1.0), poll_s=0.5, check=alive)
    except BaseException:
        _kill_group(proc)
        raise
    return Server(proc, url, log, device, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# the commands
def prepare(model: Path, data: Path, images: Path, template: str, log: Path, env: dict,
            timeout_s: float | None = None) -> tuple[Measured, float | None]:
    """``ckd data prepare``; returns the run and the build's records/s (its report line, else the last rate
    its progress bar printed; None if neither: a bar written to a file prints no rate)."""
    m = run_measured(python("-m", "ckd_common", "data", "prepare", "--model", str(model), "--data", str(data),
                            "--images", str(images), "--template", template), log, env,
                     timeout_s).check(f"ckd data prepare {data}")
    text = m.log.read_text(errors="replace")
    return m, build_rate(text) or progress_rate(text)


def build_rate(text: str) -> float | None:
    """Records/s of the build in ``ckd data prepare``'s report (``(N records in S s with W worker(s)``):
    the preparation alone, without the command's start-up."""
    m = re.search(r"\((\d+) records in ([0-9.]+) s with", text)
    return int(m.group(1)) / float(m.group(2)) if m and float(m.group(2)) > 0 else None


def progress_rate(text: str) -> float | None:
    """The last rate a tqdm bar printed (``123.4sample/s`` or ``2.5s/sample``)."""
    last = None
    for m in re.finditer(r"([0-9.]+)(s/[A-Za-z]+|[A-Za-z]+/s)\]", text):
        v, unit = float(m.group(1)), m.group(2)
        last = (1.0 / v if v else None) if unit.startswith("s/") else v
    return last


def fill(server_urls: list[str], data: Path, images: Path, template: str, k: int, cache: Path, log: Path,
         env: dict, timeout_s: float | None = None) -> Measured:
    cmd = python("-m", "logit_cache", "fill", *[a for u in server_urls for a in ("--server", u)], "--data", str(data),
                 "--images", str(images), "--template", template, "--k", str(k), "--out", str(cache),
                 "--no-progress")
    return run_measured(cmd, log, env, timeout_s).check(f"logit_cache fill {data}")


def train(step: str, model: Path, data: Path, images: Path, out: Path, log: Path, env: dict, *,
          cache: Path | None = None, global_batch: int = 1, micro_batch: int = 1, max_steps: int = 1,
          extra: tuple[str, ...] = (), launcher: tuple[str, ...] = (),
          timeout_s: float | None = None) -> tuple[Measured, list[dict]]:
    """One ``student_trainer`` run; returns it and its metrics.jsonl records."""
    from student_trainer.config import STEPS

    sub = "distill" if STEPS[step].uses_teacher else "train"
    cmd = [*(launcher or python()), "-m", "student_trainer", sub,
           "--step", step, "--model", str(model), "--data", str(data), "--images", str(images), "--out", str(out),
           "--global-batch", str(global_batch), "--micro-batch", str(micro_batch), "--max-steps", str(max_steps),
           "--num-workers", "0", "--no-progress", "--no-tensorboard",
           *(("--cache", str(cache)) if cache is not None else ()), *extra]
    m = run_measured(cmd, log, env, timeout_s)
    return m, read_metrics(out)


def read_metrics(out: Path) -> list[dict]:
    p = out / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


# ---------------------------------------------------------------------------------------------
# the cache's bytes, by array
@dataclass
class GroupBytes:
    name: str
    samples: int
    text_positions: int
    visual_positions: int
    num_visual_tokens: int
    arrays: dict[str, int] = field(default_factory=dict)  # array -> stored bytes over all segments

    @property
    def image_samples(self) -> int:
        return self.visual_positions // self.num_visual_tokens if self.num_visual_tokens else 0

    def kind(self, array: str) -> str:
        if array == "keys" or array.endswith("offsets"):
            return "index"
        return "text" if array.startswith("text") else "image"


def cache_bytes(root: Path, env: dict) -> list[GroupBytes]:
    """Stored bytes of every array of every group under ``root`` (``logit_cache ls`` / ``info`` for the
    counts; the arrays are the segment directories' children, whatever the format version names them)."""
    ls = subprocess.run(python("-m", "logit_cache", "ls", str(root)), capture_output=True, text=True, env=env)
    if ls.returncode != 0:
        raise ProbeError(f"logit_cache ls {root} failed: {ls.stderr[-2000:]}")
    out = []
    for line in ls.stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name or "UNREADABLE" in line:
            continue
        r = subprocess.run(python("-m", "logit_cache", "info", str(root), name), capture_output=True, text=True,
                           env=env)
        if r.returncode != 0:
            raise ProbeError(f"logit_cache info {root} {name} failed: {r.stderr[-2000:]}")
        info = json.loads(r.stdout)
        g = GroupBytes(name, int(info["samples"]), int(info["text_positions"]), int(info["visual_positions"]),
                       int(info["meta"].get("num_visual_tokens") or 0))
        for seg in sorted((root / name / "segments").iterdir()):
            if not seg.is_dir():
                continue
            for arr in seg.iterdir():
                if arr.is_dir():
                    size = sum(f.stat().st_size for f in arr.rglob("*") if f.is_file())
                    g.arrays[arr.name] = g.arrays.get(arr.name, 0) + size
        out.append(g)
    return out
