"""The prepared dataset across real processes: concurrent preparers build it once, the ranks of one
training run share one preparation, and a fill through a real teacher server skips bombs with a
count (issue 11.6) and opens the dataset `ckd data prepare` made."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from badimages import write_bomb, write_over_limit
from ckd_common.data import MAX_IMAGE_PIXELS

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
            "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def _env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CKD_PREPARED_DIR=str(root))
    return env


def _builds(text: str) -> int:
    return sum("prepared data: building " in ln for ln in text.splitlines())


@pytest.fixture
def data(synth_dir, tmp_path):
    shutil.copytree(synth_dir, tmp_path / "data")
    return tmp_path / "data"


def test_concurrent_preparers_build_once(data, tiny_models, tmp_path):
    cmd = [sys.executable, "-m", "ckd_common", "data", "prepare", "--model", str(tiny_models["tiny-student"]),
           "--data", str(data / "instruct.json"), "--images", str(data / "images"), "--template", "qwen2_base",
           "--no-progress"]
    env = _env(tmp_path / "root")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-2000:] for _, e in outs]
    assert sum(_builds(err) for _, err in outs) == 1
    assert len({out.splitlines()[0] for out, _ in outs}) == 1  # same samples, same fingerprint
    assert len([p for p in (tmp_path / "root").iterdir() if p.is_dir()]) == 1


def test_two_training_ranks_share_one_preparation(data, tiny_models, tmp_path):
    """torchrun with 2 gloo ranks: rank 0 builds the dataset, rank 1 opens the same directory."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    def train(out: Path) -> subprocess.CompletedProcess:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "student_trainer", "train", "--step", "pt", "--model", str(tiny_models["tiny-student"]),
               "--data", str(data / "pretrain.json"), "--images", str(data / "images"), "--out", str(out),
               "--global-batch", "4", "--micro-batch", "2", "--max-steps", "1", "--num-workers", "0", "--no-progress",
               "--no-tensorboard"]
        return subprocess.run(cmd, env=_env(tmp_path / "root"), capture_output=True, text=True, timeout=600)

    r = train(tmp_path / "run")
    assert r.returncode == 0, r.stderr[-4000:]
    assert _builds(r.stderr) == 1 and "ranks 2" in r.stdout
    (built,) = [p for p in (tmp_path / "root").iterdir() if p.is_dir()]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["samples"] == json.loads((built / "manifest.json").read_text())["samples"] == 24
    r = train(tmp_path / "run2")  # a second run opens it: no rank prepares again
    assert r.returncode == 0 and _builds(r.stderr) == 0, r.stderr[-4000:]


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    from test_server_support import ServerProc

    with ServerProc(tiny_models["tiny-teacher"], tmp_path_factory.mktemp("srv"), name="bombs") as s:
        yield s


def test_fill_skips_bombs_with_a_count_and_names_them_otherwise(server, data, tmp_path, capsys):
    from deploy.fill import main

    write_bomb(data / "images" / "bomb.png")
    write_over_limit(data / "images" / "big.png", MAX_IMAGE_PIXELS)
    recs = json.loads((data / "instruct.json").read_text())
    recs[3]["image"], recs[7]["image"] = "bomb.png", "big.png"
    (data / "instruct.json").write_text(json.dumps(recs))
    argv = ["--server", server.url, "--data", str(data / "instruct.json"), "--images", str(data / "images"),
            "--template", "qwen2_base", "--k", "4", "--out", str(tmp_path / "cache"), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{data / 'instruct.json'}: record 3 (id {recs[3]['id']}): image " in err and "Traceback" not in err
    assert "more pixels than the limit" in err and "(and 1 more bad record(s))" in err

    assert main(argv + ["--on-error", "skip"]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "22 written" in err and "22 in the dataset" in err
    from logit_cache import list_groups

    assert len(list_groups(tmp_path / "cache")) == 1


def test_fill_uses_or_refuses_the_named_prepared_dataset(server, data, tiny_models, tmp_path, capsys):
    from ckd_common.cli import main as ckd
    from deploy.fill import main

    def prepare(template: str, file: str) -> str:
        assert ckd(["data", "prepare", "--model", str(tiny_models["tiny-teacher"]), "--data", str(data / file),
                    "--images", str(data / "images"), "--template", template, "--no-progress"]) == 0
        return capsys.readouterr().out.split("prepared dataset: ")[1].split(" (")[0]

    right, wrong = prepare("pretrain", "pretrain.json"), prepare("qwen2_base", "pretrain.json")
    argv = ["--server", server.url, "--data", str(data / "pretrain.json"), "--images", str(data / "images"),
            "--template", "pretrain", "--k", "4", "--out", str(tmp_path / "cache"), "--no-progress"]
    assert main(argv + ["--prepared", wrong]) == 1
    err = capsys.readouterr().err
    assert "was made for other inputs" in err and "template: prepared for 'qwen2_base', this run has 'pretrain'" in err
    assert main(argv + ["--prepared", right]) == 0
    err = capsys.readouterr().err
    assert f"prepared data: using {right}" in err and "24 written" in err and "building" not in err
