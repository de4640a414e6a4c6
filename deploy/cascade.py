"""``ckd cascade CONFIG.yaml``: a whole cascade (student <- TA <- Teacher) from one config.

For every stage it starts the teacher server(s) as child processes on the teacher's devices, waits
for ``/readyz``, fills the caches the stage needs (or reuses a cache group that already holds every
sample for the same teacher, tokenizer, template and data), stops the servers, and runs the trainer
on the training devices. Caches of later stages do not depend on the student, so with disjoint
teacher/training devices they are filled while the current stage trains (``overlap``).

Every step leaves a completion marker (the trainer's atomic ``final/``, the cache's committed keys),
so re-running the command after a crash or Ctrl-C skips what is done and resumes what is not.
Children run in their own process groups, die with this process (PR_SET_PDEATHSIG) and are killed
on exit; none outlives the command.

Strategies:
  bottom-up  CKD: student <- teachers[0] (TA), then <- teachers[1] (Teacher), ...; each DPT->SFT->DFT
  top-down   teachers[-1] distils teachers[-2] first (DPT->SFT->DFT), the distilled TA then serves
             the student
  single     plain LLaVA-KD: student <- teachers[-1]
  none       TinyLLaVA baseline: PT -> FT, no teacher
"""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ckd_common.config import ConfigError

STRATEGIES = ("bottom-up", "top-down", "single", "none")
DISTILL_STEPS = ("dpt", "sft", "dft")
BASELINE_STEPS = ("pt", "ft")
STEP_DATA = {"pt": "pretrain", "dpt": "pretrain", "ft": "instruct", "sft": "instruct", "dft": "instruct"}
STEP_TEMPLATE = {"pretrain": "pretrain", "instruct": "qwen2_base"}
TRAIN_OVERRIDES = ("lr", "global_batch", "micro_batch", "epochs", "max_steps", "warmup_ratio", "weight_decay",
                   "alpha", "beta", "gamma", "delta", "chunk_size", "seed")


# ---------------------------------------------------------------------------------------------
# config


@dataclass
class TeacherSpec:
    name: str
    model: str
    devices: list[str] = field(default_factory=lambda: ["cpu"])


