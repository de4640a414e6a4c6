"""The typed config of ``ckd ablate GRID.yaml``: a cascade config (the base every point starts from),
the points of the grid and the seeds. Read from YAML, validated with every problem in one error
before anything starts, printed at start and saved as ``ablate.json`` in the run directory.

A grid YAML is a cascade YAML (``deploy/README.md``) plus::

    grid:                              # a cartesian product: every combination is a point
      dft.beta: [0.5, 1.0]
      distill.rel_variant: [flat, column]
    points:                            # and/or a list; with both, every point x every combination
      - {name: plain}
      - {name: no-visual, distill.gamma: 0, distill.delta: 0}
      - {name: kd-long, match_steps: ckd}   # run as many optimizer steps as point 'ckd'
    seeds: [0, 1]

An override ``<steps>.<option>`` sets a trainer option (any field of
``student_trainer.config.TrainConfig`` the cascade does not set itself, parsed like its command-line
option) on ``<steps>``: a step name of the point's plan (``dft``), ``distill`` (every step of the plan
that reads the teacher's cache) or ``all``. ``strategy`` (any of ``deploy.cascade.plan``) may vary
per point too. Each seed is the trainer's ``seed`` (data order) of every step; every point starts
from the same student checkpoint.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckd_common.config import CommandConfig, ConfigError, parse_value
from deploy.cascade.config import CASCADE_SETS, TRAIN_OPTIONS, CascadeConfig
from deploy.cascade.plan import STRATEGIES, plan
from student_trainer.config import STEPS, TrainConfig

ALL, DISTILL = "all", "distill"  # step selectors besides the step names
ABLATE_KEYS = ("grid", "points", "seeds")
POINT_KEYS = ("name", "strategy", "match_steps")  # the keys of a point that are not trainer overrides
DEFAULT_STRATEGY = "single"
_NAME = re.compile(r"[^A-Za-z0-9._,=+-]")


@dataclass(frozen=True)
class Point:
    """One point of the grid: a strategy and trainer overrides (``"<steps>.<option>": value``)."""

    name: str
    strategy: str
    overrides: dict[str, Any] = field(default_factory=dict)
    match_steps: str | None = None  # run as many optimizer steps as this other point (its last step extended)

    @property
    def dirname(self) -> str:
        return _NAME.sub("_", self.name)


def _point_name(given: str | None, combo: dict[str, Any]) -> str:
    parts = [str(v) if k == "strategy" else f"{k}={v}" for k, v in combo.items()]
    return ",".join(([given] if given else []) + parts) or "base"


@dataclass
class AblateConfig(CommandConfig):
    """The resolved configuration of one ablation (``ckd ablate GRID.yaml``)."""

    base: CascadeConfig
    points: list[Point]
    seeds: list[int]
    _samples: dict | None = field(default=None, repr=False, compare=False, metadata={"cli": False})

    # -- reading -------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path) -> AblateConfig:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"grid file {p} does not exist"], "ablate config")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"{p} is not valid YAML: {e}"], "ablate config") from None
        if not isinstance(raw, dict):
            raise ConfigError([f"{p}: expected a mapping at the top level"], "ablate config")
        return cls.from_dict(raw, base=p.parent)

    @classmethod
    def from_dict(cls, raw: dict, base: Path | None = None) -> AblateConfig:
        problems = []
        raw = dict(raw)
        grid, listed, seeds = raw.pop("grid", None) or {}, raw.pop("points", None), raw.pop("seeds", [0])
        raw.setdefault("strategy", DEFAULT_STRATEGY)
        raw.setdefault("run_dir", "runs/ablate")
        try:
            cascade = CascadeConfig.from_dict(raw, base=base)
        except ConfigError as e:
            problems += e.problems
            cascade = None
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            problems.append("grid must map each override to a non-empty list of values, e.g. {dft.beta: [0.5, 1.0]}")
            grid = {}
        if listed is None:
            listed = [{}]
        if not isinstance(listed, list) or not listed or not all(isinstance(p, dict) for p in listed):
            problems.append("points must be a non-empty list of mappings, e.g. [{name: a, dft.beta: 0.5}]")
            listed = [{}]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                               for s in seeds):
            problems.append(f"seeds must be a non-empty list of integers, got {seeds!r}")
            seeds = [0]
        if problems:
            raise ConfigError(problems, "ablate config")
        points = []
        for entry, values in itertools.product(listed, itertools.product(*grid.values())):
            combo = dict(zip(grid, values))
            over = {k: v for k, v in {**entry, **combo}.items() if k not in POINT_KEYS}
            strategy = str(combo.get("strategy", entry.get("strategy", cascade.strategy)))
            match = entry.get("match_steps")
            points.append(Point(_point_name(entry.get("name"), combo), strategy, over,
                                None if match is None else str(match)))
        return cls(base=cascade, points=points, seeds=list(seeds))

    # -- the points ----------------------------------------------------------------------------

    def point(self, name: str) -> Point:
        return next(p for p in self.points if p.name == name)

    def point_dir(self, point: Point, seed: int) -> Path:
        return Path(self.base.run_dir) / "points" / point.dirname / f"seed{seed}"

    @property
    def steps_dir(self) -> Path:
        """Every distinct training step of the ablation, named by what determines it (shared by points)."""
        return Path(self.base.run_dir) / "steps"

    def samples(self) -> dict[str, int]:
        from deploy.cascade.compute import samples_per_split

        if self._samples is None:
            self._samples = samples_per_split(self.base)
        return self._samples

    def point_config(self, point: Point, seed: int) -> CascadeConfig:
        """The cascade config of one run: the base, the point's strategy and overrides, the seed, and for a
        step-matched point its last step extended to the reference point's optimizer steps."""
        from deploy.cascade.compute import extend_last_step, planned

        cfg = self._with_overrides(point, seed)
        if point.match_steps is not None:
            ref = self._with_overrides(self.point(point.match_steps), seed)
            target = planned(ref, plan(ref), self.samples()).optimizer_steps
            steps = {k: dict(v) for k, v in cfg.steps.items()}
            for step, over in extend_last_step(cfg, plan(cfg), self.samples(), target).items():
                steps.setdefault(step, {}).update(over)
            cfg = dataclasses.replace(cfg, steps=steps)
        return cfg

    def _with_overrides(self, point: Point, seed: int) -> CascadeConfig:
        cfg = dataclasses.replace(self.base, strategy=point.strategy, run_dir=str(self.point_dir(point, seed)))
        steps = {k: dict(v) for k, v in self.base.steps.items()}
        planned_steps = _plan_steps(cfg)
        for key, value in point.overrides.items():
            selector, option = key.split(".", 1)
            for step in _select(selector, planned_steps):
                steps.setdefault(step, {})[option] = value
        for step in planned_steps:
            steps.setdefault(step, {})["seed"] = seed
        return dataclasses.replace(cfg, steps=steps)

    # -- validation ----------------------------------------------------------------------------

    def problems(self) -> list[str]:
        out = list(self.base.problems())  # paths, devices, models, the base trainer options: once
        if len(set(self.seeds)) != len(self.seeds):
            out.append(f"seeds must differ, got {self.seeds}")
        if self.base.eval_data is None:
            out.append("data.eval is required: ckd ablate evaluates every point on the held-out questions")
        names = [p.name for p in self.points]
        for n in sorted({n for n in names if names.count(n) > 1}):
            out.append(f"point name {n!r} is used twice; names must be unique")
        dirs = [p.dirname for p in self.points]
        if len(set(dirs)) != len(dirs) and len(set(names)) == len(names):
            out.append("two point names map to the same directory name; rename them")
        for p in self.points:
            own = self._point_problems(p)
            out += [f"point {p.name!r}: {x}" for x in own]
            if not own and not out:
                cfg = self.point_config(p, self.seeds[0])
                out += [f"point {p.name!r}: {x}" for x in cfg.problems(models=False)
                        if x not in out and f"point {p.name!r}: {x}" not in out]
        return out

    def _point_problems(self, p: Point) -> list[str]:
        out = []
        strategy = STRATEGIES.get(p.strategy)
        if strategy is None:
            return [f"strategy {p.strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}"]
        if len(self.base.teachers) < strategy.min_teachers:
            return [f"strategy {p.strategy} needs at least {strategy.min_teachers} teacher(s)"]
        planned_steps = _plan_steps(dataclasses.replace(self.base, strategy=p.strategy))
        for key, value in p.overrides.items():
            selector, dot, option = str(key).partition(".")
            if not dot:
                out.append(f"{key}: an override is '<steps>.<option>' (steps: a step name, {DISTILL} or {ALL}), "
                           f"e.g. dft.{key}")
                continue
            if option == "seed":
                out.append(f"{key}: the seeds are given by 'seeds', not per point")
            elif option not in TRAIN_OPTIONS:
                why = "is set by the cascade" if option in CASCADE_SETS else "is not an option of the trainer"
                out.append(f"{key}: {option} {why}; options are {', '.join(TRAIN_OPTIONS)}")
            else:
                try:
                    parse_value(TrainConfig, option, value)
                except ValueError as e:
                    out.append(f"{key}: {e}")
            if selector not in (ALL, DISTILL) and selector not in STEPS:
                out.append(f"{key}: unknown steps {selector!r}; use a step name ({', '.join(STEPS)}), {DISTILL} or "
                           f"{ALL}")
            elif not _select(selector, planned_steps):
                out.append(f"{key}: strategy {p.strategy} runs no {selector} step (its steps: "
                           f"{', '.join(planned_steps)})")
        if p.match_steps is not None:
            ref = next((q for q in self.points if q.name == p.match_steps), None)
            if ref is None or ref is p:
                out.append(f"match_steps: {p.match_steps!r} is not another point of the grid "
                           f"(points: {', '.join(q.name for q in self.points)})")
            elif ref.match_steps is not None:
                out.append(f"match_steps: point {ref.name!r} is itself step-matched; match a point that is not")
        return out

    def validate(self) -> AblateConfig:
        probs = self.problems()
        if probs:
            raise ConfigError(probs, "ablate config")
        return self

    def to_dict(self) -> dict:
        return {"base": self.base.to_dict(), "seeds": self.seeds,
                "points": [{"name": p.name, "strategy": p.strategy, "overrides": p.overrides,
                            "match_steps": p.match_steps, "dir": str(Path("points") / p.dirname)}
                           for p in self.points]}

    def describe(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


def _plan_steps(cfg: CascadeConfig) -> list[str]:
    """The distinct steps a config's plan runs, in order."""
    return list(dict.fromkeys(step for stage in plan(cfg) for step in stage.steps))


def _select(selector: str, planned_steps: list[str]) -> list[str]:
    if selector == ALL:
        return list(planned_steps)
    if selector == DISTILL:
        return [s for s in planned_steps if STEPS[s].uses_teacher]
    return [s for s in planned_steps if s == selector]


__all__ = ["AblateConfig", "Point", "ALL", "DISTILL"]
