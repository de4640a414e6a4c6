"""`ckd ablate`: the grid config (validated against TrainConfig, every problem in one error), the
points and seeds, shared steps (content-addressed), the compute columns and the `repeat` control.
No process is started here; tests/test_ablate_integration.py runs real ablations."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from ckd_common.config import ConfigError, options
from deploy.ablate import AblateConfig, Ablation, Row, format_table
from deploy.cascade import STRATEGIES, CascadeConfig, plan, teacher_chain
from deploy.cascade.compute import extend_last_step, planned, planned_steps
from deploy.cascade.config import TRAIN_OPTIONS
from student_trainer.config import STEPS, TrainConfig

BASE_STEPS = {s: {"lr": 1.0e-3, "global_batch": 4, "micro_batch": 4} for s in STEPS}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from ckd_common.model import init_preset
    from ckd_common.synth import synthesize

    root = tmp_path_factory.mktemp("ablate")
    synthesize(root / "data", seed=3, n_pretrain=10, n_instruct=18, n_eval=5)
    for p in ("tiny-student", "tiny-ta", "tiny-teacher"):
        init_preset(p, root / "models" / p)
    return root


def _raw(**extra) -> dict:
    return {
        "run_dir": "runs/grid", "strategy": "single", "student": "models/tiny-student",
        "teachers": [{"name": "ta", "model": "models/tiny-ta"}, {"name": "teacher", "model": "models/tiny-teacher"}],
        "train": {"steps": BASE_STEPS},
        "data": {"pretrain": "data/pretrain.json", "instruct": "data/instruct.json", "images": "data/images",
                 "eval": "data/eval.jsonl"},
        "cache": {"root": "cache", "k": 8},
        **extra,
    }


def _config(env, **extra) -> AblateConfig:
    return AblateConfig.from_dict(_raw(**extra), base=env)


def test_a_grid_is_the_cartesian_product_of_its_axes_times_the_listed_points(env):
    cfg = _config(env, grid={"dft.beta": [0.5, 1.0], "distill.rel_variant": ["flat", "column"]},
                  points=[{"name": "a"}, {"name": "b", "dft.alpha": 2.0}], seeds=[0, 1]).validate()
    assert [p.name for p in cfg.points] == [
        f"{n},dft.beta={b},distill.rel_variant={r}" for n in "ab" for b in (0.5, 1.0) for r in ("flat", "column")]
    p = cfg.points[-1]
    assert p.overrides == {"dft.alpha": 2.0, "dft.beta": 1.0, "distill.rel_variant": "column"}
    pc = cfg.point_config(p, seed=1)
    # 'distill' = every step of the plan that reads the cache; the seed goes to every step of the plan
    assert pc.steps["dpt"]["rel_variant"] == pc.steps["dft"]["rel_variant"] == "column"
    assert "rel_variant" not in pc.steps["sft"] and pc.steps["dft"]["alpha"] == 2.0
    assert {pc.steps[s]["seed"] for s in ("dpt", "sft", "dft")} == {1}
    assert Path(pc.run_dir) == env / "runs" / "grid" / "points" / p.dirname / "seed1"
    assert pc.steps["sft"]["lr"] == 1.0e-3  # the base trainer options stay
    # strategies are a grid axis like any other
    cfg = _config(env, grid={"strategy": ["single", "repeat", "bottom-up"]}).validate()
    assert [(p.name, p.strategy) for p in cfg.points] == [("single", "single"), ("repeat", "repeat"),
                                                        ("bottom-up", "bottom-up")]


def test_every_problem_of_a_grid_is_reported_at_once(env):
    points = [{"name": "x", "dft.micro_batchs": 4, "sft.lr": "fast", "dft.model": "m", "xft.lr": 1.0, "beta": 1,
               "all.seed": 3},
              {"name": "y", "strategy": "sideways"},
              {"name": "z", "ft.epochs": 2, "match_steps": "nobody"},
              {"name": "w", "dft.global_batch": 6},
              {"name": "x"}]
    with pytest.raises(ConfigError) as e:
        _config(env, points=points, seeds=[0, 0]).validate()
    msg = str(e.value)
    for part in ("seeds must differ", "point name 'x' is used twice",
                 "point 'x': dft.micro_batchs: micro_batchs is not an option of the trainer; options are",
                 "point 'x': sft.lr: 'fast' is not float", "point 'x': dft.model: model is set by the cascade",
                 "point 'x': xft.lr: unknown steps 'xft'", "point 'x': beta: an override is '<steps>.<option>'",
                 "point 'x': all.seed: the seeds are given by 'seeds'", "point 'y': strategy 'sideways' is unknown",
                 "point 'z': ft.epochs: strategy single runs no ft step (its steps: dpt, sft, dft)",
                 "point 'z': match_steps: 'nobody' is not another point"):
        assert part in msg, part
    # the trainer's own validation of each point once its overrides are well-formed
    with pytest.raises(ConfigError, match="point 'w': train.steps.dft: global_batch 6 must be a multiple"):
        _config(env, points=[{"name": "w", "dft.global_batch": 6}]).validate()
    with pytest.raises(ConfigError, match="data.eval is required"):
        raw = _raw()
        del raw["data"]["eval"]
        AblateConfig.from_dict(raw, base=env).validate()
    with pytest.raises(ConfigError, match="seeds must be a non-empty list of integers"):
        _config(env, seeds=[])


def test_any_trainer_option_is_a_grid_axis(env):
    """Overrides are checked against TrainConfig itself, not a list: an option added to the trainer (the
    loss options of issue 15) is an axis as soon as it exists."""
    @dataclasses.dataclass
    class Wider(TrainConfig):
        temperature: float = dataclasses.field(default=1.0, metadata={"group": "loss"})

    assert "temperature" not in TRAIN_OPTIONS
    import deploy.ablate.config as ac
    import deploy.cascade.config as cc

    wider = tuple(o.name for o in options(Wider) if o.name not in cc.CASCADE_SETS)
    with pytest.MonkeyPatch.context() as mp:
        for mod in (ac, cc):
            mp.setattr(mod, "TRAIN_OPTIONS", wider)
            mp.setattr(mod, "TrainConfig", Wider)
        cfg = _config(env, grid={"dft.temperature": [1.0, 2.0]})
        assert cfg.problems() == []
        assert cfg.point_config(cfg.points[1], 0).train_config("dft", "m", "o", "c").temperature == 2.0
        msg = str(_config(env, points=[{"dft.temperature": "hot"}]).problems())
        assert "point 'dft.temperature=hot'" not in msg and "dft.temperature: 'hot' is not float" in msg


def test_points_share_identical_step_prefixes(env):
    """One DPT and SFT for all DFT variants of a seed; nothing shared across seeds; repeat's first stage
    is single's stage."""
    cfg = _config(env, grid={"dft.beta": [0.5, 1.0]}, points=[{"name": "kd"}], seeds=[0, 1]).validate()
    abl = Ablation(cfg, log=lambda *_: None)
    dirs = {(p.name, s): {st: str(stage.step_out(st)) for stage in abl.stages(cfg.point_config(p, s))
                          for st in stage.steps} for p in cfg.points for s in cfg.seeds}
    (a, b) = cfg.points
    for s in (0, 1):
        assert dirs[a.name, s]["dpt"] == dirs[b.name, s]["dpt"] and dirs[a.name, s]["sft"] == dirs[b.name, s]["sft"]
        assert dirs[a.name, s]["dft"] != dirs[b.name, s]["dft"]
    assert dirs[a.name, 0]["dpt"] != dirs[a.name, 1]["dpt"]
    assert all(Path(d).parent == cfg.steps_dir for v in dirs.values() for d in v.values())
    # each step starts from the previous step's final model
    stages = abl.stages(cfg.point_config(a, 0))
    assert stages[0].student_in == str(env / "models" / "tiny-student")

    cfg = _config(env, grid={"strategy": ["single", "repeat"]}).validate()
    abl = Ablation(cfg, log=lambda *_: None)
    single, repeat = (abl.stages(cfg.point_config(p, 0)) for p in cfg.points)
    assert [s.id for s in repeat] == ["r1-teacher", "r2-teacher"]
    assert repeat[0].step_dirs == single[0].step_dirs and repeat[1].student_in == single[0].final
    assert repeat[1].step_dirs != repeat[0].step_dirs


