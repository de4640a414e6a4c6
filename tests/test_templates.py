"""Golden tests of the two templates (docs/design.md §3): exact tokens and labels for a fixed tokenizer."""
import pytest
from transformers import PreTrainedTokenizerFast

from ckd_common.templates import (IGNORE_INDEX, IMAGE_MARKER, SYSTEM_PROMPT, TemplateError, get_template)
from ckd_common.tokenizer import build_tokenizer_object

CORPUS = [SYSTEM_PROMPT, "USER: What colour is it? ASSISTANT: red", "How many? 2", "A red circle."]

PRETRAIN_TOKENS = '<IMG> A Ġred Ġc i r c l e . Ċ'
PRETRAIN_LABELS = '_ A Ġred Ġc i r c l e . Ċ'
MULTI_TOKENS = ("A Ġc hat Ġ b et w e en Ġa Ġc ur io us Ġuser Ġand Ġan Ġa r t i f i c i a l Ġ i n t e l l i g en c e Ġassistant . Ġ T he Ġassistant Ġ g i v es Ġ he l p f u l , Ġ d et a i l ed , Ġand Ġ p ol it e Ġan s w er s Ġt o Ġt he Ġuser 's Ġ q u es t io n s . Ġ U S ER : Ġ <IMG> Ċ W hat Ġc ol o ur Ġ is Ġ it ? Ġ ASSISTANT : Ġred <|endoftext|> U S ER : Ġ H o w Ġ m an y ? Ġ ASSISTANT : Ġ 2 <|endoftext|>")
MULTI_LABELS = ('_ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ Ġred <|endoftext|> _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ Ġ 2 <|endoftext|>')
TEXT_ONLY_TOKENS = ("A Ġc hat Ġ b et w e en Ġa Ġc ur io us Ġuser Ġand Ġan Ġa r t i f i c i a l Ġ i n t e l l i g en c e Ġassistant . Ġ T he Ġassistant Ġ g i v es Ġ he l p f u l , Ġ d et a i l ed , Ġand Ġ p ol it e Ġan s w er s Ġt o Ġt he Ġuser 's Ġ q u es t io n s . Ġ U S ER : Ġ H o w Ġ m an y ? Ġ ASSISTANT : Ġ 2 <|endoftext|>")
TEXT_ONLY_LABELS = ('_ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ Ġ 2 <|endoftext|>')


@pytest.fixture(scope="module")
def tok():
    return PreTrainedTokenizerFast(tokenizer_object=build_tokenizer_object(CORPUS, 300),
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _render(tok, template, rounds):
    r = get_template(template).render(rounds, lambda s: tok(s, add_special_tokens=False)["input_ids"])
    toks = ["<IMG>" if i == IMAGE_MARKER else tok.convert_ids_to_tokens(i) for i in r.input_ids]
    labels = " ".join(t if lab != IGNORE_INDEX else "_" for t, lab in zip(toks, r.labels))
    # supervised labels are the token ids themselves
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(r.labels, r.input_ids))
    return r, " ".join(toks), labels


def test_pretrain_golden(tok):
    r, toks, labels = _render(tok, "pretrain", [("<image>\nDescribe the image.", "A red circle.")])
    assert r.prompt == "<image>A red circle.\n"  # the human turn is dropped
    assert toks == PRETRAIN_TOKENS and labels == PRETRAIN_LABELS


def test_qwen2_base_multi_round_golden(tok):
    rounds = [("<image>\nWhat colour is it?", "red"), ("How many?", "2")]
    r, toks, labels = _render(tok, "qwen2_base", rounds)
    assert r.prompt == (SYSTEM_PROMPT + " USER: <image>\nWhat colour is it? ASSISTANT: red<|endoftext|>"
                        "USER: How many? ASSISTANT: 2<|endoftext|>")
    assert toks == MULTI_TOKENS and labels == MULTI_LABELS


