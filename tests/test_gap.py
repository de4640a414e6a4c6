"""The held-out slice (ckd_common.holdout) and `ckd gap` (student_trainer.gap): a trained student is
closer to its teacher than the untrained one, on samples training never saw."""
from __future__ import annotations

import json
import math

import pytest

from ckd_common.holdout import holdout_score, is_held_out, split_held_out
from logit_cache.synthetic import random_key

HOLDOUT = 0.25  # the tiny synthetic data has 24 instruction samples: 7 of them are held out at 0.25


def test_holdout_is_a_deterministic_key_hash_of_the_stated_size():
    keys = [random_key(i, "holdout") for i in range(20000)]
    held = [k for k in keys if is_held_out(k, 0.05)]
    assert abs(len(held) / len(keys) - 0.05) < 4 * math.sqrt(0.05 * 0.95 / len(keys))
    assert [is_held_out(k, 0.05) for k in keys[:100]] == [is_held_out(k, 0.05) for k in keys[:100]]
    assert not any(is_held_out(k, 0.0) for k in keys)
    # a larger fraction keeps every sample a smaller one holds out (the slices are nested)
    assert set(held) <= {k for k in keys if is_held_out(k, 0.1)}
    # independent of order and of the other samples
    train, out = split_held_out(list(reversed(keys[:500])), 0.05, key=lambda k: k)
    assert set(out) == {k for k in keys[:500] if holdout_score(k) < 0.05} and len(train) + len(out) == 500


@pytest.fixture(scope="module")
def cache(tiny_models, synth_dir, tmp_path_factory):
    from cachefill import fill_cache

    root = tmp_path_factory.mktemp("gapcache") / "tiny-teacher"
    fill_cache(tiny_models["tiny-teacher"], synth_dir / "instruct.json", synth_dir / "images", "qwen2_base", root, k=8)
    return root


@pytest.mark.integration
@pytest.mark.usefixtures("one_torch_thread")
def test_gap_of_a_trained_student_is_smaller_than_of_the_untrained_one(tiny_models, synth_dir, cache, tmp_path,
                                                                       capsys):
    from deploy.cli import main as ckd
    from student_trainer.cli import main as trainer
    from student_trainer.gap import measure_gap

    data, images = synth_dir / "instruct.json", synth_dir / "images"
    before = measure_gap(tiny_models["tiny-student"], str(cache), data, images, holdout=HOLDOUT)
    assert before["samples"] == 7 and before["template"] == "qwen2_base" and before["missing_targets"] == 0
    out = tmp_path / "dft"
    rc = trainer(["distill", "--step", "dft", "--cache", str(cache), "--model", str(tiny_models["tiny-student"]),
                  "--data", str(data), "--images", str(images), "--out", str(out), "--holdout", str(HOLDOUT),
                  "--global-batch", "4", "--micro-batch", "4", "--lr", "3e-3", "--epochs", "4", "--alpha", "0",
                  "--num-workers", "0", "--no-progress", "--no-tensorboard"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["samples"], summary["held_out"]) == (17, 7)  # training never saw the 7

    # the holdout comes from the student's own training config
    rc = ckd(["gap", "--model", str(out / "final"), "--cache", str(cache), "--data", str(data), "--images",
              str(images), "--json-out", str(tmp_path / "gap.json"), "--no-progress"])
    line = capsys.readouterr().out
    assert rc == 0 and "gap to" in line and "7 held-out samples" in line
    after = json.loads((tmp_path / "gap.json").read_text())
    assert after["holdout"] == HOLDOUT and after["samples"] == 7
    print(f"gap before {before}\ngap after  {after}")
    for term in ("kl_text", "kl_vis"):
        assert after[term] < 0.8 * before[term], (term, before[term], after[term])
    assert after["rel"] < before["rel"]


@pytest.mark.integration
def test_gap_errors_are_one_line(tiny_models, synth_dir, cache, tmp_path, capsys):
    from deploy.cli import main as ckd

    base = ["gap", "--model", str(tiny_models["tiny-student"]), "--cache", str(cache), "--data",
            str(synth_dir / "instruct.json"), "--images", str(synth_dir / "images"), "--no-progress"]
    assert ckd(base + ["--holdout", "0.001"]) == 2  # the slice is empty on 24 samples
    err = capsys.readouterr().err
    assert "none of its 24 samples falls in the held-out slice" in err and "Traceback" not in err
    assert ckd(base + ["--holdout", "0.25", "--teacher-fingerprint", "0123abcd"]) == 2  # the cache holds another teacher
    err = capsys.readouterr().err
    assert "cache refused" in err and "teacher_fingerprint" in err and "Traceback" not in err
    assert ckd(["gap", "--model", str(tmp_path / "nope"), "--cache", str(cache), "--data",
                str(tmp_path / "nope.json"), "--micro-batch", "0"]) == 2
    err = capsys.readouterr().err
    assert "model: dir" in err and "data: file" in err and "micro_batch" in err