def test_top_down_in_a_grid_keeps_the_distilled_teachers_cache_with_it(env):
    cfg = _config(env, strategy="top-down").validate()
    stages = Ablation(cfg, log=lambda *_: None).stages(cfg.point_config(cfg.points[0], 0))
    distilled = stages[1].teacher
    assert distilled.model == stages[0].final and distilled.produced_by == stages[0].id
    assert Path(distilled.cache_root).parent == Path(stages[0].final).parent
    assert stages[1].student_in == str(env / "models" / "tiny-student")


def test_repeat_is_a_strategy_of_the_plan(env):
    raw = {**_raw(), "strategy": "repeat"}
    cfg = CascadeConfig.from_dict(raw, base=env).validate()
    assert [s.id for s in plan(cfg)] == ["r1-teacher", "r2-teacher"]
    assert all(s.teacher.name == "teacher" and s.steps == ("dpt", "sft", "dft") for s in plan(cfg))
    assert plan(cfg)[1].student_in == plan(cfg)[0].final
    assert teacher_chain(cfg) == "teacher -> student ; teacher -> student"
    assert STRATEGIES["repeat"].control and not any(STRATEGIES[s].control for s in ("none", "single", "bottom-up"))
    # as many stages as bottom-up with these teachers (at least two)
    raw["teachers"] = raw["teachers"] + [{"name": "big", "model": "models/tiny-teacher"}]
    assert len(plan(CascadeConfig.from_dict(raw, base=env))) == 3


