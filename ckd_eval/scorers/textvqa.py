"""TextVQA (val), as LLaVA's ``llava/eval/eval_textvqa.py`` + ``m4c_evaluator.TextVQAAccuracyEvaluator``.

- Annotations: ``TextVQA_0.5.1_val.json`` (``{"data": [{"image_id", "question", "answers": [10]}]}``).
- An answer is matched to its annotation by ``(question_id, question.lower())``: in LLaVA's question
  file the question_id IS the image id, and the question is recovered from the answer's ``prompt``
  by ``prompt_processor``: a 3-line prompt containing "Reference OCR token: " gives line 0 (line 1
  if the prompt starts with the OCR line), a 2-line prompt gives line 0, an "OCR tokens: ..."
  prompt gives the text between "Question: " and " Short answer:"; anything else is an error (the
  official asserts). An answer without annotation is an error (the official raises KeyError).
- Accuracy = mean EvalAI soft accuracy (see ``evalai``), reported x100.
"""
from __future__ import annotations

import re
from pathlib import Path

from ckd_eval.common import EvalError, read_json
from ckd_eval.scorers.evalai import vqa_accuracy

OFFICIAL = "LLaVA llava/eval/eval_textvqa.py + llava/eval/m4c_evaluator.py"
VERSION = "textvqa/1"
# Where the inputs come from, in the version the official numbers use (every not-found or
# wrong-version error names it).
SOURCE = ("TextVQA v0.5.1 val (dl.fbaipublicfiles.com/textvqa/data/TextVQA_0.5.1_val.json, 5,000 questions; "
          "images: dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip -> train_images/) + LLaVA-1.5's "
          "eval.zip (textvqa/llava_textvqa_val_v051_ocr.jsonl)")


def question_from_prompt(prompt: str) -> str:
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if m is None:
            raise EvalError(f"TextVQA: cannot find 'Question: ... Short answer:' in prompt {prompt!r}")
        q = m.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        q = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        q = lines[0]
    else:
        raise EvalError(f"TextVQA: cannot recover the question from prompt {prompt!r} (expected the LLaVA "
                        f"format 'QUESTION\\nReference OCR token: ...\\nAnswer the question using a single word or phrase.')")
    return q.lower()


def score(answers, annotations: Path, questions=None, out_dir=None, allow_partial=False) -> dict:
    data = read_json(annotations, "TextVQA annotations",
                     f"textvqa/TextVQA_0.5.1_val.json with a 'data' list; source: {SOURCE}")
    if not isinstance(data, dict) or "data" not in data:
        raise EvalError(f"TextVQA annotations {annotations}: expected an object with a 'data' list; source: {SOURCE}")
    ann = {(a["image_id"], a["question"].lower()): a for a in data["data"]}
    if not answers:
        raise EvalError("TextVQA: the answer file is empty")
    scores = []
    for r in answers:
        key = (r["question_id"], question_from_prompt(r.get("prompt", "")))
        if key not in ann:
            raise EvalError(f"TextVQA: no annotation for image {key[0]!r} / question {key[1]!r} in {annotations}: "
                            f"another version? source: {SOURCE}")
        scores.append(vqa_accuracy(r["text"], ann[key]["answers"]))
    acc = 100.0 * sum(scores) / len(scores)
    return {"metric": "accuracy", "score": acc, "n": len(scores), "details": {"accuracy": acc}}
