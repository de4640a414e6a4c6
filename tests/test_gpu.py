"""CUDA tests (marker ``gpu``; tests/conftest.py skips them without CUDA): what the CPU tests cannot
see — the fused loss's CUDA autocast and device buffers against the dense reference, the teacher
forward on CUDA against the CPU one, and one DeepSpeed step (nccl, bf16) of the real trainer.
Tiny shapes: seconds on any GPU."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ckd_common.kd import KDWeights, collate_targets, fused_kd_loss, kd_loss_from_logits
from test_losses import KEYS, assert_dicts_close, make_batch, sample_targets, visual_start

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
WEIGHTS = KDWeights(ce=1.0, kl_text=0.7, kl_vis=0.3, rel=2.0)


def _on_host(out: dict) -> dict:
    return {k: out[k].detach().cpu() for k in KEYS}


def _fused_and_grads(bt, batch, device, **kw):
    h = bt["hidden"].to(device).requires_grad_()
    w = bt["weight"].to(device).requires_grad_()
    out = fused_kd_loss(h, w, bt["labels"].to(device), batch, visual_start(bt), weights=WEIGHTS, chunk_size=4, **kw)
    return out, torch.autograd.grad(out["total"], (h, w)), (h, w)


def test_fused_loss_on_cuda_equals_the_dense_reference_fp32():
    bt = make_batch(dtype=torch.float32, vocab=31, dim=16, seed=3)
    targets = sample_targets(bt, k=8)
    batch = collate_targets(targets, device=DEVICE)
    fused, g_fused, (h, w) = _fused_and_grads(bt, batch, DEVICE)
    assert all(fused[k].device.type == "cuda" and fused[k].dtype == torch.float32 for k in KEYS)
    dense = kd_loss_from_logits(h @ w.T, bt["labels"].to(DEVICE), batch, visual_start(bt), weights=WEIGHTS)
    g_dense = torch.autograd.grad(dense["total"], (h, w))
    assert_dicts_close(_on_host(fused), _on_host(dense), rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fused, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    # and the numbers the CPU computes
    cpu, g_cpu, _ = _fused_and_grads(bt, collate_targets(targets), "cpu")
    assert_dicts_close(_on_host(fused), _on_host(cpu), rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fused, g_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_fused_loss_under_cuda_bf16_autocast_stays_close_to_fp32():
    bt = make_batch(dtype=torch.float32, vocab=31, dim=16, seed=4)
    batch = collate_targets(sample_targets(bt, k=8), device=DEVICE)
    ref, g_ref, _ = _fused_and_grads(bt, batch, DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, g, _ = _fused_and_grads(bt, batch, DEVICE)
    assert all(out[k].dtype == torch.float32 for k in KEYS)  # the loss is accumulated in float32
    assert g[0].dtype == torch.float32 and g[1].dtype == torch.float32
    assert_dicts_close(_on_host(out), _on_host(ref), rtol=3e-2, atol=3e-2)
    for a, b in zip(g, g_ref):
        assert torch.isfinite(a).all()
        assert (a - b).norm() / b.norm() < 0.05


def _teacher_inputs(model_dir: Path, synth_dir: Path):
    from ckd_common.data import prepare_file
    from ckd_common.model import load_vlm, model_info
    from ckd_common.teacher import TeacherInput

    model, tok = load_vlm(model_dir)
    info = model_info(model, tok)
    ds = prepare_file(synth_dir / "instruct.json", tok, "qwen2_base", info.num_visual_tokens, info.image_token_id,
                      synth_dir / "images")
    samples = [s for s in ds.samples if s.has_image][:3] + [s for s in ds.samples if not s.has_image][:1]
    return model, info, [TeacherInput.from_prepared(s, info.image_size, aspect_ratio=info.image_aspect_ratio)
                         for s in samples]


def _assert_same_topk(got, want) -> None:
    """Equal top-k ids except where the reference's own log-probs nearly tie (then either order is right)."""
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
    np.testing.assert_allclose(got.tail, want.tail, atol=1e-4)
    gaps = np.abs(np.diff(want.logprobs, axis=-1))
    clear = np.ones_like(want.ids, dtype=bool)
    clear[:, 1:] &= gaps > 1e-3
    clear[:, :-1] &= gaps > 1e-3
    np.testing.assert_array_equal(got.ids[clear], want.ids[clear])


def test_teacher_runner_on_cuda_gives_the_cpu_targets(tiny_models, synth_dir):
    from ckd_common.teacher import TeacherRunner

    model, info, inputs = _teacher_inputs(tiny_models["tiny-teacher"], synth_dir)
    want = TeacherRunner(model, vocab_limit=info.common_vocab).targets(inputs, 8)
    runner = TeacherRunner(model.to(DEVICE), vocab_limit=info.common_vocab)
    assert runner.device.type == "cuda"
    got = runner.targets(inputs, 8)
    for g, w in zip(got, want):
        assert g.key == w.key
        _assert_same_topk(g.text, w.text)
        assert (g.visual is None) == (w.visual is None)
        if w.visual is not None:
            _assert_same_topk(g.visual, w.visual)
            np.testing.assert_allclose(g.autocorr, w.autocorr, atol=1e-4)


@pytest.mark.integration  # a DeepSpeed rank (nccl) in a subprocess
def test_one_deepspeed_step_on_cuda_in_bf16(tiny_models, synth_dir, tmp_path):
    """The real trainer on one GPU: DeepSpeed with nccl and bf16 (the GPU default), two optimizer
    steps; the first step's CE is the model's own loss on the batch, the saved student loads with
    plain transformers and differs from the one it started from."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from ckd_common.data import Preparer, collate
    from ckd_common.model import load_vlm, model_info

    student = tiny_models["tiny-student"]
    recs = json.loads((synth_dir / "pretrain.json").read_text())[:4]
    (tmp_path / "four.json").write_text(json.dumps(recs))
    out = tmp_path / "o"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    r = subprocess.run([sys.executable, "-m", "student_trainer", "train", "--step", "pt", "--model", str(student),
                        "--data", str(tmp_path / "four.json"), "--images", str(synth_dir / "images"), "--out",
                        str(out), "--global-batch", "4", "--micro-batch", "4", "--epochs", "2", "--max-steps", "2",
                        "--num-workers", "0", "--no-progress", "--no-tensorboard"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "bf16" in r.stdout, r.stdout[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(math.isfinite(s["ce"]) for s in steps)

    model, tok = load_vlm(student)  # float32 on the CPU: the reference value of the first step's CE
    info = model_info(model, tok)
    prep = Preparer(tok, "pretrain", info.num_visual_tokens, info.image_token_id, synth_dir / "images")
    batch = collate([prep.prepare(rec) for rec in recs], tok.pad_token_id, info.image_size,
                    aspect_ratio=info.image_aspect_ratio)
    with torch.no_grad():
        loss = float(model(**batch).loss)
    assert steps[0]["ce"] == pytest.approx(loss, rel=3e-2)  # bf16 forward vs float32

    final = LlavaForConditionalGeneration.from_pretrained(out / "final")
    assert all(torch.isfinite(p).all() for p in final.parameters())
    before = load_file(Path(student) / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    assert any(not torch.equal(before[k].float(), after[k].float()) for k in before if k in after)
