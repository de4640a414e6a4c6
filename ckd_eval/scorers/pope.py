"""POPE, as LLaVA's ``llava/eval/eval_pope.py``.

- Annotations: a directory of ``coco_pope_<split>.json`` files (jsonl, one ``{"question_id",
  "image", "text", "label"}`` per line; splits random / popular / adversarial); the question file
  gives each answer's split (``category``).
- Answer parsing: keep the text before the first '.', delete commas, split on single spaces; "No",
  "no" or "not" among the words -> no, otherwise yes. So "NO", "Nope", "" and "Not sure" (capital)
  all count as **yes**.
- Labels: "no" -> negative, anything else -> positive; precision, recall, F1 with "yes" positive,
  accuracy and yes-ratio per split; the reported number is the mean F1 over the splits, x100.
- Join: the official zips a split's answers (in answer-file order) with its annotation lines (in
  file order). Here the k-th question of a split in the question file is paired with the k-th
  annotation line (checked: same image), and answers are joined to questions
  on question_id - identical for LLaVA's files, and it cannot silently misalign a reordered or
  incomplete answer file. Precision/recall with an empty denominator are 0 (the official divides by
  zero).
"""
from __future__ import annotations

from pathlib import Path

from ckd_eval.common import EvalError, read_jsonl, require_complete

OFFICIAL = "LLaVA llava/eval/eval_pope.py"
VERSION = "pope/1"
# Where the inputs come from, in the version the official numbers use (every not-found or
# wrong-version error names it).
SOURCE = ("POPE's COCO labels at commit e3e39262 (github.com/AoiDragon/POPE/tree/"
          "e3e39262c85a6a83f26cf5094022a782cb0df58d/output/coco: coco_pope_{adversarial,popular,random}.json; "
          "random has 2,910 questions there, 3,000 on the default branch) + COCO val2014 images + LLaVA-1.5's "
          "eval.zip (pope/llava_pope_test.jsonl, 8,910 questions)")
LAYOUT = "pope/coco/coco_pope_{random,popular,adversarial}.json (jsonl with question_id, image, text, label)"


def parse_yes_no(text: str) -> str:
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def prf(preds: list[int], labels: list[int]) -> dict:
    tp = sum(p == 1 and l == 1 for p, l in zip(preds, labels))
    fp = sum(p == 1 and l == 0 for p, l in zip(preds, labels))
    tn = sum(p == 0 and l == 0 for p, l in zip(preds, labels))
    fn = sum(p == 0 and l == 1 for p, l in zip(preds, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"TP": tp, "FP": fp, "TN": tn, "FN": fn, "precision": precision, "recall": recall, "f1": f1,
            "accuracy": (tp + tn) / len(preds) if preds else 0.0,
            "yes_ratio": sum(preds) / len(preds) if preds else 0.0, "n": len(preds)}


def score(answers, annotations: Path, questions=None, out_dir=None, allow_partial=False) -> dict:
    root = Path(annotations)
    if not root.is_dir():
        raise EvalError(f"POPE annotations: directory {root} not found (expected layout: {LAYOUT}; source: {SOURCE})")
    if questions is None:
        raise EvalError("POPE: the question file (llava_pope_test.jsonl) is needed to know each answer's split; "
                        "pass --questions")
    files = sorted(p for p in root.iterdir() if p.name.startswith("coco_pope_") and p.name.endswith(".json"))
    if not files:
        raise EvalError(f"POPE annotations: no coco_pope_*.json in {root} (expected layout: {LAYOUT}; "
                        f"source: {SOURCE})")
    preds = {r["question_id"]: r["text"] for r in answers}
    splits, missing_total = {}, 0
    for f in files:
        split = f.name[len("coco_pope_"):-len(".json")]
        labels, _ = read_jsonl(f, f"POPE {split} annotations", f"{LAYOUT}; source: {SOURCE}")
        qs = [q for q in questions if q.get("category") == split]
        if not qs:
            continue
        if len(qs) > len(labels) or (len(qs) < len(labels) and not allow_partial):
            raise EvalError(f"POPE {split}: the question file has {len(qs)} questions but {f} has {len(labels)} lines "
                            f"(another version of the labels?); source: {SOURCE}")
        p_list, l_list = [], []
        missing = 0
        for q, lab in zip(qs, labels):
            if "image" in lab and "image" in q and lab["image"] != q["image"]:
                raise EvalError(f"POPE {split}: question {q['question_id']} ({q.get('image')}: {q.get('text')!r}) does "
                                f"not match line {len(p_list) + missing + 1} of {f} ({lab.get('image')}: "
                                f"{lab.get('text')!r}): another version of the labels? source: {SOURCE}")
            if q["question_id"] not in preds:
                missing += 1
                continue
            p_list.append(0 if parse_yes_no(preds[q["question_id"]]) == "no" else 1)
            l_list.append(0 if lab["label"] == "no" else 1)
        missing_total += missing
        if p_list:
            splits[split] = prf(p_list, l_list)
    n_q = sum(1 for q in questions if f"coco_pope_{q.get('category')}.json" in {f.name for f in files})
    require_complete(missing_total, n_q, "pope", allow_partial)
    if not splits:
        raise EvalError("POPE: no answered question in any split")
    mean_f1 = 100.0 * sum(s["f1"] for s in splits.values()) / len(splits)
    return {"metric": "mean F1 (x100)", "score": mean_f1, "n": sum(s["n"] for s in splits.values()),
            "details": {"mean_f1": mean_f1, "splits": splits, "missing": missing_total}}
