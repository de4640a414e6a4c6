"""student_trainer across processes: SIGKILL mid-run + --resume equals an uninterrupted run, and two
gloo ranks equal one rank (same global batch). Reference runs happen in this process."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from student_trainer.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]
TERMS = ("total", "ce", "kl_text", "kl_vis", "rel", "lr")
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
            "ROLE_RANK", "TORCHELASTIC_RUN_ID")




@pytest.fixture(scope="module")
def cache(tiny_models, synth_dir, tmp_path_factory):
    from cachefill import fill_cache

    root = tmp_path_factory.mktemp("icache") / "tiny-teacher"
    fill_cache(tiny_models["tiny-teacher"], synth_dir / "instruct.json", synth_dir / "images", "qwen2_base", root, k=8)
    return root


def _args(tiny_models, synth_dir, cache, out, *extra):
    return ["distill", "--step", "dft", "--cache", str(cache), "--model", str(tiny_models["tiny-student"]),
            "--data", str(synth_dir / "instruct.json"), "--images", str(synth_dir / "images"), "--out", str(out),
            "--global-batch", "4", "--micro-batch", "2", "--lr", "1e-3", "--no-progress", "--no-tensorboard", *extra]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return env


def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same(a: list[dict], b: list[dict], tol: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for t in TERMS:
            assert abs(ra[t] - rb[t]) <= tol * max(1.0, abs(rb[t])), (ra["step"], t, ra[t], rb[t])


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_models, synth_dir, cache, tmp_path):
    ref = tmp_path / "ref"
    assert main(_args(tiny_models, synth_dir, cache, ref, "--max-steps", "8", "--num-workers", "2")) == 0

    out = tmp_path / "killed"
    argv = _args(tiny_models, synth_dir, cache, out, "--max-steps", "8", "--num-workers", "2", "--save-every", "3")
    # killed one step past the checkpoint at 3: the run pauses there (tests/trainer_pause.py) until the kill
    paused = tmp_path / "paused-after-step-4"
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("trainer_pause.py")), "4", str(paused),
                             *argv], env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    marker = out / "checkpoint-000003" / "trainer_state.json"
    try:  # no deadline (the first DeepSpeed start may build its op); pytest-timeout bounds a hang
        while not paused.exists() and proc.poll() is None:
            time.sleep(0.05)
    finally:  # also on a timeout: the paused run would wait forever
        with contextlib.suppress(ProcessLookupError):  # (it may have exited on its own)
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    assert paused.exists() and marker.exists(), err.decode()[-3000:]
    assert not (out / "final").exists(), "the run finished before it was killed"
    killed_at = len(_metrics(out))
    assert 3 <= killed_at < 8

    assert main(_args(tiny_models, synth_dir, cache, out, "--max-steps", "8", "--num-workers", "2", "--save-every",
                      "3", "--resume")) == 0
    _assert_same(_metrics(out), _metrics(ref), 1e-6)


def test_two_gloo_ranks_match_one_rank(tiny_models, synth_dir, cache, tmp_path):
    one = tmp_path / "one"
    assert main(_args(tiny_models, synth_dir, cache, one, "--max-steps", "4", "--num-workers", "0")) == 0
    two = tmp_path / "two"
    torchrun = Path(sys.executable).with_name("torchrun")
    # --standalone: torchrun's own store binds a free port and the ranks join it (a port probed
    # here and passed on could be taken by another process meanwhile)
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "student_trainer",
           *_args(tiny_models, synth_dir, cache, two, "--max-steps", "4", "--num-workers", "0")]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "ranks 2" in res.stdout and "micro-batch 2 x 1 accumulation x 2 = global 4" in res.stdout
    _assert_same(_metrics(two), _metrics(one), 1e-5)
