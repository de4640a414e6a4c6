"""Gradient checkpointing in the trainer (issue 14): the same loss and gradients with and without it
(and the recompute really happens), the auto rule, its composition with DeepSpeed ZeRO-2/3, and the
banner's parameter counts (a tied lm_head counted once)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TERMS = ("total", "ce", "kl_text", "kl_vis", "rel")


@pytest.fixture(scope="module")
def cache(tiny_models, synth_dir, tmp_path_factory):
    from cachefill import fill_cache

    root = tmp_path_factory.mktemp("gc-cache") / "tiny-teacher"
    for data, template in (("pretrain.json", "pretrain"), ("instruct.json", "qwen2_base")):
        fill_cache(tiny_models["tiny-teacher"], synth_dir / data, synth_dir / "images", template, root, k=8)
    return root


def _batch(tiny_models, synth_dir, cache, data: str, template: str) -> dict:
    """One real micro-batch of 4 samples with their cached teacher targets, as the trainer's loader builds it."""
    from ckd_common.data import prepare_file
    from ckd_common.model import load_vlm, model_info
    from student_trainer.data import MicroBatches, expected_cache_meta, open_cache

    model, tok = load_vlm(tiny_models["tiny-student"])
    info = model_info(model, tok)
    ds = prepare_file(synth_dir / data, tok, template, info.num_visual_tokens, info.image_token_id,
                      synth_dir / "images")
    reader = open_cache(str(cache), expected_cache_meta(ds, info))
    return MicroBatches(ds.samples, [[0, 1, 2, 3]], tok.pad_token_id, info.image_size, reader,
                        aspect_ratio=info.image_aspect_ratio)[0]


def _loss_and_grads(model_dir: Path, batch: dict, trainable: tuple[str, ...], checkpointing: bool):
    from ckd_common.kd import KDWeights
    from ckd_common.model import load_vlm
    from student_trainer.trainer import StudentLoss, set_trainable, use_gradient_checkpointing

    vlm, _ = load_vlm(model_dir)
    set_trainable(vlm, trainable)
    on, _ = use_gradient_checkpointing(vlm, checkpointing)
    assert on == checkpointing
    vlm.train()
    vlm.model.vision_tower.eval()
    calls = []  # attention runs inside the checkpointed layer: twice per layer when it is recomputed
    for layer in vlm.model.language_model.layers:
        layer.self_attn.register_forward_hook(lambda *_: calls.append(1))
    module = StudentLoss(vlm, chunk_size=16, rel_variant="flat", head_trainable="llm" in trainable)
    res = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                 pixel_values=batch["pixel_values"], targets=batch["targets"], visual_start=batch["visual_start"],
                 weights=KDWeights())
    forward_calls = len(calls)
    res["total"].backward()
    grads = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.requires_grad}
    return {t: float(res[t].detach()) for t in TERMS}, grads, forward_calls, len(calls)


@pytest.mark.parametrize("step,trainable,data,template", [
    ("dft", ("connector", "llm"), "instruct.json", "qwen2_base"),
    ("dpt", ("connector",), "pretrain.json", "pretrain"),  # frozen LLM: the gradient still reaches the connector
])
def test_checkpointing_gives_the_same_loss_and_gradients(step, trainable, data, template, tiny_models, synth_dir,
                                                         cache):
    batch = _batch(tiny_models, synth_dir, cache, data, template)
    loss0, grads0, fwd0, total0 = _loss_and_grads(tiny_models["tiny-student"], batch, trainable, False)
    loss1, grads1, fwd1, total1 = _loss_and_grads(tiny_models["tiny-student"], batch, trainable, True)
    layers = fwd0
    assert total0 == layers and fwd1 == layers and total1 == 2 * layers, "the backward did not recompute the layers"
    assert all(loss0[t] > 0 for t in ("ce", "kl_text", "kl_vis", "rel")), loss0  # every term is exercised
    for t in TERMS:
        assert loss1[t] == pytest.approx(loss0[t], rel=1e-6, abs=1e-9), t
    assert grads0.keys() == grads1.keys() and grads0
    assert any(n.startswith("model.multi_modal_projector") for n in grads0)
    assert any(n.startswith("model.language_model") for n in grads0) == ("llm" in trainable)
    for n in grads0:
        assert grads0[n].abs().max() > 0, n
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-5, atol=1e-8, msg=n)


