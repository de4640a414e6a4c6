"""Running a cascade: first prepare each data split once (``ckd data prepare``, or reuse the current
prepared dataset; every fill and trainer step then opens that directory), then for every stage of
the plan make sure the teacher's cache is complete (reuse it, or start the teacher's servers, fill
it, stop them), then run the trainer's steps; finally evaluate the last stage's student. Before the
first stage and after each one it records the student's capacity gap to every teacher of the chain
whose cache is complete (``deploy.cascade.gaps``; summary.json and the last lines). Later
stages' caches do not depend on the student, so with disjoint teacher/training devices they are
filled while the current stage trains (``overlap``).

Every step leaves a completion marker (the trainer's atomic ``final/``, the cache's committed keys),
so re-running the command after a crash or Ctrl-C skips what is done and resumes what is not.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import sys
import threading
import time
from pathlib import Path

from ckd_common.config import to_argv
from deploy.cascade.caches import CacheCheck
from deploy.cascade.compute import measured
from deploy.cascade.config import CascadeConfig
from deploy.cascade.gaps import STORE as GAP_STORE
from deploy.cascade.gaps import CascadeGaps
from deploy.cascade.plan import Stage, Teacher, chain, plan
from deploy.cascade.supervise import CascadeError, Children, Stopped, stop_gracefully
from student_trainer.config import STEPS

SERVER_READY_TIMEOUT_S = 300


class Timeline:
    """``timeline.json``: what ran where, when, for how long, and whether it was done or reused."""

    def __init__(self, path: Path):
        self.path = path
        self.events: list[dict] = json.loads(path.read_text()) if path.is_file() else []
        self._lock = threading.Lock()

    def record(self, job: str, kind: str, devices, start: float, status: str, **extra) -> None:
        with self._lock:
            self.events.append({"job": job, "kind": kind, "devices": list(devices), "start": start, "end": time.time(),
                                "seconds": round(time.time() - start, 2), "status": status, **extra})
            _write_json(self.path, self.events, indent=1)


def _write_json(path: Path, obj, indent: int = 2) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=indent))
    tmp.replace(path)  # a Ctrl-C mid-write leaves the previous file, never half of one


def _python() -> list[str]:
    return [sys.executable, "-m"]


def _device_env(devices) -> tuple[dict, str]:
    """(environment, --device value) for a process that should see exactly ``devices``."""
    if devices[0].startswith("cuda"):
        return {"CUDA_VISIBLE_DEVICES": ",".join(d.split(":")[1] for d in devices)}, "cuda:0"
    return {"CUDA_VISIBLE_DEVICES": ""}, "cpu"


class Cascade:
    def __init__(self, cfg: CascadeConfig, log=print, children: Children | None = None):
        self.cfg = cfg
        self.run = Path(cfg.run_dir)
        self.log = log
        self.children = children or Children()
        self.caches = CacheCheck(cfg.data_of, cfg.images, self.data_for_cache)
        self.timeline: Timeline | None = None
        self.fill_lock = threading.Lock()  # one fill at a time (``ckd ablate`` points share one)
        self.prepared: dict[tuple[str, str, int], object] = {}  # (split, template, max_length) -> PreparedData
        self.gap_store = self.run / GAP_STORE  # ``ckd ablate`` points share one (deploy.cascade.gaps)
        # held while a training step runs or is found finished: ``ckd ablate`` running points side by side
        # gives every step directory one lock, so two points needing the same shared step compute it once
        self.step_lock = lambda out: contextlib.nullcontext()

    # -- data: each split prepared once per run, before any fill or training step ---------------

    def _data_key(self, step: str) -> tuple[str, str, int]:
        tc = self.cfg.train_config(step, self.cfg.student, self.run / "unused")
        return STEPS[step].split, STEPS[step].template, tc.max_length

    def prepare_data(self, stages: list[Stage]) -> None:
        from ckd_common.model import data_contract
        from ckd_common.prepared import PreparedData, PrepareSpec, default_root, open_current

        root = default_root()
        contract, _ = data_contract(self.cfg.student)  # every model of the cascade shares it (validated)
        for split, template, max_length in dict.fromkeys(self._data_key(s) for st in stages for s in st.steps):
            job = f"prepare:{split}"
            spec = PrepareSpec.of(self.cfg.data_of(split), self.cfg.images, template, contract, max_length)
            start = time.time()
            ds = open_current(spec, root)
            status = "reused" if ds is not None else "done"
            if ds is None:
                cmd = _python() + ["ckd_common", "data", "prepare", "--model", self.cfg.student, "--data",
                                   self.cfg.data_of(split), "--template", template, "--max-length", str(max_length),
                                   "--root", str(root), "--on-error", "skip", "--no-progress"]
                if self.cfg.images:
                    cmd += ["--images", self.cfg.images]
                self.log(f"[cascade] {job}: preparing {self.cfg.data_of(split)} ({template})")
                self.children.run(cmd, self.run / "logs" / f"prepare-{split}-{template}.log", what=f"{job}")
                ds = PreparedData(root / spec.dirname)
            left_out = sum(ds.skipped.values())
            self.log(f"[cascade] {job}: {'prepared' if status == 'done' else 'reusing'} {ds.path} ({len(ds)} samples"
                     + (f", {left_out} bad records left out: {ds.skipped}" if left_out else "") + ")")
            self.timeline.record(job, "prepare", ["cpu"], start, status, prepared=str(ds.path), template=template)
            self.prepared[(split, template, max_length)] = ds

    def data_for_step(self, step: str):
        return self.prepared[self._data_key(step)]

    def data_for_cache(self, split: str, template: str):
        """The prepared data a teacher's cache for (split, template) is filled from: that of the step that reads it."""
        step = next(s for s, spec in STEPS.items() if spec.uses_teacher and (spec.split, spec.template) == (split, template))
        return self.data_for_step(step)

    # -- caches --------------------------------------------------------------------------------

    def fill(self, teacher: Teacher, needs: tuple[tuple[str, str], ...]) -> None:
        """Make the teacher's cache complete for every (split, template) in ``needs``; servers are
        started only if something is missing."""
        with self.fill_lock:
            job = f"fill:{teacher.name}"
            complete, todo = [], []
            for split, template in needs:
                group = self.caches.complete_group(teacher, split, template)
                if group is not None:
                    complete.append(group)
                else:
                    todo.append((split, template))
            if not todo:
                for group in complete:
                    self.caches.check_teacher(teacher, group)  # fingerprinted once per run
                self.log(f"[cascade] {job}: cache {teacher.cache_root} complete; reusing it, no server started")
                self.timeline.record(job, "fill", teacher.devices, time.time(), "reused", cache=teacher.cache_root)
                return
            start = time.time()
            servers = self._start_servers(teacher)
            try:
                fingerprint = self._server_fingerprint(servers[0][1])
                self.caches.remember_fingerprint(teacher, fingerprint)
                for group in complete:  # the server knows its teacher: no need to load it here
                    self.caches.check_teacher(teacher, group, fingerprint)
                urls = [u for _, u in servers]
                for split, template in todo:
                    data = self.data_for_cache(split, template)
                    cmd = _python() + ["logit_cache", "fill", "--data", self.cfg.data_of(split), "--template", template,
                                       "--k", str(self.cfg.k), "--encoding", self.cfg.encoding, "--out",
                                       teacher.cache_root, "--no-progress", "--prepared", str(data.path),
                                       "--max-length", str(data.spec.max_length), *self.cfg.fill_args]
                    for u in urls:
                        cmd += ["--server", u]
                    if self.cfg.images:
                        cmd += ["--images", self.cfg.images]
                    self.log(f"[cascade] {job}: filling {split} ({template}) into {teacher.cache_root}")
                    self.children.run(cmd, self.run / "logs" / f"fill-{teacher.name}-{split}.log",
                                      what=f"logit_cache fill ({teacher.name}, {split})")
                    self._compact(teacher, split, template)
            finally:
                stop_gracefully(self.children, [p for p, _ in servers])
            self.timeline.record(job, "fill", teacher.devices, start, "done", cache=teacher.cache_root,
                                 splits=[s for s, _ in todo], servers=len(servers))

    def _compact(self, teacher: Teacher, split: str, template: str) -> None:
        """Merge the small segments a fill leaves (each writer's last one, those of interrupted
        runs) into large ones: fewer files and manifests for every later start to walk."""
        from logit_cache import find_group

        ds = self.caches.dataset(teacher, split, template)  # memoised: no second preparation
        group = find_group(teacher.cache_root, ds.fingerprint, ds.template)
        self.children.run(_python() + ["logit_cache", "-q", "compact", teacher.cache_root, group],
                          self.run / "logs" / f"compact-{teacher.name}-{split}.log",
                          what=f"logit_cache compact ({teacher.name}, {split})")

    @staticmethod
    def _server_fingerprint(url: str) -> str:
        from teacher_server.client import TeacherClient

        with TeacherClient(url) as client:
            return client.info().teacher_fingerprint

    def _start_servers(self, teacher: Teacher) -> list[tuple]:
        """One server replica per device; returns (process, URL) once every replica is ready."""
        from teacher_server.client import TeacherClient

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
            deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
            for p, port_file in servers:
                def alive(p=p) -> None:
                    if p.poll() is not None:
                        raise (Stopped if self.children.stop_signal else CascadeError)(
                            f"teacher server for {teacher.name} exited ({p.returncode}) before it was ready; "
                            f"see {self.run / 'logs'}")
                    if time.monotonic() > deadline:
                        raise CascadeError(f"teacher server for {teacher.name} not ready after "
                                           f"{SERVER_READY_TIMEOUT_S} s")

                while not (port_file.is_file() and port_file.read_text().strip()):  # the port is chosen at bind
                    alive()
                    time.sleep(0.2)
                url = f"http://127.0.0.1:{port_file.read_text().strip()}"
                with TeacherClient(url) as client:
                    client.wait_ready(max(0.0, deadline - time.monotonic()) + 1.0, poll_s=0.2, check=alive)
                ready.append((p, url))
            self.log(f"[cascade] teacher {teacher.name}: {len(ready)} server(s) ready on {list(teacher.devices)}")
            return ready
        except BaseException:
            stop_gracefully(self.children, [p for p, _ in servers])
            raise

    # -- training ------------------------------------------------------------------------------

    def train_stage(self, stage: Stage) -> None:
        model = stage.student_in
        for step in stage.steps:
            out = stage.step_out(step)
            with self.step_lock(out):
                model = self._train_step(stage, step, out, model)

    def _train_step(self, stage: Stage, step: str, out: Path, model: str) -> str:
        """Run one training step from ``model`` (or find it finished); returns the checkpoint it ends with."""
        from student_trainer.checkpoint import latest_resumable

        job = f"train:{stage.id}:{step}"
        if (out / "final" / "trainer_state.json").is_file():
            self.log(f"[cascade] {job}: already finished")
            return str(out / "final")
        env, _ = _device_env(self.cfg.train_devices)
        n_ranks = self.cfg.train_ranks
        resumed = latest_resumable(out) is not None
        uses_teacher = STEPS[step].uses_teacher
        tc = self.cfg.train_config(step, model, out, stage.teacher.cache_root if uses_teacher else None, resumed,
                                   prepared=str(self.data_for_step(step).path))
        launcher = _python()
        if n_ranks > 1:  # --standalone: the rendezvous picks its own free port
            launcher += ["torch.distributed.run", "--standalone", "--nproc_per_node", str(n_ranks), "-m"]
        cmd = launcher + ["student_trainer", "distill" if uses_teacher else "train", *to_argv(tc)]
        self.log(f"[cascade] {job}: {'resuming' if resumed else 'training'} on {self.cfg.train_devices}"
                 + (f" with teacher {stage.teacher.name}" if uses_teacher else ""))
        start = time.time()
        self.children.run(cmd, self.run / "logs" / f"{stage.id}-{step}.log", env, what=f"{job}")
        self.timeline.record(job, "train", self.cfg.train_devices, start, "resumed" if resumed else "done",
                             out=str(out))
        return str(out / "final")

    def evaluate(self, stage: Stage) -> dict | None:
        if not self.cfg.eval_data:
            return None
        out = self.run / "eval" / stage.id
        result = out / "synth" / "result.json"
        if not result.is_file():
            start = time.time()
            cmd = _python() + ["student_trainer", "eval", "run", "--bench", "synth", "--model", stage.final,
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

    def execute(self, stages: list[Stage] | None = None) -> dict:
        """Run the plan (or ``stages``: the plan with steps placed elsewhere, see ``plan.place_steps``)."""
        self.run.mkdir(parents=True, exist_ok=True)
        (self.run / "logs").mkdir(exist_ok=True)
        _write_json(self.run / "cascade.json", self.cfg.to_dict())
        self.timeline = Timeline(self.run / "timeline.json")
        stages = stages or plan(self.cfg)
        self.log(f"[cascade] {self.cfg.strategy}: " + " -> ".join(
            f"{s.id}({s.teacher.name if s.teacher else 'no teacher'})" for s in stages))
        t0 = time.time()
        pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fill")
        pending: dict[str, cf.Future] = {}
        gaps = CascadeGaps(self, stages, self.gap_store, *_device_env(self.cfg.train_devices))
        try:
            self.prepare_data(stages)
            for i, stage in enumerate(stages):
                if stage.teacher is not None:
                    fut = pending.pop(stage.teacher.name, None)
                    if fut is not None:
                        fut.result()
                    else:
                        self.fill(stage.teacher, stage.cache_needs)
                # caches of later stages do not depend on this stage's student: fill them meanwhile
                for later in stages[i + 1:]:
                    t = later.teacher
                    if self._overlappable(t) and t.name not in pending:
                        pending[t.name] = pool.submit(self.fill, t, later.cache_needs)
                if i == 0:
                    gaps.measure(0, busy=pending)
                self.train_stage(stage)
                gaps.measure(i + 1, busy=pending)
            for fut in pending.values():
                fut.result()
            gaps.measure(len(stages))  # every cache is complete now: whatever was left
            result = self.evaluate(stages[-1])
        except BaseException:
            self.children.stop()  # no new child starts from here on, in any thread
            for fut in pending.values():
                fut.cancel()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        compute = measured(stages)
        summary = {"strategy": self.cfg.strategy, "stages": [s.id for s in stages], "final": stages[-1].final,
                   "teacher_chain": chain(stages), "wall_s": round(time.time() - t0, 1), "eval": result,
                   **compute.to_dict(), "gap": gaps.summary()}
        _write_json(self.run / "summary.json", summary)
        self.log(f"[cascade] done in {summary['wall_s']} s ({compute.describe()}); final student {summary['final']}")
        for line in CascadeGaps.lines(summary["gap"]):
            self.log(f"[cascade] {line}")
        return summary


def run_cascade(config: str | Path | CascadeConfig, log=print) -> dict:
    """Validate, then run a cascade. Ctrl-C / SIGTERM (from the moment this starts) stop every child
    and raise KeyboardInterrupt; a re-run resumes."""
    children = Children()
    with children.stop_on_signals():
        cfg = config if isinstance(config, CascadeConfig) else CascadeConfig.from_yaml(config)
        cfg.validate()
        log("[cascade] resolved config:\n" + cfg.describe())
        return Cascade(cfg, log, children).execute()
