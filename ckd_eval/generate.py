"""Batched greedy answer generation into resumable LLaVA-format answer files.

The prompt is the model template's generation prompt (``qwen2_base``: system prompt, ``USER:``,
``<image>\\n`` in front of the question, ending in ``ASSISTANT:``) — the string the checkpoint's chat
template renders; ``<image>`` becomes the model's visual-token count of image-token ids, images are
preprocessed as the model was trained (``image_aspect_ratio``), batches are LEFT-padded,
``generate`` runs greedy (no sampling, one beam) up to ``max_new_tokens`` and stops at the
template's stop token ``<|endoftext|>`` (not the tokenizer's eos, which is ``<|im_end|>`` for
Qwen2.5-Instruct tokenizers);
the decoded continuation is stripped, as LLaVA's ``model_vqa_loader`` does. Questions without an
image are generated text-only.

Answers are written in question-file order, a chunk of batches at a time (sorted by length inside
the chunk), each line flushed, so an interrupted run resumes where it stopped: existing lines are
checked (same question ids in the same order, same model fingerprint) and kept, a torn last line
is dropped.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ckd_common.templates import QWEN2_BASE
from ckd_eval.common import PROMPT_VERSION, EvalError, read_questions
from ckd_eval.scorers import Benchmark


@dataclass
class Item:
    question_id: object
    question: str                 # the question as given to the template (suffix included)
    prompt: str                   # the answer file's "prompt" field
    image: Path | None
    category: str | None = None
    fixed_text: str | None = None  # answer without generation (MMMU multi-image questions)
    extra: dict = field(default_factory=dict)


def _question_text(rec: dict, bench: Benchmark) -> str:
    if "text" in rec:
        text = rec["text"]
    elif "prompt" in rec:
        text = rec["prompt"]
    elif rec.get("conversations"):
        text = rec["conversations"][0]["value"]
    else:
        raise EvalError(f"{bench.name}: question {rec.get('question_id', rec.get('id'))!r} has no 'text', "
                        f"'prompt' or 'conversations'")
    text = text.replace("<image>", "").strip()
    if bench.suffix and bench.suffix.strip() not in text:
        text = text + bench.suffix
    return text


def load_items(bench: Benchmark, question_file: Path, image_root: Path, limit: int | None = None) -> list[Item]:
    recs = read_questions(question_file, bench.questions)
    if not recs:
        raise EvalError(f"{bench.name}: question file {question_file} has no questions")
    if limit is not None:
        recs = recs[:limit]
    items = []
    for rec in recs:
        qid = rec.get("question_id", rec.get("id"))
        if qid is None:
            raise EvalError(f"{question_file}: a question has neither 'question_id' nor 'id'")
        text = _question_text(rec, bench)
        image = image_root / rec["image"] if rec.get("image") else None
        prompt = ("<image>\n" + text) if (bench.image_in_prompt and image is not None) else text
        fixed = None
        if bench.name == "mmmu" and image is None:
            # TinyLLaVA/LLaVA-KD model_vqa_mmmu: multi-image questions are not generated.
            from ckd_eval.scorers.mmmu import MULTI_IMAGE_OPEN_TEXT

            fixed = "" if rec.get("question_type") == "multiple-choice" else MULTI_IMAGE_OPEN_TEXT
        items.append(Item(qid, text, prompt, image, rec.get("category"), fixed))
    return items


def check_images(items: list[Item], bench: Benchmark, image_root: Path) -> None:
    for it in items:
        if it.image is not None and it.fixed_text is None and not it.image.is_file():
            raise EvalError(f"{bench.name}: image {it.image} (question {it.question_id!r}) not found; expected "
                            f"the images under --data-root/{bench.images} (here {image_root}); source: {bench.source}")


class Generator:
    """A loaded model + tokenizer + template that turns questions into answers."""

    def __init__(self, model_dir: str | os.PathLike, template: str | None = None, device: str = "cpu",
                 dtype: str = "float32"):
        """``template`` None = the one the checkpoint records (``ckd_template``), else qwen2_base."""
        import torch

        from ckd_common.model import load_vlm, model_info, model_template
        from ckd_common.templates import QWEN2_BASE, get_template

        self.torch = torch
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        self.model_dir = str(model_dir)
        self.model, self.tok = load_vlm(model_dir, dtype=torch_dtype, device=device)
        self.model.eval()
        self.device = device
        self.dtype = torch_dtype
        self.info = model_info(self.model, self.tok)
        self.template = get_template(template or model_template(self.model.config) or QWEN2_BASE)
        self.eos_id = self.tok.convert_tokens_to_ids(self.template.stop_token)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    def encode(self, question: str, has_image: bool) -> list[int]:
        from ckd_common.templates import IMAGE_MARKER, encode_with_image

        prompt = self.template.prompt_for_generation(question, has_image)
        ids = encode_with_image(prompt, lambda s: self.tok(s, add_special_tokens=False)["input_ids"])
        out: list[int] = []
        for t in ids:
            if t == IMAGE_MARKER:
                out.extend([self.info.image_token_id] * self.info.num_visual_tokens)
            else:
                out.append(t)
        return out

    def _pixels(self, path: Path):
        from ckd_common.data import load_image, preprocess_image

        return self.torch.from_numpy(preprocess_image(load_image(path, str(path)), self.info.image_size,
                                                     self.info.image_aspect_ratio))

    def generate(self, items: list[Item], max_new_tokens: int) -> list[str]:
        """Answers of one batch (same order as ``items``)."""
        torch = self.torch
        seqs = [self.encode(it.question, it.image is not None) for it in items]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        kwargs = {}
        images = [self._pixels(it.image) for it in items if it.image is not None]
        if images:
            kwargs["pixel_values"] = torch.stack(images).to(self.device, self.dtype)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                      eos_token_id=self.eos_id, pad_token_id=self.pad_id, **kwargs)
        return [self.tok.decode(o[width:], skip_special_tokens=True).strip() for o in out.tolist()]


def _resume(path: Path, items: list[Item], fingerprint: str) -> int:
    """Number of answers already in ``path`` (validated); a torn last line is cut off."""
    if not path.exists():
        return 0
    raw = path.read_bytes()
    keep = raw[:raw.rfind(b"\n") + 1] if not raw.endswith(b"\n") else raw
    if len(keep) != len(raw):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    n = 0
    for line in keep.decode("utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise EvalError(f"answer file {path}: line {n + 1} is corrupt; delete the file or pass --overwrite") from None
        if n >= len(items) or rec.get("question_id") != items[n].question_id:
            raise EvalError(f"answer file {path} does not match the question file at line {n + 1} (another question "
                            f"file or --limit?); pass --overwrite to regenerate")
        fp = (rec.get("metadata") or {}).get("model_fingerprint")
        if fp != fingerprint:
            raise EvalError(f"answer file {path} was written by model {fp}, not {fingerprint}; pass --overwrite "
                            f"to regenerate, or another --out")
        n += 1
    return n


def run_generation(gen: Generator, items: list[Item], answers_path: Path, max_new_tokens: int,
                   batch_size: int = 8, model_id: str | None = None, overwrite: bool = False,
                   progress: bool = True, desc: str = "") -> dict:
    """Generate the missing answers of ``items`` into ``answers_path``; returns counts."""
    from tqdm import tqdm

    answers_path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite and answers_path.exists():
        answers_path.unlink()
    done = _resume(answers_path, items, gen.fingerprint)
    model_id = model_id or Path(gen.model_dir).name
    todo = items[done:]
    chunk = max(1, batch_size) * 8  # sorted by length inside; the unit of resumption
    bar = tqdm(total=len(items), initial=done, desc=desc or "generate", unit="q", disable=not progress)
    with open(answers_path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            texts: dict[int, str] = {i: it.fixed_text for i, it in enumerate(part) if it.fixed_text is not None}
            order = sorted((i for i in range(len(part)) if i not in texts),
                           key=lambda i: len(part[i].question) + (10_000 if part[i].image is not None else 0))
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                for i, t in zip(idx, gen.generate([part[i] for i in idx], max_new_tokens)):
                    texts[i] = t
            for i, it in enumerate(part):
                rec = {"question_id": it.question_id, "prompt": it.prompt, "text": texts[i],
                       "answer_id": f"{gen.fingerprint[:12]}-{done + start + i}", "model_id": model_id,
                       "metadata": {"model_fingerprint": gen.fingerprint, "prompt_version": PROMPT_VERSION,
                                    "template": gen.template.name, "max_new_tokens": max_new_tokens}}
                if it.category is not None:
                    rec["metadata"]["category"] = it.category
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(part))
    bar.close()
    return {"resumed": done, "generated": len(todo), "total": len(items)}