def test_qwen2_base_text_only_golden(tok):
    r, toks, labels = _render(tok, "qwen2_base", [("How many?", "2")])
    assert IMAGE_MARKER not in r.input_ids
    assert toks == TEXT_ONLY_TOKENS and labels == TEXT_ONLY_LABELS


def test_image_token_moved_to_front_of_first_question(tok):
    r, _, _ = _render(tok, "qwen2_base", [("What colour is it?\n<image>", "red")])
    assert "USER: <image>\nWhat colour is it? ASSISTANT:" in r.prompt


def test_everything_through_assistant_is_masked(tok):
    """Masked: the whole prompt through 'ASSISTANT:'; supervised: the answer and <|endoftext|>."""
    r, _, _ = _render(tok, "qwen2_base", [("What colour is it?", "red"), ("How many?", "2")])
    sup = [i for i, lab in zip(r.input_ids, r.labels) if lab != IGNORE_INDEX]
    assert tok.decode(sup) == " red<|endoftext|> 2<|endoftext|>"


def test_assistant_separator_inside_an_answer_is_refused(tok):
    with pytest.raises(TemplateError, match="tokenization mismatch"):
        _render(tok, "qwen2_base", [("q?", "a ASSISTANT: b")])


def test_unknown_template():
    with pytest.raises(TemplateError, match="unknown template 'chatml'"):
        get_template("chatml")


def test_generation_prompt_ends_with_assistant():
    p = get_template("qwen2_base").prompt_for_generation("What colour?", has_image=True)
    assert p == SYSTEM_PROMPT + " USER: <image>\nWhat colour? ASSISTANT:"


def test_image_only_question_has_no_newline_after_the_image():
    """The reference strips the formatted question: "<image>\\n" + "" -> "<image>"."""
    t = get_template("qwen2_base")
    assert t.prompt([("<image>", "a")]).endswith("USER: <image> ASSISTANT: a<|endoftext|>")
    assert t.prompt_for_generation("", has_image=True).endswith("USER: <image> ASSISTANT:")
    assert t.prompt_for_generation("  ", has_image=True).endswith("USER: <image> ASSISTANT:")


def _chat(messages, template, add_generation_prompt=True):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(get_template(template).chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt)


def _user(q, as_parts):
    if not as_parts or "<image>" not in q:
        return {"role": "user", "content": q}
    before, after = q.split("<image>")
    parts = ([{"type": "text", "text": before}] if before else []) + [{"type": "image"}]
    return {"role": "user", "content": parts + ([{"type": "text", "text": after}] if after else [])}


@pytest.mark.parametrize("as_parts", [False, True])
@pytest.mark.parametrize("rounds", [
    [("<image>\nWhat colour?", None)],
    [("<image>", None)],
    [("What colour?\n<image>", None)],
    [("<image>\n  What colour?  ", "red"), ("How many?", None)],
    [("How many?", "2"), ("Where?\n<image>", " top"), ("And 你好 🙂?", None)],
    [("Text only.", "yes"), ("Again?", "no")],
])
def test_chat_template_renders_the_project_prompt(rounds, as_parts):
    """The Jinja chat template saved with every checkpoint = Template.prompt, string for string."""
    messages = []
    for q, a in rounds:
        messages.append(_user(q, as_parts))
        if a is not None:
            messages.append({"role": "assistant", "content": a})
    open_end = rounds[-1][1] is None
    assert _chat(messages, "qwen2_base", open_end) == get_template("qwen2_base").prompt(rounds)


def test_chat_template_system_message_and_pretrain():
    assert _chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "qwen2_base") == \
        "Be brief. USER: Hi ASSISTANT:"
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}
    assert _chat([user], "pretrain") == get_template("pretrain").prompt_for_generation("Describe.", True) == "<image>"
    assert _chat([user, {"role": "assistant", "content": "A red circle."}], "pretrain", False) == \
        get_template("pretrain").prompt([("<image>\nDescribe.", "A red circle.")]) == "<image>A red circle.\n"