def test_step_matched_control_takes_the_reference_points_optimizer_steps(env):
    cfg = _config(env, points=[{"name": "ckd", "strategy": "bottom-up"},
                               {"name": "baseline", "strategy": "none"},
                               {"name": "baseline-matched", "strategy": "none", "match_steps": "ckd"},
                               {"name": "kd-matched", "strategy": "single", "match_steps": "ckd"}]).validate()
    samples = cfg.samples()
    assert samples == {"pretrain": 10, "instruct": 18}
    total = {p.name: planned(pc := cfg.point_config(p, 0), plan(pc), samples) for p in cfg.points}
    # bottom-up: two stages of DPT (10 // 4 = 2 steps) + SFT (4) + DFT (4)
    assert total["ckd"].optimizer_steps == 2 * (2 + 4 + 4)
    assert total["ckd"].teacher_samples == 2 * (2 + 4) * 4
    assert total["baseline"].optimizer_steps == 2 + 4
    assert total["baseline-matched"].optimizer_steps == total["kd-matched"].optimizer_steps == 20
    pc = cfg.point_config(cfg.point("baseline-matched"), 0)
    assert pc.steps["ft"]["max_steps"] == 18 and pc.steps["ft"]["epochs"] == 5.0  # 4 steps per epoch
    per = planned_steps(pc, plan(pc), samples)
    assert per[("baseline", "pt")].optimizer_steps == 2 and per[("baseline", "ft")].optimizer_steps == 18
    with pytest.raises(ValueError, match="cannot match 1 optimizer steps"):
        extend_last_step(pc, plan(pc), samples, 1)


def test_the_table_shows_mean_std_over_seeds_and_the_compute():
    def result(acc):
        return {"bench": "synth", "score": sum(acc) / 2, "n": 40,
                "details": {"categories": {"colour": {"acc": acc[0], "n": 20}, "count": {"acc": acc[1], "n": 20}}}}

    a = Row.from_summaries("single", "teacher -> student", [
        {"eval": result((50.0, 70.0)), "optimizer_steps": 30, "teacher_samples": 480},
        {"eval": result((60.0, 80.0)), "optimizer_steps": 30, "teacher_samples": 480}])
    b = Row("none", "-", {}, extra={"gap": "1.23"})
    b.add(result((40.0, 40.0)), 12, 0)
    table = format_table([a, b])
    head, _, ra, rb = table.splitlines()
    assert head.split()[:9] == ["method", "teacher", "chain", "seeds", "opt", "steps", "teacher", "fwd", "colour"]
    assert "55.0 ± 7.1" in ra and "75.0 ± 7.1" in ra and "65.0 ± 7.1" in ra and " 30 " in ra and " 480 " in ra
    assert " 40.0 " in rb and "1.23" in rb and " 12 " in rb
    assert json.loads(json.dumps(a.to_dict()))["mean"]["avg"] == 65.0


def test_grid_yaml_round_trip(env, tmp_path):
    path = tmp_path / "grid.yaml"
    raw = _raw(grid={"dft.beta": [0.5, 1.0]}, seeds=[3, 4])
    raw["run_dir"] = str(env / "runs" / "yaml")
    for k in ("student",):
        raw[k] = str(env / raw[k])
    raw["teachers"] = [{**t, "model": str(env / t["model"])} for t in raw["teachers"]]
    raw["data"] = {k: str(env / v) for k, v in raw["data"].items()}
    path.write_text(yaml.safe_dump(raw))
    cfg = AblateConfig.from_yaml(path).validate()
    assert cfg.seeds == [3, 4] and len(cfg.points) == 2
    d = json.loads(cfg.describe())
    assert [p["overrides"] for p in d["points"]] == [{"dft.beta": 0.5}, {"dft.beta": 1.0}]


