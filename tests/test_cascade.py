"""`ckd cascade`: config validation, the plan, and real cascades on tiny models (servers, fills,
DeepSpeed trainer and eval all started as child processes). Each test asks for the runs it needs
through module fixtures, so any selection (-k) or order runs them."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ckd_common.config import ConfigError, from_args, to_argv
from deploy.cascade import STRATEGIES, CascadeConfig, CascadeError, plan, teacher_chain
from proctree import alive, descendants

# holdout 0.3: ~4 of the 12 instruction samples are never trained on (the gap's held-out slice; which
# ones: a hash of the sample key), the rest are: two steps of 4. No warm-up: with two steps the first
# would have lr 0. DFT is pure KD (alpha 0) at a larger lr, as in test_gap: the distilled student
# measurably closer to its teacher, which the cascade's gap records must show.
STEPS = {s: {"lr": 1.0e-3, "global_batch": 4, "micro_batch": 4, "max_steps": 2, "warmup_ratio": 0.0, "holdout": 0.3}
         for s in ("pt", "ft", "dpt", "sft", "dft")}
STEPS["dft"].update(lr=3.0e-3, alpha=0.0)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_models):
    from ckd_common.synth import synthesize

    root = tmp_path_factory.mktemp("cascade")
    synthesize(root / "data", seed=1, n_pretrain=12, n_instruct=12, n_eval=5)
    for p in ("tiny-student", "tiny-ta", "tiny-teacher"):  # the session's presets, copied: never changed in place
        shutil.copytree(tiny_models[p], root / "models" / p)
    return root


def _config(env: Path, run: str, strategy: str, teachers=("ta", "teacher"), **extra) -> Path:
    models = {"ta": "tiny-ta", "teacher": "tiny-teacher"}
    cfg = {
        "run_dir": f"runs/{run}", "strategy": strategy, "student": "models/tiny-student",
        "teachers": [{"name": t, "model": f"models/{models[t]}", "devices": ["cpu:0"]} for t in teachers],
        "train": {"devices": ["cpu:1"], "steps": STEPS},
        "data": {"pretrain": "data/pretrain.json", "instruct": "data/instruct.json", "images": "data/images",
                 "eval": "data/eval.jsonl"},
        "cache": {"root": "cache", "k": 8},
        "server": {"args": ["--torch-threads", "1"]},
        **extra,
    }
    path = env / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _ckd(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy", *args], capture_output=True, text=True, **kw)


def _events(env: Path, run: str) -> list[dict]:
    return json.loads((env / "runs" / run / "timeline.json").read_text())


# ---------------------------------------------------------------------------------------------
# config and plan (no process started)


@pytest.mark.integration
def test_invalid_config_lists_every_problem_before_starting(env, tmp_path):
    other = tmp_path / "other-tok"
    from ckd_common.model import init_preset
    from ckd_common.tokenizer import save_tiny_tokenizer

    init_preset("tiny-ta", other)
    save_tiny_tokenizer(other, ["a completely different corpus"], vocab_size=300)  # another tokenizer
    cfg = yaml.safe_load(_config(env, "bad", "bottom-up").read_text())
    cfg["teachers"][0]["model"] = str(other)
    cfg["teachers"][1]["devices"] = ["tpu:0"]
    cfg["data"]["pretrain"] = "data/missing.json"
    with pytest.raises(ConfigError) as e:
        CascadeConfig.from_dict({**cfg, "strategy": "sideways"}, base=env).validate()
    msg = str(e.value)
    assert "strategy 'sideways' is unknown" in msg
    assert "data.pretrain: file" in msg and "missing.json does not exist" in msg
    assert "teacher teacher: device 'tpu:0'" in msg
    # model compatibility is checked once the paths are right
    cfg["data"]["pretrain"] = "data/pretrain.json"
    cfg["teachers"][1]["devices"] = ["cpu"]
    with pytest.raises(ConfigError, match="teacher ta .*tokenizer_hash .* != student's"):
        CascadeConfig.from_dict(cfg, base=env).validate()
    # through the CLI: one error listing everything, nothing started, no run directory
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**cfg, "strategy": "sideways", "run_dir": str(tmp_path / "never")}))
    r = _ckd("cascade", str(bad), cwd=env)
    assert r.returncode == 2 and "strategy 'sideways' is unknown" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "never").exists()


def test_trainer_options_are_checked_when_the_config_is_validated(env):
    """Per-step overrides are TrainConfig fields: a misspelt or renamed option, a value of the wrong type
    or one the trainer would refuse fails validation, naming the option — not a trainer mid-run."""
    def problems(steps: dict, strategy="bottom-up") -> str:
        raw = yaml.safe_load(_config(env, "opts", strategy).read_text())
        raw["train"]["steps"] = steps
        with pytest.raises(ConfigError) as e:
            CascadeConfig.from_dict(raw, base=env).validate()
        return str(e.value)

    msg = problems({"dpt": {"micro_batchs": 4}, "sft": {"lr": "fast", "on_missing": "skip"}, "dft": {"model": "x"},
                    "xft": {}})
    assert "train.steps.dpt.micro_batchs is not an option of the trainer; options are " in msg
    assert ", micro_batch, " in msg.split("micro_batchs", 1)[1]  # the valid ones are listed
    assert "train.steps.sft.lr: 'fast' is not float" in msg
    assert "train.steps.sft.on_missing: step sft reads no teacher cache" in msg
    assert "train.steps.dft.model is set by the cascade" in msg
    assert "train.steps: unknown step 'xft'; steps are pt, ft, dpt, sft, dft" in msg
    # the trainer's own validation of every planned step, before anything starts
    msg = problems({"dpt": {"global_batch": 6, "micro_batch": 4}, "sft": {"beta": 1.0}})
    assert "train.steps.dpt: global_batch 6 must be a multiple of micro_batch 4" in msg
    assert "train.steps.sft: beta=1.0: step sft has no teacher" in msg
    # how many teachers a strategy needs comes from the plan's table
    raw = yaml.safe_load(_config(env, "opts", "top-down", teachers=("teacher",)).read_text())
    with pytest.raises(ConfigError, match=f"needs at least {STRATEGIES['top-down'].min_teachers} teacher"):
        CascadeConfig.from_dict(raw, base=env).validate()


def test_the_trainer_command_line_is_its_typed_config(env):
    """What the cascade starts parses, with the trainer's own parser, back to the TrainConfig it built."""
    from student_trainer.cli import build_parser
    from student_trainer.config import STEPS as TABLE
    from student_trainer.config import TrainConfig

    raw = yaml.safe_load(_config(env, "argv", "bottom-up").read_text())
    raw["train"]["steps"]["dft"] = {"lr": "1e-3", "adam_betas": [0.8, 0.99], "group_by_length": False,
                                    "on_missing": "skip"}
    cfg = CascadeConfig.from_dict(raw, base=env).validate()
    for stage in plan(cfg):
        for step in stage.steps:
            tc = cfg.train_config(step, stage.student_in, stage.step_out(step), stage.teacher.cache_root, resume=True)
            command = "distill" if TABLE[step].uses_teacher else "train"
            assert from_args(TrainConfig, build_parser().parse_args([command, *to_argv(tc)])) == tc
            assert tc.data == Path(cfg.data_of(TABLE[step].split)) and not tc.progress and tc.zero_stage == 1
    assert (tc.lr, tc.adam_betas, tc.group_by_length, tc.on_missing) == (1e-3, (0.8, 0.99), False, "skip")


