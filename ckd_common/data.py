"""LLaVA-format data -> prepared samples (token ids, labels, visual span, response positions, keys).

Input: the LLaVA JSON format (a list of ``{"id", "image"?, "conversations": [{"from": "human"|"gpt",
"value"}...]}``, or JSON lines) with an image root. Output: :class:`PreparedSample` s that every
model sharing a tokenizer, template and visual-token count sees identically (docs/design.md §3).
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ckd_common.keys import image_hash, sample_key
from ckd_common.templates import IGNORE_INDEX, IMAGE_MARKER, QWEN2_BASE, TemplateError, get_template, with_image_first
from ckd_common.tokenizer import IMAGE_TOKEN, pad_eos_warning

DEFAULT_MAX_LENGTH = 2048
# What the prepare report counts (docs/templates.md explains each against the reference).
NOTE_IMAGE_INSERTED = ("image field but no <image> in the text: image put before the first question "
                       "(the reference drops it)")
NOTE_TRUNCATED = "longer than max_length: truncated (as the reference)"


class DataError(ValueError):
    """Bad input data; the message names the sample id and the problem."""


@dataclass
class PreparedSample:
    id: str
    key: str
    input_ids: np.ndarray          # int64 [L], image already expanded to num_visual tokens
    labels: np.ndarray             # int64 [L], -100 where not supervised (unshifted)
    visual_start: int              # -1 when the sample has no image
    num_visual: int                # 0 when the sample has no image
    image_path: str | None = None
    image_sha: str | None = None

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def has_image(self) -> bool:
        return self.num_visual > 0

    @property
    def response_positions(self) -> np.ndarray:
        """R = {t : labels[t+1] != -100}: the positions whose logits predict a supervised token."""
        return np.nonzero(self.labels[1:] != IGNORE_INDEX)[0].astype(np.int64)

    @property
    def visual_positions(self) -> np.ndarray:
        return np.arange(self.visual_start, self.visual_start + self.num_visual, dtype=np.int64)


@dataclass
class PreparedDataset:
    samples: list[PreparedSample]
    template: str
    num_visual_tokens: int
    skipped: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)    # NOTE_* -> count of samples
    warnings: list[str] = field(default_factory=list)      # about the tokenizer (pad != eos)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def fingerprint(self) -> str:
        """Content hash of the prepared dataset: template + every sample key in order."""
        h = hashlib.sha256(f"{self.template}|{self.num_visual_tokens}|".encode())
        for s in self.samples:
            h.update(s.key.encode())
        return h.hexdigest()[:32]


def read_records(path: str | Path) -> list[dict]:
    """Read LLaVA JSON (a list) or JSON lines."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p} is not valid JSON ({e}); expected a list of LLaVA samples or JSON lines") from None
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a JSON list of samples, got {type(data).__name__}")
    return data


def conversation_rounds(record: dict) -> list[tuple[str, str]]:
    """(question, answer) rounds of a LLaVA record, validated."""
    sid = record.get("id", "<no id>")
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError(f"sample {sid}: 'conversations' is missing or empty")
    for i, m in enumerate(conv):
        if not isinstance(m, dict) or not isinstance(m.get("value"), str) or m.get("from") not in ("human", "gpt"):
            raise DataError(f"sample {sid}: message {i} is malformed; each message needs "
                            f"'from' ('human' or 'gpt') and a string 'value'")
    if conv[0]["from"] != "human":  # as the reference: a leading gpt message is dropped
        conv = conv[1:]
    if len(conv) < 2 or len(conv) % 2:
        raise DataError(f"sample {sid}: expected alternating human/gpt messages in pairs, got {len(conv)} message(s)")
    rounds = []
    for i in range(0, len(conv), 2):
        if conv[i]["from"] != "human" or conv[i + 1]["from"] != "gpt":
            raise DataError(f"sample {sid}: wrong role order at message {i}: "
                            f"expected human then gpt, got {conv[i]['from']} then {conv[i + 1]['from']}")
        rounds.append((conv[i]["value"], conv[i + 1]["value"]))
    return rounds


def load_image(path: Path, sid: str):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"sample {sid}: image {path} not found (check --images / the 'image' field)")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"sample {sid}: image {path} is unreadable ({e})") from None


