"""The capacity gap a cascade records (issue 15.5, docs/design.md §4.8): the student against every
teacher of its chain, before the first stage and after each stage, so its summary shows whether a TA
stage shrank the gap to the Teacher:

  gap to teacher (kl_text): 2.31 before stage 1, 1.74 after stage 1, 0.92 after stage 2

Each number is ``student_trainer.gap.measure_gap`` of one student checkpoint against one teacher's
cache, on the held-out slice of the data that teacher's last distilling step reads (DFT: the
instruction split, its template, the step's ``holdout``), at most ``gap.max_samples`` samples.

*When*: lazily. A (checkpoint, teacher) pair is measured as soon as both exist: the checkpoint
finished and the teacher's cache complete (not while a fill of it is in flight), at the first of the
measuring points (before stage 1, after each stage) that follows. A cache filled later (the next
stage's, or top-down's distilled TA's) is measured against the earlier checkpoints then. Nothing here
starts a teacher server: it only reads complete caches.

*Where*: one child process per measuring point (``python -m deploy.cascade.gaps``) measuring every
pair due, on the training devices. The cascade process itself never touches a GPU (the teachers'
devices may be busy with an overlapped fill: teacher and student never share GPU memory), the
student's memory is released when the child exits, and Ctrl-C stops it like any other child. It
costs one Python start per stage boundary (seconds) against stages of minutes to days.

*Resumable*: every result is stored in ``gaps.json`` under a key of everything it depends on (the
checkpoint's files, the cache, the data, template, holdout, sample cap), so a re-run of a finished
cascade measures nothing, and ``ckd ablate`` shares one store between all its points (the untrained
student's gap is measured once per teacher for the whole grid). A failed measurement (e.g. an empty
held-out slice) is stored as its one-line error and shown as n/a; it never fails the cascade.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import threading
from pathlib import Path

from deploy.cascade.plan import STUDENT, Stage, Teacher
from student_trainer.config import STEPS

SHOWN_TERM = "kl_text"  # the term the cascade's last lines show (summary.json holds them all)
STORE = "gaps.json"


def checkpoints(stages: list[Stage]) -> list[tuple[str, str, str | None]]:
    """(label, student model, stage id) at each measuring point: before stage 1, then after each stage
    (a stage that trains a teacher, as top-down's first, leaves the student as it was)."""
    first = next(st for st in stages if st.learner == STUDENT)
    model = first.student_in
    out: list[tuple[str, str, str | None]] = [("before stage 1", model, None)]
    for i, st in enumerate(stages, 1):
        if st.learner == STUDENT:
            model = st.final
        out.append((f"after stage {i}", model, st.id))
    return out


def measured_step(steps) -> str:
    """The step whose data a teacher's gap is measured on: the last of ``steps`` that reads its cache (DFT)."""
    return [s for s in steps if STEPS[s].uses_teacher][-1]


def chain_teachers(stages: list[Stage]) -> list[tuple[Teacher, str]]:
    """Every teacher of the chain, in order of first use, with the step whose data its gap is measured on."""
    out: dict[str, tuple[Teacher, str]] = {}
    for st in stages:
        if st.teacher is not None and st.teacher.name not in out:
            out[st.teacher.name] = (st.teacher, measured_step(st.steps))
    return list(out.values())


def gap_job(cfg, cache_root: str | Path, step: str, model: str | Path, max_samples: int | None,
            device: str = "cpu") -> dict:
    """The arguments of ``measure_gap`` for ``model`` against the teacher whose cache is ``cache_root``: the
    data, template, holdout and max length of the cascade's ``step`` (the ones that cache was filled from
    and the student trained with)."""
    tc = cfg.train_config(step, model, ".", str(cache_root)).resolved()
    return {"model": str(model), "cache": str(cache_root), "data": cfg.data_of(STEPS[step].split),
            "images": cfg.images, "template": STEPS[step].template, "holdout": tc.holdout,
            "max_samples": max_samples, "max_length": tc.max_length, "device": device}


def job_key(job: dict) -> str:
    """What a gap depends on: the checkpoint's files, the cache, the data and how it is sliced."""
    from deploy.cascade.caches import model_files_key

    ident = {k: v for k, v in job.items() if k != "device"}
    for k in ("model", "cache", "data", "images"):
        if ident.get(k) and "://" not in str(ident[k]):
            ident[k] = str(Path(ident[k]).resolve())
    ident["model_files"] = model_files_key(job["model"])
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


class GapStore:
    """``gaps.json``: job key -> the gap (or its error); written atomically after every measurement."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.results: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except ValueError:  # a damaged store costs a re-measurement, nothing else
            self.results = {}

    def get(self, job: dict) -> dict | None:
        return self.results.get(job_key(job))

    def put(self, job: dict, result: dict) -> None:
        with self._lock:
            self.results[job_key(job)] = result
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.results, indent=1))
            tmp.replace(self.path)


def measure(job: dict) -> dict:
    """One gap, in this process: measure_gap's result, or ``{"error": one line}`` for a problem of the data
    or the cache (an empty held-out slice, missing targets), which the summary shows as n/a."""
    from ckd_common.data import DataError
    from ckd_common.kd.objective import KDObjective
    from ckd_common.model import ModelLoadError
    from student_trainer.gap import GapError, measure_gap

    try:
        return measure_gap(job["model"], job["cache"], job["data"], job["images"], template=job["template"],
                           holdout=job["holdout"], max_samples=job["max_samples"], max_length=job["max_length"],
                           objective=KDObjective(), device=job["device"])
    except (GapError, DataError, ModelLoadError) as e:
        return {"error": str(e).splitlines()[0]}


def stored_gap(store: GapStore, job: dict) -> dict:
    """The gap of ``job`` from ``store``, else measured here (in this process) and stored."""
    result = store.get(job)
    if result is None:
        result = measure(job)
        store.put(job, result)
    return result


class CascadeGaps:
    """The gaps of one cascade run (``Cascade.execute`` calls :meth:`measure` at each measuring point)."""

    def __init__(self, cascade, stages: list[Stage], store: Path | GapStore, env: dict, device: str):
        self.cascade = cascade
        self.cfg = cascade.cfg
        self.points = checkpoints(stages)
        self.teachers = chain_teachers(stages)
        self.store = store if isinstance(store, GapStore) else GapStore(store)
        self.env, self.device = env, device

    def _job(self, teacher: Teacher, step: str, model: str) -> dict:
        return gap_job(self.cfg, teacher.cache_root, step, model, self.cfg.gap_max_samples, self.device)

    def _cache_complete(self, teacher: Teacher, step: str) -> bool:
        return self.cascade.caches.complete_group(teacher, STEPS[step].split, STEPS[step].template) is not None

    def due(self, done: int, busy=()) -> list[dict]:
        """Jobs measurable now and not stored: checkpoints up to after stage ``done``, teachers whose cache
        is complete and not being filled (``busy``: names of teachers with a fill in flight)."""
        jobs = []
        for teacher, step in self.teachers:
            if teacher.name in busy or not self._cache_complete(teacher, step):
                continue
            for _, model, _ in self.points[:done + 1]:
                job = self._job(teacher, step, model)
                if Path(model, "config.json").is_file() and self.store.get(job) is None and job not in jobs:
                    jobs.append(job)
        return jobs

    def measure(self, done: int, busy=()) -> None:
        """Measure, in one child process on the training devices, every gap due after stage ``done``
        (0: before stage 1). A child that fails is reported and the cascade goes on."""
        import time

        from deploy.cascade.supervise import CascadeError, Stopped

        if not self.cfg.gap:
            return
        jobs = self.due(done, busy)
        if not jobs:
            return
        name = "before-stage-1" if done == 0 else f"after-stage-{done}"
        run = Path(self.cascade.run)
        jobs_file, out_file = run / "logs" / f"gap-{name}.jobs.json", run / "logs" / f"gap-{name}.out.json"
        jobs_file.write_text(json.dumps(jobs, indent=1))
        out_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "deploy.cascade.gaps", "--jobs", str(jobs_file), "--out", str(out_file)]
        self.cascade.log(f"[cascade] gap:{name}: measuring {len(jobs)} student/teacher pair(s) on the held-out slice")
        start = time.time()
        try:
            self.cascade.children.run(cmd, run / "logs" / f"gap-{name}.log", self.env, what=f"gap {name}")
        except Stopped:
            raise
        except CascadeError as e:
            self.cascade.log(f"[cascade] gap:{name}: measurement failed, going on without it: {e}")
            return
        for job, result in zip(jobs, json.loads(out_file.read_text())):
            self.store.put(job, result)
        self.cascade.timeline.record(f"gap:{name}", "gap", self.cfg.train_devices, start, "done", pairs=len(jobs))

    def summary(self) -> dict | None:
        """Per teacher: what was measured on which data, and the gap at each measuring point."""
        if not self.cfg.gap:
            return None
        out = {}
        for teacher, step in self.teachers:
            first = self._job(teacher, step, self.points[0][1])
            entry = {"cache": first["cache"], "data": first["data"], "template": first["template"],
                     "holdout": first["holdout"], "max_samples": first["max_samples"], "points": []}
            for label, model, stage in self.points:
                result = self.store.get(self._job(teacher, step, model))
                if result is not None:
                    entry["points"].append({"at": label, "stage": stage, "model": model, **result})
            out[teacher.name] = entry
        return out

    @staticmethod
    def lines(summary: dict | None, term: str = SHOWN_TERM) -> list[str]:
        """``gap to <teacher> (kl_text): 2.31 before stage 1, 1.74 after stage 1, ...`` per teacher."""
        out = []
        for name, entry in (summary or {}).items():
            parts = []
            for p in entry["points"]:
                v = p.get(term)
                shown = "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"
                parts.append(f"{shown} {p['at']}")
            errors = sorted({p["error"] for p in entry["points"] if "error" in p})
            line = f"gap to {name} ({term}): " + (", ".join(parts) or "not measured (its cache was never complete)")
            out.append(line + (f"  [n/a: {'; '.join(errors)}]" if errors else ""))
        return out


def main(argv: list[str] | None = None) -> int:
    """The measuring child: every job of ``--jobs`` (a JSON list of gap_job dicts), results to ``--out``."""
    ap = argparse.ArgumentParser(prog="python -m deploy.cascade.gaps", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from ckd_common.model import quiet_transformers

    quiet_transformers()
    results = []
    for job in json.loads(args.jobs.read_text()):
        results.append(measure(job))
        shown = results[-1].get("error") or f"{SHOWN_TERM} {results[-1][SHOWN_TERM]:.4f}"
        print(f"gap {job['model']} -> {job['cache']}: {shown}", flush=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results))
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