def test_plans_for_each_strategy(env):
    def ids(strategy):
        return [(s.id, s.teacher.name if s.teacher else None, s.steps)
                for s in plan(CascadeConfig.from_yaml(_config(env, "p", strategy)))]

    assert ids("none") == [("baseline", None, ("pt", "ft"))]
    assert ids("single") == [("kd-teacher", "teacher", ("dpt", "sft", "dft"))]
    assert [i[:2] for i in ids("bottom-up")] == [("s1-ta", "ta"), ("s2-teacher", "teacher")]
    assert [i[:2] for i in ids("top-down")] == [("td1-teacher-to-ta", "teacher"),
                                              ("td2-ta-distilled-to-student", "ta-distilled")]
    td = plan(CascadeConfig.from_yaml(_config(env, "p", "top-down")))
    assert td[1].teacher.model == td[0].final  # the distilled TA serves the student
    assert td[0].cache_needs == (("pretrain", "pretrain"), ("instruct", "qwen2_base"))  # DPT's and DFT's data
    chains = {s: teacher_chain(CascadeConfig.from_yaml(_config(env, "p", s))) for s in STRATEGIES}
    assert chains == {"none": "-", "single": "teacher -> student", "bottom-up": "ta -> student ; teacher -> student",
                      "top-down": "teacher -> ta -> student", "repeat": "teacher -> student ; teacher -> student"}


