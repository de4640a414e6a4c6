"""Unit tests of the benchmark scorers on hand-made answers, one quirk of each official script at a time."""
from __future__ import annotations

import json
import random

import pytest

from ckd_eval.common import EvalError
from ckd_eval.scorers import gqa, mme, mmmu, pope, sqa, synth, textvqa, vqav2
from ckd_eval.scorers.evalai import answer_scores, normalize_answer, vqa_accuracy


def _jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _ans(qid, text, prompt=""):
    return {"question_id": qid, "prompt": prompt, "text": text}


# ---------------------------------------------------------------- EvalAI normalisation (VQAv2, TextVQA)

@pytest.mark.parametrize("raw,norm", [
    ("Two dogs.", "2 dogs"),            # number word, final period
    ("The Cat", "cat"),                 # lower case, article
    ("an apple", "apple"),
    ("dont", "don't"),                  # contraction table
    ("somebody'd", "somebodyd"),        # ... including its odd entry
    ("it's", "it 's"),                  # 's split
    ("3.5", "3.5"),                     # period before a digit kept
    ("none", "0"),
    ("yes!", "yes"),                    # punctuation glued to a word -> space, then stripped
    ("black-and-white", "black and white"),
    ("left - right", "left right"),     # punctuation next to a space -> deleted
    ("1,000", "1000"),                  # commas always deleted first
    ("What?", "what"),
    ("new\nyork", "new york"),
])
def test_evalai_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_evalai_period_strip_stops_after_32_periods():
    # the official passes re.UNICODE (32) as re.sub's count argument
    assert normalize_answer("a." * 40) == "a" * 32 + "a.a.a.a.a.a.a.a."


def test_vqa_soft_accuracy_leave_one_out():
    gts = ["red"] * 3 + ["blue"] * 6 + ["green"]
    assert vqa_accuracy("Red", gts) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)   # 0.9, not 1.0
    assert vqa_accuracy("blue.", gts) == pytest.approx(1.0)
    assert vqa_accuracy("green", gts) == pytest.approx(9 * (1 / 3) / 10)          # 0.3
    assert vqa_accuracy("purple", gts) == 0.0
    with pytest.raises(EvalError, match="10 human answers"):
        answer_scores(["a"] * 9)


def test_textvqa_matches_on_image_and_question_from_prompt(tmp_path):
    ann = tmp_path / "TextVQA_0.5.1_val.json"
    ann.write_text(json.dumps({"data": [
        {"image_id": "img1", "question": "What brand is this?", "answers": ["dakota"] * 10},
        {"image_id": "img1", "question": "What year?", "answers": ["2012"] * 4 + ["2011"] * 6},
    ]}))
    suffix = "\nAnswer the question using a single word or phrase."
    answers = [
        _ans("img1", "Dakota.", "What brand is this?\nReference OCR token: DAKOTA, x" + suffix),
        _ans("img1", "2012", "Reference OCR token: 2012\nWhat year?" + suffix),  # OCR line first
    ]
    res = textvqa.score(answers, ann)
    assert res["score"] == pytest.approx(100 * (1.0 + 1.0) / 2)
    with pytest.raises(EvalError, match="cannot recover the question"):
        textvqa.score([_ans("img1", "x", "one\ntwo\nthree\nfour")], ann)
    with pytest.raises(EvalError, match="no annotation"):
        textvqa.score([_ans("img2", "x", "What brand is this?" + suffix)], ann)


def test_vqav2_testdev_upload_file(tmp_path):
    split = _jsonl(tmp_path / "llava_vqav2_mscoco_test2015.jsonl",
                   [{"question_id": i, "image": f"{i}.jpg", "text": "q"} for i in (1, 2, 3)])
    answers = [_ans(1, "Two"), _ans(3, "no"), _ans(3, "The Dog.")]   # repeated id: last wins
    res = vqav2.score(answers, split, out_dir=tmp_path, bad_lines=1)
    assert res["score"] is None and res["details"]["error_lines"] == 1
    upload = json.loads((tmp_path / vqav2.UPLOAD_NAME).read_text())
    assert upload == [{"question_id": 1, "answer": "2"}, {"question_id": 2, "answer": ""},
                      {"question_id": 3, "answer": "dog"}]


def test_vqav2_local_accuracy_with_official_annotations(tmp_path):
    ann = tmp_path / "v2_mscoco_val2014_annotations.json"
    ann.write_text(json.dumps({"annotations": [
        {"question_id": 7, "answers": [{"answer": "2"}] * 10},
        {"question_id": 8, "answers": [{"answer": "yes"}] * 2 + [{"answer": "no"}] * 8},
    ]}))
    res = vqav2.score([_ans(7, "two"), _ans(8, "Yes")], ann)
    assert res["score"] == pytest.approx(100 * (1 + (2 * 1 / 3 + 8 * 2 / 3) / 10) / 2)


