"""Running an ablation: every point x seed is a cascade (``deploy.cascade``: the same caches check,
fills, trainer steps, eval, timeline and summary) in ``points/<point>/seed<s>/``, with its training
steps placed by what determines them, so a step whose inputs are identical for several points
(the same starting model, trainer config and teacher cache: e.g. one DPT and SFT for all DFT
variants, or the first stage of ``repeat`` and ``single``) is computed once, in ``steps/``.

With ``workers`` > 1, that many points run side by side (threads, each point's children its own processes;
the longest start first): a teacher's cache is filled by the first point that needs it while the others wait
for it, and a shared step is computed by one point while the others wait for its checkpoint. The points
share the configured devices, so this is for devices that can be shared (the CPU demo on 2 cores); on GPUs
give each ablation its own.

Resumable like the cascade: a point whose ``summary.json`` was written for the same config is
skipped; an interrupted step resumes from its checkpoint; Ctrl-C stops every child and raises
KeyboardInterrupt (``ckd ablate`` exits 130).
"""
from __future__ import annotations

import functools
import hashlib
import json
import shutil
import threading
import time
from pathlib import Path

from deploy.ablate.config import AblateConfig, Point
from deploy.ablate.report import Row, write_report
from deploy.cascade.caches import CacheCheck, model_files_key
from deploy.cascade.config import CascadeConfig
from deploy.cascade.gaps import STORE as GAP_STORE
from deploy.cascade.gaps import GapStore
from deploy.cascade.plan import Stage, chain, place_steps, plan
from deploy.cascade.run import Cascade
from deploy.cascade.supervise import Children, side_by_side
from student_trainer.config import TrainConfig

# trainer options that do not change what a step computes (the trainer's own rule for --resume)
_NOT_IDENTITY = ("out", *TrainConfig.RESUME_FREE)


def step_key(cfg: CascadeConfig, stage: Stage, step: str, model_in: str, steps_dir: Path) -> str:
    """What determines a training step's result: its whole trainer config (model in, data, teacher cache,
    every option) and, for a step that starts from a checkpoint outside ``steps_dir`` (the student, a
    teacher being distilled), that checkpoint's files; a step inside is named by its own key already."""
    cache = stage.teacher.cache_root if stage.teacher else None
    tc = cfg.train_config(step, model_in, ".", cache).resolved().to_dict()
    ident = {k: v for k, v in tc.items() if k not in _NOT_IDENTITY}
    ident["model"] = str(Path(model_in).resolve())
    if ident.get("cache"):
        ident["cache"] = str(Path(ident["cache"]).resolve())
    if not Path(model_in).resolve().is_relative_to(steps_dir.resolve()):
        ident["model_files"] = model_files_key(model_in)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{step}-{digest}"


