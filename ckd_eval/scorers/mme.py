"""MME, as LLaVA's ``playground/data/eval/MME/convert_answer_to_mme.py`` followed by the MME
``eval_tool/calculation.py``.

- Ground truth: ``MME_Benchmark_release_version/<subtask>/`` - for artwork, celebrity, landmark,
  posters and scene the ``questions_answers_YN/*.txt`` next to ``images/``, for the other subtasks
  ``*.txt`` next to the images; one ``question<TAB>answer`` per line.
- An answer's subtask is ``question_id.split('/')[0]``, its GT file the image's base name + ".txt";
  its question is the prompt with "Answer the question using a single word or phrase." removed and
  stripped, plus " Please answer yes or no." (with two spaces if that is how the GT spells it).
- Parsing (lower-cased text): exactly "yes"/"no"; else "yes" in the first 4 characters -> yes;
  else "no" in them -> no; else "other" (wrong).
- Per subtask, answers are taken two at a time **in answer-file order** (the official chunks the
  txt lines; LLaVA's question file lists an image's two questions together): acc = correct /
  questions, acc+ = images with both right / images; subtask score = 100 acc + 100 acc+.
  Perception = sum of its 10 subtasks (max 2000), also given /20 as a percentage; Cognition (4
  subtasks) is reported too.
- Deviation: the official round-trips answers through tab-separated txt lines, so an answer
  containing a newline or a tab crashes or shifts its pairing there; here each answer stays one
  record (counted in ``details.multiline_answers``). A pair whose two answers are for different
  images is an error (the file is not in question-file order).
"""
from __future__ import annotations

import os
from pathlib import Path

from ckd_eval.common import EvalError

OFFICIAL = "LLaVA MME/convert_answer_to_mme.py + MME eval_tool/calculation.py"
VERSION = "mme/1"
# Where the inputs come from, in the version the official numbers use (every not-found or
# wrong-version error names it).
SOURCE = ("MME (released by its authors on request, github.com/BradyFU/Awesome-Multimodal-Large-Language-Models/"
          "tree/Evaluation): the full MME_Benchmark_release_version tree (14 subtask folders, 2,374 questions) + "
          "LLaVA-1.5's eval.zip (MME/llava_mme.jsonl)")
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SHORT = "Answer the question using a single word or phrase."
YN = "Please answer yes or no."
LAYOUT = ("MME_Benchmark_release_version/<subtask>/{*.txt, images} or "
          "<subtask>/{images/, questions_answers_YN/*.txt}")


def parse_yes_no(text: str) -> str:
    t = text.lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def load_gt(root: Path) -> dict[tuple[str, str, str], str]:
    if not root.is_dir():
        raise EvalError(f"MME ground truth: directory {root} not found (expected layout: {LAYOUT}; source: {SOURCE})")
    gt = {}
    for category in sorted(os.listdir(root)):
        cdir = root / category
        if not cdir.is_dir():
            continue
        qa = cdir / "questions_answers_YN" if (cdir / "images").exists() else cdir
        if not qa.is_dir():
            raise EvalError(f"MME ground truth: {qa} missing (expected layout: {LAYOUT}; source: {SOURCE})")
        for name in sorted(os.listdir(qa)):
            if not name.endswith(".txt"):
                continue
            with open(qa / name, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    parts = line.strip().split("\t")
                    if len(parts) != 2:
                        raise EvalError(f"MME ground truth {qa / name} line {n}: expected 'question<TAB>answer'")
                    gt[(category, name, parts[0])] = parts[1]
    if not gt:
        raise EvalError(f"MME ground truth: no question files under {root} (expected layout: {LAYOUT}; "
                        f"source: {SOURCE})")
    return gt


def gt_question(prompt: str, category: str, file: str, gt) -> str:
    if SHORT in prompt:
        prompt = prompt.replace(SHORT, "").strip()
    if YN not in prompt:
        prompt = prompt + " " + YN
        if (category, file, prompt) not in gt:
            prompt = prompt.replace(" " + YN, "  " + YN)
    return prompt


def score(answers, annotations: Path, questions=None, out_dir=None, allow_partial=False) -> dict:
    gt = load_gt(Path(annotations))
    per_cat: dict[str, list[tuple[str, str, str]]] = {}
    multiline = 0
    for r in answers:
        qid = str(r["question_id"])
        category = qid.split("/")[0]
        file = qid.split("/")[-1].split(".")[0] + ".txt"
        q = gt_question(r.get("prompt", ""), category, file, gt)
        if (category, file, q) not in gt:
            raise EvalError(f"MME: no ground truth for subtask {category!r}, file {file!r}, question {q!r} "
                            f"under {annotations}: an incomplete tree or another version? source: {SOURCE}")
        multiline += ("\n" in r["text"]) or ("\t" in r["text"])
        per_cat.setdefault(category, []).append((qid, gt[(category, file, q)], r["text"]))

    subtasks, dropped = {}, 0
    for category, items in per_cat.items():
        if len(items) % 2 and allow_partial:  # a truncated file (--limit) may end inside a pair
            items, dropped = items[:-1], dropped + 1
            if not items:
                continue
        if len(items) % 2:
            raise EvalError(f"MME: subtask {category} has an odd number of answers ({len(items)}); every "
                            f"image has two questions")
        correct = pairs_right = 0
        for i in range(0, len(items), 2):
            pair = items[i:i + 2]
            if pair[0][0] != pair[1][0]:
                raise EvalError(f"MME: answers {i + 1} and {i + 2} of subtask {category} are for different images "
                                f"({pair[0][0]} vs {pair[1][0]}); keep the question-file order")
            right = 0
            for _, g, text in pair:
                g = g.lower()
                if g not in ("yes", "no"):
                    raise EvalError(f"MME: ground truth answer {g!r} for {pair[0][0]} is not yes/no")
                right += parse_yes_no(text) == g
            correct += right
            pairs_right += right == 2
        acc, acc_plus = correct / len(items), pairs_right / (len(items) // 2)
        subtasks[category] = {"acc": 100 * acc, "acc_plus": 100 * acc_plus, "score": 100 * acc + 100 * acc_plus,
                              "questions": len(items)}

    missing = [c for c in PERCEPTION if c not in subtasks]
    if missing and not allow_partial:
        raise EvalError(f"MME: no answers for perception subtasks {missing}; the official tool needs all 10 "
                        f"(pass --allow-partial to sum the ones present)")
    perception = sum(subtasks[c]["score"] for c in PERCEPTION if c in subtasks)
    cognition = sum(subtasks[c]["score"] for c in COGNITION if c in subtasks)
    return {"metric": "perception score (max 2000)", "score": perception,
            "n": sum(v["questions"] for v in subtasks.values()),
            "details": {"perception": perception, "perception_percent": perception / 20, "cognition": cognition,
                        "subtasks": subtasks, "missing_perception_subtasks": missing,
                        "multiline_answers": multiline,
                        "dropped_unpaired": dropped}}