# ---------------------------------------------------------------- GQA

def test_gqa_rstrip_period_lowercase_exact_match(tmp_path):
    qs = {"1": {"answer": "yes", "isBalanced": True, "types": {"structural": "verify"}},
          "2": {"answer": "cat", "isBalanced": True, "types": {"structural": "query"}},
          "3": {"answer": "left", "isBalanced": True, "types": {"structural": "query"}},
          "4": {"answer": "no", "isBalanced": False, "types": {"structural": "verify"}}}
    ann = tmp_path / "testdev_balanced_questions.json"
    ann.write_text(json.dumps(qs))
    answers = [_ans("1", "Yes."), _ans("2", "the cat"), _ans("3", "left ")]  # article / space not forgiven
    res = gqa.score(answers, ann, out_dir=tmp_path)
    assert res["score"] == pytest.approx(100 / 3)
    assert res["details"]["binary"] == 100.0 and res["details"]["open"] == 0.0
    preds = json.loads((tmp_path / "testdev_balanced_predictions.json").read_text())
    assert preds[0] == {"questionId": "1", "prediction": "yes"}
    with pytest.raises(EvalError, match="no answer"):
        gqa.score(answers[:2], ann)
    assert gqa.score(answers[:2], ann, allow_partial=True)["n"] == 2


# ---------------------------------------------------------------- ScienceQA

@pytest.mark.parametrize("text,letter", [
    ("A", "A"), ("C. a cell wall", "C"), ("The answer is B.", "B"), ("So. The answer is D!", "D"),
    ("The answer is B", "FAILED"),                      # the regex needs one more character
    ("The answer is A. The answer is B.", "FAILED"),    # two matches
    (" A", "FAILED"), ("a", "FAILED"), ("A.", "FAILED"), ("", "FAILED"), ("(A)", "FAILED"),
])
def test_sqa_letter_parsing(text, letter):
    assert sqa.parse_letter(text) == letter


def test_sqa_img_accuracy(tmp_path):
    problems = {str(i): {"choices": ["x", "y", "z"], "answer": 1} for i in range(1, 7)}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": [str(i) for i in range(1, 7)], "val": []}))
    img = "<image>\nQuestion?\nAnswer with the option's letter from the given choices directly."
    answers = [_ans("1", "B", img),                  # right
               _ans("2", "B. y", img),               # right
               _ans("3", "E", img),                  # letter beyond the 3 choices -> wrong
               _ans("4", "banana", img),             # unparseable -> wrong
               _ans("5", "B", "Question?")]          # right, but not an image question
    # "6" (no answer) -> wrong, and not counted as an image question
    with pytest.raises(EvalError, match="no answer"):
        sqa.score(answers, tmp_path)
    res = sqa.score(answers, tmp_path, allow_partial=True)
    assert res["score"] == pytest.approx(50.0) and res["details"]["img_total"] == 4
    assert res["details"]["accuracy"] == pytest.approx(300 / 5)
    full = sqa.score(answers + [_ans("6", "C", img)], tmp_path)
    assert full["score"] == pytest.approx(40.0) and full["details"]["accuracy"] == pytest.approx(50.0)


# ---------------------------------------------------------------- MME

def _mme_gt(root):
    (root / "existence").mkdir(parents=True)
    (root / "existence" / "000.txt").write_text("Is there a dog? Please answer yes or no.\tYes\n"
                                                "Is there a cat? Please answer yes or no.\tNo\n")
    (root / "existence" / "001.txt").write_text("Is there a car? Please answer yes or no.\tNo\n"
                                                "Is there a bus?  Please answer yes or no.\tYes\n")  # two spaces
    (root / "artwork" / "images").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN").mkdir()
    (root / "artwork" / "questions_answers_YN" / "10.txt").write_text(
        "Is this a painting? Please answer yes or no.\tyes\nIs this a statue? Please answer yes or no.\tno\n")
    return root


@pytest.mark.parametrize("text,label", [
    ("Yes", "yes"), ("no", "no"), ("Yes, there is.", "yes"), ("nope", "no"), ("No.", "no"),
    ("The answer is yes", "other"), ("", "other"), ("n", "other"), ("I think not", "other"),
])
def test_mme_yes_no_parsing(text, label):
    assert mme.parse_yes_no(text) == label