@dataclass
class CascadeConfig:
    """The resolved configuration of one cascade (``ckd cascade CONFIG.yaml``)."""

    run_dir: str
    strategy: str
    student: str
    pretrain_data: str
    instruct_data: str
    images: str | None = None
    eval_data: str | None = None              # a synth-style eval.jsonl (held-out questions)
    teachers: list[TeacherSpec] = field(default_factory=list)
    train_devices: list[str] = field(default_factory=lambda: ["cpu"])
    cache_root: str = "cache"
    k: int = 64
    encoding: str = "f16"
    zero_stage: int = 1
    overlap: bool = True
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-step trainer overrides
    server_args: list[str] = field(default_factory=list)
    fill_args: list[str] = field(default_factory=list)
    eval_batch_size: int = 16

    @classmethod
    def from_yaml(cls, path: str | Path) -> "CascadeConfig":
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {p} does not exist"], "cascade config")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"{p} is not valid YAML: {e}"], "cascade config") from None
        return cls.from_dict(raw, base=p.parent)

    @classmethod
    def from_dict(cls, raw: dict, base: Path | None = None) -> "CascadeConfig":
        """Nested YAML layout -> flat config. Relative paths resolve against ``base`` (the YAML's folder)."""
        problems = []
        known = {"run_dir", "strategy", "student", "teachers", "train", "data", "cache", "overlap", "server",
                 "fill", "eval"}
        unknown = sorted(set(raw) - known)
        if unknown:
            problems.append(f"unknown top-level keys {unknown}; known: {sorted(known)}")

        def rel(v):
            if v is None or base is None or "://" in str(v) or Path(v).is_absolute():
                return None if v is None else str(v)
            return str(base / v)

        data, train, cache = raw.get("data") or {}, raw.get("train") or {}, raw.get("cache") or {}
        teachers = []
        for i, t in enumerate(raw.get("teachers") or []):
            if not isinstance(t, dict) or "model" not in t:
                problems.append(f"teachers[{i}] needs at least 'model' (and 'name', 'devices')")
                continue
            teachers.append(TeacherSpec(str(t.get("name") or Path(t["model"]).name), rel(t["model"]),
                                        [str(d) for d in t.get("devices", ["cpu"])]))
        student = raw.get("student")
        if isinstance(student, dict):
            student = student.get("model")
        if problems:
            raise ConfigError(problems, "cascade config")
        steps = {k: dict(v or {}) for k, v in (train.get("steps") or {}).items()}
        return cls(
            run_dir=rel(raw.get("run_dir", "runs/cascade")), strategy=str(raw.get("strategy", "")),
            student=rel(student), pretrain_data=rel(data.get("pretrain")), instruct_data=rel(data.get("instruct")),
            images=rel(data.get("images")), eval_data=rel(data.get("eval")), teachers=teachers,
            train_devices=[str(d) for d in train.get("devices", ["cpu"])],
            cache_root=rel(cache.get("root", "cache")), k=int(cache.get("k", 64)),
            encoding=str(cache.get("encoding", "f16")), zero_stage=int(train.get("zero_stage", 1)),
            overlap=bool(raw.get("overlap", True)), steps=steps,
            server_args=[str(a) for a in (raw.get("server") or {}).get("args", [])],
            fill_args=[str(a) for a in (raw.get("fill") or {}).get("args", [])],
            eval_batch_size=int((raw.get("eval") or {}).get("batch_size", 16)),
        )

    # -- validation ----------------------------------------------------------------------------

    def problems(self) -> list[str]:
        out = []
        if self.strategy not in STRATEGIES:
            out.append(f"strategy {self.strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}")
        need = {"single": 1, "bottom-up": 1, "top-down": 2}.get(self.strategy, 0)
        if len(self.teachers) < need:
            out.append(f"strategy {self.strategy} needs at least {need} teacher(s), got {len(self.teachers)}")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            out.append(f"teacher names must be unique, got {names}")
        for label, p in [("student", self.student), ("data.pretrain", self.pretrain_data),
                         ("data.instruct", self.instruct_data)] + [(f"teacher {t.name}", t.model) for t in self.teachers]:
            if p is None:
                out.append(f"{label} is required")
            elif label.startswith("data"):
                if not Path(p).is_file():
                    out.append(f"{label}: file {p} does not exist")
            elif not (Path(p) / "config.json").is_file():
                out.append(f"{label}: {p} is not a model directory (no config.json)")
        for label, p in (("data.images", self.images), ("data.eval", self.eval_data)):
            if p is not None and not Path(p).exists():
                out.append(f"{label}: {p} does not exist")
        for who, devs in [("train", self.train_devices)] + [(f"teacher {t.name}", t.devices) for t in self.teachers]:
            out += [f"{who}: {p}" for p in device_problems(devs)]
        if self.k < 1:
            out.append(f"cache.k must be >= 1, got {self.k}")
        if self.encoding not in ("f16", "q8"):
            out.append(f"cache.encoding must be f16 or q8, got {self.encoding!r}")
        if not 0 <= self.zero_stage <= 3:
            out.append(f"train.zero_stage must be 0..3, got {self.zero_stage}")
        for step, ov in self.steps.items():
            if step not in DISTILL_STEPS + BASELINE_STEPS:
                out.append(f"train.steps: unknown step {step!r}; steps are {DISTILL_STEPS + BASELINE_STEPS}")
            bad = sorted(set(ov) - set(TRAIN_OVERRIDES))
            if bad:
                out.append(f"train.steps.{step}: unknown overrides {bad}; allowed {list(TRAIN_OVERRIDES)}")
        if not out:
            out += self._model_compat_problems()
        return out

    def _model_compat_problems(self) -> list[str]:
        """Every model must share tokenizer, vision config and visual-token count with the student:
        otherwise a cached target lines up with nothing."""
        ref = _model_signature(self.student)
        out = []
        for t in self.teachers:
            sig = _model_signature(t.model)
            for fld in ("tokenizer_hash", "vision", "num_visual_tokens"):
                if sig[fld] != ref[fld]:
                    shown = (sig[fld], ref[fld]) if fld != "vision" else ("(differs)", "(student's)")
                    out.append(f"teacher {t.name} ({t.model}): {fld} {shown[0]} != student's {shown[1]}")
        return out

    def validate(self) -> "CascadeConfig":
        probs = self.problems()
        if probs:
            raise ConfigError(probs, "cascade config")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def device_problems(devices: list[str]) -> list[str]:
    """'cpu', 'cpu:N' (a simulated separate CPU device: same cores, scheduled as distinct) or 'cuda:N'."""
    out = []
    if not devices:
        return ["no devices given"]
    n_cuda = None
    for d in devices:
        kind, _, idx = d.partition(":")
        if kind == "cpu" and (not idx or idx.isdigit()):
            continue
        if kind == "cuda" and idx.isdigit():
            if n_cuda is None:
                import torch

                n_cuda = torch.cuda.device_count()
            if int(idx) >= n_cuda:
                out.append(f"device {d} does not exist ({n_cuda} CUDA device(s) visible)")
            continue
        out.append(f"device {d!r} is not 'cpu', 'cpu:N' or 'cuda:N'")
    kinds = {d.partition(":")[0] for d in devices}
    if len(kinds) > 1:
        out.append(f"devices mix CPU and CUDA: {devices}")
    return out


