"""ckd_eval: evaluation of VLM checkpoints on the paper's benchmarks (VQAv2, GQA, TextVQA,
ScienceQA-IMG, MME-Perception, POPE, MMMU) and on the synthetic benchmark.

Job: answer each benchmark's questions with a saved model (stock transformers, the model's
template) and score the answer files exactly as the official scripts do. It imports nothing from
the trainer; it needs only ``ckd_common`` (model loading, templates).

Run: ``ckd_eval --model DIR --bench paper --data-root DIR --out DIR`` (= ``python -m ckd_eval`` =
``student_trainer eval``), or ``ckd_eval score --bench NAME --answers FILE ...``. The data layout,
the answer-file format and every scorer's rules are specified in ``ckd_eval/README.md``.

- :mod:`.generate`: batched greedy generation with the model's template into resumable answer
  files in the LLaVA answer-file format;
- :mod:`.scorers`: one scorer per benchmark, each reproducing its official script, quirks included;
- :mod:`.config`: the command's typed config; :mod:`.cli`: the command (``add_eval_parser``,
  ``run_eval``, ``main``).

Results carry the model fingerprint, the prompt version and the scorer version.
"""
from ckd_eval.common import PROMPT_VERSION, EvalError

__all__ = ["EvalError", "PROMPT_VERSION"]
