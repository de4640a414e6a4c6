"""student_trainer: config, schedule, trainable parts per step, KD from a tiny-teacher cache, cache
refusal, missing targets, atomic checkpoints that load with plain transformers.

Runs the real DeepSpeed engine in this process (one gloo rank); tiny models, a few steps each."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from student_trainer.cli import main

COMMON = ["--global-batch", "4", "--micro-batch", "2", "--no-progress", "--no-tensorboard"]



pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def cache(tiny_models, synth_dir, tmp_path_factory):
    """A cache root with the tiny teacher's targets for the pretrain and instruct data."""
    from cachefill import fill_cache

    root = tmp_path_factory.mktemp("cache") / "tiny-teacher"
    for data, template in (("pretrain.json", "pretrain"), ("instruct.json", "qwen2_base")):
        fill_cache(tiny_models["tiny-teacher"], synth_dir / data, synth_dir / "images", template, root, k=8)
    return root


def _args(cmd, step, model, synth_dir, out, data="instruct.json", extra=()):
    a = [cmd, "--step", step, "--model", str(model), "--data", str(synth_dir / data),
         "--images", str(synth_dir / "images"), "--out", str(out), *COMMON, *extra]
    return a


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(d)).state_dict()


def _part(name: str) -> str:
    for prefix, part in (("model.vision_tower.", "vision"), ("model.multi_modal_projector.", "connector"),
                         ("model.language_model.", "llm"), ("lm_head.", "llm")):
        if name.startswith(prefix):
            return part
    raise AssertionError(f"unexpected weight {name}")


def _changed_parts(before: dict, after: dict) -> dict[str, bool]:
    assert before.keys() == after.keys()
    changed: dict[str, bool] = {}
    for k in before:
        p = _part(k)
        changed[p] = changed.get(p, False) or not torch.equal(before[k], after[k])
    return changed


