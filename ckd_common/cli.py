"""The ``ckd_common`` half of the ``ckd`` command: models and data. (``deploy.cli`` adds the
cascade and the demo on top, since those drive the server, cache and trainer.)

  ckd model init --preset tiny-student|tiny-ta|tiny-teacher --out DIR [--strategy full|patch]
                 [--image-aspect-ratio square|pad] [--template qwen2_base|pretrain]
  ckd model convert --tinyllava SRC --out DST [--template qwen2_base|pretrain]
  ckd model compose --vision DIR --llm DIR --out DST [--strategy full|patch] [--image-aspect-ratio square|pad]
  ckd model info DIR
  ckd data synth --out DIR [--seed S --n-pretrain N --n-instruct N --n-eval N]
  ckd data prepare --model DIR --data FILE --images DIR --template pretrain|qwen2_base
"""
from __future__ import annotations

import argparse
import sys

from ckd_common.config import ConfigError
from ckd_common.data import DataError
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
    d = dsub.add_parser("prepare", help="validate a LLaVA json file and report what a model sees")
    d.add_argument("--model", required=True)
    d.add_argument("--data", required=True)
    d.add_argument("--images", default=None)
    d.add_argument("--template", required=True, choices=TEMPLATE_NAMES)
    d.add_argument("--max-length", type=int, default=2048)
    d.add_argument("--on-error", default="raise", choices=["raise", "skip"])


def prepare_report(ds) -> str:
    """What ``ckd data prepare`` prints: counts, skipped samples by reason, where this data is
    rendered differently from the reference (docs/templates.md) and tokenizer warnings."""
    n_resp = sum(len(s.response_positions) for s in ds.samples)
    lines = [f"{len(ds)} samples, {sum(s.length for s in ds.samples)} tokens, {n_resp} response positions, "
             f"template {ds.template}, fingerprint {ds.fingerprint}"]
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
            from ckd_common.data import prepare_file
            from ckd_common.model import load_vlm, model_info

            model, tok = load_vlm(args.model)
            info = model_info(model, tok)
            ds = prepare_file(args.data, tok, args.template, info.num_visual_tokens, info.image_token_id,
                              args.images, args.max_length, args.on_error, progress=True)
            print(prepare_report(ds))
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
