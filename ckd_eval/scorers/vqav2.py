"""VQAv2, as LLaVA's ``scripts/convert_vqav2_for_submission.py`` (test-dev) with the EvalAI
normaliser of ``m4c_evaluator.py``.

- test-dev (the paper's number; answers are not public): the upload file for the EvalAI server is
  written: one ``{"question_id", "answer"}`` per question of the FULL test split
  (``llava_vqav2_mscoco_test2015.jsonl`` - the server wants all test2015 questions), the answer
  EvalAI-normalised, ``""`` for questions without an answer; unparseable answer-file lines are
  skipped and counted, a repeated question_id keeps its last answer. No local score.
- with official VQA annotations (``v2_mscoco_val2014_annotations.json``-style
  ``{"annotations": [{"question_id", "answers": [{"answer": ...} x10]}]}``) a local accuracy is also
  computed with the soft VQA accuracy of ``m4c_evaluator`` (the EvalAI server's own evaluator can
  differ in rare normalisation corner cases).
"""
from __future__ import annotations

from pathlib import Path

from ckd_eval.common import EvalError, read_json, read_jsonl, require_complete, write_json
from ckd_eval.scorers.evalai import normalize_answer, vqa_accuracy

OFFICIAL = "LLaVA scripts/convert_vqav2_for_submission.py + llava/eval/m4c_evaluator.py"
VERSION = "vqav2/1"
# Where the inputs come from, in the version the official numbers use (every not-found or
# wrong-version error names it).
SOURCE = ("LLaVA-1.5's eval.zip (docs/Evaluation.md of github.com/haotian-liu/LLaVA: "
          "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl, 107,394 questions, and llava_vqav2_mscoco_test2015.jsonl) "
          "+ COCO test2015 images (images.cocodataset.org/zips/test2015.zip); test-dev is scored by the EvalAI server "
          "(challenge 830)")
UPLOAD_NAME = "vqav2_test-dev_upload.json"


def upload_records(answers, test_split: list[dict]) -> list[dict]:
    results = {r["question_id"]: r["text"] for r in answers}
    return [{"question_id": q["question_id"],
             "answer": normalize_answer(results[q["question_id"]]) if q["question_id"] in results else ""}
            for q in test_split]


def score(answers, annotations: Path, questions=None, out_dir=None, allow_partial=False, bad_lines=0) -> dict:
    annotations = Path(annotations)
    if annotations.suffix == ".jsonl":  # the test split question list -> upload file only
        split, _ = read_jsonl(annotations, "VQAv2 test split",
                              f"vqav2/llava_vqav2_mscoco_test2015.jsonl; source: {SOURCE}")
        recs = upload_records(answers, split)
        answered = len({r["question_id"] for r in answers} & {q["question_id"] for q in split})
        files = {}
        if out_dir is not None:
            files["upload"] = str(Path(out_dir) / UPLOAD_NAME)
            write_json(files["upload"], recs)
        return {"metric": "accuracy (EvalAI server)", "score": None, "n": answered,
                "details": {"total_split": len(split), "answered": answered, "error_lines": bad_lines,
                            "note": "test-dev answers are not public: submit the upload file to EvalAI"},
                "files": files}
    data = read_json(annotations, "VQAv2 annotations",
                     f"official VQA annotations json with an 'annotations' list; source: {SOURCE}")
    if not isinstance(data, dict) or "annotations" not in data:
        raise EvalError(f"VQAv2 annotations {annotations}: expected an object with an 'annotations' list "
                        f"(or pass the test split .jsonl to only write the EvalAI upload file)")
    ann = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in data["annotations"]}
    preds = {r["question_id"]: r["text"] for r in answers}
    unknown = [q for q in preds if q not in ann]
    if unknown:
        raise EvalError(f"VQAv2: {len(unknown)} answered questions have no annotation in {annotations} "
                        f"(e.g. {unknown[0]!r}): another split or version? source: {SOURCE}")
    if questions is not None:
        qids = [q["question_id"] for q in questions]
        require_complete(sum(1 for q in qids if q not in preds), len(qids), "vqav2", allow_partial)
    if not preds:
        raise EvalError("VQAv2: the answer file is empty")
    scores = [vqa_accuracy(t, ann[q]) for q, t in preds.items()]
    acc = 100.0 * sum(scores) / len(scores)
    files = {}
    if out_dir is not None:
        files["upload"] = str(Path(out_dir) / "vqav2_upload.json")
        write_json(files["upload"], [{"question_id": q, "answer": normalize_answer(t)} for q, t in preds.items()])
    return {"metric": "accuracy", "score": acc, "n": len(scores),
            "details": {"accuracy": acc, "error_lines": bad_lines}, "files": files}