def test_auto_rule_and_banner_counts_at_the_real_shapes(student):
    """Qwen2.5-0.5B + SigLIP-so400m-384 built on the meta device (no memory): the tied head is counted once
    (494,032,768 = the published Qwen2.5-0.5B size) and auto turns checkpointing on; the tiny preset: off."""
    from transformers import LlavaForConditionalGeneration

    from deploy.selftest_models import real_llava_config
    from student_trainer.trainer import set_trainable, use_gradient_checkpointing

    with torch.device("meta"):
        real = LlavaForConditionalGeneration(real_llava_config("0.5b", image_token_id=151665))
    assert real.lm_head.weight is real.model.language_model.embed_tokens.weight
    counts = set_trainable(real, ("connector", "llm"))
    assert counts == {"vision": 428_225_600, "connector": 1_836_800, "llm": 494_032_768}
    assert use_gradient_checkpointing(real, None) == (True, "auto: LLM 494.0M parameters >= 100M")
    assert real.model.language_model.layers[0].gradient_checkpointing
    assert use_gradient_checkpointing(real, False) == (False, "--no-gradient-checkpointing")
    assert not real.model.language_model.layers[0].gradient_checkpointing

    tiny, _ = student
    on, why = use_gradient_checkpointing(tiny, None)
    assert not on and why.startswith("auto: LLM 0.") and why.endswith("< 100M")
    assert use_gradient_checkpointing(tiny, True) == (True, "--gradient-checkpointing")
    use_gradient_checkpointing(tiny, False)


# ---------------------------------------------------------------------------------------------
# through the trainer: DeepSpeed ZeRO-2 and ZeRO-3 with checkpointing = ZeRO-2 without
def _run(tiny_models, synth_dir, cache, out: Path, *extra: str) -> list[dict]:
    from student_trainer.cli import main

    argv = ["distill", "--step", "dft", "--cache", str(cache), "--model", str(tiny_models["tiny-student"]),
            "--data", str(synth_dir / "instruct.json"), "--images", str(synth_dir / "images"), "--out", str(out),
            "--global-batch", "4", "--micro-batch", "2", "--max-steps", "3", "--lr", "1e-3", "--num-workers", "0",
            "--no-progress", "--no-tensorboard", *extra]
    assert main(argv) == 0
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def plain_run(tiny_models, synth_dir, cache, tmp_path_factory):
    """The default run (auto: no checkpointing for the tiny preset) and its banner."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("gc-plain") / "run"
    banner = io.StringIO()
    with contextlib.redirect_stdout(banner):
        rec = _run(tiny_models, synth_dir, cache, out)
    return out, rec, banner.getvalue()


@pytest.mark.integration
@pytest.mark.parametrize("stage", [2, 3])
def test_checkpointing_composes_with_zero_stages(stage, plain_run, tiny_models, synth_dir, cache, tmp_path, capsys,
                                                 monkeypatch):
    from transformers import LlavaForConditionalGeneration

    from student_trainer.trainer import StudentLoss

    seen = []  # transformers checkpoints a layer only in training mode: the trainer must train() the model
    forward = StudentLoss.forward

    def spy(self, *a, **kw):
        layer = self.vlm.model.language_model.layers[0]
        seen.append((layer.training, layer.gradient_checkpointing, self.vlm.model.vision_tower.training))
        return forward(self, *a, **kw)

    monkeypatch.setattr(StudentLoss, "forward", spy)
    plain_out, plain, plain_banner = plain_run
    assert "gradient checkpointing off (auto: LLM 0." in plain_banner
    capsys.readouterr()
    out = tmp_path / f"gc-z{stage}"
    rec = _run(tiny_models, synth_dir, cache, out, "--gradient-checkpointing", "--zero-stage", str(stage))
    banner = capsys.readouterr().out
    assert seen and set(seen) == {(True, True, False)}, seen
    assert "gradient checkpointing on (--gradient-checkpointing)" in banner and "counted once" in banner
    assert [r["step"] for r in rec] == [r["step"] for r in plain] == [1, 2, 3]
    for a, b in zip(rec, plain):
        for t in TERMS:
            assert a[t] == pytest.approx(b[t], rel=1e-5, abs=1e-6), (a["step"], t)
    w0 = LlavaForConditionalGeneration.from_pretrained(str(plain_out / "final")).state_dict()
    w1 = LlavaForConditionalGeneration.from_pretrained(str(out / "final")).state_dict()
    assert all(torch.allclose(w0[k], w1[k], atol=1e-5) for k in w0)