# ---------------------------------------------------------------------------------------------
# real cascades (shared by the tests below: each fixture runs once per module, on demand)
# Whichever test asks first pays for the fixtures' cascades (a few minutes each on 2 busy cores), so
# each of these tests gets a generous pytest timeout; the cascades themselves need no timeout of
# their own (pytest-timeout interrupts subprocess.run, which then kills the cascade).
CASCADES_S = 2400  # bottom-up (+ single) cascade fixtures
INTERRUPTED_S = 3600  # ... + an interrupted cascade and its resumption


@pytest.fixture(scope="module")
def bottom_up_run(env):
    """The bottom-up cascade: fills the TA's and the Teacher's caches under cache/."""
    r = _ckd("cascade", str(_config(env, "bu", "bottom-up")), cwd=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r, _events(env, "bu")


@pytest.fixture(scope="module")
def single_run(env, bottom_up_run):
    """A single-teacher cascade after the bottom-up one: the Teacher's cache is already complete."""
    r = _ckd("cascade", str(_config(env, "single", "single", teachers=("teacher",))), cwd=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r, _events(env, "single")


@pytest.mark.integration
@pytest.mark.timeout(CASCADES_S)
def test_bottom_up_end_to_end_then_rerun_is_a_no_op(env, bottom_up_run):
    _, ev = bottom_up_run
    jobs = [e["job"] for e in ev if e["kind"] != "prepare"]
    assert jobs[0] == "fill:ta" and "fill:teacher" in jobs
    assert [j for j in jobs if j.startswith("train")] == [
        f"train:{s}:{st}" for s in ("s1-ta", "s2-teacher") for st in ("dpt", "sft", "dft")]
    # one server per teacher, started and stopped (its log ends with the graceful shutdown)
    for t in ("ta", "teacher"):
        log = (env / "runs" / "bu" / "logs" / f"server-{t}-0.log").read_text()
        assert "Application startup complete" in log and "Finished server process" in log
    # every fill is followed by `logit_cache compact`: the fill's writers' segments become one per group
    assert len(list((env / "runs" / "bu" / "logs").glob("compact-*.log"))) == 4
    for group in (env / "cache").glob("*/*/zarr.json"):
        assert len(list(group.parent.glob("manifests/*.json"))) == 1, group.parent
    # the final student loads with plain transformers
    final = env / "runs" / "bu" / "stages" / "s2-teacher" / "dft" / "final"
    code = ("from transformers import LlavaForConditionalGeneration as L; import sys;"
            f"L.from_pretrained({str(final)!r}); assert 'ckd_common' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    summary = json.loads((env / "runs" / "bu" / "summary.json").read_text())
    assert summary["eval"]["bench"] == "synth" and 0 <= summary["eval"]["score"] <= 100

    # re-running a finished cascade only reports (the gaps too: read from its store, not measured again)
    r = _ckd("cascade", str(_config(env, "bu", "bottom-up")), cwd=env)
    assert r.returncode == 0, r.stderr[-3000:]
    new = _events(env, "bu")[len(ev):]
    assert all(e["status"] == "reused" and e["kind"] in ("prepare", "fill") for e in new), new
    assert "already finished" in r.stdout
    assert json.loads((env / "runs" / "bu" / "summary.json").read_text())["gap"] == summary["gap"]
    assert [ln for ln in r.stdout.splitlines() if "gap to " in ln] == [
        ln for ln in bottom_up_run[0].stdout.splitlines() if "gap to " in ln]


@pytest.mark.integration
@pytest.mark.timeout(CASCADES_S)
def test_bottom_up_records_the_gap_to_every_teacher_before_and_after_each_stage(env, bottom_up_run):
    """Issue 15.5: the student's capacity gap to the TA and to the Teacher, before stage 1 and after each
    stage, from the teachers' caches (no server started for it), on the held-out slice; the trained
    student is closer to the teacher it was distilled from than the untrained one."""
    r, ev = bottom_up_run
    gap = json.loads((env / "runs" / "bu" / "summary.json").read_text())["gap"]
    # the gap's slice is the one every training step left out (the trainer counts it by the same rule)
    held = {json.loads((env / "runs" / "bu" / "stages" / s / "dft" / "summary.json").read_text())["held_out"]
            for s in ("s1-ta", "s2-teacher")}
    assert len(held) == 1 and held != {0}
    assert list(gap) == ["ta", "teacher"]
    at = {}
    for name, entry in gap.items():
        assert entry["cache"].endswith(f"cache/{name}") and entry["template"] == "qwen2_base"
        assert entry["holdout"] == 0.3 and entry["data"].endswith("instruct.json")
        assert [p["at"] for p in entry["points"]] == ["before stage 1", "after stage 1", "after stage 2"]
        for p in entry["points"]:
            assert "error" not in p, p
            assert {p["samples"]} == held and p["missing_targets"] == 0
            assert all(math.isfinite(p[t]) and p[t] >= 0 for t in ("kl_text", "kl_vis", "rel", "ce")), p
        at[name] = {p["at"]: p for p in entry["points"]}
    for name in ("ta", "teacher"):  # the untrained student, whichever cascade measured it
        assert at[name]["before stage 1"]["model"] == str(env / "models" / "tiny-student")
    # the trained student is closer to the teacher it was just distilled from than the untrained one
    assert at["ta"]["after stage 1"]["kl_text"] < at["ta"]["before stage 1"]["kl_text"]
    assert at["teacher"]["after stage 2"]["kl_text"] < at["teacher"]["before stage 1"]["kl_text"]
    # measured once per (checkpoint, teacher), lazily, in children on the training device
    measured = [e for e in ev if e["kind"] == "gap"]
    assert measured and sum(e["pairs"] for e in measured) == 2 * 3
    assert all(e["devices"] == ["cpu:1"] for e in measured)
    assert [e["status"] for e in ev if e["kind"] == "fill"] == ["done", "done"]  # one fill per teacher, nothing more
    for t in ("ta", "teacher"):
        assert (env / "runs" / "bu" / "logs" / f"server-{t}-0.log").read_text().count("Application startup") == 1
    # the cascade's last lines
    tail = r.stdout.strip().splitlines()[-2:]
    assert [ln.split(":")[0] for ln in tail] == ["[cascade] gap to ta (kl_text)", "[cascade] gap to teacher (kl_text)"]
    assert all(ln.count(" before stage 1") == 1 and ln.endswith(" after stage 2") for ln in tail), tail


@pytest.mark.integration
@pytest.mark.timeout(CASCADES_S)
def test_bottom_up_prepares_each_split_exactly_once(env, bottom_up_run):
    """Issue 14: the data was prepared 14 times per bottom-up cascade (every trainer step, every fill, the
    completeness checks). Now each split is prepared once, before any fill or training step, and every
    fill and trainer opens that directory."""
    r, ev = bottom_up_run
    prepares = [e for e in ev if e["kind"] == "prepare"]
    assert sorted((e["job"], e["status"]) for e in prepares) == [("prepare:instruct", "done"),
                                                                  ("prepare:pretrain", "done")]
    first_other = min(i for i, e in enumerate(ev) if e["kind"] != "prepare")
    assert all(e["kind"] == "prepare" for e in ev[:first_other]) and len(prepares) == first_other
    logs = {p.name: p.read_text() for p in (env / "runs" / "bu" / "logs").glob("*.log")}
    builds = [ln for text in [r.stdout, r.stderr, *logs.values()] for ln in text.splitlines()
              if "prepared data: building " in ln]
    assert len(builds) == 2, builds
    assert sum("pretrain.json" in b for b in builds) == 1 and sum("instruct.json" in b for b in builds) == 1
    dirs = {e["prepared"] for e in prepares}
    users = {n: t for n, t in logs.items() if n.startswith("fill-") or n.split("-")[-1][:-4] in STEPS}
    assert len(users) == 4 + 6  # a fill per teacher and split, 6 training steps
    for name, text in users.items():
        assert any(f"prepared data: using {d} " in text for d in dirs), name


@pytest.mark.integration
@pytest.mark.timeout(CASCADES_S)
def test_second_cascade_reuses_the_teacher_cache(env, single_run):
    _, events = single_run
    fills = [e for e in events if e["kind"] == "fill"]
    assert fills == [fills[0]] and fills[0]["status"] == "reused"
    assert not list((env / "runs" / "single" / "logs").glob("server-*.log"))  # no server started


@pytest.mark.integration
@pytest.mark.timeout(CASCADES_S)
def test_cache_check_fingerprints_each_teacher_once_and_still_sees_a_changed_one(env, bottom_up_run, tmp_path):
    from ckd_common.model import init_preset
    from deploy.cascade.caches import CacheCheck
    from deploy.cascade.plan import Teacher

    cfg = CascadeConfig.from_yaml(_config(env, "bu", "bottom-up"))
    model = tmp_path / "teacher"
    shutil.copytree(env / "models" / "tiny-teacher", model)
    teacher = Teacher("teacher", str(model), ("cpu:0",), str(env / "cache" / "teacher"))
    check = CacheCheck(cfg.data_of, cfg.images)
    needs = plan(cfg)[-1].cache_needs
    assert all(check.complete(teacher, split, template) for split, template in needs)
    assert all(check.complete(teacher, split, template) for split, template in needs)
    assert check.fingerprints_computed == 1  # not once per split, not once per question
    init_preset("tiny-teacher", model, seed=7)  # the same directory now holds another teacher
    with pytest.raises(CascadeError, match="holds targets of a different 'teacher'"):
        check.complete(teacher, *needs[0])
    assert check.fingerprints_computed == 2


@pytest.mark.integration
@pytest.mark.timeout(INTERRUPTED_S)
def test_interrupted_cascade_resumes_to_the_same_result(env, single_run):
    cfg = _config(env, "single-int", "single", teachers=("teacher",))
    # started with SIGINT ignored, as every background job of a non-interactive shell is (`make test &`,
    # CI runners): the cascade must install its own handler, Python's default would not be there
    p = subprocess.Popen([sys.executable, "-m", "deploy", "cascade", str(cfg)], cwd=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        # the cascade writes the step's log header *before* it forks the trainer (tens of ms later
        # with the cascade's memory to copy): wait for the SFT log, then for the trainer process
        # itself — the cascade has no other child by then (DPT's trainer has been reaped)
        log = env / "runs" / "single-int" / "logs" / "kd-teacher-sft.log"
        running: dict[int, int] = {}
        while p.poll() is None and not (log.is_file() and (running := descendants(p.pid))):
            time.sleep(0.05)
        assert p.poll() is None, p.stdout.read()
        os.kill(p.pid, signal.SIGINT)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, out[-3000:]
    assert "re-run the command to resume" in out
    assert running and alive(running) == []  # no server, fill or trainer outlives the command
    assert not (env / "runs" / "single-int" / "stages" / "kd-teacher" / "dft").exists()

    r = _ckd("cascade", str(cfg), cwd=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "dpt: already finished" in r.stdout

    from safetensors.torch import load_file

    a = load_file(env / "runs" / "single" / "stages" / "kd-teacher" / "dft" / "final" / "model.safetensors")
    b = load_file(env / "runs" / "single-int" / "stages" / "kd-teacher" / "dft" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k
