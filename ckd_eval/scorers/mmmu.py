"""MMMU (validation), as the MMMU repository's ``eval/eval_utils.py`` (``parse_multi_choice_response``,
``parse_open_response``, ``eval_multi_choice``, ``eval_open``) driven the way TinyLLaVA-Factory /
LLaVA-KD run it (``model_vqa_mmmu.py`` parses multiple-choice answers with ``random`` seeded 42,
then ``main_eval_only.py`` scores against ``answer_dict_val.json``).

- Questions (``anns_for_eval.json``): ``id``, ``question_type`` ("multiple-choice" | "open"),
  ``all_choices``, ``index2ans``, ``prompt``, optional ``image``. Ground truth
  (``answer_dict_val.json``): ``{id: {"question_type", "ground_truth"}}``.
- Multiple choice: strip ``,.!?;:'`` from both ends, pad with spaces; candidates "(X)", else " X ",
  else (only if the response has more than 5 words) options whose text occurs in the response;
  several candidates -> the one occurring last; none -> ``random.choice(all_choices)`` from ONE
  ``random.Random(42)`` consumed in answer-file order. Correct iff equal to the ground truth (or
  one of a list).
- Open: key sub-responses after indicator words ("could be ", "so ", "is ", "thus ", "therefore ",
  "final ", "answer ", "result ", and "=" in the last sentence), numbers extracted with the
  official regexes, strings lower-cased, numbers rounded to 2 decimals; correct iff a predicted
  number equals a ground-truth number, or a ground-truth string is a substring of a predicted
  string (1-character answers padded with a space to avoid trivial matches).
- Only ids whose subject (``"_".join(id.split("_")[1:-1])``) is one of the 30 MMMU subjects are
  scored; accuracy is micro (instance-level) over all answered questions, x100; per-subject and
  per-domain accuracies are in the details. As in the TinyLLaVA/LLaVA-KD generation script,
  questions without an ``image`` (multi-image questions) are not generated: their text is left
  empty (-> random letter for multiple choice) or "INVALID GENERATION FOR MULTIPLE IMAGE INPUTS".
- Answer files written by TinyLLaVA/LLaVA-KD already hold the parsed letter for multiple choice;
  re-parsing a letter is idempotent and draws no random number, so they score the same here.
- Generation uses the benchmark-wide 128-token limit; LLaVA-KD's script allows 1024.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from ckd_eval.common import EvalError, read_json, require_complete

OFFICIAL = "MMMU eval/eval_utils.py + eval/main_eval_only.py (TinyLLaVA/LLaVA-KD model_vqa_mmmu.py parsing, seed 42)"
VERSION = "mmmu/1"
# Where the inputs come from, in the version the official numbers use (every not-found or
# wrong-version error names it).
SOURCE = ("MMMU validation split (900 questions, 30 subjects; huggingface.co/datasets/MMMU/MMMU): anns_for_eval.json "
          "and all_images/ as TinyLLaVA-Factory's evaluation data lays them out, eval/answer_dict_val.json from "
          "github.com/MMMU-Benchmark/MMMU")
SEED = 42
MULTI_IMAGE_OPEN_TEXT = "INVALID GENERATION FOR MULTIPLE IMAGE INPUTS"
DOMAINS = {
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": ["Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": ["Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"],
}
SUBJECTS = {s for subs in DOMAINS.values() for s in subs}


def parse_multi_choice_response(response: str, all_choices: list[str], index2ans: dict[str, str],
                                rng: random.Random) -> str:
    for ch in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(ch)
    response = " " + response + " "
    index_ans, with_brackets = True, False
    candidates = [c for c in all_choices if f"({c})" in response]
    if candidates:
        with_brackets = True
    else:
        candidates = [c for c in all_choices if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(index)
                index_ans = False
    if not candidates:
        return rng.choice(all_choices)
    if len(candidates) == 1:
        return candidates[0]
    if index_ans:
        pattern = "({})" if with_brackets else " {} "
        starts = [response.rfind(pattern.format(c)) for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[max(range(len(starts)), key=lambda i: (starts[i], -i))]  # np.argmax: first maximum


def check_is_number(s: str) -> bool:
    try:
        float(s.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(s: str) -> list:
    s = s.strip()
    if check_is_number(s):
        return [round(float(s.replace(",", "")), 2)]
    s = s.lower()
    return [" " + s, s + " "] if len(s) == 1 else [s]


_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCI = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def extract_numbers(s: str) -> list[str]:
    return _NUM_COMMAS.findall(s) + _NUM_SCI.findall(s) + _NUM_SIMPLE.findall(s)


def _key_subresponses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    subs = re.split(r"\.\s(?=[A-Z])|\n", response)
    indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    keys = []
    for i, resp in enumerate(subs):
        if i == len(subs) - 1:
            indicators.append("=")
        shortest = None
        for ind in indicators:
            if ind in resp:
                tail = resp.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", ":", "'"):
            keys.append(shortest)
    return keys or [response]


def parse_open_response(response: str) -> list:
    keys = _key_subresponses(response)
    preds = list(keys)
    for k in keys:
        preds.extend(extract_numbers(k))
    out = []
    for p in preds:
        out.extend(normalize_str(p))
    return list(dict.fromkeys(out))  # the official uses set(); order does not affect eval_open


def eval_multi_choice(gold, pred) -> bool:
    return pred in gold if isinstance(gold, list) else gold == pred


def eval_open(gold, preds: list) -> bool:
    norm = [x for g in (gold if isinstance(gold, list) else [gold]) for x in normalize_str(g)]
    for p in preds:
        if isinstance(p, str):
            if any(isinstance(n, str) and n in p for n in norm):
                return True
        elif p in norm:
            return True
    return False


def subject_of(qid: str) -> str:
    return "_".join(qid.split("_")[1:-1])


def score(answers, annotations: Path, questions=None, out_dir=None, allow_partial=False) -> dict:
    gt = read_json(annotations, "MMMU ground truth",
                   f"MMMU/eval/answer_dict_val.json ({{id: {{question_type, ground_truth}}}}); source: {SOURCE}")
    if questions is None:
        raise EvalError("MMMU: the question file (anns_for_eval.json, with all_choices / index2ans) is needed to "
                        "parse multiple-choice answers; pass --questions")
    qmap = {str(q.get("id", q.get("question_id"))): q for q in questions}
    rng = random.Random(SEED)
    per_subject: dict[str, list[int]] = {}
    random_fallbacks = 0
    answered = set()
    for r in answers:
        qid = str(r["question_id"])
        answered.add(qid)
        subject = subject_of(qid)
        if subject not in SUBJECTS:
            continue  # main_eval_only only iterates the 30 subjects
        if qid not in gt:
            raise EvalError(f"MMMU: no ground truth for {qid!r} in {annotations}: another version? source: {SOURCE}")
        qtype = gt[qid]["question_type"]
        if qtype == "multiple-choice":
            q = qmap.get(qid)
            if q is None or "all_choices" not in q:
                raise EvalError(f"MMMU: question {qid!r} (multiple choice) not found with all_choices/index2ans in "
                                f"the question file")
            state = rng.getstate()
            pred = parse_multi_choice_response(r["text"], q["all_choices"], q["index2ans"], rng)
            random_fallbacks += rng.getstate() != state
            ok = eval_multi_choice(gt[qid]["ground_truth"], pred)
        else:
            ok = eval_open(gt[qid]["ground_truth"], parse_open_response(r["text"]))
        per_subject.setdefault(subject, []).append(int(ok))
    expected = [str(q.get("id", q.get("question_id"))) for q in questions]
    require_complete(sum(1 for q in expected if q not in answered), len(expected), "mmmu", allow_partial)
    n = sum(len(v) for v in per_subject.values())
    if not n:
        raise EvalError("MMMU: no answer with a known MMMU subject id (validation_<Subject>_<n>)")
    acc = 100.0 * sum(sum(v) for v in per_subject.values()) / n
    domains = {}
    for d, subs in DOMAINS.items():
        vals = [x for s in subs for x in per_subject.get(s, [])]
        if vals:
            domains[d] = {"acc": 100.0 * sum(vals) / len(vals), "num": len(vals)}
    return {"metric": "accuracy (micro)", "score": acc, "n": n,
            "details": {"accuracy": acc, "random_fallbacks": random_fallbacks, "domains": domains,
                        "subjects": {s: {"acc": 100.0 * sum(v) / len(v), "num": len(v)} for s, v in per_subject.items()}}}
