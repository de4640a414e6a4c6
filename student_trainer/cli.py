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
import sys
from pathlib import Path

from ckd_common.config import add_arguments, from_args
from student_trainer.config import (DISTILL_STEPS, KD_OPTION_DEFAULTS, LLAVA_KD_STEPS, OPTION_GROUPS, STEPS,
                                    TEACHER_GROUP, TRAIN_STEPS, ConfigError, TrainConfig)

EXIT_USAGE = 2


def _step_help(steps) -> str:
    return "; ".join(f"{s}: {STEPS[s].description}" for s in steps)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="student_trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    sub = p.add_subparsers(dest="command", required=True)
    # every option is a TrainConfig field (ckd_common.config.add_arguments): declared once, in the config
    t = sub.add_parser("train", help="no teacher: TinyLLaVA PT/FT baselines and LLaVA-KD's SFT step")
    add_arguments(t, TrainConfig, skip_groups=[TEACHER_GROUP], groups=OPTION_GROUPS,
                  overrides={"step": {"choices": list(TRAIN_STEPS), "help": _step_help(TRAIN_STEPS)}})
    k = sub.add_parser("distill", help="DPT/DFT from a logit cache (no teacher loaded); --step all = DPT -> SFT -> DFT")
    add_arguments(k, TrainConfig, groups=OPTION_GROUPS, overrides={
        "step": {"choices": [*DISTILL_STEPS, "all"], "help": _step_help(DISTILL_STEPS)},
        "cache": {"required": True},
        "data": {"required": False, "help": "data of a single step (not with --step all)"}})
    k.add_argument("--pretrain-data", default=None, help="--step all: caption data for DPT")
    k.add_argument("--instruct-data", default=None, help="--step all: instruction data for SFT and DFT")
    for sp in (t, k):
        # the deepspeed launcher appends --local_rank=N (torchrun sets LOCAL_RANK instead); the env wins
        sp.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    from ckd_eval.cli import add_eval_parser  # `student_trainer eval` = ckd_eval (evaluation is its own package)

    add_eval_parser(sub)
    return p


def _config(args: argparse.Namespace, step: str, data, out, model) -> TrainConfig:
    fixed = dict(step=step, data=data, out=out, model=model)
    if not STEPS[step].uses_teacher:
        fixed.update(cache=None, teacher_fingerprint=None)  # --step all: the SFT step between DPT and DFT
    return from_args(TrainConfig, args, **fixed)


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
        if getattr(args, "prepared", None):
            problems.append("--step all reads two data files: --prepared names one prepared dataset; leave it out "
                            "(each step opens its own)")
        if args.lr is not None:
            per_step = ", ".join(f"{s.upper()} {STEPS[s].lr:g}" for s in LLAVA_KD_STEPS)
            problems.append(f"--lr differs per step ({per_step}): run the steps one by one to override it")
        if problems:
            raise ConfigError(problems, "student_trainer distill --step all")
        out = Path(args.out)
        model = args.model
        sft_args = argparse.Namespace(**{**vars(args), "beta": None, "gamma": None, "delta": None,
                                         **KD_OPTION_DEFAULTS})  # SFT has no teacher
        data_of = {"pretrain": args.pretrain_data, "instruct": args.instruct_data}
        for step in LLAVA_KD_STEPS:
            a, data = (args if STEPS[step].uses_teacher else sft_args), data_of[STEPS[step].split]
            sub_out = out / step
            finished = (sub_out / "final" / "trainer_state.json").is_file()
            if finished and args.resume:
                print(f"student_trainer: {step} already finished in {sub_out}; moving on")
            else:
                resume = args.resume and latest_resumable(sub_out) is not None
                train(_config(argparse.Namespace(**{**vars(a), "resume": resume}), step, data, sub_out, model))
            model = str(sub_out / "final")
        print(f"student_trainer: {' -> '.join(s.upper() for s in LLAVA_KD_STEPS)} done; "
              f"final student {out / LLAVA_KD_STEPS[-1] / 'final'}")
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
