"""The synthetic benchmark (held-out questions of ``ckd data synth``; no official script).

Questions file ``eval.jsonl`` carries the exact short ``answer`` and a ``category`` (colour, shape,
count, position, existence). A prediction is right when its EvalAI-normalised form (see ``evalai``:
lower case, punctuation, number words -> digits, articles dropped) equals the normalised answer.
Reported: accuracy per category and their mean (the headline), plus the overall accuracy.
"""
from __future__ import annotations

from pathlib import Path

from ckd_eval.common import EvalError, read_questions, require_complete
from ckd_eval.scorers.evalai import normalize_answer

OFFICIAL = "none (toolkit's synthetic benchmark): normalised exact match"
VERSION = "synth/1"
# Where the inputs come from, in the version the official numbers use (every not-found or
# wrong-version error names it).
SOURCE = ("ckd data synth (this toolkit; fully determined by its seed)")


def score(answers, annotations: Path, questions=None, out_dir=None, allow_partial=False) -> dict:
    gold = {str(q["question_id"]): q for q in read_questions(annotations, "synth/eval.jsonl")}
    preds = {str(r["question_id"]): r["text"] for r in answers}
    unknown = [q for q in preds if q not in gold]
    if unknown:
        raise EvalError(f"synth: {len(unknown)} answers for ids not in {annotations} (e.g. {unknown[0]!r})")
    require_complete(sum(1 for q in gold if q not in preds), len(gold), "synth", allow_partial)
    per_cat: dict[str, list[int]] = {}
    for qid, text in preds.items():
        q = gold[qid]
        if "answer" not in q:
            raise EvalError(f"synth: question {qid} in {annotations} has no 'answer'")
        per_cat.setdefault(q.get("category", "all"), []).append(int(normalize_answer(text) == normalize_answer(q["answer"])))
    if not per_cat:
        raise EvalError("synth: the answer file is empty")
    cats = {c: {"acc": 100.0 * sum(v) / len(v), "n": len(v)} for c, v in sorted(per_cat.items())}
    mean = sum(c["acc"] for c in cats.values()) / len(cats)
    n = sum(c["n"] for c in cats.values())
    overall = 100.0 * sum(sum(v) for v in per_cat.values()) / n
    return {"metric": "mean category accuracy", "score": mean, "n": n,
            "details": {"categories": cats, "mean_category_accuracy": mean, "overall_accuracy": overall}}
