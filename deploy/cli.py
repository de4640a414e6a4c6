"""``ckd``: the toolkit's umbrella command.

  ckd model init|convert|compose|info ...   (ckd_common)
  ckd data synth|prepare ...                 (ckd_common)
  ckd fill --server URL --data F --out ROOT  fill a logit cache from teacher servers (= logit_cache fill)
  ckd cascade CONFIG.yaml                    a whole cascade: servers, caches, training, eval
  ckd gap --model S --cache C --data F       a student's capacity gap to a cached teacher (held-out slice)
  ckd ablate GRID.yaml                       a grid of cascades x seeds from shared caches: table + plot
  ckd demo [--workdir DIR]                   the embedded default, end to end on CPU
  ckd selftest [--device D] [--tiny]         check this machine before a long job (pass/fail table)
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from ckd_common.cli import USER_ERRORS, add_common_commands
from ckd_common.cli import run as run_common


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="group", required=True)
    add_common_commands(sub)
    from deploy.fill import __doc__ as fill_doc
    from deploy.fill import add_fill_arguments

    add_fill_arguments(sub.add_parser("fill", help="fill a logit cache by streaming a dataset through teacher "
                                      "servers (= logit_cache fill)", description=fill_doc))
    casc = sub.add_parser("cascade", help="run a cascade (student <- TA <- Teacher) from a YAML config")
    casc.add_argument("config", help="cascade YAML (see deploy/README.md and deploy/examples/)")
    from student_trainer.gap import __doc__ as gap_doc
    from student_trainer.gap import add_gap_arguments

    add_gap_arguments(sub.add_parser("gap", help="a student's gap to a cached teacher on the held-out slice",
                                     description=gap_doc, formatter_class=argparse.RawDescriptionHelpFormatter))
    abl = sub.add_parser("ablate", help="run a grid of trainer options / strategies x seeds from shared caches")
    abl.add_argument("config", help="grid YAML: a cascade config + grid/points/seeds (see deploy/README.md)")
    demo = sub.add_parser("demo", help="run the embedded default (tiny models, synthetic data) on CPU")
    demo.add_argument("--workdir", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    from deploy.selftest import __doc__ as selftest_doc
    from deploy.selftest import add_selftest_arguments

    add_selftest_arguments(sub.add_parser("selftest", help="check this machine before a long job: devices, "
                                          "DeepSpeed ops, a teacher server, a fill, every training step, a "
                                          "checkpoint round trip (pass/fail table)", description=selftest_doc,
                                          formatter_class=argparse.RawDescriptionHelpFormatter))
    return p


def _orchestrate(command: str, run, config: str) -> int:
    """Run a cascade-like command: 1 on a failed step, 130 on Ctrl-C / SIGTERM (a re-run resumes)."""
    from deploy.cascade import CascadeError

    try:
        run(config)
    except CascadeError as e:
        print(f"ckd {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ckd {command}: interrupted; finished steps are kept, re-run the command to resume", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C stops a ckd command even when it was started with SIGINT ignored, as every background job
    # of a non-interactive shell is (Python then installs no KeyboardInterrupt handler of its own)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    args = _parser().parse_args(argv)
    from ckd_common.model import quiet_transformers

    quiet_transformers()
    try:
        if args.group == "cascade":
            from deploy.cascade import run_cascade

            return _orchestrate("cascade", run_cascade, args.config)
        if args.group == "ablate":
            from deploy.ablate import run_ablation

            return _orchestrate("ablate", run_ablation, args.config)
        if args.group == "fill":
            from deploy.fill import run_fill

            return run_fill(args, prog="ckd fill")
        if args.group == "selftest":
            from deploy.selftest import main_from_args

            return main_from_args(args)
        if args.group == "gap":
            from student_trainer.gap import run_gap

            return run_gap(args)
        if args.group == "demo":
            from deploy.demo import run_demo

            run_demo(args.workdir, seed=args.seed)
            return 0
        return run_common(args)
    except USER_ERRORS as e:
        print(f"ckd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
