"""`ckd ablate` for real on the tiny presets: a 4-point x 2-seed grid from complete caches starts no
teacher server, shares identical steps between points, survives Ctrl-C (exit 130, no child left) and
resumes, and writes the table and the plot. Every trainer, eval and the command itself run as real
subprocesses."""
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

from proctree import alive, descendants

pytestmark = pytest.mark.integration

STEPS = {s: {"lr": 1.0e-3, "global_batch": 4, "micro_batch": 4, "max_steps": 1, "num_workers": 0}
         for s in ("dpt", "sft", "dft")}
# one torch thread per child: a 2-thread trainer's OpenMP spin-waits collapse on a shared 2-core box
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
GRID = {"dft.beta": [0.5, 1.0], "dft.rel_variant": ["flat", "column"]}  # DPT and SFT shared by all points
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny models, synthetic data, and the Teacher's caches filled beforehand (no server needed)."""
    from cachefill import fill_cache

    from ckd_common.model import init_preset
    from ckd_common.synth import synthesize

    root = tmp_path_factory.mktemp("ablate-run")
    # 8 per split for a global batch of 4: the trainer's held-out slice (a hash of each sample key, 1 %)
    # may take a sample, and a split must still fill one batch whatever the data (it took 1 of 4 once)
    synthesize(root / "data", seed=2, n_pretrain=8, n_instruct=8, n_eval=5)
    for p in ("tiny-student", "tiny-teacher"):
        init_preset(p, root / "models" / p)
    for split, template in (("pretrain", "pretrain"), ("instruct", "qwen2_base")):
        fill_cache(root / "models" / "tiny-teacher", root / "data" / f"{split}.json", root / "data" / "images",
                   template, root / "cache" / "teacher", k=8)
    grid = {
        "run_dir": "runs/grid", "strategy": "single", "student": "models/tiny-student",
        "teachers": [{"name": "teacher", "model": "models/tiny-teacher", "devices": ["cpu:0"]}],
        "train": {"devices": ["cpu:1"], "steps": STEPS},
        "data": {"pretrain": "data/pretrain.json", "instruct": "data/instruct.json", "images": "data/images",
                 "eval": "data/eval.jsonl"},
        "cache": {"root": "cache", "k": 8},
        "eval": {"batch_size": 5},
        "grid": GRID, "seeds": SEEDS,
    }
    (root / "grid.yaml").write_text(yaml.safe_dump(grid))
    return root


def _ckd(env: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy", "ablate", "grid.yaml"], cwd=env, capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def _timelines(run: Path) -> list[dict]:
    return [e for f in sorted(run.glob("points/*/seed*/timeline.json")) for e in json.loads(f.read_text())]


def test_grid_runs_from_complete_caches_resumes_after_ctrl_c_and_writes_table_and_plot(env):
    run = env / "runs" / "grid"
    # started with SIGINT ignored, as every background job of a non-interactive shell is: ckd installs its own
    p = subprocess.Popen([sys.executable, "-m", "deploy", "ablate", "grid.yaml"], cwd=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True, env=ENV,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        # interrupt once the second point trains (points run in order, seeds inside: its DPT and SFT are the
        # first point's, so only its DFT runs)
        deadline = time.monotonic() + 900
        while p.poll() is None and time.monotonic() < deadline and len(list(run.glob("points/*/*/logs/*-dft.log"))) < 3:
            time.sleep(0.2)
        assert p.poll() is None, p.stdout.read()
        running = descendants(p.pid)
        os.kill(p.pid, signal.SIGINT)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, out[-3000:]
    assert "re-run the command to resume" in out and "Traceback" not in out
    assert running and alive(running) == []  # no trainer or eval outlives the command
    assert not (run / "results.md").exists()

    r = _ckd(env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "already finished" in r.stdout

    # zero server starts: every fill found the caches complete
    events = _timelines(run)
    fills = [e for e in events if e["kind"] == "fill"]
    assert fills and all(e["status"] == "reused" for e in fills), fills
    assert not list(run.glob("points/*/seed*/logs/server-*.log"))
    # each distinct step trained once (the interrupted one resumed): per seed one DPT, one SFT, four DFTs
    trained = [e for e in events if e["kind"] == "train"]
    steps = sorted(d.name.split("-")[0] for d in (run / "steps").iterdir())
    assert steps == ["dft"] * 8 + ["dpt"] * 2 + ["sft"] * 2
    assert len(trained) == len(steps) and len({e["out"] for e in trained}) == len(steps)

    # every point's config and summary are recorded, with the compute behind it
    ablate = json.loads((run / "ablate.json").read_text())
    assert len(ablate["points"]) == 4 and ablate["seeds"] == SEEDS
    for point in ablate["points"]:
        for seed in SEEDS:
            d = run / point["dir"] / f"seed{seed}"
            cfg = json.loads((d / "cascade.json").read_text())
            assert {cfg["steps"][s]["seed"] for s in ("dpt", "sft", "dft")} == {seed}
            summary = json.loads((d / "summary.json").read_text())
            assert summary["optimizer_steps"] == 3 and summary["teacher_samples"] == 2 * 4
            assert summary["eval"]["bench"] == "synth"
    results = json.loads((run / "results.json").read_text())
    assert [r["label"] for r in results["rows"]] == [p["name"] for p in ablate["points"]]
    assert all(len(r["scores"]["avg"]) == len(SEEDS) for r in results["rows"])
    table = (run / "results.md").read_text()
    assert table.count("±") >= 4 * 6 and "opt steps" in table and "teacher fwd" in table
    assert (run / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a finished grid re-runs as a no-op that writes the same table
    before = (run / "results.json").read_text()
    r = _ckd(env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("already finished") == 4 * len(SEEDS)
    assert (run / "results.json").read_text() == before