def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
def test_config_reports_every_problem_at_once(tmp_path, capsys):
    from student_trainer.config import ConfigError, TrainConfig

    cfg = TrainConfig(step="sft", model=tmp_path / "nope", data=tmp_path / "nope.json", out=tmp_path / "o",
                      lr=-1.0, global_batch=6, micro_batch=4, zero_stage=5, beta=1.0, cache="somewhere")
    with pytest.raises(ConfigError) as e:
        cfg.resolved().validate(world_size=1, cuda=False)
    msg = str(e.value)
    for needle in ("model: dir", "data: file", "lr must be > 0", "multiple of micro_batch", "zero_stage",
                   "beta=1.0: step sft has no teacher", "--cache must not be given"):
        assert needle in msg, needle
    # the CLI prints it as one error, no traceback
    rc = main(["train", "--step", "sft", "--model", str(tmp_path / "nope"), "--data", str(tmp_path / "x.json"),
               "--out", str(tmp_path / "o"), "--lr", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "student_trainer: error: invalid" in err and "Traceback" not in err


def test_trainable_overrides_the_steps_parts_and_never_the_vision_tower():
    from student_trainer.config import TrainConfig

    base = dict(step="pt", model="m", data="d", out="o")
    assert TrainConfig(**base).trainable_parts == ("connector",)
    assert TrainConfig(**base, trainable=["connector", "llm"]).trainable_parts == ("connector", "llm")
    for bad in (["vision"], ["connector", "lm"], []):
        problems = TrainConfig(**base, trainable=bad).problems()
        assert any(p.startswith("trainable must name parts among") for p in problems), (bad, problems)


def test_step_table_defaults_follow_the_recipe():
    from ckd_common.kd import KDWeights
    from student_trainer.config import STEPS, TrainConfig

    dpt = TrainConfig(step="dpt", model="m", data="d", out="o").resolved()
    dft = TrainConfig(step="dft", model="m", data="d", out="o", lr=1e-4).resolved()
    sft = TrainConfig(step="sft", model="m", data="d", out="o").resolved()
    assert (dpt.lr, dpt.global_batch, dpt.weights) == (1e-3, 256, KDWeights(1.0, 1.0, 1.0, 1.0))
    assert (dft.lr, dft.global_batch) == (1e-4, 128)
    assert (sft.lr, sft.global_batch, sft.weights) == (2e-5, 128, KDWeights(1.0, 0.0, 0.0, 0.0))
    assert STEPS["dpt"].trainable == STEPS["pt"].trainable == ("connector",)
    assert STEPS["dft"].trainable == STEPS["sft"].trainable == STEPS["ft"].trainable == ("connector", "llm")
    assert all("vision" not in s.trainable for s in STEPS.values())
    assert (dpt.warmup_ratio, dpt.weight_decay, dpt.epochs, dpt.max_length) == (0.03, 0.0, 1.0, 2048)


def test_schedule_is_deterministic_and_rank_count_independent():
    from student_trainer.data import build_schedule

    lengths = [(i * 37) % 50 + 5 for i in range(40)]
    one = build_schedule(lengths, 8, 2, 1, seed=3, epochs=2)
    two = build_schedule(lengths, 8, 2, 2, seed=3, epochs=2)
    assert len(one) == len(two) == 10 and one.global_batches == two.global_batches
    assert one.global_batches == build_schedule(lengths, 8, 2, 1, seed=3, epochs=2).global_batches
    for s in range(len(one)):
        flat1 = sorted(i for mb in one.steps[s][0] for i in mb)
        flat2 = sorted(i for r in range(2) for mb in two.steps[s][r] for i in mb)
        assert flat1 == flat2 == sorted(one.global_batches[s])
        ls = [lengths[i] for i in one.global_batches[s]]
        assert ls == sorted(ls, reverse=True)  # grouped by length
    assert sorted(i for g in one.global_batches[:5] for i in g) == list(range(40))  # an epoch = a permutation


@pytest.mark.integration
def test_dpt_changes_only_the_connector(tiny_models, synth_dir, cache, tmp_path):
    out = tmp_path / "dpt"
    rc = main(_args("distill", "dpt", tiny_models["tiny-student"], synth_dir, out, "pretrain.json",
                    ["--cache", str(cache), "--max-steps", "3", "--num-workers", "2", "--progress", "--tensorboard"]))
    assert rc == 0
    changed = _changed_parts(_weights(tiny_models["tiny-student"]), _weights(out / "final"))
    assert changed == {"vision": False, "connector": True, "llm": False}
    assert list((out / "tb").glob("events.out.tfevents.*"))
    rec = _metrics(out)
    assert [r["step"] for r in rec] == [1, 2, 3]
    assert all(r["kl_vis"] > 0 and r["rel"] >= 0 and r["kl_text"] > 0 for r in rec)
    assert all(0 <= r["data_wait_fraction"] <= 1 for r in rec)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and "data_wait_fraction" in summary and (out / "loss_curve.png").stat().st_size


@pytest.mark.integration
@pytest.mark.parametrize("trainable, changes_llm", [((), False), (("connector", "llm"), True)])
def test_pt_trains_the_connector_or_with_trainable_also_the_llm(trainable, changes_llm, tiny_models, synth_dir,
                                                                 tmp_path):
    """PT trains the connector (TinyLLaVA's recipe); ``--trainable connector --trainable llm`` is its full
    pre-training: the LLM learns from the captions too. The vision tower stays frozen either way."""
    out = tmp_path / "pt"
    extra = ["--max-steps", "2", "--num-workers", "0", "--lr", "1e-3"]
    for part in trainable:
        extra += ["--trainable", part]
    assert main(_args("train", "pt", tiny_models["tiny-student"], synth_dir, out, "pretrain.json", extra)) == 0
    changed = _changed_parts(_weights(tiny_models["tiny-student"]), _weights(out / "final"))
    assert changed == {"vision": False, "connector": True, "llm": changes_llm}
    saved = json.loads((out / "student_trainer.json").read_text())
    assert saved["trainable"] == (list(trainable) or None)


@pytest.mark.integration
@pytest.mark.parametrize("step", ["sft", "dft"])
def test_sft_and_dft_change_connector_and_llm_not_vision(step, tiny_models, synth_dir, cache, tmp_path):
    out = tmp_path / step
    extra = ["--max-steps", "2", "--num-workers", "0", "--lr", "1e-3"]
    if step == "dft":
        extra += ["--cache", str(cache)]
    rc = main(_args("distill" if step == "dft" else "train", step, tiny_models["tiny-student"], synth_dir, out,
                    extra=extra))
    assert rc == 0
    changed = _changed_parts(_weights(tiny_models["tiny-student"]), _weights(out / "final"))
    assert changed == {"vision": False, "connector": True, "llm": True}


@pytest.mark.integration
def test_distillation_from_the_cache_lowers_the_kd_terms(tiny_models, synth_dir, cache, tmp_path):
    # alpha = 0: the random tiny teacher's targets disagree with the data, so CE would pull away
    out = tmp_path / "kd"
    rc = main(_args("distill", "dft", tiny_models["tiny-student"], synth_dir, out,
                    extra=["--cache", str(cache), "--epochs", "4", "--lr", "3e-3", "--alpha", "0",
                           "--num-workers", "0"]))
    assert rc == 0
    rec = _metrics(out)
    assert len(rec) == 24
    kd = [r["kl_text"] + r["kl_vis"] + r["rel"] for r in rec]
    first, last = sum(kd[:3]) / 3, sum(kd[-3:]) / 3
    assert last < 0.3 * first, (first, last)
    for term in ("kl_text", "kl_vis", "rel"):
        assert sum(r[term] for r in rec[-3:]) < sum(r[term] for r in rec[:3]), term


@pytest.mark.integration
def test_losses_do_not_depend_on_the_micro_batch_size(tiny_models, synth_dir, cache, tmp_path):
    runs = {}
    for micro in ("1", "4"):
        out = tmp_path / f"micro{micro}"
        args = _args("distill", "dft", tiny_models["tiny-student"], synth_dir, out,
                     extra=["--cache", str(cache), "--max-steps", "3", "--num-workers", "0", "--lr", "1e-3"])
        args[args.index("--micro-batch") + 1] = micro
        assert main(args) == 0
        runs[micro] = _metrics(out)
    for a, b in zip(runs["1"], runs["4"]):
        for t in ("total", "ce", "kl_text", "kl_vis", "rel"):
            assert a[t] == pytest.approx(b[t], rel=1e-5, abs=1e-6), (a["step"], t)


@pytest.mark.integration
def test_step_all_runs_dpt_sft_dft_in_order(tiny_models, synth_dir, cache, tmp_path):
    out = tmp_path / "all"
    rc = main(["distill", "--step", "all", "--cache", str(cache), "--model", str(tiny_models["tiny-student"]),
               "--pretrain-data", str(synth_dir / "pretrain.json"), "--instruct-data", str(synth_dir / "instruct.json"),
               "--images", str(synth_dir / "images"), "--out", str(out), "--global-batch", "4", "--micro-batch", "2",
               "--max-steps", "1",
               "--num-workers", "0", "--no-progress", "--no-tensorboard"])
    assert rc == 0
    cfgs = {s: json.loads((out / s / "final" / "student_trainer.json").read_text()) for s in ("dpt", "sft", "dft")}
    assert cfgs["dpt"]["model"] == str(tiny_models["tiny-student"])
    assert cfgs["sft"]["model"] == str(out / "dpt" / "final") and cfgs["sft"]["cache"] is None
    assert cfgs["dft"]["model"] == str(out / "sft" / "final")
    assert (cfgs["dpt"]["lr"], cfgs["sft"]["lr"], cfgs["sft"]["beta"], cfgs["dft"]["beta"]) == (1e-3, 2e-5, 0.0, 1.0)


@pytest.mark.integration
def test_checkpoint_loads_with_plain_transformers(tiny_models, synth_dir, tmp_path, capsys):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    out = tmp_path / "pt"
    rc = main(_args("train", "pt", tiny_models["tiny-student"], synth_dir, out, "pretrain.json",
                    ["--max-steps", "4", "--save-every", "2", "--num-workers", "0"]))
    assert rc == 0
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    for d in (out / "checkpoint-000002", out / "final"):
        model = LlavaForConditionalGeneration.from_pretrained(str(d))
        tok = AutoTokenizer.from_pretrained(str(d))
        ids = torch.tensor([tok("a red square")["input_ids"]])
        assert torch.isfinite(model(input_ids=ids).logits).all()
        cfg = json.loads((d / "student_trainer.json").read_text())
        assert cfg["step"] == "pt" and cfg["lr"] == 1e-3 and cfg["global_batch"] == 4
        assert (d / "ds").is_dir() and (d / "trainer_state.json").is_file()
    # a finished run is not silently overwritten, and --resume refuses a changed config
    rc = main(_args("train", "pt", tiny_models["tiny-student"], synth_dir, out, "pretrain.json", ["--max-steps", "4"]))
    assert rc == 2 and "already holds a run" in capsys.readouterr().err
    rc = main(_args("train", "pt", tiny_models["tiny-student"], synth_dir, out, "pretrain.json",
                    ["--max-steps", "4", "--resume", "--lr", "1e-4"]))
    assert rc == 2 and "lr: now 0.0001, checkpoint 0.001" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.parametrize("stage", [0, 3])
def test_zero_stages_agree(stage, tiny_models, synth_dir, cache, tmp_path):
    runs = {}
    for z in (2, stage):
        out = tmp_path / f"z{z}"
        assert main(_args("distill", "dft", tiny_models["tiny-student"], synth_dir, out,
                          extra=["--cache", str(cache), "--max-steps", "3", "--num-workers", "0", "--lr", "1e-3",
                                 "--zero-stage", str(z)])) == 0
        runs[z] = _metrics(out)
    for a, b in zip(runs[2], runs[stage]):
        for t in ("total", "ce", "kl_text", "kl_vis", "rel"):
            assert a[t] == pytest.approx(b[t], rel=1e-5, abs=1e-6), (a["step"], t)
    w2, w = _weights(tmp_path / "z2" / "final"), _weights(tmp_path / f"z{stage}" / "final")
    assert all(torch.allclose(w2[k], w[k], atol=1e-5) for k in w2)


def test_interrupted_save_never_looks_complete(tmp_path):
    from student_trainer import checkpoint as ckpt

    class Boom:
        def save_checkpoint(self, *a, **k):
            (Path(a[0]) / "partial").mkdir(parents=True)
            raise OSError("disk full")

    with pytest.raises(OSError):
        ckpt.save_checkpoint(Boom(), None, None, tmp_path, ckpt.checkpoint_name(5), template="qwen2_base",
                             zero_stage=0, state={"step": 5}, config=None)
    assert not (tmp_path / "checkpoint-000005").exists()
    assert ckpt.latest_resumable(tmp_path) is None and ckpt.complete_checkpoints(tmp_path) == []
    assert ckpt.clean_partial(tmp_path) == [".tmp-checkpoint-000005"]


# ---------------------------------------------------------------------------------------------
# cache compatibility and missing targets
def _student_dataset(tiny_models, synth_dir, data="instruct.json", template="qwen2_base"):
    from ckd_common.data import prepare_file
    from ckd_common.model import load_vlm, model_info

    model, tok = load_vlm(tiny_models["tiny-student"])
    info = model_info(model, tok)
    ds = prepare_file(synth_dir / data, tok, template, info.num_visual_tokens, info.image_token_id,
                      synth_dir / "images")
    return ds, info


@pytest.mark.integration
@pytest.mark.parametrize("field,value", [("tokenizer_hash", "0123456789abcdef"), ("vocab_size", 400),
                                         ("num_visual_tokens", 15), ("template", "pretrain"),
                                         ("image_aspect_ratio", "pad")])  # a pad teacher, a square student
def test_incompatible_cache_is_refused_naming_the_field(field, value, tiny_models, synth_dir, tmp_path, capsys):
    from dataclasses import replace

    from logit_cache import TARGET_KINDS, CacheMeta, open_group

    ds, info = _student_dataset(tiny_models, synth_dir)
    meta = CacheMeta.for_dataset(ds, teacher_fingerprint="t" * 32, tokenizer_hash=info.tokenizer_hash,
                                 vocab_size=info.common_vocab, k=8, vision_strategy=info.vision_strategy,
                                 num_visual_tokens=info.num_visual_tokens, value_encoding="f16",
                                 target_kinds=TARGET_KINDS)
    root = tmp_path / "cache"
    open_group(root, meta=replace(meta, **{field: value}), create=True)
    rc = main(_args("distill", "dft", tiny_models["tiny-student"], synth_dir, tmp_path / "o",
                    extra=["--cache", str(root), "--num-workers", "0"]))
    err = capsys.readouterr().err
    assert rc == 2 and "cache refused" in err and field in err and "Traceback" not in err


@pytest.mark.integration
def test_missing_targets_error_or_skip(tiny_models, synth_dir, tmp_path, capsys):
    from cachefill import fill_cache

    root = tmp_path / "partial-cache"
    fill_cache(tiny_models["tiny-teacher"], synth_dir / "instruct.json", synth_dir / "images", "qwen2_base", root,
               k=4, limit=19)
    args = _args("distill", "dft", tiny_models["tiny-student"], synth_dir, tmp_path / "o",
                 extra=["--cache", str(root), "--num-workers", "0", "--max-steps", "1"])
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "5 of 24 samples have no targets" in err and "first:" in err and "--on-missing skip" in err
    assert main(args + ["--on-missing", "skip"]) == 0
    assert "5 of 24 samples have no cached targets" in capsys.readouterr().out
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["skipped_missing_targets"] == 5 and summary["samples"] == 19
