"""``student_trainer``: train a student VLM with DeepSpeed, with or without cached teacher targets.

  student_trainer train   --step pt|ft|sft --model DIR --data FILE.json --images DIR --out DIR [options]
  student_trainer distill --step dpt|dft --cache ROOT --model DIR --data FILE.json --images DIR --out DIR [options]
  student_trainer distill --step all --cache ROOT --model DIR --pretrain-data P.json --instruct-data I.json
                          --images DIR --out DIR [options]        (DPT -> SFT -> DFT into OUT/dpt, OUT/sft, OUT/dft;
                          options apply to every step, --global-batch too; --lr is per step: run steps singly)
  student_trainer eval    ...   (benchmarks; see `student_trainer eval --help`)

Several ranks: ``torchrun --nproc_per_node N -m student_trainer ...`` or ``deepspeed --num_gpus N
student_trainer/cli.py ...`` (gloo on CPU, nccl on GPU). The final model is OUT/final (HF llava
layout); ``--resume`` continues from the newest checkpoint exactly.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from student_trainer.config import DISTILL_STEPS, STEPS, TRAIN_STEPS, ConfigError, TrainConfig

EXIT_USAGE = 2


def _bool(p, name, default, help):
    p.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction, default=default,
                   help=help)


def _common(p: argparse.ArgumentParser, all_steps: bool = False) -> None:
    d = TrainConfig.__dataclass_fields__
    p.add_argument("--model", required=True, help="student: an HF llava directory")
    if all_steps:
        p.add_argument("--data", default=None, help="data of a single step (not with --step all)")
        p.add_argument("--pretrain-data", default=None, help="--step all: caption data for DPT")
        p.add_argument("--instruct-data", default=None, help="--step all: instruction data for SFT and DFT")
    else:
        p.add_argument("--data", required=True, help="LLaVA json / jsonl")
    p.add_argument("--images", default=None, help="image root of the data's 'image' fields")
    p.add_argument("--out", required=True, help="run directory (checkpoints, final/, metrics, TensorBoard)")
    o = p.add_argument_group("optimisation (defaults: the step's LLaVA-KD recipe)")
    o.add_argument("--lr", type=float, default=None, help="default: pt/dpt 1e-3, ft/sft/dft 2e-5")
    o.add_argument("--global-batch", type=int, default=None, help="samples per optimizer step over all ranks; "
                   "default: pt/dpt 256, ft/sft/dft 128")
    o.add_argument("--micro-batch", type=int, default=d["micro_batch"].default, help="samples per forward per rank")
    o.add_argument("--epochs", type=float, default=d["epochs"].default)
    o.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    o.add_argument("--warmup-ratio", type=float, default=d["warmup_ratio"].default)
    o.add_argument("--weight-decay", type=float, default=d["weight_decay"].default)
    o.add_argument("--grad-clip", type=float, default=d["grad_clip"].default, help="0 = off")
    o.add_argument("--max-length", type=int, default=d["max_length"].default)
    o.add_argument("--seed", type=int, default=d["seed"].default)
    e = p.add_argument_group("engine")
    e.add_argument("--zero-stage", type=int, default=d["zero_stage"].default, choices=[0, 1, 2, 3])
    e.add_argument("--precision", default=d["precision"].default, choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 on GPU, fp32 on CPU")
    _bool(e, "gradient-checkpointing", False, "recompute LLM activations in the backward")
    ls = p.add_argument_group("loss: alpha*ce + beta*kl_text + gamma*kl_vis + delta*rel")
    for name in ("alpha", "beta", "gamma", "delta"):
        ls.add_argument(f"--{name}", type=float, default=None,
                        help="default 1 (" + ("always" if name == "alpha" else "0 without a teacher") + ")")
    ls.add_argument("--rel-variant", default="flat", choices=["flat", "column"])
    ls.add_argument("--chunk-size", type=int, default=d["chunk_size"].default, help="positions per fused lm_head chunk")
    da = p.add_argument_group("data")
    _bool(da, "group-by-length", True, "micro-batches of similar length")
    da.add_argument("--num-workers", type=int, default=d["num_workers"].default, help="prefetching loader workers")
    da.add_argument("--prefetch", type=int, default=d["prefetch"].default, help="micro-batches prefetched per worker")
    da.add_argument("--data-on-error", default="raise", choices=["raise", "skip"], help="bad records at preparation")
    c = p.add_argument_group("checkpoints and feedback")
    c.add_argument("--save-every", type=int, default=0, help="periodic checkpoint every N steps (0: final only)")
    c.add_argument("--keep-last", type=int, default=d["keep_last"].default)
    c.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    _bool(c, "progress", True, "progress bar")
    _bool(c, "tensorboard", True, "TensorBoard scalars under OUT/tb")
    c.add_argument("--step-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # test hook
    # the deepspeed launcher appends --local_rank=N (torchrun sets LOCAL_RANK instead); the env wins
    c.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="student_trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="no teacher: TinyLLaVA PT/FT baselines and LLaVA-KD's SFT step")
    t.add_argument("--step", required=True, choices=list(TRAIN_STEPS),
                   help="; ".join(f"{s}: {STEPS[s].description}" for s in TRAIN_STEPS))
    _common(t)
    k = sub.add_parser("distill", help="DPT/DFT from a logit cache (no teacher loaded); --step all = DPT -> SFT -> DFT")
    k.add_argument("--step", required=True, choices=[*DISTILL_STEPS, "all"],
                   help="; ".join(f"{s}: {STEPS[s].description}" for s in DISTILL_STEPS))
    k.add_argument("--cache", required=True, help="logit cache root (path or fsspec URL); the group matching the "
                   "data's fingerprint and template is picked")
    k.add_argument("--teacher-fingerprint", default=None, help="also require the cache to come from this teacher")
    k.add_argument("--on-missing", default="error", choices=["error", "skip"],
                   help="samples without cached targets: fail (default) or leave them out and count them")
    _common(k, all_steps=True)
    from ckd_eval.cli import add_eval_parser  # `student_trainer eval` = ckd_eval (evaluation is its own package)

    add_eval_parser(sub)
    return p


def _config(args: argparse.Namespace, step: str, data, out, model) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw.update(step=step, data=data, out=out, model=model)
    if not STEPS[step].uses_teacher:
        kw["cache"] = kw["teacher_fingerprint"] = None  # --step all: the SFT step between DPT and DFT
    return TrainConfig(**kw)


def run(args: argparse.Namespace) -> int:
    from student_trainer.checkpoint import latest_resumable
    from student_trainer.trainer import train

    if args.command == "distill" and args.step == "all":
        problems = []
        if args.data:
            problems.append("--step all takes --pretrain-data and --instruct-data, not --data")
        for opt in ("pretrain_data", "instruct_data"):
            if not getattr(args, opt):
                problems.append(f"--step all needs --{opt.replace('_', '-')}")
        if args.lr is not None:
            problems.append("--lr differs per step (1e-3 DPT, 2e-5 SFT/DFT): run the steps one by one to override it")
        if problems:
            raise ConfigError(problems, "student_trainer distill --step all")
        out = Path(args.out)
        model = args.model
        sft_args = argparse.Namespace(**{**vars(args), "beta": None, "gamma": None, "delta": None})
        plan = [("dpt", args, args.pretrain_data), ("sft", sft_args, args.instruct_data),
                ("dft", args, args.instruct_data)]
        for step, a, data in plan:
            sub_out = out / step
            finished = (sub_out / "final" / "trainer_state.json").is_file()
            if finished and args.resume:
                print(f"student_trainer: {step} already finished in {sub_out}; moving on")
            else:
                resume = args.resume and latest_resumable(sub_out) is not None
                train(_config(argparse.Namespace(**{**vars(a), "resume": resume}), step, data, sub_out, model))
            model = str(sub_out / "final")
        print(f"student_trainer: DPT -> SFT -> DFT done; final student {out / 'dft' / 'final'}")
        return 0
    cfg = _config(args, args.step, args.data, args.out, args.model)
    train(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    from ckd_common.data import DataError
    from ckd_common.model import ModelLoadError
    from student_trainer.data import TrainerError

    args = _parser().parse_args(argv)
    if args.command == "eval":
        return args.func(args)
    try:
        from logit_cache import CacheError
    except ImportError:  # pragma: no cover
        CacheError = TrainerError  # noqa: N806
    try:
        return run(args)
    except (ConfigError, DataError, ModelLoadError, TrainerError, CacheError) as e:
        print(f"student_trainer: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("student_trainer: interrupted; the newest complete checkpoint is intact (continue with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