def _model_signature(model_dir: str) -> dict:
    from transformers import AutoTokenizer

    from ckd_common.tokenizer import tokenizer_hash

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    vc = cfg.get("vision_config", {})
    n = (vc.get("image_size", 0) // max(1, vc.get("patch_size", 1))) ** 2
    n -= 1 if cfg.get("vision_feature_select_strategy") == "default" else 0
    vision = {k: vc.get(k) for k in ("hidden_size", "image_size", "patch_size", "num_hidden_layers",
                                     "intermediate_size", "num_attention_heads")}
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return {"tokenizer_hash": tokenizer_hash(tok), "vision": vision, "num_visual_tokens": n}


# ---------------------------------------------------------------------------------------------
# plan


@dataclass
class Teacher:
    """A teacher as a stage sees it: a fixed checkpoint, or the output of an earlier stage."""

    name: str
    model: str
    devices: list[str]
    cache_root: str
    produced_by: str | None = None


@dataclass
class Stage:
    id: str
    student_in: str                # model directory the stage starts from (may be produced earlier)
    teacher: Teacher | None
    out: str
    steps: tuple[str, ...]

    @property
    def final(self) -> str:
        return str(Path(self.out) / self.steps[-1] / "final")


def plan(cfg: CascadeConfig) -> list[Stage]:
    run = Path(cfg.run_dir)
    static = {t.name: Teacher(t.name, t.model, t.devices, str(Path(cfg.cache_root) / t.name)) for t in cfg.teachers}
    if cfg.strategy == "none":
        return [Stage("baseline", cfg.student, None, str(run / "stages" / "baseline"), BASELINE_STEPS)]
    if cfg.strategy == "single":
        t = static[cfg.teachers[-1].name]
        return [Stage(f"kd-{t.name}", cfg.student, t, str(run / "stages" / f"kd-{t.name}"), DISTILL_STEPS)]
    if cfg.strategy == "bottom-up":
        stages, model = [], cfg.student
        for i, spec in enumerate(cfg.teachers, 1):
            st = Stage(f"s{i}-{spec.name}", model, static[spec.name], str(run / "stages" / f"s{i}-{spec.name}"),
                       DISTILL_STEPS)
            stages.append(st)
            model = st.final
        return stages
    # top-down: the largest distils the next one down, which (distilled) serves the next, ... the student
    chain = list(reversed(cfg.teachers))  # largest first
    stages: list[Stage] = []
    teacher = static[chain[0].name]
    for i, spec in enumerate(chain[1:], 1):
        sid = f"td{i}-{teacher.name}-to-{spec.name}"
        st = Stage(sid, spec.model, teacher, str(run / "stages" / sid), DISTILL_STEPS)
        stages.append(st)
        # a distilled teacher is new weights: its cache lives with the run, not the shared root
        teacher = Teacher(f"{spec.name}-distilled", st.final, spec.devices, str(run / "cache" / sid), sid)
    sid = f"td{len(chain)}-{teacher.name}-to-student"
    stages.append(Stage(sid, cfg.student, teacher, str(run / "stages" / sid), DISTILL_STEPS))
    return stages


# ---------------------------------------------------------------------------------------------
# child processes


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class Children:
    """Every child process this command started; all are killed when the command ends."""

    def __init__(self):
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def popen(self, cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        f = open(log, "ab")
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, **(env or {})}, start_new_session=True,
                             preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        f.close()
        with self._lock:
            self._procs.add(p)
        return p

    def forget(self, p: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(p)

    def run(self, cmd: list[str], log: Path, env: dict | None = None, what: str = "") -> None:
        p = self.popen(cmd, log, env)
        try:
            rc = p.wait()
        finally:
            self.forget(p)
        if rc != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise CascadeError(f"{what or cmd[2]} failed (exit {rc}); last lines of {log}:\n    " + "\n    ".join(tail))

    def kill_all(self, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        with self._lock:
            procs = list(self._procs)
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.time() + grace
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


class CascadeError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# running


class Timeline:
    def __init__(self, path: Path):
        self.path = path
        self.events: list[dict] = json.loads(path.read_text()) if path.is_file() else []
        self._lock = threading.Lock()
        self.t0 = time.time()

    def record(self, job: str, kind: str, devices: list[str], start: float, status: str, **extra) -> None:
        with self._lock:
            self.events.append({"job": job, "kind": kind, "devices": devices, "start": start, "end": time.time(),
                                "seconds": round(time.time() - start, 2), "status": status, **extra})
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.events, indent=1))
            tmp.replace(self.path)


def _python() -> list[str]:
    return [sys.executable, "-m"]


def _device_env(devices: list[str]) -> tuple[dict, str]:
    """(environment, --device value) for a process that should see exactly ``devices``."""
    if devices[0].startswith("cuda"):
        return {"CUDA_VISIBLE_DEVICES": ",".join(d.split(":")[1] for d in devices)}, "cuda:0"
    return {"CUDA_VISIBLE_DEVICES": ""}, "cpu"


class Cascade:
    def __init__(self, cfg: CascadeConfig, log=print):
        self.cfg = cfg
        self.run = Path(cfg.run_dir)
        self.log = log
        self.children = Children()
        self.timeline: Timeline | None = None
        self._fill_lock = threading.Lock()  # one fill at a time per teacher device set

    # -- caches --------------------------------------------------------------------------------

    def _dataset(self, teacher_model: str, split: str):
        from ckd_common.data import prepare_file
        from ckd_common.model import num_visual_tokens

        from transformers import AutoConfig, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(teacher_model, local_files_only=True)
        mcfg = AutoConfig.from_pretrained(teacher_model, local_files_only=True)
        data = self.cfg.pretrain_data if split == "pretrain" else self.cfg.instruct_data
        return prepare_file(data, tok, STEP_TEMPLATE[split], num_visual_tokens(mcfg), mcfg.image_token_id,
                            self.cfg.images, on_error="skip")

    def cache_complete(self, teacher: Teacher, split: str) -> bool:
        """True when the teacher's cache root already holds every sample of ``split`` for this
        exact teacher (weights fingerprint), tokenizer and template."""
        from logit_cache import GroupNotFoundError, find_group, open_group

        from ckd_common.model import load_vlm, model_fingerprint

        if not Path(teacher.model, "config.json").is_file():
            return False
        ds = self._dataset(teacher.model, split)
        try:
            group = open_group(teacher.cache_root, find_group(teacher.cache_root, ds.fingerprint, ds.template))
        except (GroupNotFoundError, FileNotFoundError):
            return False
        if not {s.key for s in ds.samples} <= group.committed_keys():
            return False
        import torch

        # the server hashes the weights as it loaded them: bf16 on CUDA, fp32 on CPU
        dtype = torch.bfloat16 if teacher.devices[0].startswith("cuda") else torch.float32
        model, _ = load_vlm(teacher.model, dtype=dtype)
        if group.meta.teacher_fingerprint != model_fingerprint(model):
            raise CascadeError(f"cache {teacher.cache_root} holds targets of a different '{teacher.name}' "
                               f"(fingerprint {group.meta.teacher_fingerprint} != {model_fingerprint(model)}); "
                               f"point cache.root elsewhere or delete it")
        return True

    def fill(self, teacher: Teacher) -> None:
        """Fill both splits' caches for ``teacher`` (servers started only if something is missing)."""
        with self._fill_lock:
            todo = [s for s in ("pretrain", "instruct") if not self.cache_complete(teacher, s)]
            job = f"fill:{teacher.name}"
            if not todo:
                self.log(f"[cascade] {job}: cache {teacher.cache_root} complete; reusing it, no server started")
                self.timeline.record(job, "fill", teacher.devices, time.time(), "reused", cache=teacher.cache_root)
                return
            start = time.time()
            servers = self._start_servers(teacher)
            try:
                urls = [u for _, u in servers]
                for split in todo:
                    data = self.cfg.pretrain_data if split == "pretrain" else self.cfg.instruct_data
                    cmd = _python() + ["logit_cache", "fill", "--data", data, "--template", STEP_TEMPLATE[split],
                                       "--k", str(self.cfg.k), "--encoding", self.cfg.encoding, "--out",
                                       teacher.cache_root, "--no-progress", *self.cfg.fill_args]
                    for u in urls:
                        cmd += ["--server", u]
                    if self.cfg.images:
                        cmd += ["--images", self.cfg.images]
                    self.log(f"[cascade] {job}: filling {split} ({STEP_TEMPLATE[split]}) into {teacher.cache_root}")
                    self.children.run(cmd, self.run / "logs" / f"fill-{teacher.name}-{split}.log",
                                      what=f"logit_cache fill ({teacher.name}, {split})")
            finally:
                self._stop_servers(servers)
            self.timeline.record(job, "fill", teacher.devices, start, "done", cache=teacher.cache_root,
                                 splits=todo, servers=len(servers))

    def _start_servers(self, teacher: Teacher) -> list[tuple[subprocess.Popen, str]]:
        """One server replica per device; returns (process, URL) once every replica is ready."""
        import httpx

        servers = []
        try:
            for i, dev in enumerate(teacher.devices):
                env, device = _device_env([dev])
                port_file = self.run / "logs" / f"server-{teacher.name}-{i}.port"
                port_file.unlink(missing_ok=True)
                cmd = _python() + ["teacher_server", "serve", "--model", teacher.model, "--device", device,
                                   "--port", "0", "--port-file", str(port_file), *self.cfg.server_args]
                p = self.children.popen(cmd, self.run / "logs" / f"server-{teacher.name}-{i}.log", env)
                servers.append((p, port_file))
            ready = []
            deadline = time.time() + 300
            for p, port_file in servers:
                while True:
                    if p.poll() is not None:
                        raise CascadeError(f"teacher server for {teacher.name} exited ({p.returncode}) before it "
                                           f"was ready; see {self.run / 'logs'}")
                    if time.time() > deadline:
                        raise CascadeError(f"teacher server for {teacher.name} not ready after 300 s")
                    if port_file.is_file() and port_file.read_text().strip():
                        url = f"http://127.0.0.1:{port_file.read_text().strip()}"
                        try:
                            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                                ready.append((p, url))
                                break
                        except httpx.HTTPError:
                            pass
                    time.sleep(0.2)
            self.log(f"[cascade] teacher {teacher.name}: {len(ready)} server(s) ready on {teacher.devices}")
            return ready
        except BaseException:
            self._stop_servers([(p, "") for p, _ in servers])
            raise

    def _stop_servers(self, servers) -> None:
        for p, _ in servers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)  # graceful: finishes in-flight batches
        for p, _ in servers:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            self.children.forget(p)

    # -- training ------------------------------------------------------------------------------

    def train_stage(self, stage: Stage) -> None:
        from student_trainer.checkpoint import latest_resumable

        model = stage.student_in
        env, _ = _device_env(self.cfg.train_devices)
        n_ranks = len(self.cfg.train_devices) if self.cfg.train_devices[0].startswith("cuda") else 1
        for step in stage.steps:
            out = Path(stage.out) / step
            job = f"train:{stage.id}:{step}"
            if (out / "final" / "trainer_state.json").is_file():
                self.log(f"[cascade] {job}: already finished")
                model = str(out / "final")
                continue
            split = STEP_DATA[step]
            data = self.cfg.pretrain_data if split == "pretrain" else self.cfg.instruct_data
            launcher = (["torchrun", "--nproc_per_node", str(n_ranks), "-m"] if n_ranks > 1 else _python())
            sub = ["distill", "--cache", stage.teacher.cache_root] if step in ("dpt", "dft") else ["train"]
            cmd = launcher + ["student_trainer", *sub, "--step", step, "--model", model, "--data", data,
                              "--out", str(out), "--zero-stage", str(self.cfg.zero_stage), "--no-progress",
                              "--no-tensorboard"]
            if self.cfg.images:
                cmd += ["--images", self.cfg.images]
            for k, v in self.cfg.steps.get(step, {}).items():
                cmd += [f"--{k.replace('_', '-')}", str(v)]
            resumed = latest_resumable(out) is not None
            if resumed:
                cmd.append("--resume")
            self.log(f"[cascade] {job}: {'resuming' if resumed else 'training'} on {self.cfg.train_devices}"
                     + (f" with teacher {stage.teacher.name}" if step in ("dpt", "dft") else ""))
            start = time.time()
            self.children.run(cmd, self.run / "logs" / f"{stage.id}-{step}.log", env, what=f"{job}")
            self.timeline.record(job, "train", self.cfg.train_devices, start, "resumed" if resumed else "done",
                                 out=str(out))
            model = str(out / "final")

    def evaluate(self, stage: Stage) -> dict | None:
        if not self.cfg.eval_data:
            return None
        out = self.run / "eval" / stage.id
        result = out / "synth" / "result.json"
        if not result.is_file():
            start = time.time()
            cmd = _python() + ["student_trainer.eval", "run", "--bench", "synth", "--model", stage.final,
                               "--data-root", str(Path(self.cfg.eval_data).parent), "--out", str(out),
                               "--batch-size", str(self.cfg.eval_batch_size), "--no-progress", "--device", "cpu"]
            self.log(f"[cascade] eval:{stage.id}: synth benchmark")
            self.children.run(cmd, self.run / "logs" / f"eval-{stage.id}.log", what=f"eval {stage.id}")
            self.timeline.record(f"eval:{stage.id}", "eval", ["cpu"], start, "done")
        return json.loads(result.read_text())

    # -- the whole thing -----------------------------------------------------------------------

    def _overlappable(self, teacher: Teacher | None) -> bool:
        if teacher is None or teacher.produced_by is not None or not self.cfg.overlap:
            return False
        return not set(teacher.devices) & set(self.cfg.train_devices)

    def execute(self) -> dict:
        self.run.mkdir(parents=True, exist_ok=True)
        (self.run / "logs").mkdir(exist_ok=True)
        (self.run / "cascade.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
        self.timeline = Timeline(self.run / "timeline.json")
        stages = plan(self.cfg)
        self.log(f"[cascade] {self.cfg.strategy}: " + " -> ".join(
            f"{s.id}({s.teacher.name if s.teacher else 'no teacher'})" for s in stages))
        t0 = time.time()
        pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fill")
        pending: dict[str, cf.Future] = {}
        try:
            for i, stage in enumerate(stages):
                if stage.teacher is not None:
                    fut = pending.pop(stage.teacher.name, None)
                    if fut is not None:
                        fut.result()
                    else:
                        self.fill(stage.teacher)
                # caches of later stages do not depend on this stage's student: fill them meanwhile
                for later in stages[i + 1:]:
                    t = later.teacher
                    if self._overlappable(t) and t.name not in pending:
                        pending[t.name] = pool.submit(self.fill, t)
                self.train_stage(stage)
            for fut in pending.values():
                fut.result()
            results = {s.id: self.evaluate(s) for s in stages[-1:]}
        except BaseException:
            self.children.kill_all()
            for fut in pending.values():
                fut.cancel()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        summary = {"strategy": self.cfg.strategy, "stages": [s.id for s in stages], "final": stages[-1].final,
                   "teacher_chain": teacher_chain(self.cfg), "wall_s": round(time.time() - t0, 1),
                   "eval": results.get(stages[-1].id)}
        (self.run / "summary.json").write_text(json.dumps(summary, indent=2))
        self.log(f"[cascade] done in {summary['wall_s']} s; final student {summary['final']}")
        return summary


def teacher_chain(cfg: CascadeConfig) -> str:
    names = [t.name for t in cfg.teachers]
    if cfg.strategy == "none":
        return "-"
    if cfg.strategy == "single":
        return f"{names[-1]} -> student"
    if cfg.strategy == "bottom-up":
        return " ; ".join(f"{n} -> student" for n in names)
    return " -> ".join(reversed(names)) + " -> student"


def run_cascade(config: str | Path | CascadeConfig, log=print) -> dict:
    cfg = config if isinstance(config, CascadeConfig) else CascadeConfig.from_yaml(config)
    cfg.validate()
    log("[cascade] resolved config:\n" + json.dumps(cfg.to_dict(), indent=2))
    cascade = Cascade(cfg, log)
    # Ctrl-C and SIGTERM: stop children first, then leave; a re-run resumes
    def _on_sigterm(signum, frame):
        raise KeyboardInterrupt

    prev = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return cascade.execute()
    finally:
        signal.signal(signal.SIGTERM, prev)
