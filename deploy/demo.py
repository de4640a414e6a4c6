"""The embedded default: synthetic data + tiny models, end to end on CPU (``make demo``).

Run: ``python -m deploy.demo [--workdir runs/demo]``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def _step(msg: str) -> float:
    print(f"==> {msg}", flush=True)
    return time.perf_counter()


def run_demo(workdir: str | Path = "runs/demo", seed: int = 0) -> dict:
    from ckd_common.data import collate, prepare_file
    from ckd_common.losses import collate_targets, fused_kd_loss
    from ckd_common.model import PRESETS, init_preset, lm_head_weight, load_vlm, model_info
    from ckd_common.synth import synthesize
    from ckd_common.teacher import TeacherInput, TeacherRunner

    work = Path(workdir)
    t0 = _step(f"synthesising data into {work / 'data'}")
    counts = synthesize(work / "data", seed=seed, n_pretrain=200, n_instruct=200, n_eval=100)
    print(f"    {counts['pretrain']} captions, {counts['instruct']} conversations, {counts['eval']} eval questions "
          f"({time.perf_counter() - t0:.1f}s)")

    _step("building the tiny presets")
    models = {}
    for name in PRESETS:
        d = init_preset(name, work / "models" / name, seed=seed)
        models[name] = load_vlm(d)

    rows = []
    keys = {}
    for name, (model, tok) in models.items():
        info = model_info(model, tok)
        t = time.perf_counter()
        ds = prepare_file(work / "data" / "instruct.json", tok, "qwen2_base", info.num_visual_tokens,
                          info.image_token_id, work / "data" / "images")
        keys[name] = [s.key for s in ds.samples]
        batch = collate(ds.samples[:8], tok.pad_token_id, info.image_size)
        with torch.no_grad():
            loss = model(**batch).loss.item()
        n_params = sum(p.numel() for p in model.parameters())
        rows.append((name, n_params, info.hidden_size, info.num_visual_tokens, loss, time.perf_counter() - t))
    same = all(v == keys["tiny-student"] for v in keys.values())

    _step("teacher targets (top-k + tail, autocorrelation) and the student's KD loss against them")
    (s_model, s_tok), (t_model, t_tok) = models["tiny-student"], models["tiny-teacher"]
    info = model_info(t_model, t_tok)
    ds = prepare_file(work / "data" / "instruct.json", t_tok, "qwen2_base", info.num_visual_tokens,
                      info.image_token_id, work / "data" / "images")
    samples = ds.samples[:8]
    runner = TeacherRunner(t_model, vocab_limit=min(info.vocab_size, info.tokenizer_vocab_size))
    targets = runner.targets([TeacherInput.from_prepared(s, info.image_size) for s in samples], k=16)
    batch = collate(samples, s_tok.pad_token_id, info.image_size)
    with torch.no_grad():
        h = s_model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          pixel_values=batch["pixel_values"]).last_hidden_state
        kd = fused_kd_loss(h, lm_head_weight(s_model), batch["labels"], collate_targets(targets),
                           [s.visual_start for s in samples])
    tail = float(np.mean(np.concatenate([t.text.tail for t in targets])))

    print()
    print(f"{'model':<14}{'params':>10}{'hidden':>8}{'visual':>8}{'CE loss':>10}{'time':>8}")
    for name, n, d, nv, loss, dt in rows:
        print(f"{name:<14}{n / 1e6:>9.2f}M{d:>8}{nv:>8}{loss:>10.3f}{dt:>7.2f}s")
    print(f"\nsample keys identical across the three models: {same}")
    print(f"KD terms of the untrained student vs the untrained teacher (k=16, mean tail mass {tail:.3f}): "
          + ", ".join(f"{k}={v.item():.4f}" for k, v in kd.items()))
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f}s; outputs under {work}")
    return {"models": rows, "keys_identical": same, "kd": {k: v.item() for k, v in kd.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__)
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from ckd_common.model import quiet_transformers

    quiet_transformers()
    run_demo(args.workdir, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