def test_mme_pairs_acc_plus_and_perception(tmp_path):
    gt = _mme_gt(tmp_path / "MME_Benchmark_release_version")
    s = "\nAnswer the question using a single word or phrase."
    answers = [
        _ans("existence/000.png", "Yes", "Is there a dog?" + s), _ans("existence/000.png", "No", "Is there a cat?" + s),
        _ans("existence/001.png", "Yes, a car", "Is there a car?" + s), _ans("existence/001.png", "yes", "Is there a bus?" + s),
        _ans("artwork/images/10.jpg", "yes", "Is this a painting?" + s),
        _ans("artwork/images/10.jpg", "The answer is no", "Is this a statue?" + s),
    ]
    with pytest.raises(EvalError, match="perception subtasks"):
        mme.score(answers, gt)
    res = mme.score(answers, gt, allow_partial=True)
    sub = res["details"]["subtasks"]
    assert sub["existence"]["acc"] == 75.0 and sub["existence"]["acc_plus"] == 50.0
    assert sub["existence"]["score"] == 125.0
    assert sub["artwork"]["score"] == 50.0 + 0.0
    assert res["score"] == 175.0 and res["details"]["perception_percent"] == pytest.approx(175 / 20)
    swapped = [answers[0], answers[2], answers[1], answers[3]]
    with pytest.raises(EvalError, match="different images"):
        mme.score(swapped, gt, allow_partial=True)
    with pytest.raises(EvalError, match="no ground truth"):
        mme.score([_ans("existence/000.png", "yes", "Is there a horse?" + s)] * 2, gt, allow_partial=True)


# ---------------------------------------------------------------- POPE

@pytest.mark.parametrize("text,label", [
    ("No", "no"), ("no", "no"), ("No, there is not.", "no"), ("There is no dog in the image.", "no"),
    ("It is not there", "no"), ("NO", "yes"), ("", "yes"), ("Not sure", "yes"), ("Yes. No.", "yes"),
    ("Nope", "yes"), ("no.", "no"), ("yes,no", "yes"),
])
def test_pope_parsing(text, label):
    assert pope.parse_yes_no(text) == label


def _pope_data(tmp_path):
    ann = tmp_path / "coco"
    ann.mkdir()
    labels = {"adversarial": ["yes", "no", "yes", "no"], "random": ["yes", "yes", "no", "no"]}
    questions, qid = [], 1
    for split, labs in labels.items():
        _jsonl(ann / f"coco_pope_{split}.json", [{"question_id": i + 1, "image": f"{split}{i}.jpg",
                                                   "text": f"Is there a thing {i}?", "label": l}
                                                  for i, l in enumerate(labs)])
        for i in range(len(labs)):
            questions.append({"question_id": qid, "image": f"{split}{i}.jpg", "category": split,
                              "text": f"Is there a thing {i}?\nAnswer the question using a single word or phrase."})
            qid += 1
    return ann, questions


def test_pope_f1_per_split_joined_on_question_id(tmp_path):
    ann, questions = _pope_data(tmp_path)
    texts = {1: "Yes", 2: "NO", 3: "", 4: "No, there is not.",          # adversarial: TP, FP, TP, TN
             5: "Yes", 6: "no", 7: "not at all", 8: "No"}              # random: TP, FN, TN, TN
    answers = [_ans(q, t) for q, t in texts.items()]
    res = pope.score(answers, ann, questions=questions)
    adv, rnd = res["details"]["splits"]["adversarial"], res["details"]["splits"]["random"]
    assert (adv["TP"], adv["FP"], adv["TN"], adv["FN"]) == (2, 1, 1, 0)
    assert adv["f1"] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert rnd["f1"] == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert res["score"] == pytest.approx(100 * (adv["f1"] + rnd["f1"]) / 2)
    shuffled = list(reversed(answers))   # the official would zip these with the wrong labels
    assert pope.score(shuffled, ann, questions=questions)["score"] == pytest.approx(res["score"])
    with pytest.raises(EvalError, match="no answer"):
        pope.score(answers[1:], ann, questions=questions)
    with pytest.raises(EvalError, match="question file"):
        pope.score(answers, ann)


def test_pope_rejects_question_annotation_mismatch(tmp_path):
    ann, questions = _pope_data(tmp_path)
    questions[0]["image"] = "other.jpg"
    with pytest.raises(EvalError, match="does not match"):
        pope.score([_ans(q["question_id"], "yes") for q in questions], ann, questions=questions)


# ---------------------------------------------------------------- MMMU

CHOICES = ["A", "B", "C", "D"]
INDEX2ANS = {"A": "red apple", "B": "green pear", "C": "blue plum", "D": "yellow banana"}


