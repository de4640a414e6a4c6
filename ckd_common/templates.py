"""Conversation templates and label masking (DESIGN.md §3).

Two templates, string- and mask-identical to the reference implementations (TinyLLaVA-Factory's
``pretrain`` and LLaVA-KD's ``qwen2_base``), because cached teacher targets are only valid for
exactly the token positions the student will see:

- ``pretrain`` (DPT/PT): ``<image>`` + caption + ``"\\n"``; the human turn is dropped; only the caption
  and the newline are supervised.
- ``qwen2_base`` (SFT/DFT/FT/eval): ``SYSTEM + " "``, then per round
  ``"USER: " + question + " " + "ASSISTANT: " + answer + "<|endoftext|>"``; ``<image>\\n`` is moved to the
  front of the first question. The rounds follow each other with no separator, as in the reference code.

The image appears here as ONE marker (:data:`IMAGE_MARKER`); ``ckd_common.data`` expands it to the
model's visual-token count afterwards, so the masking below is the reference algorithm verbatim.
"""
from __future__ import annotations

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


@dataclass(frozen=True)
class Rendered:
    prompt: str
    input_ids: list[int]  # with at most one IMAGE_MARKER
    labels: list[int]


class Template:
    name: str

    def render(self, rounds: Sequence[tuple[str, str]], encode: Encode) -> Rendered:
        raise NotImplementedError

    def prompt_for_generation(self, question: str, has_image: bool) -> str:
        """The prompt text for answering one question (ends where the answer starts)."""
        raise NotImplementedError


class PretrainTemplate(Template):
    name = PRETRAIN

    def render(self, rounds, encode):
        if len(rounds) != 1:
            raise TemplateError(f"the pretrain template takes exactly one human/gpt round, got {len(rounds)}")
        prompt = IMAGE_TOKEN + rounds[0][1] + "\n"
        ids = encode_with_image(prompt, encode)
        n_mask = len(encode_with_image(IMAGE_TOKEN, encode))
        labels = [IGNORE_INDEX] * n_mask + ids[n_mask:]
        return Rendered(prompt, ids, labels)

    def prompt_for_generation(self, question, has_image):
        return IMAGE_TOKEN if has_image else ""


class Qwen2BaseTemplate(Template):
    name = QWEN2_BASE

    @staticmethod
    def _question(q: str) -> str:
        if IMAGE_TOKEN in q:
            q = IMAGE_TOKEN + "\n" + q.replace(IMAGE_TOKEN, "").strip()
        return q

    def render(self, rounds, encode):
        prompt = SYSTEM_PROMPT + " "
        for q, a in rounds:
            prompt += "USER: " + self._question(q) + " " + "ASSISTANT: " + a + ENDOFTEXT
        ids = encode_with_image(prompt, encode)
        labels = list(ids)
        # LLaVA-KD's make_labels: per round, mask the instruction part. The instruction is encoded
        # alone and ends in a lone " " token that, in the full prompt, merges into the answer's first
        # token; hence the "- 1", which keeps that first answer token supervised.
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

    def prompt_for_generation(self, question, has_image):
        q = question
        if has_image and IMAGE_TOKEN not in q:
            q = IMAGE_TOKEN + "\n" + q
        return SYSTEM_PROMPT + " " + "USER: " + self._question(q) + " " + "ASSISTANT:"


TEMPLATES: dict[str, Template] = {t.name: t for t in (PretrainTemplate(), Qwen2BaseTemplate())}
TEMPLATE_NAMES: tuple[str, ...] = tuple(TEMPLATES)


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise TemplateError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}") from None
