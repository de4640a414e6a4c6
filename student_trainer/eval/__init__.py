"""Evaluation of student checkpoints on the paper's benchmarks (VQAv2, GQA, TextVQA, ScienceQA-IMG,
MME-Perception, POPE, MMMU) and on the synthetic benchmark.

- :mod:`.generate`: batched greedy generation with the model's template into resumable answer
  files in the LLaVA answer-file format;
- :mod:`.scorers`: one scorer per benchmark, each reproducing its official script, quirks included;
- :mod:`.cli`: ``student_trainer eval`` (``add_eval_parser``, ``run_eval``); also
  ``python -m student_trainer.eval``.

Results carry the model fingerprint, the prompt version and the scorer version.
"""
from student_trainer.eval.common import PROMPT_VERSION, EvalError

__all__ = ["EvalError", "PROMPT_VERSION"]
