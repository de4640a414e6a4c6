"""The ``ckd_common`` half of the ``ckd`` command: models and data. (``deploy.cli`` adds the
cascade and the demo on top, since those drive the server, cache and trainer.)

  ckd model init --preset tiny-student|tiny-ta|tiny-teacher --out DIR [--strategy full|patch]
                 [--image-aspect-ratio square|pad] [--template qwen2_base|pretrain]
  ckd model convert --tinyllava SRC --out DST [--template qwen2_base|pretrain]
  ckd model compose --vision DIR --llm DIR --out DST [--strategy full|patch] [--image-aspect-ratio square|pad]
  ckd model info DIR
  ckd data synth --out DIR [--seed S --n-pretrain N --n-instruct N --n-eval N]
  ckd data prepare --model DIR --data FILE --images DIR --template pretrain|qwen2_base [--workers N]
                   [--root DIR] [--max-length N] [--on-error raise|skip] [--max-image-pixels N]
                   [--allow-outside-images] [--rebuild]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ckd_common.config import CommandConfig, ConfigError, add_arguments, from_args
from ckd_common.data import DEFAULT_MAX_LENGTH, MAX_IMAGE_PIXELS, DataError
from ckd_common.model import IMAGE_ASPECT_RATIOS, PRESETS, ModelLoadError
from ckd_common.templates import QWEN2_BASE, TEMPLATE_NAMES

_ASPECT_HELP = ("image preprocessing: 'square' resizes the image as it is, 'pad' first pads it to a square with "
                "the mean colour (LLaVA-1.5)")
_TEMPLATE_HELP = "the conversation template the model is (to be) trained with: its chat template and stop token"


def add_common_commands(sub) -> None:
    """Register ``model`` and ``data`` on an argparse subparsers object."""
    model = sub.add_parser("model", help="create, convert, compose and inspect VLM checkpoints")
    msub = model.add_subparsers(dest="cmd", required=True)
    m = msub.add_parser("init", help="write a tiny random-initialised preset")
    m.add_argument("--preset", required=True, choices=sorted(PRESETS))
    m.add_argument("--out", required=True)
    m.add_argument("--strategy", default="full", choices=["full", "patch"])
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--image-aspect-ratio", default="square", choices=IMAGE_ASPECT_RATIOS, help=_ASPECT_HELP)
    m.add_argument("--template", default=QWEN2_BASE, choices=TEMPLATE_NAMES, help=_TEMPLATE_HELP)
    m = msub.add_parser("convert", help="TinyLLaVA-Factory checkpoint (any layout it writes) -> HF llava directory")
    m.add_argument("--tinyllava", required=True, help="the TinyLLaVA-Factory output or released model directory")
    m.add_argument("--out", required=True)
    m.add_argument("--template", default=QWEN2_BASE, choices=TEMPLATE_NAMES,
                   help=_TEMPLATE_HELP + " (TinyLLaVA's config does not record it; qwen2_base for its Qwen2 "
                        "finetune stage and released models, pretrain for a pretrain-stage checkpoint)")
    m = msub.add_parser("compose", help="vision tower + LLM + fresh connector -> HF llava directory")
    m.add_argument("--vision", required=True)
    m.add_argument("--llm", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--strategy", default="full", choices=["full", "patch"])
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--image-aspect-ratio", default="square", choices=IMAGE_ASPECT_RATIOS, help=_ASPECT_HELP)
    m.add_argument("--template", default=QWEN2_BASE, choices=TEMPLATE_NAMES, help=_TEMPLATE_HELP)
    m = msub.add_parser("info", help="print a model's fingerprint and shapes")
    m.add_argument("dir")

    data = sub.add_parser("data", help="synthesise and prepare data")
    dsub = data.add_subparsers(dest="cmd", required=True)
    d = dsub.add_parser("synth", help="write the synthetic shapes dataset")
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--n-pretrain", type=int, default=400)
    d.add_argument("--n-instruct", type=int, default=400)
    d.add_argument("--n-eval", type=int, default=200)
    d = dsub.add_parser("prepare", help="prepare a LLaVA json file once for a model (docs/prepared-data.md) and "
                                        "report what the model sees")
    add_arguments(d, PrepareConfig)


def _opt(default=None, **meta):
    return field(default=default, metadata=meta)


@dataclass
class PrepareConfig(CommandConfig):
    """``ckd data prepare``: one prepared dataset (ckd_common.prepared) for a model's tokenizer and
    visual-token count, built in parallel or, when it exists and is current, only reported."""

    model: Path = _opt(dataclasses.MISSING, help="the model the data is for: an HF llava directory (its config.json and tokenizer; "
                            "no weights are loaded)")
    data: Path = _opt(dataclasses.MISSING, help="LLaVA json / jsonl")
    template: str = _opt(dataclasses.MISSING, choices=TEMPLATE_NAMES, help="the conversation template (pretrain: DPT/PT, qwen2_base: "
                                                      "SFT/DFT/FT)")
    images: Path | None = _opt(help="image root of the data's 'image' paths")
    max_length: int = _opt(DEFAULT_MAX_LENGTH, help="longest sample in tokens (longer ones are truncated)")
    on_error: str = _opt("raise", choices=("raise", "skip"), help="bad records: fail naming the first, or leave them "
                         "out and count them (the dataset is written either way)")
    workers: int | None = _opt(help="preparation processes (default: every core)")
    root: Path | None = _opt(help="where prepared datasets live (default: $CKD_PREPARED_DIR, else "
                                  "~/.cache/llava-ckd/prepared)")
    max_image_pixels: int = _opt(MAX_IMAGE_PIXELS, help="images with more pixels (from the file header) are bad data")
    allow_outside_images: bool = _opt(False, help="accept image paths that resolve outside --images (absolute, "
                                                  "'..', symlinks out)")
    rebuild: bool = _opt(False, help="prepare again even if a current prepared dataset exists")
    progress: bool = _opt(True, help="progress bar")

    def problems(self) -> list[str]:
        from ckd_common.config import path_problems

        p = path_problems(model=(self.model, "dir"), data=(self.data, "file"))
        if self.images is not None and not Path(self.images).is_dir():
            p.append(f"images: directory {self.images} does not exist")
        if self.template not in TEMPLATE_NAMES:
            p.append(f"template {self.template!r}: choose one of {', '.join(TEMPLATE_NAMES)}")
        if self.max_length < 16:
            p.append(f"max_length must be >= 16, got {self.max_length}")
        if self.workers is not None and self.workers < 1:
            p.append(f"workers must be >= 1, got {self.workers}")
        if self.max_image_pixels < 1:
            p.append(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if self.on_error not in ("raise", "skip"):
            p.append(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        return p


def prepare_data(cfg: PrepareConfig):
    """Run ``ckd data prepare``: returns the opened PreparedData."""
    from ckd_common.model import data_contract
    from ckd_common.prepared import PrepareSpec, obtain

    cfg.validate()
    contract, tok = data_contract(cfg.model)
    spec = PrepareSpec.of(cfg.data, cfg.images, cfg.template, contract, cfg.max_length,
                          max_image_pixels=cfg.max_image_pixels, allow_outside_images=cfg.allow_outside_images)
    return obtain(spec, tok, root=cfg.root, on_error=cfg.on_error, workers=cfg.workers, progress=cfg.progress,
                  rebuild=cfg.rebuild)


def prepare_report(ds) -> str:
    """What ``ckd data prepare`` prints: counts, skipped samples by reason, where this data is
    rendered differently from the reference (docs/templates.md) and tokenizer warnings."""
    m = ds.manifest
    lines = [f"{len(ds)} samples, {m['tokens']} tokens, {m['response_positions']} response positions, "
             f"template {ds.template}, fingerprint {ds.fingerprint}",
             f"  prepared dataset: {ds.path} ({m['records']} records in {m['seconds']} s with {m['workers']} "
             f"worker(s); pass it as --prepared to the trainer and the fill)"]
    for reason, n in sorted((ds.skipped or {}).items()):
        lines.append(f"  skipped {n}: {reason}")
    for note, n in sorted((ds.notes or {}).items()):
        lines.append(f"  {n} sample(s): {note}")
    lines += [f"  warning: {w}" for w in ds.warnings]
    if ds.notes or ds.warnings:
        lines.append("  (deviations from TinyLLaVA-Factory/LLaVA-KD and why: docs/templates.md)")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_commands(p.add_subparsers(dest="group", required=True))
    return p


def run(args: argparse.Namespace) -> int:
    if args.group == "model":
        from ckd_common import model as M

        if args.cmd == "init":
            out = M.init_preset(args.preset, args.out, args.strategy, args.seed, args.image_aspect_ratio, args.template)
            print(f"wrote {out}")
        elif args.cmd == "convert":
            from ckd_common.tinyllava import convert_tinyllava

            print(convert_tinyllava(args.tinyllava, args.out, template=args.template, progress=True))
        elif args.cmd == "compose":
            out = M.compose_vlm(args.vision, args.llm, args.out, args.strategy, args.seed, args.image_aspect_ratio,
                                args.template)
            print(f"wrote {out}")
        elif args.cmd == "info":
            print(M.describe(args.dir))
    elif args.group == "data":
        if args.cmd == "synth":
            from ckd_common.synth import synthesize

            print(synthesize(args.out, args.seed, args.n_pretrain, args.n_instruct, args.n_eval))
        elif args.cmd == "prepare":
            print(prepare_report(prepare_data(from_args(PrepareConfig, args))))
    else:
        raise ValueError(f"unknown command group {args.group!r}")
    return 0


USER_ERRORS = (ConfigError, DataError, ModelLoadError, ValueError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ckd_common.model import quiet_transformers

    quiet_transformers()
    try:
        return run(args)
    except USER_ERRORS as e:
        print(f"ckd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
