"""Golden token / label sequences of both templates with the REAL Qwen2 tokenizer (vendored in
tests/fixtures/qwen2-tokenizer), checked twice: against literal ids frozen here, and against a
transcription of TinyLLaVA-Factory's own template code (tests/reference_tinyllava_templates.py).

Covers multi-round, text-only, unicode/CJK/emoji, answers starting with digits or spaces, the
``<image>``-only question, the image after the question, truncation at 2048 with 728 visual tokens,
generation prompts (one and several rounds, empty question), the error cases, and the pad != eos
warning."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from ckd_common.data import NOTE_IMAGE_INSERTED, NOTE_TRUNCATED, DataError, Preparer
from ckd_common.templates import IGNORE_INDEX, IMAGE_MARKER, TemplateError, get_template
from tests import reference_tinyllava_templates as ref

ENDOFTEXT, IMAGE_ID, NV = 151643, 151646, 728  # <image> as ckd model convert adds it; SigLIP-384/14 'patch'
SYSTEM_IDS = [32, 6236, 1948, 264, 22208, 1196, 323, 458, 20443, 11229, 17847, 13, 576, 17847, 6696, 10950, 11,
              11682, 11, 323, 47787, 11253, 311, 279, 1196, 594, 4755, 13]

CASES = {
    "multi_round": ("qwen2_base", [("<image>\nWhat colour is the circle?", "red"), ("How many shapes are there?", "2"),
                                   ("Where is it?", " top left")]),
    "text_only": ("qwen2_base", [("What is one plus one?", "2")]),
    "unicode": ("qwen2_base", [("<image>\n这是什么颜色？🙂", "红色 🟥"), ("Ça va? ½", "Très bien — 👍")]),
    "image_only_question": ("qwen2_base", [("<image>", "A red circle.")]),
    "image_after_question": ("qwen2_base", [("What is it?\n<image>", "12 circles")]),
    "pretrain": ("pretrain", [("<image>\nDescribe the image briefly.", "A red circle on a grey background.")]),
}
# (input ids with the image marker, supervised [start, end) ranges of the labels)
GOLDEN = {
    # " 2" and " top left" after "ASSISTANT:" keep a lone " " token (220), supervised with the answer
    "multi_round": (SYSTEM_IDS + [13872, 25, 220, -200, 198, 3838, 12463, 374, 279, 12671, 30, 35560, 3846, 2821, 25,
                                  2518, 151643, 6448, 25, 2585, 1657, 20816, 525, 1052, 30, 35560, 3846, 2821, 25, 220,
                                  17, 151643, 6448, 25, 10967, 374, 432, 30, 35560, 3846, 2821, 25, 220, 1909, 2115,
                                  151643],
                    [(43, 45), (57, 60), (70, 74)]),
    "text_only": (SYSTEM_IDS + [13872, 25, 3555, 374, 825, 5519, 825, 30, 35560, 3846, 2821, 25, 220, 17, 151643],
                  [(40, 43)]),
    "unicode": (SYSTEM_IDS + [13872, 25, 220, -200, 198, 100346, 99245, 102284, 11319, 145080, 35560, 3846, 2821, 25,
                              10236, 118, 95, 38035, 11162, 22129, 151643, 6448, 25, 131098, 11164, 30, 220, 26062,
                              35560, 3846, 2821, 25, 1163, 12142, 14370, 1959, 61804, 235, 151643],
                [(42, 49), (60, 67)]),
    # "USER: <image> ASSISTANT:": no "\n" token after the image (the reference strips it)
    "image_only_question": (SYSTEM_IDS + [13872, 25, 220, -200, 35560, 3846, 2821, 25, 362, 2518, 12671, 13, 151643],
                            [(36, 41)]),
    "image_after_question": (SYSTEM_IDS + [13872, 25, 220, -200, 198, 3838, 374, 432, 30, 35560, 3846, 2821, 25, 220,
                                           16, 17, 25362, 151643],
                             [(41, 46)]),
    "pretrain": ([-200, 32, 2518, 12671, 389, 264, 19780, 4004, 624],
                 [(1, 9)]),
}


@pytest.fixture(scope="module")
def tok(qwen2_base_tokenizer_dir):
    return AutoTokenizer.from_pretrained(qwen2_base_tokenizer_dir)


@pytest.fixture(scope="module")
def instruct_tok(qwen2_tokenizer_dir):
    return AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)


def _encode(tok):
    return lambda s: tok(s, add_special_tokens=False)["input_ids"]


def _messages(rounds):
    return [m for q, a in rounds for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


def _labels(ids, ranges):
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in ranges:
        labels[a:b] = ids[a:b]
    return labels


def test_the_vendored_tokenizer_is_the_real_one(tok, instruct_tok):
    assert tok("Hello world! 你好", add_special_tokens=False)["input_ids"] == [9707, 1879, 0, 220, 108386]
    assert len(tok) == len(instruct_tok) == 151646
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert (tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|endoftext|>")
    assert (instruct_tok.eos_token, instruct_tok.pad_token) == ("<|im_end|>", "<|endoftext|>")


@pytest.mark.parametrize("case", list(CASES))
def test_golden_ids_and_labels(case, tok):
    template, rounds = CASES[case]
    r = get_template(template).render(rounds, _encode(tok))
    ids, ranges = GOLDEN[case]
    assert r.input_ids == ids
    assert r.labels == _labels(ids, ranges)
    # ... and the same as TinyLLaVA-Factory's template code gives
    assert (r.prompt, r.input_ids, r.labels) == ref.encode(_messages(rounds), tok, template)


def test_golden_answers_decode_to_the_answers(tok):
    for case in ("multi_round", "unicode"):
        ids, ranges = GOLDEN[case]
        answers = [tok.decode(ids[a:b]) for a, b in ranges]
        assert answers == [" " + a + "<|endoftext|>" for _, a in CASES[case][1]]


@pytest.fixture
def image_root(tmp_path):
    Image.new("RGB", (64, 48), (10, 200, 10)).save(tmp_path / "img.png")
    return tmp_path


def _prep(tok, template, root, **kw):
    return Preparer(tok, template, NV, IMAGE_ID, root, **kw)


def _expand(ids, labels):
    """The reference's splice of the visual span: the image id position becomes NV masked tokens."""
    if IMAGE_MARKER not in ids:
        return ids, labels
    i = ids.index(IMAGE_MARKER)
    return (ids[:i] + [IMAGE_ID] * NV + ids[i + 1:], labels[:i] + [IGNORE_INDEX] * NV + labels[i + 1:])


