"""Data preparation: position contract, sample keys, errors, synthetic data, image preprocessing."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ckd_common.data import DataError, Preparer, collate, preprocess_image, prepare_file, read_records
from ckd_common.keys import sample_key
from ckd_common.model import init_preset, load_vlm, model_info
from ckd_common.synth import synthesize
from ckd_common.templates import IGNORE_INDEX


@pytest.fixture(scope="module")
def patch_student(tmp_path_factory):
    return load_vlm(init_preset("tiny-student", tmp_path_factory.mktemp("patch") / "m", strategy="patch"))


def _preparer(model_tok, template, images, **kw):
    model, tok = model_tok
    info = model_info(model, tok)
    return Preparer(tok, template, info.num_visual_tokens, info.image_token_id, images, **kw)


def _record(sid="s1", image="img.png", conv=None):
    rec = {"id": sid, "conversations": conv if conv is not None else [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}]}
    if image:
        rec["image"] = image
    return rec


@pytest.fixture
def img_dir(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "img.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    return tmp_path


@pytest.mark.parametrize("strategy,expected_nv", [("full", 4), ("patch", 3)])
def test_visual_span_for_both_strategies(strategy, expected_nv, student, patch_student, img_dir):
    from transformers import AutoProcessor

    model, tok = student if strategy == "full" else patch_student
    prep = _preparer((model, tok), "qwen2_base", img_dir)
    s = prep.prepare(_record())
    assert s.num_visual == expected_nv == model_info(model, tok).num_visual_tokens
    span = s.input_ids[s.visual_start:s.visual_start + s.num_visual]
    assert (span == model.config.image_token_id).all()
    assert (s.input_ids == model.config.image_token_id).sum() == expected_nv
    assert (s.labels[s.visual_start:s.visual_start + s.num_visual] == IGNORE_INDEX).all()
    # transformers' own processor, saved with the model, expands <image> to the same count
    proc = AutoProcessor.from_pretrained(model.name_or_path)
    enc = proc(images=Image.open(img_dir / "img.png"), text="<image>hi", return_tensors="np")
    assert (enc["input_ids"] == model.config.image_token_id).sum() == expected_nv
    # and the model accepts the prepared sample (image features fill exactly the span)
    batch = collate([s], tok.pad_token_id, model.config.vision_config.image_size, aspect_ratio="square")
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert out.logits.shape[1] == s.length


def test_pretrain_visual_span_starts_at_zero(student, img_dir):
    s = _preparer(student, "pretrain", img_dir).prepare(_record())
    assert s.visual_start == 0
    assert (s.labels[:s.num_visual] == IGNORE_INDEX).all() and (s.labels[s.num_visual:] != IGNORE_INDEX).all()


def test_response_positions_are_labels_shifted_by_one(student, synth_dir):
    model, tok = student
    info = model_info(model, tok)
    ds = prepare_file(synth_dir / "instruct.json", tok, "qwen2_base", info.num_visual_tokens,
                      info.image_token_id, synth_dir / "images")
    for s in ds.samples:
        R = s.response_positions
        assert len(R) == (s.labels != IGNORE_INDEX).sum()
        assert (s.labels[R + 1] != IGNORE_INDEX).all()
        assert np.array_equal(s.input_ids[R + 1], s.labels[R + 1])
        assert R.min() >= (s.visual_start + s.num_visual if s.has_image else 0)


def test_text_only_sample(student, img_dir):
    s = _preparer(student, "qwen2_base", img_dir).prepare(_record(image=None, conv=[
        {"from": "human", "value": "How many corners does a square have?"}, {"from": "gpt", "value": "4"}]))
    assert not s.has_image and s.visual_start == -1 and s.num_visual == 0
    assert len(s.response_positions) > 0


def test_sample_key_changes_with_each_input():
    ids = np.arange(20)
    base = sample_key("qwen2_base", ids, "abc", 16)
    assert base == sample_key("qwen2_base", list(range(20)), "abc", 16)  # type-independent
    assert len(base) == 32 and int(base, 16) >= 0
    assert base != sample_key("pretrain", ids, "abc", 16)
    assert base != sample_key("qwen2_base", np.r_[ids[:-1], 99], "abc", 16)
    assert base != sample_key("qwen2_base", ids, "abd", 16)
    assert base != sample_key("qwen2_base", ids, "abc", 15)
    assert base != sample_key("qwen2_base", ids, None, 16)


@pytest.mark.integration
def test_sample_keys_stable_across_processes(student, img_dir, tmp_path):
    s = _preparer(student, "qwen2_base", img_dir).prepare(_record())
    code = ("from ckd_common.model import load_vlm, model_info; from ckd_common.data import Preparer;"
            f"m,t=load_vlm({str(student[0].name_or_path)!r}); i=model_info(m,t);"
            f"p=Preparer(t,'qwen2_base',i.num_visual_tokens,i.image_token_id,{str(img_dir)!r});"
            "import json,sys; print(p.prepare(json.loads(sys.argv[1])).key)")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(_record())], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip().splitlines()[-1] == s.key


def test_image_bytes_change_the_key(student, img_dir):
    prep = _preparer(student, "qwen2_base", img_dir)
    k1 = prep.prepare(_record()).key
    Image.new("RGB", (40, 30), (10, 200, 10)).save(img_dir / "img.png")
    assert prep.prepare(_record()).key != k1


@pytest.mark.parametrize("record,message", [
    (_record(image="missing.png"), "sample s1: image .*missing.png not found"),
    (_record(image="broken.png"), "sample s1: image .*broken.png is unreadable"),
    (_record(conv=[]), "sample s1: 'conversations' is missing or empty"),
    ({"id": "s1", "image": "img.png"}, "sample s1: 'conversations' is missing or empty"),
    (_record(conv=[{"from": "human"}, {"from": "gpt", "value": "x"}]), "sample s1: message 0 is malformed"),
    (_record(conv=[{"from": "human", "value": "<image>q"}, {"from": "human", "value": "a"}]),
     "sample s1: wrong role order at message 0"),
    (_record(conv=[{"from": "human", "value": "<image>q"}]), "sample s1: expected alternating human/gpt"),
    (_record(conv=[{"from": "human", "value": "<image>q <image>"}, {"from": "gpt", "value": "a"}]),
     "sample s1: 2 <image> tokens"),
    (_record(image=None), "sample s1: the text has <image> but the sample has no 'image' field"),
])
def test_data_errors_name_the_sample(student, img_dir, record, message):
    with pytest.raises(DataError, match=message):
        _preparer(student, "qwen2_base", img_dir).prepare(record)


def test_truncation_never_cuts_the_visual_span(student, img_dir):
    prep = _preparer(student, "qwen2_base", img_dir)
    full = prep.prepare(_record())
    cut_inside = full.visual_start + full.num_visual // 2
    with pytest.raises(DataError, match="would cut the visual span"):
        _preparer(student, "qwen2_base", img_dir, max_length=cut_inside).prepare(_record())
    ds = _preparer(student, "qwen2_base", img_dir, max_length=cut_inside).prepare_all(
        [_record(), _record(image=None, conv=[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}])],
        on_error="skip")
    cut = [n for reason, n in ds.skipped.items() if "would cut the visual span" in reason]
    assert cut == [1] and len(ds) + sum(ds.skipped.values()) == 2
    # a cut that only shortens the answer is fine
    long_a = _record(conv=[{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "red " * 60}])
    limit = full.visual_start + full.num_visual + 20
    assert _preparer(student, "qwen2_base", img_dir, max_length=limit).prepare(long_a).length == limit
    # a cut that leaves no answer at all is refused
    long_q = _record(conv=[{"from": "human", "value": "<image>\n" + "word " * 60}, {"from": "gpt", "value": "a"}])
    with pytest.raises(DataError, match="sample s1: no supervised token left"):
        _preparer(student, "qwen2_base", img_dir, max_length=limit).prepare(long_q)


def test_read_records_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(DataError, match="not valid JSON"):
        read_records(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(DataError, match="expected a JSON list"):
        read_records(tmp_path / "obj.json")


def test_preprocess_matches_siglip_image_processor():
    from transformers import SiglipImageProcessor

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8))
    ref = SiglipImageProcessor(size={"height": 56, "width": 56})(images=img, return_tensors="np")["pixel_values"][0]
    ours = preprocess_image(img, 56, "square")
    assert ours.shape == ref.shape == (3, 56, 56)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_synth_is_deterministic_and_well_formed(tmp_path, student):
    a = synthesize(tmp_path / "a", seed=3, n_pretrain=10, n_instruct=10, n_eval=5)
    synthesize(tmp_path / "b", seed=3, n_pretrain=10, n_instruct=10, n_eval=5)
    for f in ("pretrain.json", "instruct.json", "eval.jsonl"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    for img in (tmp_path / "a" / "images").iterdir():
        assert img.read_bytes() == (tmp_path / "b" / "images" / img.name).read_bytes()
    assert a["pretrain"] == 10 and a["eval"] == 5
    evals = [json.loads(line) for line in (tmp_path / "a" / "eval.jsonl").read_text().splitlines()]
    assert {"question_id", "image", "text", "answer", "category"} <= set(evals[0])
    model, tok = student
    info = model_info(model, tok)
    for f, t in (("pretrain.json", "pretrain"), ("instruct.json", "qwen2_base")):
        ds = prepare_file(tmp_path / "a" / f, tok, t, info.num_visual_tokens, info.image_token_id,
                          tmp_path / "a" / "images")
        assert len(ds) == 10


def test_synth_rounds_and_short_answer_knobs(tmp_path):
    """rounds=(5, 5) asks every category once per instruction image; short_answer=False drops LLaVA-1.5's
    short-answer instruction from instructions and held-out questions alike (they must match)."""
    from ckd_common.synth import CATEGORIES, SHORT_ANSWER

    synthesize(tmp_path, seed=4, n_pretrain=2, n_instruct=12, n_eval=10, rounds=(5, 5), short_answer=False,
               text_only_fraction=0.0)
    instruct = json.loads((tmp_path / "instruct.json").read_text())
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert all(len(r["conversations"]) == 2 * len(CATEGORIES) for r in instruct)
    texts = [t["value"] for r in instruct for t in r["conversations"] if t["from"] == "human"] + [e["text"] for e in evals]
    assert texts and not any(SHORT_ANSWER in t for t in texts)
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in instruct)
    assert sorted(e["category"] for e in evals) == sorted(CATEGORIES * 2)


def test_prepare_report_counts_deviations_and_warnings(tmp_path, capsys):
    """`ckd data prepare` tells which samples are rendered differently from the reference."""
    from ckd_common.cli import main as ckd_main

    model_dir = init_preset("tiny-student", tmp_path / "m")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "img.png")
    recs = [_record("a"), _record("b", conv=[{"from": "human", "value": "What colour is it?"},
                                             {"from": "gpt", "value": "red"}])]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    assert ckd_main(["data", "prepare", "--model", str(model_dir), "--data", str(tmp_path / "d.json"),
                     "--images", str(tmp_path), "--template", "qwen2_base"]) == 0
    out = capsys.readouterr().out
    assert "2 samples" in out and "1 sample(s): image field but no <image> in the text" in out
    assert "docs/templates.md" in out


def test_synth_questions_are_answerable_from_the_scene():
    """Each category's answer follows from the scene: existence asks about one place and is "yes" about half the
    time; a position question names its object unambiguously, with as few attributes as do."""
    import random
    from collections import Counter

    from ckd_common.synth import CELLS, SHAPES, _scene, question

    rng, answers = random.Random(7), Counter()
    for _ in range(2000):
        items = _scene(rng)
        q, a = question(items, "existence", rng)
        cell = CELLS.index(q.removeprefix("Is there a shape at the ").removesuffix("?"))
        assert a == ("yes" if any(it.cell == cell for it in items) else "no")
        answers[a] += 1
        q, a = question(items, "position", rng)
        name = q.removeprefix("Where is the ").removesuffix("?").split()
        matches = [it for it in items if all(w in (it.colour, it.shape, "shape") for w in name)]
        assert len(matches) == 1 and CELLS[matches[0].cell] == a, (q, items)
        if len(name) == 2 and name[1] == "shape":  # named by colour: its shape alone would not single it out
            assert sum(it.shape == matches[0].shape for it in items) > 1
        if len(name) == 1:
            assert name[0] in SHAPES
    assert 0.45 < answers["yes"] / sum(answers.values()) < 0.55