class _RecordingCascade:
    """Stands in for deploy.cascade.Cascade in ``Ablation.run_point``: walks the point's steps the way
    Cascade.train_stage does (under ``step_lock``, a step whose output exists is reused) and records who
    computed what. ``barrier``: every point waits there first, which only passes if they run side by side."""

    computed: list[str] = []
    barrier = None
    fail = None  # a point whose run directory contains this fails

    def __init__(self, cfg, log, children):
        self.cfg, self.children = cfg, children
        self.step_lock = lambda out: __import__("contextlib").nullcontext()

    def execute(self, stages):
        if self.fail and self.fail in str(self.cfg.run_dir):
            raise RuntimeError("point failed")
        type(self).barrier.wait(timeout=60)
        for stage in stages:
            for step in stage.steps:
                out = stage.step_out(step)
                with self.step_lock(out):
                    if not (out / "done").is_file():
                        type(self).computed.append(str(out))
                        out.mkdir(parents=True, exist_ok=True)
                        (out / "done").write_text("1")
        score = 10.0 * len(stages) + self.cfg.steps["dft"]["seed"]  # which point and seed produced it
        return {"strategy": self.cfg.strategy, "optimizer_steps": 3 * len(stages), "teacher_samples": 0,
                "eval": {"bench": "synth", "score": score, "n": 5}}


def test_points_run_side_by_side_and_a_shared_step_is_computed_once(env, monkeypatch, tmp_path):
    """workers=2: `single` and `repeat` (whose first stage is single's) run at the same time (both pass a
    2-party barrier), every shared step directory is computed by exactly one of them, and the table keeps
    the grid's order (points, seeds inside) whatever order they finish in."""
    import threading

    import deploy.ablate.run as run

    monkeypatch.setattr(run, "Cascade", _RecordingCascade)
    monkeypatch.setattr(_RecordingCascade, "computed", [])
    monkeypatch.setattr(_RecordingCascade, "barrier", threading.Barrier(2))
    cfg = _config(env, run_dir=str(tmp_path / "grid"), grid={"strategy": ["single", "repeat"]}, seeds=[0, 1]).validate()
    abl = Ablation(cfg, log=lambda *_: None, workers=2)
    report = abl.execute()
    assert [r.label for r in report["rows"]] == [p.name for p in cfg.points]
    assert [r.scores["synth"] for r in report["rows"]] == [[10.0, 11.0], [20.0, 21.0]]
    expected = {str(s.step_out(st)) for p in cfg.points for seed in cfg.seeds
                for s in abl.stages(cfg.point_config(p, seed)) for st in s.steps}
    assert sorted(_RecordingCascade.computed) == sorted(expected)  # each once: single's 3 + repeat's 2nd stage's 3
    assert len(expected) == 12  # per seed


def test_side_by_side_the_longest_points_start_first(env):
    """Side by side, a grid starts its longest runs first (planned optimizer steps; ties in grid order), so
    that no long point starts last and runs alone; one at a time it keeps grid order."""
    cfg = _config(env, grid={"strategy": ["none", "single", "bottom-up", "repeat"]}, seeds=[0, 1]).validate()
    runs = [(p, s) for p in cfg.points for s in cfg.seeds]
    order = Ablation(cfg, workers=2).start_order(runs)
    assert [(runs[i][0].strategy, runs[i][1]) for i in order] == [
        ("bottom-up", 0), ("bottom-up", 1), ("repeat", 0), ("repeat", 1), ("single", 0), ("single", 1),
        ("none", 0), ("none", 1)]
    assert Ablation(cfg, workers=1).start_order(runs) == list(range(len(runs)))


def test_a_failing_point_stops_the_others(env, monkeypatch, tmp_path):
    """The first failure is raised and the shared children are stopped: the other points start nothing more."""
    import threading

    import deploy.ablate.run as run

    monkeypatch.setattr(run, "Cascade", _RecordingCascade)
    monkeypatch.setattr(_RecordingCascade, "barrier", threading.Barrier(1))
    monkeypatch.setattr(_RecordingCascade, "fail", "repeat")
    cfg = _config(env, run_dir=str(tmp_path / "grid"), grid={"strategy": ["single", "repeat"]}).validate()
    abl = Ablation(cfg, log=lambda *_: None, workers=2)
    with pytest.raises(RuntimeError, match="point failed"):
        abl._run_all([(p, 0) for p in cfg.points])
    assert abl.children.stopping
    with pytest.raises(ValueError, match="workers"):
        Ablation(cfg, workers=0)
