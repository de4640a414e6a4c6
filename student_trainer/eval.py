"""Alias kept for existing scripts: ``python -m student_trainer.eval ...`` = ``python -m ckd_eval ...``.

Evaluation is its own package, ``ckd_eval`` (it imports nothing from the trainer); the
``student_trainer eval`` subcommand is registered in ``student_trainer/cli.py``.
"""
from ckd_eval.cli import add_eval_parser, main, run_eval

__all__ = ["add_eval_parser", "main", "run_eval"]

if __name__ == "__main__":
    raise SystemExit(main())