class Ablation:
    def __init__(self, cfg: AblateConfig, log=print, children: Children | None = None, workers: int = 1):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.cfg = cfg
        self.run = Path(cfg.base.run_dir)
        self.log = log
        self.children = children or Children()
        self.workers = workers
        self.caches = CacheCheck(cfg.base.data_of, cfg.base.images)  # data prepared, teachers fingerprinted once
        self.gap_store = GapStore(self.run / GAP_STORE)  # one store for the grid: a shared checkpoint is measured once
        self._fill_lock = threading.Lock()  # one fill at a time across the points; the next finds the cache complete
        self._step_locks: dict[Path, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def _step_lock(self, out: Path) -> threading.Lock:
        with self._locks_lock:
            return self._step_locks.setdefault(Path(out).resolve(), threading.Lock())

    def stages(self, pcfg: CascadeConfig) -> list[Stage]:
        """The point's plan, each step in ``steps/<step>-<key>``."""
        steps = self.cfg.steps_dir
        return place_steps(plan(pcfg), lambda st, step, model: steps / step_key(pcfg, st, step, model, steps))

    def run_point(self, point: Point, seed: int) -> dict:
        pcfg = self.cfg.point_config(point, seed)
        pdir = Path(pcfg.run_dir)
        saved, summary = pdir / "cascade.json", pdir / "summary.json"
        same = saved.is_file() and json.loads(saved.read_text()) == json.loads(json.dumps(pcfg.to_dict()))
        if same and summary.is_file():
            self.log(f"[ablate] {point.name} seed {seed}: already finished")
            return json.loads(summary.read_text())
        if saved.is_file() and not same:  # the grid changed this point: its steps are keyed, its eval is not
            self.log(f"[ablate] {point.name} seed {seed}: config changed; evaluating again")
            shutil.rmtree(pdir / "eval", ignore_errors=True)
            summary.unlink(missing_ok=True)
        self.log(f"[ablate] {point.name} seed {seed}: {pcfg.strategy} -> {pdir}")
        cascade = Cascade(pcfg, lambda m: self.log(f"  {m}"), self.children)
        cascade.caches = self.caches
        cascade.gap_store = self.gap_store
        cascade.fill_lock = self._fill_lock
        cascade.step_lock = self._step_lock
        return cascade.execute(self.stages(pcfg))

    def execute(self, title: str | None = None) -> dict:
        """Every point x seed (started in :meth:`start_order`), then the table (grid order, seeds inside) and
        plot. Returns the report: ``rows`` (deploy.ablate.report.Row, one per point), ``table``, the files
        written, ``wall_s``."""
        self.run.mkdir(parents=True, exist_ok=True)
        self.cfg.save(self.run / "ablate.json")
        t0 = time.time()
        runs = [(point, seed) for point in self.cfg.points for seed in self.cfg.seeds]
        summaries = iter(self._run_all(runs))  # in the order of runs: points, seeds inside
        rows = []
        for point in self.cfg.points:
            first = self.cfg.point_config(point, self.cfg.seeds[0])
            summaries_of = [next(summaries) for _ in self.cfg.seeds]
            rows.append(Row.from_summaries(point.name, chain(plan(first)), summaries_of))
        wall = round(time.time() - t0, 1)
        title = title or (f"ckd ablate: {len(self.cfg.points)} points x {len(self.cfg.seeds)} seed(s) "
                          f"(seeds {self.cfg.seeds}), accuracy (%) on the held-out questions")
        report = write_report(rows, self.run, title)
        self.log(report["table"])
        self.log(f"[ablate] done in {wall} s; table {report['md']}, plot {report['png']}")
        return {**report, "rows": rows, "wall_s": wall}

    def start_order(self, runs: list[tuple[Point, int]]) -> list[int]:
        """The order ``runs`` start in: grid order one at a time; side by side the longest first (planned
        optimizer steps, ties in grid order), so the last to start are short. The demo's student grid took
        314 s in grid order (its longest point, top-down, began last and ran alone at the end), 284 s
        longest first."""
        from deploy.cascade.compute import planned

        if self.workers == 1:
            return list(range(len(runs)))

        def cost(i: int) -> int:
            pcfg = self.cfg.point_config(*runs[i])
            return planned(pcfg, plan(pcfg), self.cfg.samples()).optimizer_steps

        return sorted(range(len(runs)), key=lambda i: -cost(i))  # stable: ties keep grid order

    def _run_all(self, runs: list[tuple[Point, int]]) -> list[dict]:
        """Every (point, seed), ``workers`` at a time (in :meth:`start_order`); the first failure stops the
        others. The summaries come back in the order of ``runs``."""
        order = self.start_order(runs)
        calls = [functools.partial(self.run_point, *runs[i]) for i in order]
        summaries: list[dict] = [{}] * len(runs)
        for i, summary in zip(order, side_by_side(self.children, calls, self.workers, name="point")):
            summaries[i] = summary
        return summaries


def run_ablation(config: str | Path | AblateConfig, log=print) -> dict:
    """Validate, then run an ablation. Ctrl-C / SIGTERM stop every child and raise KeyboardInterrupt;
    a re-run resumes."""
    children = Children()
    with children.stop_on_signals():
        cfg = config if isinstance(config, AblateConfig) else AblateConfig.from_yaml(config)
        cfg.validate()
        log("[ablate] resolved config:\n" + cfg.describe())
        return Ablation(cfg, log, children).execute()
