"""Shared pieces of the evaluation package: errors, versions, file readers, answer files.

Answer files use the LLaVA answer-file format, one JSON object per line::

    {"question_id": ..., "prompt": ..., "text": ..., "answer_id": ..., "model_id": ..., "metadata": {...}}

so files written by LLaVA / TinyLLaVA / LLaVA-KD (or any tool that writes the same fields) can be
scored with ``ckd_eval score`` and ours can be fed to their scripts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Bump when the prompt construction changes (suffixes, template use, image placement): answers
# produced under another prompt version are not comparable.
PROMPT_VERSION = "llava15-eval-prompts/2"  # 2: an empty question renders "USER: <image> ASSISTANT:"
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
MULTI_CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


class EvalError(RuntimeError):
    """An evaluation input is missing or malformed; the message names the file and what was expected."""


def read_json(path: str | os.PathLike, what: str, layout: str = "") -> Any:
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"{what}: file {p} not found" + (f" (expected layout: {layout})" if layout else ""))
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise EvalError(f"{what}: {p} is not valid JSON ({e})") from None


def read_jsonl(path: str | os.PathLike, what: str, layout: str = "", tolerant: bool = False) -> tuple[list[dict], int]:
    """Records of a jsonl file, and the number of unparseable lines (only allowed if ``tolerant``)."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"{what}: file {p} not found" + (f" (expected layout: {layout})" if layout else ""))
    out, bad = [], 0
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                if not tolerant:
                    raise EvalError(f"{what}: {p} line {n} is not valid JSON ({e})") from None
                bad += 1
    return out, bad


def read_questions(path: str | os.PathLike, layout: str = "") -> list[dict]:
    """A LLaVA-1.5 question file: jsonl (question_id, image, text, category) or a JSON list
    (ScienceQA's ``llava_test_CQM-A.json`` with id/image/conversations, MMMU's ``anns_for_eval.json``)."""
    p = Path(path)
    if p.suffix == ".json":
        data = read_json(p, "question file", layout)
        if not isinstance(data, list):
            raise EvalError(f"question file {p}: expected a JSON list of questions, got {type(data).__name__}")
        return data
    return read_jsonl(p, "question file", layout)[0]


def read_answers(path: str | os.PathLike, tolerant: bool = False) -> tuple[list[dict], int]:
    """An answer file; every record needs ``question_id`` and ``text``."""
    recs, bad = read_jsonl(path, "answer file", "jsonl with question_id, prompt, text", tolerant)
    for i, r in enumerate(recs):
        if not isinstance(r, dict) or "question_id" not in r or "text" not in r:
            raise EvalError(f"answer file {path}: record {i + 1} lacks 'question_id' or 'text' "
                            f"(expected the LLaVA answer format: question_id, prompt, text, ...)")
    return recs, bad


def write_json(path: str | os.PathLike, obj: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False, default=str)
    os.replace(tmp, p)


def require_complete(missing: int, total: int, bench: str, allow_partial: bool, hint: str = "") -> None:
    if missing and not allow_partial:
        raise EvalError(f"{bench}: {missing} of {total} questions have no answer{hint}; the official script "
                        f"refuses (or mis-scores) incomplete answer files. Finish generation (it resumes) or "
                        f"pass --allow-partial to score only the answered questions.")