# SigLIP's processor mean (0.5) as LLaVA's expand2square fill: tuple(int(x * 255) for x in image_mean).
PAD_COLOUR = (127, 127, 127)


# The largest image (width x height, read from the file header before decoding) anything of ours
# decodes: data preparation, the teacher server and the loaders. 32 Mpx is ~5,800 x 5,800, far above
# what a 384-px model needs, and it bounds a decompression bomb's memory (RGB: 96 MiB). The one
# owner of the limit; a server may lower it and reports its own in /v1/info.
MAX_IMAGE_PIXELS = 1 << 25


def expand_to_square(image, fill: tuple[int, int, int] = PAD_COLOUR):
    """LLaVA-1.5 / TinyLLaVA ``expand2square``: the image centred on a square canvas of its longer
    side (offset ``(long - short) // 2``), the rest filled with ``fill``."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def preprocess_image(image, size: int, aspect_ratio: str) -> np.ndarray:
    """The model's image preprocessing (docs/design.md §2) -> [3, size, size] float32: for
    ``aspect_ratio='pad'`` first :func:`expand_to_square`, then (both modes) SigLIP's bicubic
    resize to ``size``², /255, (x - 0.5) / 0.5. The one implementation the server, the trainer and
    eval call (with the model's ``ModelInfo.image_aspect_ratio``); the saved image processor
    (ckd_common.model.save_vlm) does the same for stock tools."""
    from PIL import Image

    im = image.convert("RGB")
    if aspect_ratio == "pad":
        im = expand_to_square(im)
    elif aspect_ratio != "square":
        raise ValueError(f"image_aspect_ratio {aspect_ratio!r} is not supported; choose 'square' or 'pad'")
    im = im.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return ((arr - 0.5) / 0.5).transpose(2, 0, 1).copy()


class Preparer:
    """Turns LLaVA records into prepared samples for one (tokenizer, template, visual-token count)."""

    def __init__(self, tokenizer, template: str, num_visual_tokens: int, image_token_id: int,
                 image_root: str | Path | None = None, max_length: int = DEFAULT_MAX_LENGTH):
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.num_visual_tokens = int(num_visual_tokens)
        self.image_token_id = int(image_token_id)
        self.image_root = Path(image_root) if image_root is not None else None
        self.max_length = int(max_length)
        self._encode_cache: dict[str, list[int]] = {}
        self.notes: Counter = Counter()
        self.warnings: list[str] = []
        w = pad_eos_warning(tokenizer) if self.template.name == QWEN2_BASE else None
        if w:
            self.warnings.append(w)
            warnings.warn(w, stacklevel=2)

    def _encode(self, text: str) -> list[int]:
        ids = self._encode_cache.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(self._encode_cache) < 4096:  # the template repeats the same system/role strings
                self._encode_cache[text] = ids
        return ids

    def image_file(self, record: dict) -> Path:
        rel = record["image"]
        return (self.image_root / rel) if self.image_root is not None else Path(rel)

    def prepare(self, record: dict) -> PreparedSample:
        sid = str(record.get("id", "<no id>"))
        rounds = conversation_rounds(record)
        has_image = bool(record.get("image"))
        n_tokens = sum(q.count(IMAGE_TOKEN) + a.count(IMAGE_TOKEN) for q, a in rounds)
        if n_tokens > 1:
            raise DataError(f"sample {sid}: {n_tokens} {IMAGE_TOKEN} tokens; exactly one image per sample is supported")
        if any(IMAGE_TOKEN in a for _, a in rounds):
            raise DataError(f"sample {sid}: {IMAGE_TOKEN} appears in an answer; it belongs in the first question")
        if n_tokens and not has_image:
            raise DataError(f"sample {sid}: the text has {IMAGE_TOKEN} but the sample has no 'image' field")
        if has_image and not n_tokens:  # common in the wild: the image goes before the first question
            rounds = with_image_first(rounds)
        # (pretrain renders "<image>" + caption whatever the question says, as the reference does)
        notes = [NOTE_IMAGE_INSERTED] if has_image and not n_tokens and self.template.name == QWEN2_BASE else []
        if self.template.name == "pretrain" and not has_image:
            raise DataError(f"sample {sid}: the pretrain template needs an image")

        image_sha = None
        path = None
        if has_image:
            path = self.image_file(record)
            load_image(path, sid)  # validates now, so a bad image fails at preparation, not mid-training
            image_sha = image_hash(path.read_bytes())
        try:
            r = self.template.render(rounds, self._encode)
        except TemplateError as e:
            raise DataError(f"sample {sid}: {e}") from None

        ids, labels = r.input_ids, r.labels
        visual_start, nv = -1, 0
        if has_image:
            visual_start = ids.index(IMAGE_MARKER)
            nv = self.num_visual_tokens
            ids = ids[:visual_start] + [self.image_token_id] * nv + ids[visual_start + 1:]
            labels = labels[:visual_start] + [IGNORE_INDEX] * nv + labels[visual_start + 1:]
        if len(ids) > self.max_length:
            if has_image and visual_start + nv > self.max_length:
                raise DataError(f"sample {sid}: max_length {self.max_length} would cut the visual span "
                                f"[{visual_start}, {visual_start + nv}); raise --max-length or skip such samples")
            ids, labels = ids[:self.max_length], labels[:self.max_length]
            notes.append(NOTE_TRUNCATED)
        input_ids = np.asarray(ids, dtype=np.int64)
        labels_arr = np.asarray(labels, dtype=np.int64)
        if not (labels_arr[1:] != IGNORE_INDEX).any():
            raise DataError(f"sample {sid}: no supervised token left (empty answer, or truncated away)")
        key = sample_key(self.template.name, input_ids, image_sha, nv)
        self.notes.update(notes)
        return PreparedSample(sid, key, input_ids, labels_arr, visual_start, nv,
                              str(path) if path else None, image_sha)

    def prepare_all(self, records: Iterable[dict], on_error: str = "raise",
                    progress: bool = False) -> PreparedDataset:
        """Prepare every record. ``on_error='skip'`` drops bad samples and counts them by reason."""
        if on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip'")
        records = list(records)
        it = records
        if progress:
            from tqdm import tqdm
            it = tqdm(records, desc=f"prepare[{self.template.name}]", unit="sample")
        samples, skipped = [], {}
        for rec in it:
            try:
                samples.append(self.prepare(rec))
            except DataError as e:
                if on_error == "raise":
                    raise
                reason = str(e).split(": ", 1)[-1].split(" (")[0][:80]
                skipped[reason] = skipped.get(reason, 0) + 1
        return PreparedDataset(samples, self.template.name, self.num_visual_tokens, skipped,
                               dict(self.notes), list(self.warnings))


def prepare_file(data: str | Path, tokenizer, template: str, num_visual_tokens: int, image_token_id: int,
                 image_root: str | Path | None, max_length: int = DEFAULT_MAX_LENGTH, on_error: str = "raise",
                 progress: bool = False) -> PreparedDataset:
    prep = Preparer(tokenizer, template, num_visual_tokens, image_token_id, image_root, max_length)
    return prep.prepare_all(read_records(data), on_error=on_error, progress=progress)


def collate(samples: Sequence[PreparedSample], pad_id: int, image_size: int | None = None,
            images: Sequence | None = None, aspect_ratio: str | None = None) -> dict:
    """Right-padded batch tensors: input_ids, attention_mask, labels (+ pixel_values for the
    samples with an image, in batch order, preprocessed with ``image_size`` and ``aspect_ratio``
    unless ``images`` gives them)."""
    import torch

    L = max(s.length for s in samples)
    B = len(samples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, :s.length] = torch.from_numpy(s.input_ids)
        labels[i, :s.length] = torch.from_numpy(s.labels)
        mask[i, :s.length] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with_image = [s for s in samples if s.has_image]
    if with_image:
        if images is None and (image_size is None or aspect_ratio is None):
            raise ValueError("collate: image_size and aspect_ratio (the model's) are required for samples with images")
        pix = [preprocess_image(load_image(Path(s.image_path), s.id), image_size, aspect_ratio)
               for s in with_image] if images is None else list(images)
        batch["pixel_values"] = torch.from_numpy(np.stack(pix))
    return batch
