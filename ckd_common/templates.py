"""Conversation templates, label masking and the matching HF chat templates (docs/design.md §3,
docs/templates.md).

Two templates, string- and mask-identical to the reference implementations (TinyLLaVA-Factory's
``pretrain`` and LLaVA-KD's ``qwen2_base``, ``tinyllava/data/template/``), because cached teacher
targets are only valid for exactly the token positions the student will see:

- ``pretrain`` (DPT/PT): ``<image>`` + caption + ``"\\n"``; the human turn is dropped; only the caption
  and the newline are supervised.
- ``qwen2_base`` (SFT/DFT/FT/eval): ``SYSTEM + " "``, then per round
  ``"USER: " + question + " " + "ASSISTANT: " + answer + "<|endoftext|>"``. A question holding
  ``<image>`` becomes ``("<image>\\n" + question.replace("<image>", "").strip()).strip()`` (the
  reference's ``format_image_token`` followed by its ``.strip()``: a question that is only
  ``<image>`` renders as ``<image>`` with no newline). The rounds follow each other with no separator.
  A generation prompt ends in ``"ASSISTANT:"`` (the reference's formatter with answer ``None``).

The image appears here as ONE marker (:data:`IMAGE_MARKER`); ``ckd_common.data`` expands it to the
model's visual-token count afterwards, so the masking below is the reference algorithm verbatim.

Every checkpoint we write carries its template as a Jinja chat template (:attr:`Template.chat_template`)
so ``processor.apply_chat_template`` renders exactly :meth:`Template.prompt` — same string, hence
same ids — and generation stops at :attr:`Template.stop_token`.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ckd_common.tokenizer import ENDOFTEXT, IMAGE_TOKEN

IGNORE_INDEX = -100
IMAGE_MARKER = -200  # stands for the whole visual span until expansion
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ASSISTANT_SEP = " ASSISTANT: "
# Template names: the one owner of these strings (CLIs, cache metadata, the step table import them).
PRETRAIN = "pretrain"        # DPT / PT: captions
QWEN2_BASE = "qwen2_base"    # SFT / DFT / FT / eval: instructions


class TemplateError(ValueError):
    """A conversation cannot be rendered by a template (the message names why)."""


Encode = Callable[[str], list[int]]
Round = tuple[str, "str | None"]  # (question, answer); answer None = the prompt ends where it starts


def encode_with_image(text: str, encode: Encode) -> list[int]:
    """Tokenise ``text`` with every ``<image>`` replaced by one :data:`IMAGE_MARKER` (as
    TinyLLaVA's ``tokenizer_image_token``): the text around it is encoded piecewise."""
    ids: list[int] = []
    for i, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            ids.append(IMAGE_MARKER)
        if chunk:
            ids.extend(encode(chunk))
    return ids


def with_image_first(rounds: Sequence[Round]) -> list[Round]:
    """``rounds`` with ``<image>`` put in front of the first question when no turn mentions it
    (the project's rule for a record with an ``image`` field but no ``<image>`` in its text; the
    reference drops such an image silently, see docs/templates.md)."""
    rounds = list(rounds)
    if rounds and not any(IMAGE_TOKEN in q or IMAGE_TOKEN in (a or "") for q, a in rounds):
        rounds[0] = (IMAGE_TOKEN + "\n" + rounds[0][0], rounds[0][1])
    return rounds


@dataclass(frozen=True)
class Rendered:
    prompt: str
    input_ids: list[int]  # with at most one IMAGE_MARKER
    labels: list[int]


def _jinja(s: str) -> str:
    """A Jinja string literal holding ``s`` exactly (JSON's escapes are Jinja's)."""
    return json.dumps(s)


# Jinja pieces shared by the chat templates: the text of a message whose content is a string or a
# list of parts ({"type": "image"} -> "<image>", {"type": "text", "text": ...} -> its text).
_MESSAGE_TEXT = (
    "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
    "{%- else -%}{%- set ns.text = '' -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + " + _jinja(IMAGE_TOKEN) + " -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)


class Template:
    name: str
    stop_token: str = ENDOFTEXT  # generation ends here (not at the tokenizer's eos, see docs/templates.md)
    chat_template: str           # Jinja: apply_chat_template renders exactly prompt()

    def prompt(self, rounds: Sequence[Round]) -> str:
        """The text of ``rounds``; only the last answer may be ``None`` (a generation prompt)."""
        raise NotImplementedError

    def render(self, rounds: Sequence[tuple[str, str]], encode: Encode) -> Rendered:
        raise NotImplementedError

    def prompt_for_generation(self, question: str, has_image: bool,
                              history: Sequence[tuple[str, str]] = ()) -> str:
        """The prompt text for answering ``question`` after the answered rounds ``history`` (ends
        where the answer starts). With ``has_image`` and no ``<image>`` in the text, the image goes
        in front of the first question."""
        rounds: list[Round] = [*history, (question, None)]
        if has_image:
            rounds = with_image_first(rounds)
        return self.prompt(rounds)

    @staticmethod
    def _check_rounds(rounds: Sequence[Round]) -> None:
        if not rounds:
            raise TemplateError("a conversation needs at least one round")
        if any(a is None for _, a in rounds[:-1]):
            raise TemplateError("only the last round may be unanswered")


class PretrainTemplate(Template):
    name = PRETRAIN
    # A user turn is "<image>" when it carries an image (its text is dropped, as the reference's
    # format_user), an assistant turn is its text + "\n"; the generation prompt adds nothing.
    chat_template = (
        "{%- set ns = namespace(text='') -%}{%- for message in messages -%}" + _MESSAGE_TEXT
        + "{%- if message['role'] == 'user' and " + _jinja(IMAGE_TOKEN) + " in ns.text -%}{{- "
        + _jinja(IMAGE_TOKEN) + " -}}"
        "{%- elif message['role'] == 'assistant' -%}{{- ns.text + " + _jinja("\n") + " -}}{%- endif -%}"
        "{%- endfor -%}"
    )

    def prompt(self, rounds):
        self._check_rounds(rounds)
        if len(rounds) != 1:
            raise TemplateError(f"the pretrain template takes exactly one human/gpt round, got {len(rounds)}")
        q, a = rounds[0]
        return (IMAGE_TOKEN if IMAGE_TOKEN in q else "") + ("" if a is None else a + "\n")

    def render(self, rounds, encode):
        if len(rounds) != 1:
            raise TemplateError(f"the pretrain template takes exactly one human/gpt round, got {len(rounds)}")
        prompt = IMAGE_TOKEN + rounds[0][1] + "\n"
        ids = encode_with_image(prompt, encode)
        n_mask = len(encode_with_image(IMAGE_TOKEN, encode))
        labels = [IGNORE_INDEX] * n_mask + ids[n_mask:]
        return Rendered(prompt, ids, labels)


class Qwen2BaseTemplate(Template):
    name = QWEN2_BASE
    # A leading system message replaces SYSTEM_PROMPT (the project itself never sends one).
    chat_template = (
        "{%- set ns = namespace(text='', system=" + _jinja(SYSTEM_PROMPT) + ") -%}"
        "{%- set loop_messages = messages -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set message = messages[0] -%}"
        + _MESSAGE_TEXT + "{%- set ns.system = ns.text -%}{%- set loop_messages = messages[1:] -%}{%- endif -%}"
        "{%- if loop_messages -%}{{- ns.system + ' ' -}}{%- endif -%}"
        "{%- for message in loop_messages -%}" + _MESSAGE_TEXT
        + "{%- if message['role'] == 'user' -%}"
        "{%- if " + _jinja(IMAGE_TOKEN) + " in ns.text -%}{%- set ns.text = (" + _jinja(IMAGE_TOKEN + "\n")
        + " + (ns.text | replace(" + _jinja(IMAGE_TOKEN) + ", '') | trim)) | trim -%}{%- endif -%}"
        "{{- 'USER: ' + ns.text + ' ' -}}"
        "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + ns.text + " + _jinja(ENDOFTEXT) + " -}}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )

    @staticmethod
    def _question(q: str) -> str:
        if IMAGE_TOKEN in q:
            q = (IMAGE_TOKEN + "\n" + q.replace(IMAGE_TOKEN, "").strip()).strip()
        return q

    def prompt(self, rounds):
        self._check_rounds(rounds)
        prompt = SYSTEM_PROMPT + " "
        for q, a in rounds:
            prompt += "USER: " + self._question(q) + " "
            prompt += "ASSISTANT:" if a is None else "ASSISTANT: " + a + ENDOFTEXT
        return prompt

    def render(self, rounds, encode):
        if any(a is None for _, a in rounds):
            raise TemplateError("every round of a training sample needs an answer")
        prompt = self.prompt(rounds)
        ids = encode_with_image(prompt, encode)
        labels = list(ids)
        # LLaVA-KD's make_labels: per round, mask the instruction part. The instruction is encoded
        # alone and ends in a lone " " token that, in the full prompt, merges into the answer's first
        # token; hence the "- 1", which keeps that first answer token supervised. (With an answer
        # starting with a digit or a space the " " stays its own token and is supervised too.)
        cur = 0
        for rnd in prompt.split(ENDOFTEXT):
            if rnd == "":
                break
            parts = rnd.split(ASSISTANT_SEP)
            if len(parts) != 2:
                break
            round_len = len(encode_with_image(rnd + ENDOFTEXT, encode))
            instruction_len = len(encode_with_image(parts[0] + ASSISTANT_SEP, encode)) - 1
            labels[cur:cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur:cur + instruction_len])
            cur += round_len
        labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
        if cur != len(ids):
            # The reference silently masks the whole sample here; we refuse, so no sample is
            # trained on (or cached) with shifted labels.
            raise TemplateError(
                f"tokenization mismatch: rounds add up to {cur} tokens but the prompt has {len(ids)} "
                f"(a question or answer contains {ASSISTANT_SEP.strip()!r} or {ENDOFTEXT!r})")
        return Rendered(prompt, ids, labels)


TEMPLATES: dict[str, Template] = {t.name: t for t in (PretrainTemplate(), Qwen2BaseTemplate())}
TEMPLATE_NAMES: tuple[str, ...] = tuple(TEMPLATES)


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise TemplateError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}") from None
