"""Synthetic vision-language data: the embedded default dataset (``ckd data synth``).

Images of one to three coloured shapes (four colours, three shapes, no two alike) in the cells of a 2x2
grid; captions for pre-training; question-answer conversations for instruction tuning; held-out questions
with exact short answers for evaluation, in five categories: colour and shape of the object at a cell,
count, position of a named object, and yes/no existence of an object at a cell. Every answer is read from
the image (one visual token per cell for the tiny presets) and each category needs a different lookup,
so a model's per-category accuracy says what it has learnt to read. Written in the same formats as real data
(LLaVA JSON, LLaVA-1.5 eval jsonl) and fully determined by the seed.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

# Four well-separated colours: the frozen tiny tower's tokens carry a cell's colour mixed with its shape
# (a random linear map of the pixels); a linear probe reads these four 100 %, the former six (with
# purple and orange) 87 %, and the tiny Teacher stayed near chance on the six in the demo's budget.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
}
SHAPES = ("square", "circle", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
CATEGORIES = ("colour", "shape", "count", "position", "existence")
IMAGE_SIZE = 112
# The tiny presets' frozen random tower is a linear map of each cell's pixels (ckd_common.model.TINY_VISION).
# On a near-white background every visual token carried a large common offset (the white) and the tiny
# Teacher never learnt colour; mid-grey is 0 after SigLIP's normalisation, so a token is only its shape.
# The black outline keeps shape and presence linearly readable on grey (a fixed-sign edge whatever the fill
# colour): a linear probe on the tower's tokens reads occupancy and shape 100 % with it, 85 % / 80 % without.
BACKGROUND = (128, 128, 128)
OUTLINE = (0, 0, 0)
OUTLINE_WIDTH = 4  # px at 112 = 1 px of the tiny tower's 28 px input
# Existence asks whether there is an object at one place, "Is there a shape at the top left?" (yes / no, as POPE
# asks whether an object is there): the answer is read from one visual token, as colour and shape are.
# Measured on the tiny Teacher in the demo's budget: asking about the whole image ("Is there a red shape?",
# an OR over the cells matched by content) and asking about one object at one place ("Is there a circle at
# the top left?", a comparison of a word with a token) both left it answering "yes" to nearly everything.
OBJECT_COUNTS = (1, 2, 3)
OBJECT_WEIGHTS = (1, 1, 1)
MARGIN = (6, 12)  # px between a shape and its cell's border (drawn at random in this range)
PRETRAIN_PROMPTS = (
    "Describe the image briefly.",
    "Render a clear and concise summary of the photo.",
    "Give a short caption for this picture.",
)
TEXT_ONLY_QA = (
    ("Name a colour that is in a rainbow.", "red"),
    ("How many corners does a square have?", "4"),
    ("How many corners does a triangle have?", "3"),
    ("Which shape has no corners?", "circle"),
    ("What is one plus one?", "2"),
)


@dataclass(frozen=True)
class Item:
    colour: str
    shape: str
    cell: int


def _draw(items: list[Item], rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    d = ImageDraw.Draw(img)
    half = IMAGE_SIZE // 2
    for it in items:
        x0, y0 = (it.cell % 2) * half, (it.cell // 2) * half
        m = rng.randint(*MARGIN)
        box = (x0 + m, y0 + m, x0 + half - m, y0 + half - m)
        col = COLOURS[it.colour]
        if it.shape == "square":
            d.rectangle(box, fill=col, outline=OUTLINE, width=OUTLINE_WIDTH)
        elif it.shape == "circle":
            d.ellipse(box, fill=col, outline=OUTLINE, width=OUTLINE_WIDTH)
        else:
            d.polygon([((box[0] + box[2]) // 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=col,
                      outline=OUTLINE, width=OUTLINE_WIDTH)
    return img


def _scene(rng: random.Random) -> list[Item]:
    """1-3 objects in distinct cells, no two alike (colour and shape): every object can be named."""
    n = rng.choices(OBJECT_COUNTS, OBJECT_WEIGHTS)[0]
    cells = rng.sample(range(4), n)
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    return [Item(c, s, cell) for (c, s), cell in zip(kinds, sorted(cells))]


def caption(items: list[Item]) -> str:
    parts = [f"a {it.colour} {it.shape} at the {CELLS[it.cell]}" for it in items]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    noun = "shape" if len(items) == 1 else "shapes"
    return f"{NUMBER_WORDS[len(items)].capitalize()} {noun}: {text}."


def question(items: list[Item], category: str, rng: random.Random) -> tuple[str, str]:
    """One (question, exact short answer) pair of the given category about the scene."""
    if category == "count":
        return "How many shapes are there?", str(len(items))
    if category == "colour":
        it = rng.choice(items)
        return f"What colour is the shape at the {CELLS[it.cell]}?", it.colour
    if category == "shape":
        it = rng.choice(items)
        return f"What shape is at the {CELLS[it.cell]}?", it.shape
    if category == "position":  # the object named by the fewest attributes that single it out
        it = rng.choice(items)
        if sum(o.shape == it.shape for o in items) == 1:
            name = it.shape
        elif sum(o.colour == it.colour for o in items) == 1:
            name = f"{it.colour} shape"
        else:
            name = f"{it.colour} {it.shape}"
        return f"Where is the {name}?", CELLS[it.cell]
    if category == "existence":  # is there an object at one place: "yes" half the time (when the scene allows)
        full = [it.cell for it in items]
        empty = [c for c in range(len(CELLS)) if c not in full]
        cell = rng.choice(full if not empty or rng.random() < 0.5 else empty)
        return f"Is there a shape at the {CELLS[cell]}?", "yes" if cell in full else "no"
    raise ValueError(f"unknown question category {category!r}; expected one of {CATEGORIES}")


def synthesize(out_dir: str | Path, seed: int = 0, n_pretrain: int = 400, n_instruct: int = 400,
               n_eval: int = 200, text_only_fraction: float = 0.05, rounds: tuple[int, int] = (1, 3),
               short_answer: bool = True) -> dict:
    """Write pretrain.json, instruct.json, eval.jsonl and images/ under ``out_dir``.

    ``rounds``: questions per instruction image (drawn in this range, each of another category).
    ``short_answer``: end every question with LLaVA-1.5's short-answer instruction (as real data does);
    off, the sequences are about half as long, which buys a CPU demo twice the optimizer steps."""
    suffix = SHORT_ANSWER if short_answer else ""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def new_image(prefix: str, i: int) -> tuple[str, list[Item]]:
        items = _scene(rng)
        name = f"{prefix}_{i:06d}.png"
        _draw(items, rng).save(out / "images" / name)
        return name, items

    pretrain = []
    for i in range(n_pretrain):
        name, items = new_image("pt", i)
        pretrain.append({
            "id": f"pt-{i:06d}", "image": name,
            "conversations": [
                {"from": "human", "value": "<image>\n" + rng.choice(PRETRAIN_PROMPTS)},
                {"from": "gpt", "value": caption(items)},
            ],
        })

    instruct = []
    for i in range(n_instruct):
        if rng.random() < text_only_fraction:
            q, a = rng.choice(TEXT_ONLY_QA)
            instruct.append({"id": f"it-{i:06d}", "conversations": [
                {"from": "human", "value": q}, {"from": "gpt", "value": a}]})
            continue
        name, items = new_image("it", i)
        conv = []
        for r, cat in enumerate(rng.sample(CATEGORIES, rng.randint(*rounds))):
            q, a = question(items, cat, rng)
            conv.append({"from": "human", "value": ("<image>\n" if r == 0 else "") + q + suffix})
            conv.append({"from": "gpt", "value": a})
        instruct.append({"id": f"it-{i:06d}", "image": name, "conversations": conv})

    evals = []
    for i in range(n_eval):
        name, items = new_image("ev", i)
        cat = CATEGORIES[i % len(CATEGORIES)]
        q, a = question(items, cat, rng)
        evals.append({"question_id": f"ev-{i:06d}", "image": name, "text": q + suffix,
                      "answer": a, "category": cat})

    (out / "pretrain.json").write_text(json.dumps(pretrain, indent=1))
    (out / "instruct.json").write_text(json.dumps(instruct, indent=1))
    with open(out / "eval.jsonl", "w") as f:
        for e in evals:
            f.write(json.dumps(e) + "\n")
    return {"pretrain": len(pretrain), "instruct": len(instruct), "eval": len(evals), "dir": str(out)}


def tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the template strings and every word synth emits."""
    from ckd_common.templates import SYSTEM_PROMPT

    rng = random.Random(1234)
    n_scenes = 300
    # BPE merges by frequency: the system prompt starts every instruction sequence, so it is counted as often
    # as the conversations below. Counted once, it was 58 of the tiny tokenizer's tokens (nearly half of a
    # demo sequence's compute) instead of 28.
    corpus = [SYSTEM_PROMPT] * n_scenes + [" USER: ", " ASSISTANT: ", SHORT_ANSWER, *PRETRAIN_PROMPTS]
    corpus += [q + " " + a for q, a in TEXT_ONLY_QA]
    for _ in range(n_scenes):
        items = _scene(rng)
        corpus.append(caption(items))
        for cat in CATEGORIES:
            q, a = question(items, cat, rng)
            corpus.append(q + " " + a)
    corpus += [" ".join(str(i) for i in range(10)), "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    return corpus