@pytest.mark.parametrize("case", ["multi_round", "unicode", "image_only_question", "pretrain"])
def test_prepared_samples_expand_the_visual_span(case, tok, image_root):
    template, rounds = CASES[case]
    s = _prep(tok, template, image_root).prepare({"id": case, "image": "img.png", "conversations": _messages(rounds)})
    ids, labels = _expand(*ref.encode(_messages(rounds), tok, template)[1:])
    assert s.input_ids.tolist() == ids and s.labels.tolist() == labels
    assert s.visual_start == GOLDEN[case][0].index(IMAGE_MARKER) and s.num_visual == NV
    assert (s.response_positions == np.nonzero(np.asarray(labels[1:]) != IGNORE_INDEX)[0]).all()


def test_truncation_at_2048(tok, image_root):
    rounds = [("<image>\nDescribe every detail.", "A circle. " * 400), ("And then?", "Nothing more. " * 300)]
    prep = _prep(tok, "qwen2_base", image_root)
    s = prep.prepare({"id": "long", "image": "img.png", "conversations": _messages(rounds)})
    ids, labels = _expand(*ref.encode(_messages(rounds), tok, "qwen2_base")[1:])
    assert len(ids) > 2048 and s.length == 2048  # the reference truncates the spliced sequence to 2048 too
    assert s.input_ids.tolist() == ids[:2048] and s.labels.tolist() == labels[:2048]
    assert s.labels[-1] != IGNORE_INDEX and prep.notes[NOTE_TRUNCATED] == 1
    # a cut through the visual span is refused (the reference would silently train on half an image)
    with pytest.raises(DataError, match=r"sample long: max_length 700 would cut the visual span \[31, 759\)"):
        _prep(tok, "qwen2_base", image_root, max_length=700).prepare(
            {"id": "long", "image": "img.png", "conversations": _messages(rounds)})
    # nothing supervised left after truncation
    with pytest.raises(DataError, match="no supervised token left"):
        _prep(tok, "qwen2_base", image_root, max_length=770).prepare(
            {"id": "long", "image": "img.png", "conversations": _messages([("<image>\n" + "Why? " * 20, "Yes.")])})


def test_image_without_marker_is_put_first_and_reported(tok, image_root):
    prep = _prep(tok, "qwen2_base", image_root)
    rec = {"id": "x", "image": "img.png", "conversations": _messages([("What colour is the circle?", "red")])}
    s = prep.prepare(rec)
    want = _expand(*ref.encode(_messages([("<image>\nWhat colour is the circle?", "red")]), tok, "qwen2_base")[1:])
    assert (s.input_ids.tolist(), s.labels.tolist()) == want
    assert prep.notes == {NOTE_IMAGE_INSERTED: 1}


