"""Step time of offline distillation (targets read from the logit cache by the prefetching loader)
versus online distillation (the teacher's forward inside the step), plus the data-wait fraction.

Same student, same teacher (about 3x the student's LLM parameters), same micro-batches, the same
DeepSpeed engine and fused loss; only where the targets come from differs. The two modes alternate step
by step and the median of the per-pair ratios is reported (the machine may be shared).

    python bench/train_step.py [--size tiny|mid] [--steps 8] [--rounds 3]

Last line: ``RESULT offline_over_online_step=... data_wait_fraction=...`` (targets <= 0.5, < 0.05).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # cachefill: the in-process test/bench filler

import torch  # noqa: E402

# (hidden, layers, heads, kv heads, intermediate): the teacher has ~3x the student's LLM parameters
SIZES = {
    "tiny": {"student": (64, 2, 4, 2, 128), "teacher": (112, 3, 4, 2, 224)},
    "mid": {"student": (256, 4, 4, 2, 704), "teacher": (384, 6, 6, 2, 1024)},
}


def build(kind: str, dims: tuple, out: Path) -> Path:
    from ckd_common import model as M

    name = f"bench-{kind}"
    M.PRESETS[name] = M.Preset(*dims)  # a bench-local preset: same tokenizer and vision tower as the tiny ones
    return M.init_preset(name, out / name)


def llm_params(model) -> int:
    return sum(p.numel() for p in model.model.language_model.parameters())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="mid", choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=6, help="measured steps per mode per reporting block")
    ap.add_argument("--rounds", type=int, default=3, help="reporting blocks (modes alternate every step)")
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3], help="the trainer's default is 2")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the training process (1: no OpenMP oversubscription on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import deepspeed

    from cachefill import fill_cache
    from ckd_common.data import prepare_file
    from ckd_common.kd import KDWeights, collate_targets
    from ckd_common.model import load_vlm, model_info
    from ckd_common.synth import synthesize
    from ckd_common.teacher import TeacherInput, TeacherRunner
    from ckd_common.templates import QWEN2_BASE
    from student_trainer.config import TrainConfig
    from student_trainer.data import MicroBatches, build_schedule, expected_cache_meta, make_loader, open_cache
    from student_trainer.trainer import StudentLoss, deepspeed_config, set_trainable, setup_distributed

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_step_"))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {dev}" + ("" if dev == "cuda" else " (no GPU in this session: CPU fp32 numbers)"))
    synth = tmp / "synth"
    synthesize(synth, seed=0, n_pretrain=0, n_instruct=96, n_eval=0)
    sdir = build("student", SIZES[args.size]["student"], tmp)
    tdir = build("teacher", SIZES[args.size]["teacher"], tmp)
    cache = tmp / "cache"
    t0 = time.perf_counter()
    fill_cache(tdir, synth / "instruct.json", synth / "images", QWEN2_BASE, cache, k=args.k)
    print(f"cache filled in {time.perf_counter() - t0:.1f}s")

    rank, world = setup_distributed()
    student, tok = load_vlm(sdir)
    teacher, _ = load_vlm(tdir)
    ratio = llm_params(teacher) / llm_params(student)
    print(f"size {args.size}: student LLM {llm_params(student) / 1e6:.2f}M, teacher LLM "
          f"{llm_params(teacher) / 1e6:.2f}M params ({ratio:.1f}x)")
    info = model_info(student, tok)
    ds = prepare_file(synth / "instruct.json", tok, QWEN2_BASE, info.num_visual_tokens, info.image_token_id,
                      synth / "images")
    reader = open_cache(str(cache), expected_cache_meta(ds, info))
    runner = TeacherRunner(teacher, vocab_limit=reader.meta.vocab_size)

    cfg = TrainConfig(step="dft", model=sdir, data=synth / "instruct.json", out=tmp / "run", cache=str(cache),
                      global_batch=args.global_batch, micro_batch=args.micro_batch, zero_stage=args.zero_stage).resolved()
    set_trainable(student, ("connector", "llm"))
    module = StudentLoss(student, cfg.chunk_size, cfg.rel_variant, head_trainable=True)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=deepspeed_config(cfg, world, bf16=False))
    gas = cfg.global_batch // (cfg.micro_batch * world)
    steps_needed = 2 * (args.rounds * args.steps + 1)
    sched = build_schedule([s.length for s in ds.samples], cfg.global_batch, cfg.micro_batch, world, 0,
                           epochs=max(1.0, steps_needed * cfg.global_batch / len(ds.samples) + 1))
    micro = [mb for st in sched.steps for mb in st[rank]]
    weights = KDWeights()  # every term weighted 1, as in DFT

    def loader(online: bool, mbs):
        return iter(make_loader(MicroBatches(ds.samples, mbs, tok.pad_token_id, info.image_size,
                                             None if online else reader, aspect_ratio=info.image_aspect_ratio),
                                args.num_workers, 4))

    teacher_t: list[float] = []

    def step(it, online: bool) -> tuple[float, float]:
        t = time.perf_counter()
        wait = tt = 0.0
        for _ in range(gas):
            tw = time.perf_counter()
            batch = next(it)
            wait += time.perf_counter() - tw
            targets = batch["targets"]
            if online:  # the teacher forward is part of the step
                t1 = time.perf_counter()
                pix = iter(batch["pixel_values"].numpy()) if "pixel_values" in batch else None
                inputs = [TeacherInput.from_prepared(ds.samples[i], pixel_values=next(pix)
                                                     if ds.samples[i].has_image else None) for i in batch["indices"]]
                targets = collate_targets(runner.targets(inputs, args.k))
                tt += time.perf_counter() - t1
            kw = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
            if "pixel_values" in batch:
                kw["pixel_values"] = batch["pixel_values"]
            res = engine(targets=targets, visual_start=batch["visual_start"], weights=weights, **kw)
            engine.backward(res["total"])
            engine.step()
        if online:
            teacher_t.append(tt)
        return time.perf_counter() - t, wait

    # Both loaders live side by side and the modes alternate step by step, so a load change on a
    # shared machine hits both alike; the first pair (loader start-up) is not counted.
    n = args.rounds * args.steps + 1
    off_it, on_it = loader(False, micro[:n * gas]), loader(True, micro[n * gas:2 * n * gas])
    off_t, off_w, on_t = [], [], []
    for i in range(n):
        to, wo = step(off_it, False)
        tn, _ = step(on_it, True)
        if i:
            off_t.append(to)
            off_w.append(wo)
            on_t.append(tn)
        if i and i % args.steps == 0:
            print(f"steps {i - args.steps + 1}-{i}: offline {statistics.median(off_t[-args.steps:]) * 1e3:.1f} ms/step, "
                  f"online {statistics.median(on_t[-args.steps:]) * 1e3:.1f} ms/step")
    del off_it, on_it
    off, on = statistics.median(off_t), statistics.median(on_t)
    pair = statistics.median(a / b for a, b in zip(off_t, on_t))
    wait_fraction = sum(off_w) / sum(off_t)
    print(f"offline (cache) step: median {off * 1e3:.1f} ms; online (teacher in the step): median {on * 1e3:.1f} ms "
          f"(ratio of medians {off / on:.3f}, median of per-pair ratios {pair:.3f}); global batch {cfg.global_batch}, "
          f"micro-batch {cfg.micro_batch}, {args.num_workers} loader workers each, k={args.k}, "
          f"{args.threads} torch thread(s), ZeRO-{args.zero_stage}")
    print(f"inside the online step the teacher's targets take a median {statistics.median(teacher_t[1:]) * 1e3:.1f} ms: "
          f"the ratio is about student / (student + teacher); on CPU a 3x teacher's forward costs about one student "
          f"forward+backward, so ~0.5 is the floor here")
    print(f"RESULT offline_over_online_step={pair:.3f} data_wait_fraction={wait_fraction:.4f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
