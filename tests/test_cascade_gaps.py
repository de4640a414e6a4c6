"""What a cascade records of the capacity gap (deploy.cascade.gaps), in-process: which checkpoints and
teachers, when a pair is due (lazily: checkpoint finished, cache complete, not being filled), the
store that makes a re-run measure nothing, the config switch and the summary lines. The real
measurements of a real cascade are in tests/test_cascade.py (integration)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from ckd_common.config import ConfigError
from deploy.cascade import CascadeConfig, plan
from deploy.cascade.gaps import CascadeGaps, GapStore, chain_teachers, checkpoints, gap_job, job_key, stored_gap


def _cfg(tmp_path: Path, strategy: str, **raw) -> CascadeConfig:
    return CascadeConfig.from_dict({
        "run_dir": "run", "strategy": strategy, "student": "student",
        "teachers": [{"name": "ta", "model": "ta"}, {"name": "teacher", "model": "teacher"}],
        "data": {"pretrain": "pretrain.json", "instruct": "instruct.json", "images": "images"},
        "train": {"steps": {"dft": {"holdout": 0.2}}}, **raw}, base=tmp_path)


def _model(path) -> str:
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / "config.json").write_text("{}")
    return str(path)


def test_checkpoints_and_chain_teachers_of_each_strategy(tmp_path):
    bu = plan(_cfg(tmp_path, "bottom-up"))
    assert [(label, m) for label, m, _ in checkpoints(bu)] == [
        ("before stage 1", str(tmp_path / "student")), ("after stage 1", bu[0].final), ("after stage 2", bu[1].final)]
    assert [(t.name, step) for t, step in chain_teachers(bu)] == [("ta", "dft"), ("teacher", "dft")]

    td = plan(_cfg(tmp_path, "top-down"))
    # the first stage trains the TA: the student after it is the untrained one
    assert [m for _, m, _ in checkpoints(td)] == [str(tmp_path / "student")] * 2 + [td[1].final]
    assert [t.name for t, _ in chain_teachers(td)] == ["teacher", "ta-distilled"]

    assert [t.name for t, _ in chain_teachers(plan(_cfg(tmp_path, "repeat")))] == ["teacher"]
    assert chain_teachers(plan(_cfg(tmp_path, "none"))) == []


def test_the_gap_is_measured_on_the_dft_data_template_and_holdout(tmp_path):
    cfg = _cfg(tmp_path, "single")
    job = gap_job(cfg, "cache/teacher", "dft", "m", 64)
    assert job == {"model": "m", "cache": "cache/teacher", "data": str(tmp_path / "instruct.json"),
                   "images": str(tmp_path / "images"), "template": "qwen2_base", "holdout": 0.2,
                   "max_samples": 64, "max_length": cfg.train_config("dft", "m", ".").resolved().max_length,
                   "device": "cpu"}


def test_config_turns_the_gap_off_and_checks_its_sample_cap(tmp_path):
    assert _cfg(tmp_path, "single").gap is True
    assert _cfg(tmp_path, "single", gap=False).gap is False
    c = _cfg(tmp_path, "single", gap={"enabled": True, "max_samples": None})
    assert (c.gap, c.gap_max_samples) == (True, None)
    assert any("gap.max_samples must be >= 1" in p for p in _cfg(tmp_path, "single", gap={"max_samples": 0}).problems())
    with pytest.raises(ConfigError, match="gap must be true/false"):
        _cfg(tmp_path, "single", gap={"enable": False})


def test_store_keys_on_the_checkpoint_files_not_the_device(tmp_path, monkeypatch):
    model = _model(tmp_path / "m")
    job = gap_job(_cfg(tmp_path, "single"), tmp_path / "cache", "dft", model, 8)
    store = GapStore(tmp_path / "gaps.json")
    store.put(job, {"kl_text": 1.5})
    assert GapStore(tmp_path / "gaps.json").get({**job, "device": "cuda:0"}) == {"kl_text": 1.5}
    monkeypatch.setattr("deploy.cascade.gaps.measure", lambda job: pytest.fail("measured a stored gap"))
    assert stored_gap(store, job) == {"kl_text": 1.5}
    key = job_key(job)
    (Path(model) / "model.safetensors").write_bytes(b"new weights")  # the checkpoint changed: measure again
    assert job_key(job) != key and store.get(job) is None
    monkeypatch.setattr("deploy.cascade.gaps.measure", lambda job: {"kl_text": 0.5})
    assert stored_gap(store, job) == {"kl_text": 0.5} and GapStore(store.path).get(job) == {"kl_text": 0.5}
    (tmp_path / "gaps.json").write_text("{not json")  # a damaged store costs a re-measurement only
    assert GapStore(tmp_path / "gaps.json").get(job) is None


class _FakeCascade:
    """What CascadeGaps reads of a Cascade; caches complete for the names in ``complete``."""

    def __init__(self, cfg, complete: set[str]):
        self.cfg, self.run, self.log = cfg, Path(cfg.run_dir), print
        self.caches = SimpleNamespace(complete_group=lambda t, split, template: t.name if t.name in complete else None)


def test_pairs_are_due_once_checkpoint_and_complete_cache_exist(tmp_path):
    cfg = _cfg(tmp_path, "bottom-up")
    stages = plan(cfg)
    _model(cfg.student)
    cascade = _FakeCascade(cfg, {"ta"})
    gaps = CascadeGaps(cascade, stages, tmp_path / "gaps.json", {}, "cpu")

    def due(done, busy=()):
        return [(Path(j["model"]).name if j["model"] == cfg.student else j["model"], Path(j["cache"]).name)
                for j in gaps.due(done, busy)]

    assert due(0) == [("student", "ta")]  # the Teacher's cache is not filled yet
    assert due(0, busy={"ta": None}) == []  # a fill in flight: not now
    assert due(1) == [("student", "ta")]  # stage 1 has not produced its student yet
    _model(stages[0].final)
    for job in gaps.due(1):
        gaps.store.put(job, {"kl_text": 2.0 if job["model"] == cfg.student else 1.0})
    assert due(1) == []
    cascade.caches = _FakeCascade(cfg, {"ta", "teacher"}).caches  # the Teacher's cache is complete now
    _model(stages[1].final)
    assert due(2) == [(stages[1].final, "ta"), ("student", "teacher"), (stages[0].final, "teacher"),
                      (stages[1].final, "teacher")]
    for job in gaps.due(2):
        gaps.store.put(job, {"error": "none of the 3 held-out samples has targets"} if "s2" in job["model"]
                       else {"kl_text": 3.0 if job["model"] == cfg.student else math.nan})
    summary = gaps.summary()
    assert [p["at"] for p in summary["teacher"]["points"]] == ["before stage 1", "after stage 1", "after stage 2"]
    assert summary["teacher"]["holdout"] == 0.2 and summary["teacher"]["template"] == "qwen2_base"
    assert json.loads(json.dumps(summary, allow_nan=True))["ta"]["points"][1]["kl_text"] == 1.0
    assert CascadeGaps.lines(summary) == [
        "gap to ta (kl_text): 2 before stage 1, 1 after stage 1, n/a after stage 2"
        "  [n/a: none of the 3 held-out samples has targets]",
        "gap to teacher (kl_text): 3 before stage 1, n/a after stage 1, n/a after stage 2"
        "  [n/a: none of the 3 held-out samples has targets]"]


def test_a_cascade_with_the_gap_off_measures_and_shows_nothing(tmp_path):
    cfg = _cfg(tmp_path, "single", gap=False)
    gaps = CascadeGaps(_FakeCascade(cfg, {"teacher"}), plan(cfg), tmp_path / "gaps.json", {}, "cpu")
    gaps.measure(1)  # would start a child if anything were due: nothing may be
    assert gaps.summary() is None and CascadeGaps.lines(None) == []