@pytest.mark.parametrize("text,letter", [
    ("(B)", "B"), ("B", "B"), ("The answer is C.", "C"), ("A or B", "B"),          # last candidate wins
    ("(A) is wrong, (C) is right", "C"), ("I would say it is the green pear here", "B"),  # option text, >5 words
])
def test_mmmu_multi_choice_parsing(text, letter):
    assert mmmu.parse_multi_choice_response(text, CHOICES, INDEX2ANS, random.Random(0)) == letter


def test_mmmu_multi_choice_random_fallback_is_seeded_42():
    rng, ref = random.Random(42), random.Random(42)
    got = [mmmu.parse_multi_choice_response(t, CHOICES, INDEX2ANS, rng) for t in ("", "green pear", "???")]
    assert got == [ref.choice(CHOICES) for _ in range(3)]


@pytest.mark.parametrize("text,gold,ok", [
    ("3000", "3000", True), ("The answer is 3,000.", "3000", True), ("so x = 2.50", "2.5", True),
    ("It is 2.504", "2.5", True),              # rounded to 2 decimals
    ("It is 2.51", "2.5", False), ("The result is 12 apples", "12", True), ("-4", "-4", True),
    ("1.2e3", "1200", True), ("Paris", "paris", True), ("it is in paris.", "Paris", True),
    ("b", "a", False), ("The answer is a", "a", True), ("", "5", False),
    ("therefore the answer is 7", ["7", "seven"], True),
])
def test_mmmu_open_answers(text, gold, ok):
    assert mmmu.eval_open(gold, mmmu.parse_open_response(text)) is ok


def test_mmmu_micro_accuracy_over_subjects(tmp_path):
    gt = {"validation_Math_1": {"question_type": "open", "ground_truth": "42"},
          "validation_Math_2": {"question_type": "multiple-choice", "ground_truth": "B"},
          "validation_Art_Theory_1": {"question_type": "multiple-choice", "ground_truth": "A"},
          "validation_Unknown_Subject_1": {"question_type": "open", "ground_truth": "x"}}
    ann = tmp_path / "answer_dict_val.json"
    ann.write_text(json.dumps(gt))
    questions = [{"id": k, "question_type": v["question_type"], "all_choices": CHOICES, "index2ans": INDEX2ANS}
                 for k, v in gt.items()]
    answers = [_ans("validation_Math_1", "The final answer is 42."), _ans("validation_Math_2", "(B)"),
               _ans("validation_Art_Theory_1", "(C)"), _ans("validation_Unknown_Subject_1", "x")]
    res = mmmu.score(answers, ann, questions=questions)
    assert res["n"] == 3 and res["score"] == pytest.approx(200 / 3)     # unknown subject skipped
    assert res["details"]["subjects"]["Math"] == {"acc": 100.0, "num": 2}
    assert res["details"]["domains"]["Science"]["num"] == 2


# ---------------------------------------------------------------- synth

def test_synth_normalised_exact_match_per_category(tmp_path):
    qs = _jsonl(tmp_path / "eval.jsonl", [
        {"question_id": "a", "answer": "red", "category": "colour"},
        {"question_id": "b", "answer": "blue", "category": "colour"},
        {"question_id": "c", "answer": "2", "category": "count"},
        {"question_id": "d", "answer": "top left", "category": "position"},
    ])
    res = synth.score([_ans("a", "Red."), _ans("b", "green"), _ans("c", "two"), _ans("d", "the top left")], qs)
    cats = res["details"]["categories"]
    assert cats["colour"]["acc"] == 50.0 and cats["count"]["acc"] == 100.0 and cats["position"]["acc"] == 100.0
    assert res["score"] == pytest.approx(250 / 3) and res["details"]["overall_accuracy"] == 75.0


def test_partial_files_mme_unpaired_and_pope_truncated(tmp_path):
    gt = _mme_gt(tmp_path / "MME")
    s = "\nAnswer the question using a single word or phrase."
    answers = [_ans("existence/000.png", "Yes", "Is there a dog?" + s), _ans("existence/000.png", "No", "Is there a cat?" + s),
               _ans("existence/001.png", "No", "Is there a car?" + s)]
    with pytest.raises(EvalError, match="odd number"):
        mme.score(answers, gt)
    res = mme.score(answers, gt, allow_partial=True)
    assert res["details"]["subtasks"]["existence"]["score"] == 200.0 and res["details"]["dropped_unpaired"] == 1
    ann, questions = _pope_data(tmp_path)
    first = questions[:2]  # --limit 2
    res = pope.score([_ans(q["question_id"], "yes") for q in first], ann, questions=first, allow_partial=True)
    assert res["details"]["splits"]["adversarial"]["n"] == 2
    with pytest.raises(EvalError, match="lines"):
        pope.score([_ans(q["question_id"], "yes") for q in first], ann, questions=first)
