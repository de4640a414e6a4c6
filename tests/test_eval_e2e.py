"""End to end with a tiny model: generation -> answer file -> score, resume, CLI errors."""
from __future__ import annotations

import json
import shutil

import pytest

from ckd_eval.cli import main
from ckd_eval.common import EvalError


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    """Only the tiny student (the shared ``tiny_models`` fixture builds three models)."""
    from ckd_common.model import init_preset, load_vlm

    d = init_preset("tiny-student", tmp_path_factory.mktemp("eval_model") / "tiny-student")
    return d, load_vlm(d)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_synth_generate_answer_file_score_and_resume(tiny_student, synth_dir, tmp_path, capsys):
    from ckd_common.model import model_info

    model_dir, student = tiny_student
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--bench", "synth", "--data-root", str(synth_dir),
            "--out", str(out), "--batch-size", "8", "--max-new-tokens", "3", "--no-progress"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "synth" in table and "colour" in table and "mean category accuracy" in table
    answers = out / "synth" / "answers.jsonl"
    recs = _lines(answers)
    questions = [json.loads(x) for x in (synth_dir / "eval.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in recs] == [q["question_id"] for q in questions]
    assert all(r["prompt"] == q["text"] and isinstance(r["text"], str) for r, q in zip(recs, questions))
    fp = model_info(*student).fingerprint
    res = json.loads((out / "results.json").read_text())["benchmarks"]["synth"]
    assert res["model"]["fingerprint"] == fp and recs[0]["metadata"]["model_fingerprint"] == fp
    assert res["bench"] == "synth" and res["scorer_version"] == "synth/1"
    assert res["prompt_version"] and res["template"] == "qwen2_base" and res["max_new_tokens"] == 3
    assert res["n"] == len(questions) and set(res["details"]["categories"]) == {q["category"] for q in questions}
    assert res["generation"] == {"resumed": 0, "generated": len(questions), "total": len(questions)}
    saved = json.loads((out / "eval_config.json").read_text())
    assert saved["config"] == "EvalConfig" and saved["bench"] == "synth" and saved["max_new_tokens"] == 3

    # resume: a torn last line is regenerated, complete lines are kept as they are
    raw = answers.read_text()
    kept = raw.splitlines(keepends=True)[:-1]
    answers.write_text("".join(kept) + raw.splitlines()[-1][:15])
    assert main(args) == 0
    capsys.readouterr()
    assert answers.read_text() == raw
    res2 = json.loads((out / "synth" / "result.json").read_text())
    assert res2["generation"]["resumed"] == len(questions) - 1 and res2["generation"]["generated"] == 1
    assert res2["score"] == res["score"]

    # scoring only, from the answer file, gives the same number
    assert main(["score", "--bench", "synth", "--answers", str(answers), "--annotations",
                 str(synth_dir / "eval.jsonl"), "--out", str(tmp_path / "scored")]) == 0
    scored = json.loads((tmp_path / "scored" / "synth_result.json").read_text())
    assert scored["score"] == res["score"] and scored["model"]["fingerprint"] == fp

    # another model may not append to this answer file
    answers.write_text(raw.replace(fp, "0" * 32))
    assert main(args) == 2
    assert "was written by model" in capsys.readouterr().err


def test_batching_and_text_only_questions(tiny_student, synth_dir, tmp_path):
    """Left-padded batches (mixed lengths, with and without image) give the per-question scores."""
    import torch

    from ckd_eval.generate import Generator, Item

    gen = Generator(tiny_student[0])
    questions = [json.loads(x) for x in (synth_dir / "eval.jsonl").read_text().splitlines()][:3]
    items = [Item(q["question_id"], q["text"] + " Think." * i, q["text"],
                  synth_dir / "images" / q["image"] if i != 1 else None) for i, q in enumerate(questions)]
    assert gen.encode(items[0].question, True).count(gen.info.image_token_id) == gen.info.num_visual_tokens
    assert gen.encode(items[1].question, False).count(gen.info.image_token_id) == 0
    generate, scores = gen.model.generate, []

    def with_scores(**kw):
        out = generate(**kw, output_scores=True, return_dict_in_generate=True)
        scores.append(torch.stack(out.scores, 1))
        return out.sequences

    gen.model.generate = with_scores
    batched = gen.generate(items, max_new_tokens=3)
    single = [gen.generate([it], max_new_tokens=3)[0] for it in items]
    assert batched == single and len(batched) == 3
    for i in range(3):
        torch.testing.assert_close(scores[0][i], scores[1 + i][0], atol=1e-4, rtol=1e-4)


def _fake_sqa(root, synth_dir):
    """A tiny ScienceQA in the LLaVA layout: llava_test_CQM-A.json + problems.json + pid_splits.json."""
    sqa = root / "scienceqa"
    (sqa / "images" / "test").mkdir(parents=True)
    img = sorted((synth_dir / "images").glob("ev_*.png"))[0]
    shutil.copy(img, sqa / "images" / "test" / "q1.png")
    conv = lambda q: [{"from": "human", "value": q}, {"from": "gpt", "value": "A"}]  # noqa: E731
    (sqa / "llava_test_CQM-A.json").write_text(json.dumps([
        {"id": "1", "image": "q1.png", "conversations": conv("<image>\nWhich shape?\nA. square\nB. circle")},
        {"id": "2", "conversations": conv("How many corners has a square?\nA. 4\nB. 3")},
    ]))
    (sqa / "problems.json").write_text(json.dumps({"1": {"choices": ["square", "circle"], "answer": 0},
                                                   "2": {"choices": ["4", "3"], "answer": 0}}))
    (sqa / "pid_splits.json").write_text(json.dumps({"test": ["1", "2"]}))


def test_sqa_end_to_end_prompt_conventions(tiny_student, synth_dir, tmp_path, capsys):
    _fake_sqa(tmp_path / "data", synth_dir)
    out = tmp_path / "out"
    assert main(["--model", str(tiny_student[0]), "--bench", "sqa", "--data-root",
                 str(tmp_path / "data"), "--out", str(out), "--max-new-tokens", "3", "--no-progress"]) == 0
    recs = _lines(out / "sqa" / "answers.jsonl")
    suffix = "\nAnswer with the option's letter from the given choices directly."
    assert recs[0]["prompt"] == "<image>\nWhich shape?\nA. square\nB. circle" + suffix   # as model_vqa_science
    assert recs[1]["prompt"] == "How many corners has a square?\nA. 4\nB. 3" + suffix    # text-only question
    res = json.loads((out / "sqa" / "result.json").read_text())
    assert res["details"]["img_total"] == 1 and res["details"]["total"] == 2
    assert res["max_new_tokens"] == 3 and res["scorer_version"] == "sqa/1"


def test_missing_inputs_name_the_file_and_layout(tmp_path, capsys):
    rc = main(["--model", str(tmp_path / "model"), "--bench", "gqa", "--data-root", str(tmp_path),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "llava_gqa_testdev_balanced.jsonl" in err and "expected layout" in err
    assert main(["--model", "x", "--bench", "nope", "--data-root", str(tmp_path), "--out", "o"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    assert main(["score", "--bench", "pope", "--answers", str(tmp_path / "a.jsonl"),
                 "--annotations", str(tmp_path)]) == 2
    assert "question file" in capsys.readouterr().err
    (tmp_path / "eval.jsonl").write_text("")
    assert main(["--model", str(tmp_path / "no-model"), "--bench", "synth", "--data-root", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no-model" in capsys.readouterr().err


def test_config_problems_reported_at_once_before_loading(tmp_path, capsys):
    rc = main(["--bench", "gqa,nope", "--batch-size", "0", "--template", "chat", "--annotation", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    for part in ("unknown benchmark 'nope'", "eval run needs --model", "--batch-size must be at least 1",
                 "--template 'chat'", "--annotation expects BENCH=PATH"):
        assert part in err, part
    assert main(["score", "--bench", "gqa,pope", "--answers", "a.jsonl"]) == 2
    assert "exactly one --bench" in capsys.readouterr().err


def test_student_trainer_eval_is_the_same_command(synth_dir, tmp_path, capsys):
    from student_trainer.cli import main as student_trainer

    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": json.loads(q)["question_id"], "text": "red"}) + "\n"
                               for q in (synth_dir / "eval.jsonl").read_text().splitlines()))
    args = ["score", "--bench", "synth", "--answers", str(answers), "--annotations", str(synth_dir / "eval.jsonl")]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert student_trainer(["eval", *args, "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    a, b = (json.loads((tmp_path / d / "synth_result.json").read_text()) for d in "ab")
    assert a["score"] == b["score"] and a["n"] == b["n"] > 0
    assert (tmp_path / "a" / "synth_score_config.json").is_file()


@pytest.mark.integration
def test_module_entry_points():
    import subprocess
    import sys

    for module in ("ckd_eval", "student_trainer.eval"):
        r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "--data-root" in r.stdout, (module, r.stderr[-2000:])


def test_add_eval_parser_registers_on_a_parent_cli():
    import argparse

    from ckd_eval.cli import add_eval_parser, run_eval

    parser = argparse.ArgumentParser(prog="student_trainer")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["eval", "--model", "m", "--bench", "paper", "--data-root", "d", "--out", "o"])
    assert a.func is run_eval and a.action == "run" and a.bench == "paper"
    a = parser.parse_args(["eval", "score", "--bench", "gqa", "--answers", "f.jsonl", "--annotations", "x.json"])
    assert a.action == "score" and a.answers == "f.jsonl"
    with pytest.raises(EvalError):
        from ckd_eval.config import parse_benches

        parse_benches("gqa,unknown")


def _fake_llava_root(root, synth_dir):
    """Two to four questions per benchmark, in the LLaVA-1.5 layout, with hand-made annotations."""
    img = sorted((synth_dir / "images").glob("ev_*.png"))[0]
    s = "\nAnswer the question using a single word or phrase."

    def put(rel, name):
        (root / rel).mkdir(parents=True, exist_ok=True)
        shutil.copy(img, root / rel / name)

    def jsonl(rel, recs):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("".join(json.dumps(r) + "\n" for r in recs))

    put("vqav2/test2015", "v.jpg")
    jsonl("vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", [{"question_id": 11, "image": "v.jpg", "text": "What?" + s}])
    jsonl("vqav2/llava_vqav2_mscoco_test2015.jsonl", [{"question_id": i, "image": "v.jpg", "text": "q"} for i in (10, 11)])
    put("gqa/images", "g.jpg")
    jsonl("gqa/llava_gqa_testdev_balanced.jsonl", [{"question_id": "g1", "image": "g.jpg", "text": "Is it red?" + s}])
    (root / "gqa/testdev_balanced_questions.json").write_text(json.dumps({"g1": {"answer": "yes", "isBalanced": True}}))
    put("textvqa/train_images", "t.jpg")
    jsonl("textvqa/llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": "t", "image": "t.jpg", "text": "What brand?\nReference OCR token: ACME" + s}])
    (root / "textvqa/TextVQA_0.5.1_val.json").write_text(json.dumps(
        {"data": [{"image_id": "t", "question": "What brand?", "answers": ["acme"] * 10}]}))
    put("MME/MME_Benchmark_release_version/existence", "000.png")
    (root / "MME/MME_Benchmark_release_version/existence/000.txt").write_text(
        "Is there a dog? Please answer yes or no.\tYes\nIs there a cat? Please answer yes or no.\tNo\n")
    jsonl("MME/llava_mme.jsonl", [{"question_id": "existence/000.png", "image": "existence/000.png",
                                   "text": q + s, "category": "existence"} for q in ("Is there a dog?", "Is there a cat?")])
    put("pope/val2014", "p.jpg")
    (root / "pope/coco").mkdir(parents=True)
    (root / "pope/coco/coco_pope_random.json").write_text("".join(
        json.dumps({"question_id": i, "image": "p.jpg", "text": "Is there a dog?", "label": lab}) + "\n"
        for i, lab in ((1, "yes"), (2, "no"))))
    jsonl("pope/llava_pope_test.jsonl", [{"question_id": i, "image": "p.jpg", "text": "Is there a dog?" + s,
                                          "category": "random"} for i in (1, 2)])
    put("MMMU/all_images", "m.png")
    (root / "MMMU/anns_for_eval.json").write_text(json.dumps([
        {"id": "validation_Math_1", "question_type": "multiple-choice", "all_choices": ["A", "B"],
         "index2ans": {"A": "1", "B": "2"}, "image": "m.png",
         "prompt": "1+1?\n(A) 1\n(B) 2\nAnswer with the option's letter from the given choices directly."},
        {"id": "validation_Math_2", "question_type": "open", "all_choices": [], "index2ans": {},
         "prompt": "Two images: how many? Answer the question using a single word or phrase."}]))
    (root / "MMMU/eval").mkdir()
    (root / "MMMU/eval/answer_dict_val.json").write_text(json.dumps({
        "validation_Math_1": {"question_type": "multiple-choice", "ground_truth": "B"},
        "validation_Math_2": {"question_type": "open", "ground_truth": "2"}}))
    _fake_sqa(root, synth_dir)


def test_all_paper_benchmarks_run_on_the_llava_layout(tiny_student, synth_dir, tmp_path, capsys):
    _fake_llava_root(tmp_path / "data", synth_dir)
    out = tmp_path / "out"
    assert main(["--model", str(tiny_student[0]), "--bench", "paper", "--data-root", str(tmp_path / "data"),
                 "--out", str(out), "--max-new-tokens", "2", "--batch-size", "4", "--no-progress",
                 "--allow-partial"]) == 0   # MME/POPE here hold one subtask/split only
    table = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())["benchmarks"]
    assert set(results) == {"vqav2", "gqa", "textvqa", "sqa", "mme", "pope", "mmmu"}
    for name, r in results.items():
        assert name in table and r["model"]["fingerprint"] and r["scorer_version"].startswith(name)
    assert results["vqav2"]["score"] is None
    upload = json.loads((out / "vqav2" / "vqav2_test-dev_upload.json").read_text())
    assert [u["question_id"] for u in upload] == [10, 11] and upload[0]["answer"] == ""
    mmmu_recs = _lines(out / "mmmu" / "answers.jsonl")
    assert mmmu_recs[1]["text"] == "INVALID GENERATION FOR MULTIPLE IMAGE INPUTS"   # no image: not generated
    assert results["mme"]["details"]["subtasks"]["existence"]["questions"] == 2


@pytest.mark.parametrize("bench", ["vqav2", "gqa", "textvqa", "sqa", "mme", "pope", "mmmu"])
def test_missing_inputs_name_the_public_source_and_version(bench, tmp_path, capsys):
    from ckd_eval.scorers import get_benchmark

    source = get_benchmark(bench).source
    assert main(["--model", "m", "--bench", bench, "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"source: {source}" in err and len(err.strip().splitlines()) == 1
    versions = {"vqav2": "test2015", "gqa": "1.2 testdev-balanced", "textvqa": "v0.5.1", "sqa": "pid_splits.json",
                "mme": "full MME_Benchmark_release_version tree", "pope": "e3e39262", "mmmu": "validation"}
    assert versions[bench] in source


def test_pope_labels_of_the_default_branch_are_refused_naming_the_commit(tmp_path):
    """LLaVA-1.5's 8,910 questions use POPE's labels at e3e39262 (2,910 random); the default branch has 3,000."""
    from ckd_eval.scorers import pope

    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "coco_pope_random.json").write_text("".join(
        json.dumps({"question_id": i, "image": f"{i}.jpg", "text": "Is there a dog?", "label": "yes"}) + "\n"
        for i in range(3000)))
    questions = [{"question_id": i, "image": f"{i}.jpg", "category": "random"} for i in range(2910)]
    answers = [{"question_id": i, "text": "Yes"} for i in range(2910)]
    with pytest.raises(EvalError, match=r"2910 questions but .*coco_pope_random.json has 3000 lines .*"
                                        r"commit e3e39262.*3,000 on the default branch"):
        pope.score(answers, tmp_path / "coco", questions=questions)
