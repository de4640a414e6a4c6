"""``--resume`` with damaged checkpoints (issue 11.10): a truncated DeepSpeed state file, a torn JSON
file or a flipped byte is named, the newest checkpoint that loads is taken (with a message saying
which one was skipped and why), and when none loads the error is one line with the fix. Nothing is
deleted either way."""
from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import pytest

from student_trainer import checkpoint as ckpt
from student_trainer.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]  # every test trains with DeepSpeed


def _argv(tiny_models, synth_dir, out: Path, *extra: str) -> list[str]:
    return ["train", "--step", "pt", "--model", str(tiny_models["tiny-student"]),
            "--data", str(synth_dir / "pretrain.json"), "--images", str(synth_dir / "images"), "--out", str(out),
            "--global-batch", "4", "--micro-batch", "2", "--max-steps", "4", "--save-every", "2", "--num-workers", "0",
            "--no-progress", "--no-tensorboard", *extra]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _snapshot(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}


@pytest.fixture
def run(tiny_models, synth_dir, tmp_path):
    """A finished 4-step run with checkpoint-000002 and final/ (each holding DeepSpeed state). A run
    resumes only in its own --out, so each test trains its own (a few seconds)."""
    out = tmp_path / "run"
    assert main(_argv(tiny_models, synth_dir, out)) == 0
    assert [p.name for p in ckpt.resumable_candidates(out)] == ["final", "checkpoint-000002"]
    return out


def _model_states(d: Path) -> Path:
    return sorted((d / ckpt.DS_DIR / ckpt.DS_TAG).glob("*model_states.pt"))[0]


def _truncate(f: Path) -> None:
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


def test_damage_names_what_is_wrong(run):
    final = run / "final"
    assert ckpt.damage(final) is None and ckpt.damage(run / "checkpoint-000002") is None

    states = _model_states(final)
    good = states.read_bytes()
    _truncate(states)
    why = ckpt.damage(final)
    assert why.startswith(f"ds/state/{states.name} is truncated or damaged"), why

    # one flipped bit inside the largest tensor record: the archive still opens, only the record's CRC can tell
    states.write_bytes(good)
    with zipfile.ZipFile(states) as z:
        big = max(z.infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack_from("<HH", good, big.header_offset + 26)  # the local file header
    flipped = bytearray(good)
    flipped[big.header_offset + 30 + name_len + extra_len + big.file_size // 2] ^= 0x10
    states.write_bytes(bytes(flipped))
    assert ckpt.damage(final) == f"ds/state/{states.name} is damaged (record {big.filename} fails its CRC check)"
    states.write_bytes(good)

    (final / ckpt.STATE_FILE).write_text('{"step": 4, "total_')  # torn
    assert ckpt.damage(final).startswith("trainer_state.json is unreadable or not valid JSON")
    (final / ckpt.STATE_FILE).unlink()
    assert [p.name for p in ckpt.resumable_candidates(run)] == ["checkpoint-000002"]  # no marker: never complete


def test_resume_skips_a_truncated_checkpoint_and_takes_the_newest_that_loads(run, tiny_models, synth_dir, capsys):
    reference = _metrics(run)
    _truncate(_model_states(run / "final"))
    damaged_final = (run / "final").stat().st_ino
    capsys.readouterr()
    assert main(_argv(tiny_models, synth_dir, run, "--resume")) == 0
    out = capsys.readouterr().out
    assert (f"student_trainer: --resume: skipping {run / 'final'}: ds/state/" in out
            and "is truncated or damaged" in out and f"resuming from the newest checkpoint that loads, "
            f"{run / 'checkpoint-000002'}" in out), out
    assert f"resuming from {run / 'checkpoint-000002'} at step 2" in out
    # steps 3-4 were trained again from checkpoint 2: the same losses, and a new final that loads
    got = _metrics(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got, reference):
        assert a["total"] == pytest.approx(b["total"], rel=1e-6), a["step"]
    assert ckpt.damage(run / "final") is None and (run / "final").stat().st_ino != damaged_final


def test_resume_with_no_loadable_checkpoint_is_one_line_and_changes_nothing(run, tiny_models, synth_dir, capsys):
    _truncate(_model_states(run / "final"))
    (run / "checkpoint-000002" / "student_trainer.json").write_text("{")
    before = _snapshot(run)
    capsys.readouterr()
    assert main(_argv(tiny_models, synth_dir, run, "--resume")) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"student_trainer: error: --resume: no checkpoint in {run} loads (final: ds/state/")
    assert "checkpoint-000002: student_trainer.json is unreadable or not valid JSON" in lines[0]
    assert "nothing was changed" in lines[0] and "Fix:" in lines[0]
    assert _snapshot(run) == before
    assert os.path.getsize(_model_states(run / "final")) > 0