def test_generation_prompts_match_the_reference_eval_prompt(tok):
    t = get_template("qwen2_base")
    for q in ("What colour is the circle?", "", "这是什么？🙂", " 2 spaces "):
        p = t.prompt_for_generation(q, has_image=True)
        assert p == ref.eval_prompt(q)  # model_vqa*.py: "<image>\n" + question, answer None
    assert t.prompt_for_generation("", has_image=True).endswith("USER: <image> ASSISTANT:")
    # several rounds: the answered history, then the open question
    history = [("<image>\nWhat colour is the circle?", "red"), ("How many?", "2")]
    p = t.prompt_for_generation("Where is it?", has_image=True, history=history)
    q_list = [q for q, _ in history] + ["Where is it?"]
    assert p == ref.prompt(ref.QWEN2_BASE, q_list, [a for _, a in history] + [None])
    ids = get_template("qwen2_base").render(history + [("Where is it?", "x")], _encode(tok)).input_ids
    gen = [IMAGE_MARKER if i == "<image>" else i for i in _split_image(p, tok)]
    assert gen == ids[:len(gen)] and ids[len(gen):] == [856, ENDOFTEXT]  # " x<|endoftext|>" continues it
    # text-only and pretrain
    assert t.prompt_for_generation("Hi", has_image=False) == ref.prompt(ref.QWEN2_BASE, ["Hi"], [None])
    assert get_template("pretrain").prompt_for_generation("Describe.", has_image=True) == "<image>"


def _split_image(text, tok):
    out = []
    for i, chunk in enumerate(text.split("<image>")):
        if i:
            out.append("<image>")
        out += tok(chunk, add_special_tokens=False)["input_ids"] if chunk else []
    return out


@pytest.mark.parametrize("rounds,match", [
    ([("q?", "a ASSISTANT: b")], "tokenization mismatch"),
    ([("q ASSISTANT: q?", "a")], "tokenization mismatch"),
    ([("q?", "a<|endoftext|>b")], "tokenization mismatch"),
])
def test_template_errors_where_the_reference_masks_silently(rounds, match, tok):
    with pytest.raises(TemplateError, match=match):
        get_template("qwen2_base").render(rounds, _encode(tok))
    _, _, labels = ref.encode(_messages(rounds), tok, "qwen2_base")
    assert set(labels) == {IGNORE_INDEX}  # the reference trains on nothing, silently


@pytest.mark.parametrize("template,record,match", [
    ("qwen2_base", {"image": "img.png", "conversations": [("<image>\nq", "a"), ("<image>\nq2", "a2")]},
     "2 <image> tokens"),
    ("qwen2_base", {"image": "img.png", "conversations": [("q", "<image> a")]}, "appears in an answer"),
    ("qwen2_base", {"conversations": [("<image>\nq", "a")]}, "has no 'image' field"),
    ("pretrain", {"image": "img.png", "conversations": [("<image>\nq", "a"), ("q2", "a2")]}, "exactly one human/gpt"),
    ("pretrain", {"conversations": [("q", "a")]}, "needs an image"),
    ("qwen2_base", {"conversations": [("q", "")]}, None),  # an empty answer still supervises " <|endoftext|>"
])
def test_preparer_errors(template, record, match, tok, image_root):
    rec = {"id": "e", **record, "conversations": _messages(record["conversations"])}
    prep = _prep(tok, template, image_root)
    if match is None:
        s = prep.prepare(rec)
        assert [int(s.input_ids[i + 1]) for i in s.response_positions] == [220, ENDOFTEXT]
        assert s.labels.tolist() == ref.encode(rec["conversations"], tok, template)[2]
        return
    with pytest.raises(DataError, match="sample e: .*" + match):
        prep.prepare(rec)


def test_pad_other_than_eos_warns_and_changes_nothing_here(tok, instruct_tok, image_root):
    rounds = CASES["multi_round"][1]
    rec = {"id": "w", "image": "img.png", "conversations": _messages(rounds)}
    with pytest.warns(UserWarning, match="pad token '<\\|endoftext\\|>' differs from its eos token '<\\|im_end\\|>'"):
        prep = _prep(instruct_tok, "qwen2_base", image_root)
    assert prep.prepare_all([rec]).warnings and not _prep(tok, "qwen2_base", image_root).warnings
    s = prep.prepare(rec)
    base = _prep(tok, "qwen2_base", image_root).prepare(rec)
    assert (s.input_ids == base.input_ids).all() and (s.labels == base.labels).all()
    # why it matters: the reference masks the whole sample with such a tokenizer
    assert set(ref.encode(_messages(rounds), instruct_tok, "qwen2_base")[2]) == {IGNORE_INDEX}
