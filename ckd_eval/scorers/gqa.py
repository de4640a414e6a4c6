"""GQA testdev-balanced, as LLaVA's ``scripts/convert_gqa_for_eval.py`` followed by the official GQA
``eval.py`` (accuracy part).

- prediction = ``text.rstrip('.').lower()`` (nothing else: no strip, no article removal);
- exact string match with ``answer`` of ``testdev_balanced_questions.json``, over the questions with
  ``isBalanced`` (all of testdev-balanced); every balanced question must have a prediction (the
  official raises "missing predictions"); "binary" / "open" split by ``types.structural == 'query'``
  (open) as eval.py does. Question ids are compared as strings (JSON keys).
- the converted predictions file (``testdev_balanced_predictions.json``) is written for the
  official script.
"""
from __future__ import annotations

from pathlib import Path

from ckd_eval.common import EvalError, read_json, require_complete, write_json

OFFICIAL = "LLaVA scripts/convert_gqa_for_eval.py + GQA eval.py"
VERSION = "gqa/1"
# Where the inputs come from, in the version the official numbers use (every not-found or
# wrong-version error names it).
SOURCE = ("GQA 1.2 testdev-balanced (cs.stanford.edu/people/dorarad/gqa/download.html: questions1.2.zip -> "
          "testdev_balanced_questions.json, 12,578 questions; images.zip) + LLaVA-1.5's eval.zip "
          "(gqa/llava_gqa_testdev_balanced.jsonl)")


def convert(answers) -> list[dict]:
    return [{"questionId": r["question_id"], "prediction": r["text"].rstrip(".").lower()} for r in answers]


def score(answers, annotations: Path, questions=None, out_dir=None, allow_partial=False) -> dict:
    qs = read_json(annotations, "GQA questions", "gqa/testdev_balanced_questions.json ({id: {answer, isBalanced, "
                   f"...}}); source: {SOURCE}")
    if not isinstance(qs, dict):
        raise EvalError(f"GQA annotations {annotations}: expected an object keyed by question id; source: {SOURCE}")
    preds = {str(p["questionId"]): p["prediction"] for p in convert(answers)}
    unknown = [qid for qid in preds if qid not in qs]
    if unknown:
        raise EvalError(f"GQA: {len(unknown)} answered questions are not in {annotations} (e.g. {unknown[0]!r}): "
                        f"another split or version? source: {SOURCE}")
    balanced = {qid: q for qid, q in qs.items() if q.get("isBalanced", True)}
    missing = [qid for qid in balanced if qid not in preds]
    require_complete(len(missing), len(balanced), "gqa", allow_partial)
    acc, binary, open_ = [], [], []
    for qid, q in balanced.items():
        if qid not in preds:
            continue
        s = float(preds[qid] == q["answer"])
        acc.append(s)
        structural = q.get("types", {}).get("structural")
        (open_ if structural == "query" else binary).append(s)
    if not acc:
        raise EvalError("GQA: no answered balanced question")
    avg = lambda xs: 100.0 * sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    files = {}
    if out_dir is not None:
        files["predictions"] = str(Path(out_dir) / "testdev_balanced_predictions.json")
        write_json(files["predictions"], convert(answers))
    return {"metric": "accuracy", "score": avg(acc), "n": len(acc),
            "details": {"accuracy": avg(acc), "binary": avg(binary), "open": avg(open_), "missing": len(missing)},
            "files": files}
