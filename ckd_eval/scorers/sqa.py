"""ScienceQA-IMG (test split), as LLaVA-1.5's ``llava/eval/eval_science_qa.py``.

- Annotations: the ScienceQA directory with ``problems.json`` and ``pid_splits.json``; the problems
  of ``pid_splits['test']`` are scored, in that order.
- Letter parsing of the raw ``text`` (options A-E): the text itself if it is exactly one of
  "A".."E"; else its first letter if the text starts with "X. "; else the single match of the
  regex ``The answer is ([A-Z]).`` (the '.' is any character, so "The answer is B" at the very end
  does not match; two matches fail too); anything else is "FAILED". A letter beyond the problem's
  number of choices, FAILED, and a problem without answer all count as wrong (no random guess).
- IMG accuracy (the paper's number) counts the problems whose answer-file ``prompt`` contains
  ``<image>`` - that is how the official script tells image questions apart, so an image question
  without answer is not in the denominator. Overall accuracy is also reported.
"""
from __future__ import annotations

import re
from pathlib import Path

from ckd_eval.common import EvalError, read_json, require_complete

OFFICIAL = "LLaVA-1.5 llava/eval/eval_science_qa.py"
VERSION = "sqa/1"
# Where the inputs come from, in the version the official numbers use (every not-found or
# wrong-version error names it).
SOURCE = ("ScienceQA (github.com/lupantech/ScienceQA, data/scienceqa: problems.json, pid_splits.json, images/test; "
          "test split 4,241 problems, 2,017 with an image) + LLaVA-1.5's eval.zip (scienceqa/llava_test_CQM-A.json)")
OPTIONS = ("A", "B", "C", "D", "E")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_letter(pred_text: str) -> str:
    if pred_text in OPTIONS:
        return pred_text
    if len(pred_text) >= 3 and pred_text[0] in OPTIONS and pred_text[1:3] == ". ":
        return pred_text[0]
    res = _ANSWER_IS.findall(pred_text)
    return res[0] if len(res) == 1 else "FAILED"


def pred_index(letter: str, n_choices: int) -> int:
    return OPTIONS.index(letter) if letter in OPTIONS[:n_choices] else -1


def score(answers, annotations: Path, questions=None, out_dir=None, allow_partial=False) -> dict:
    base = Path(annotations)
    layout = f"scienceqa/ with problems.json and pid_splits.json; source: {SOURCE}"
    if not base.is_dir():
        raise EvalError(f"ScienceQA annotations: directory {base} not found (expected layout: {layout})")
    split = read_json(base / "pid_splits.json", "ScienceQA splits", layout)
    problems = read_json(base / "problems.json", "ScienceQA problems", layout)
    if "test" not in split:
        raise EvalError(f"ScienceQA: {base / 'pid_splits.json'} has no 'test' split; source: {SOURCE}")
    preds = {str(r["question_id"]): r for r in answers}
    unknown = [q for q in preds if q not in problems]
    if unknown:
        raise EvalError(f"ScienceQA: {len(unknown)} answers are for ids not in {base / 'problems.json'} "
                        f"(e.g. {unknown[0]!r}): another version? source: {SOURCE}")
    test = [pid for pid in split["test"]]
    missing = [pid for pid in test if pid not in preds]
    require_complete(len(missing), len(test), "sqa", allow_partial)
    if allow_partial:
        test = [pid for pid in test if pid in preds]
    correct = total = img_correct = img_total = failed = 0
    for pid in test:
        prob = problems[pid]
        pred = preds.get(pid, {"text": "FAILED", "prompt": "Unknown"})
        letter = parse_letter(pred["text"])
        failed += letter == "FAILED"
        ok = pred_index(letter, len(prob["choices"])) == prob["answer"]
        is_img = "<image>" in pred.get("prompt", "")
        total += 1
        correct += ok
        img_total += is_img
        img_correct += ok and is_img
    if not img_total:
        raise EvalError("ScienceQA: no answered image question (answer prompts must contain '<image>', "
                        "as LLaVA's model_vqa_science writes them)")
    img_acc = 100.0 * img_correct / img_total
    return {"metric": "IMG accuracy", "score": img_acc, "n": img_total,
            "details": {"img_accuracy": img_acc, "accuracy": 100.0 * correct / total, "total": total,
                        "img_total": img_total, "unparsed": failed, "missing": len(missing)}}
