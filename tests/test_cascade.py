"""`ckd cascade`: config validation, and real cascades on tiny models (servers, fills, DeepSpeed
trainer and eval all started as child processes)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ckd_common.config import ConfigError
from deploy.cascade import CascadeConfig, plan

STEPS = {s: {"lr": 1.0e-3, "global_batch": 8, "micro_batch": 4, "max_steps": 2}
         for s in ("pt", "ft", "dpt", "sft", "dft")}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from ckd_common.model import init_preset
    from ckd_common.synth import synthesize

    root = tmp_path_factory.mktemp("cascade")
    synthesize(root / "data", seed=1, n_pretrain=12, n_instruct=12, n_eval=5)
    for p in ("tiny-student", "tiny-ta", "tiny-teacher"):
        init_preset(p, root / "models" / p)
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


@pytest.mark.integration
def test_bottom_up_end_to_end_then_rerun_is_a_no_op(env):
    r = _ckd("cascade", str(_config(env, "bu", "bottom-up")), cwd=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ev = _events(env, "bu")
    jobs = [e["job"] for e in ev]
    assert jobs[0] == "fill:ta" and "fill:teacher" in jobs
    assert [j for j in jobs if j.startswith("train")] == [
        f"train:{s}:{st}" for s in ("s1-ta", "s2-teacher") for st in ("dpt", "sft", "dft")]
    # one server per teacher, started and stopped (its log ends with the graceful shutdown)
    for t in ("ta", "teacher"):
        log = (env / "runs" / "bu" / "logs" / f"server-{t}-0.log").read_text()
        assert "Application startup complete" in log and "Finished server process" in log
    # the final student loads with plain transformers
    final = env / "runs" / "bu" / "stages" / "s2-teacher" / "dft" / "final"
    code = ("from transformers import LlavaForConditionalGeneration as L; import sys;"
            f"L.from_pretrained({str(final)!r}); assert 'ckd_common' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    summary = json.loads((env / "runs" / "bu" / "summary.json").read_text())
    assert summary["eval"]["bench"] == "synth" and 0 <= summary["eval"]["score"] <= 100

    # re-running a finished cascade only reports
    r = _ckd("cascade", str(_config(env, "bu", "bottom-up")), cwd=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    new = _events(env, "bu")[len(ev):]
    assert all(e["status"] == "reused" and e["kind"] == "fill" for e in new), new
    assert "already finished" in r.stdout


@pytest.mark.integration
def test_second_cascade_reuses_the_teacher_cache(env):
    if not (env / "runs" / "bu" / "summary.json").is_file():
        pytest.skip("needs the bottom-up cascade of the previous test")
    r = _ckd("cascade", str(_config(env, "single", "single", teachers=("teacher",))), cwd=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    fills = [e for e in _events(env, "single") if e["kind"] == "fill"]
    assert fills == [fills[0]] and fills[0]["status"] == "reused"
    assert not list((env / "runs" / "single" / "logs").glob("server-*.log"))  # no server started


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,pgid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()
            if "student_trainer" in line or "teacher_server" in line or "logit_cache" in line]


@pytest.mark.integration
def test_interrupted_cascade_resumes_to_the_same_result(env):
    if not (env / "runs" / "single" / "summary.json").is_file():
        pytest.skip("needs the single-teacher cascade of the previous test")
    cfg = _config(env, "single-int", "single", teachers=("teacher",))
    p = subprocess.Popen([sys.executable, "-m", "deploy", "cascade", str(cfg)], cwd=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = env / "runs" / "single-int" / "logs" / "kd-teacher-sft.log"
    deadline = time.time() + 600
    while not log.is_file() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert p.poll() is None, p.stdout.read()
    os.kill(p.pid, signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 130, out[-3000:]
    assert "re-run the command to resume" in out
    time.sleep(0.5)
    assert _children_of(p.pid) == []  # no server, fill or trainer outlives the command
    assert not (env / "runs" / "single-int" / "stages" / "kd-teacher" / "dft").exists()

    r = _ckd("cascade", str(cfg), cwd=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "dpt: already finished" in r.stdout

    from safetensors.torch import load_file

    a = load_file(env / "runs" / "single" / "stages" / "kd-teacher" / "dft" / "final" / "model.safetensors")
    b = load_file(env / "runs" / "single-int" / "stages" / "kd-teacher" / "dft" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k
