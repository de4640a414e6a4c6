"""LLaVA-format data -> prepared samples (token ids, labels, visual span, response positions, keys).

Input: the LLaVA JSON format (a list of ``{"id", "image"?, "conversations": [{"from": "human"|"gpt",
"value"}...]}``, or JSON lines) with an image root. Output: :class:`PreparedSample` s that every
model sharing a tokenizer, template and visual-token count sees identically (docs/design.md §3).

This module is the per-record rule (:class:`Preparer`) and the in-memory form of a small dataset
(:func:`prepare_file`). Processes that train, fill or evaluate at scale open the prepared dataset
that ``ckd data prepare`` wrote once (``ckd_common.prepared``, docs/prepared-data.md), made with
this same per-record rule. Images are validated from their header here (format, size, the pixel
limit :data:`MAX_IMAGE_PIXELS`) and hashed; they are decoded only by the loaders that need pixels
(:func:`load_image`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ckd_common.keys import sample_key
from ckd_common.templates import IGNORE_INDEX, IMAGE_MARKER, QWEN2_BASE, TemplateError, get_template, with_image_first
from ckd_common.tokenizer import IMAGE_TOKEN, pad_eos_warning

DEFAULT_MAX_LENGTH = 2048
# What the prepare report counts (docs/templates.md explains each against the reference).
NOTE_IMAGE_INSERTED = ("image field but no <image> in the text: image put before the first question "
                       "(the reference drops it)")
NOTE_TRUNCATED = "longer than max_length: truncated (as the reference)"

# The largest image (width x height, read from the file header before decoding) anything of ours
# decodes: data preparation, the teacher server and the loaders. 32 Mpx is ~5,800 x 5,800, far above
# what a 384-px model needs, and it bounds a decompression bomb's memory (RGB: 96 MiB). The one
# owner of the limit; a server may lower it and reports its own in /v1/info.
MAX_IMAGE_PIXELS = 1 << 25

# Skip-count reasons (``--on-error skip`` reports counts per reason).
REASON_IMAGE_MISSING = "image not found"
REASON_IMAGE_UNREADABLE = "image unreadable"
REASON_IMAGE_TOO_LARGE = "image over the pixel limit"
REASON_IMAGE_OUTSIDE = "image outside --images"
REASON_IMAGE_CHANGED = "image changed since preparation"
REASON_NOT_OBJECT = "record is not a JSON object"
REASON_BAD_IMAGE_FIELD = "'image' is not a string"


class DataError(ValueError):
    """Bad input data. The message names the problem, the sample (``sample``: its id) and, once
    known, the data file and the record's index; ``reason`` is the short category skip counts use."""

    def __init__(self, problem: str, sample: str | None = None, reason: str | None = None,
                 source: str | None = None, index: int | None = None):
        super().__init__(problem)
        self.problem, self.sample, self.reason, self.source, self.index = problem, sample, reason, source, index

    def __str__(self) -> str:
        if self.index is None:
            who = f"sample {self.sample}: " if self.sample is not None else ""
        else:
            who = f"record {self.index}" + (f" (id {self.sample})" if self.sample is not None else "") + ": "
        return (f"{self.source}: " if self.source else "") + who + self.problem

    def __reduce__(self):  # keep the fields across processes
        return (_rebuild_data_error, (self.problem, self.sample, self.reason, self.source, self.index))

    def located(self, source: str | Path | None, index: int | None) -> "DataError":
        """This error, naming the data file and the record's index."""
        return DataError(self.problem, self.sample, self.reason, str(source) if source is not None else None, index)

    @property
    def category(self) -> str:
        """What skip counts group by: the explicit reason, else the problem's first clause."""
        return self.reason or self.problem.split(" (")[0][:80]


def _rebuild_data_error(*args) -> DataError:
    return DataError(*args)


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
    # (size, mtime_ns) of the image file when it was hashed: how a prepared dataset notices a change
    image_stat: tuple[int, int] | None = field(default=None, repr=False, compare=False)

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


def dataset_fingerprint(template: str, num_visual_tokens: int, keys: Iterable[str]) -> str:
    """Content hash of a prepared dataset (docs/design.md §3.6): template, Nv and every sample key in order."""
    h = hashlib.sha256(f"{template}|{num_visual_tokens}|".encode())
    for k in keys:
        h.update(k.encode())
    return h.hexdigest()[:32]


@dataclass
class PreparedDataset:
    """A prepared dataset held in memory (small data, tests). ``ckd_common.prepared.PreparedData``
    is the same interface over the memory-mapped dataset on disk."""

    samples: list[PreparedSample]
    template: str
    num_visual_tokens: int
    skipped: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)    # NOTE_* -> count of samples
    warnings: list[str] = field(default_factory=list)      # about the tokenizer (pad != eos)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.samples]

    @property
    def fingerprint(self) -> str:
        """Content hash of the prepared dataset: template + every sample key in order."""
        return dataset_fingerprint(self.template, self.num_visual_tokens, self.keys)


# ---------------------------------------------------------------------------------------------
# the data file


def read_records(path: str | Path) -> list:
    """Read LLaVA JSON (a list) or JSON lines. Every problem of the file itself (missing, not UTF-8,
    not JSON, nested beyond the parser's limit) is a one-line DataError naming the file (and, where
    one is to blame, the record or line)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {p} does not exist")
    return [rec for rec, _ in iter_records(decode_text(p.read_bytes(), p), p)]


def decode_text(raw: bytes, p: Path) -> str:
    """The text of data file ``p`` (bytes ``raw``): UTF-8, a BOM tolerated."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{p} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); LLaVA data "
                        f"files are UTF-8 JSON: convert it, e.g. iconv -f LATIN1 -t UTF-8") from None


_WS = re.compile(r"[ \t\n\r]*")


def iter_records(text: str, p: Path) -> Iterator[tuple[object, int]]:
    """(record, offset in ``text`` after it) for each record of a JSON list or JSON lines, parsed one at
    a time, so a large file is never held as Python objects all at once."""
    if p.suffix == ".jsonl":
        pos = 0
        for n, line in enumerate(text.splitlines(keepends=True), 1):
            pos += len(line)
            if not line.strip():
                continue
            try:
                yield json.loads(line), pos
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: line {n} is not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{p}: line {n}: JSON nested too deeply to be a LLaVA record") from None
        return
    i = _WS.match(text, 0).end()
    if not text.startswith("[", i):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p} is not valid JSON ({e}); expected a list of LLaVA samples or JSON lines") from None
        except RecursionError:
            raise DataError(f"{p}: JSON nested too deeply to be a LLaVA data file") from None
        raise DataError(f"{p}: expected a JSON list of samples, got {type(data).__name__}")
    decoder, i, n = json.JSONDecoder(), _WS.match(text, i + 1).end(), 0
    if text.startswith("]", i):
        i = _WS.match(text, i + 1).end()
    else:
        while True:
            try:
                rec, i = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise DataError(f"{p} is not valid JSON ({e}); expected a list of LLaVA samples or JSON lines") from None
            except RecursionError:
                raise DataError(f"{p}: record {n}: JSON nested too deeply to be a LLaVA record") from None
            yield rec, i
            n += 1
            i = _WS.match(text, i).end()
            if text.startswith(",", i):
                i = _WS.match(text, i + 1).end()
            elif text.startswith("]", i):
                i = _WS.match(text, i + 1).end()
                break
            else:
                raise DataError(f"{p} is not valid JSON (expected ',' or ']' after record {n - 1}, at char {i})")
    if i != len(text):
        raise DataError(f"{p} is not valid JSON (extra data after the list, at char {i})")


def _sample_id(record) -> str:
    sid = record.get("id", "<no id>") if isinstance(record, dict) else "<no id>"
    sid = sid if isinstance(sid, str) else repr(sid)
    return sid if len(sid) <= 80 else sid[:77] + "..."


def conversation_rounds(record: dict) -> list[tuple[str, str]]:
    """(question, answer) rounds of a LLaVA record, validated."""
    sid = _sample_id(record)
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError("'conversations' is missing or empty", sid)
    for i, m in enumerate(conv):
        if not isinstance(m, dict) or not isinstance(m.get("value"), str) or m.get("from") not in ("human", "gpt"):
            raise DataError(f"message {i} is malformed; each message needs 'from' ('human' or 'gpt') and a "
                            f"string 'value'", sid)
    if conv[0]["from"] != "human":  # as the reference: a leading gpt message is dropped
        conv = conv[1:]
    if len(conv) < 2 or len(conv) % 2:
        raise DataError(f"expected alternating human/gpt messages in pairs, got {len(conv)} message(s)", sid)
    rounds = []
    for i in range(0, len(conv), 2):
        if conv[i]["from"] != "human" or conv[i + 1]["from"] != "gpt":
            raise DataError(f"wrong role order at message {i}: expected human then gpt, got "
                            f"{conv[i]['from']} then {conv[i + 1]['from']}", sid)
        rounds.append((conv[i]["value"], conv[i + 1]["value"]))
    return rounds


# ---------------------------------------------------------------------------------------------
# images: header checks at preparation, full decoding in the loaders


def _read_image_bytes(path: Path, sid: str) -> tuple[bytes, os.stat_result]:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            return f.read(), st
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise DataError(f"image {path} not found (check --images / the 'image' field)", sid,
                        REASON_IMAGE_MISSING) from None
    except OSError as e:
        raise DataError(f"image {path} cannot be read ({e.strerror})", sid, REASON_IMAGE_UNREADABLE) from None


def _open_header(data: bytes, path: Path, sid: str, max_pixels: int):
    """The image with only its header parsed; DataError when that fails or it has too many pixels."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise DataError(f"image {path} has more pixels than the limit of {max_pixels} ({e})", sid,
                        REASON_IMAGE_TOO_LARGE) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken headers
        raise DataError(f"image {path} is unreadable ({type(e).__name__}: {e})", sid, REASON_IMAGE_UNREADABLE) from None
    w, h = im.size
    if w * h > max_pixels:
        raise DataError(f"image {path} is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels} "
                        f"(MAX_IMAGE_PIXELS); downscale it or leave it out (--on-error skip)", sid,
                        REASON_IMAGE_TOO_LARGE)
    if w < 1 or h < 1:
        raise DataError(f"image {path} is unreadable (size {w}x{h})", sid, REASON_IMAGE_UNREADABLE)
    return im


def inspect_image(path: Path, sid: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[str, tuple[int, int]]:
    """Validate an image from its header (a format PIL reads, a size within ``max_pixels``) without
    decoding it; returns (sha256 of its bytes, (size, mtime_ns) of the file)."""
    data, st = _read_image_bytes(path, sid)
    _open_header(data, path, sid, max_pixels).close()
    return hashlib.sha256(data).hexdigest(), (int(st.st_size), int(st.st_mtime_ns))


def load_image(path: Path, sid: str, max_pixels: int = MAX_IMAGE_PIXELS, expect_sha: str | None = None):
    """Decode an image to RGB after checking its header against the pixel limit. With
    ``expect_sha`` (the hash recorded at preparation) a file whose bytes changed since is refused."""
    path = Path(path)
    data, _ = _read_image_bytes(path, sid)
    if expect_sha is not None and hashlib.sha256(data).hexdigest() != expect_sha:
        raise DataError(f"image {path} changed since the data was prepared (its bytes no longer match the hash "
                        f"in the sample key); prepare the data again", sid, REASON_IMAGE_CHANGED)
    im = _open_header(data, path, sid, max_pixels)
    try:
        return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - a header that parses can still hide a broken body
        raise DataError(f"image {path} is unreadable ({type(e).__name__}: {e})", sid, REASON_IMAGE_UNREADABLE) from None
    finally:
        im.close()


# SigLIP's processor mean (0.5) as LLaVA's expand2square fill: tuple(int(x * 255) for x in image_mean).
PAD_COLOUR = (127, 127, 127)


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


# ---------------------------------------------------------------------------------------------
# records -> prepared samples


class Preparer:
    """Turns LLaVA records into prepared samples for one (tokenizer, template, visual-token count).

    ``tokenizer``: a transformers tokenizer or a ``tokenizers.Tokenizer`` (what preparation workers
    receive; both encode identically, tested). Image paths must stay inside ``image_root`` (after
    ``..`` and symlinks) unless ``allow_outside_images``; images over ``max_image_pixels`` are bad
    data."""

    def __init__(self, tokenizer, template: str, num_visual_tokens: int, image_token_id: int,
                 image_root: str | Path | None = None, max_length: int = DEFAULT_MAX_LENGTH, *,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, allow_outside_images: bool = False):
        self.template = get_template(template)
        self.num_visual_tokens = int(num_visual_tokens)
        self.image_token_id = int(image_token_id)
        self.image_root = Path(image_root) if image_root is not None else None
        self._root_resolved = self.image_root.resolve() if self.image_root is not None else None
        self.max_length = int(max_length)
        self.max_image_pixels = int(max_image_pixels)
        self.allow_outside_images = bool(allow_outside_images)
        backend = tokenizer if _is_backend(tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer directly: same ids, half the per-call overhead
            self._tokenize = lambda text: backend.encode(text, add_special_tokens=False).ids
        else:
            self._tokenize = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
        self._encode_cache: dict[str, list[int]] = {}
        self.notes: Counter = Counter()
        self.warnings: list[str] = []
        w = pad_eos_warning(tokenizer) if self.template.name == QWEN2_BASE and not _is_backend(tokenizer) else None
        if w:
            self.warnings.append(w)
            warnings.warn(w, stacklevel=2)

    def _encode(self, text: str) -> list[int]:
        ids = self._encode_cache.get(text)
        if ids is None:
            ids = self._tokenize(text)
            if len(self._encode_cache) < 4096:  # the template repeats the same system/role strings
                self._encode_cache[text] = ids
        return ids

    def image_file(self, record: dict, sid: str = "<no id>") -> Path:
        rel = record["image"]
        if not isinstance(rel, str):
            hint = "; exactly one image per sample is supported" if isinstance(rel, list) else ""
            raise DataError(f"'image' must be a path (a string) relative to --images, got "
                            f"{type(rel).__name__}{hint}", sid, REASON_BAD_IMAGE_FIELD)
        if self.image_root is None:
            return Path(rel)
        path = self.image_root / rel
        if not self.allow_outside_images:
            try:
                inside = path.resolve().is_relative_to(self._root_resolved)
            except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
                inside = False
            if not inside:
                raise DataError(f"image {rel!r} resolves outside --images {self.image_root} (an absolute path, "
                                f"'..' or a symlink out); refused unless --allow-outside-images is given",
                                sid, REASON_IMAGE_OUTSIDE)
        return path

    def prepare(self, record: dict) -> PreparedSample:
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object with 'conversations' (and 'id', 'image'), got "
                            f"{type(record).__name__}", None, REASON_NOT_OBJECT)
        sid = _sample_id(record)
        rounds = conversation_rounds(record)
        has_image = record.get("image") not in (None, "")
        path = self.image_file(record, sid) if has_image else None
        n_tokens = sum(q.count(IMAGE_TOKEN) + a.count(IMAGE_TOKEN) for q, a in rounds)
        if n_tokens > 1:
            raise DataError(f"{n_tokens} {IMAGE_TOKEN} tokens; exactly one image per sample is supported", sid)
        if any(IMAGE_TOKEN in a for _, a in rounds):
            raise DataError(f"{IMAGE_TOKEN} appears in an answer; it belongs in the first question", sid)
        if n_tokens and not has_image:
            raise DataError(f"the text has {IMAGE_TOKEN} but the sample has no 'image' field", sid)
        if has_image and not n_tokens:  # common in the wild: the image goes before the first question
            rounds = with_image_first(rounds)
        # (pretrain renders "<image>" + caption whatever the question says, as the reference does)
        notes = [NOTE_IMAGE_INSERTED] if has_image and not n_tokens and self.template.name == QWEN2_BASE else []
        if self.template.name == "pretrain" and not has_image:
            raise DataError("the pretrain template needs an image", sid)

        image_sha = image_stat = None
        if has_image:  # header only: pixels are decoded by the loaders that need them
            image_sha, image_stat = inspect_image(path, sid, self.max_image_pixels)
        try:
            r = self.template.render(rounds, self._encode)
        except TemplateError as e:
            raise DataError(str(e), sid) from None

        ids, labels = r.input_ids, r.labels
        visual_start, nv = -1, 0
        if has_image:
            visual_start = ids.index(IMAGE_MARKER)
            nv = self.num_visual_tokens
            ids = ids[:visual_start] + [self.image_token_id] * nv + ids[visual_start + 1:]
            labels = labels[:visual_start] + [IGNORE_INDEX] * nv + labels[visual_start + 1:]
        if len(ids) > self.max_length:
            if has_image and visual_start + nv > self.max_length:
                raise DataError(f"max_length {self.max_length} would cut the visual span "
                                f"[{visual_start}, {visual_start + nv}); raise --max-length or skip such samples", sid)
            ids, labels = ids[:self.max_length], labels[:self.max_length]
            notes.append(NOTE_TRUNCATED)
        input_ids = np.asarray(ids, dtype=np.int64)
        labels_arr = np.asarray(labels, dtype=np.int64)
        if not (labels_arr[1:] != IGNORE_INDEX).any():
            raise DataError("no supervised token left (empty answer, or truncated away)", sid)
        key = sample_key(self.template.name, input_ids, image_sha, nv)
        self.notes.update(notes)
        return PreparedSample(sid, key, input_ids, labels_arr, visual_start, nv,
                              str(path) if path else None, image_sha, image_stat)

    def prepare_all(self, records: Iterable, on_error: str = "raise", progress: bool = False,
                    source: str | Path | None = None) -> PreparedDataset:
        """Prepare every record. ``on_error='skip'`` drops bad samples and counts them by reason.
        Errors name ``source`` (the data file) and the record's index."""
        if on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip'")
        records = list(records)
        it = records
        if progress:
            from tqdm import tqdm
            it = tqdm(records, desc=f"prepare[{self.template.name}]", unit="sample")
        samples, skipped = [], {}
        for i, rec in enumerate(it):
            try:
                samples.append(self.prepare(rec))
            except DataError as e:
                if on_error == "raise":
                    raise e.located(source, i) from None
                skipped[e.category] = skipped.get(e.category, 0) + 1
        return PreparedDataset(samples, self.template.name, self.num_visual_tokens, skipped,
                               dict(self.notes), list(self.warnings))


def _is_backend(tokenizer) -> bool:
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - a transformers dependency
        return False
    return isinstance(tokenizer, Tokenizer)


def prepare_file(data: str | Path, tokenizer, template: str, num_visual_tokens: int, image_token_id: int,
                 image_root: str | Path | None, max_length: int = DEFAULT_MAX_LENGTH, on_error: str = "raise",
                 progress: bool = False, **policy) -> PreparedDataset:
    """Prepare a whole file in memory (one process). For data of any size use the prepared dataset
    on disk (``ckd_common.prepared.obtain``), which gives the same samples and fingerprint."""
    prep = Preparer(tokenizer, template, num_visual_tokens, image_token_id, image_root, max_length, **policy)
    return prep.prepare_all(read_records(data), on_error=on_error, progress=progress, source=data)


def collate(samples: Sequence[PreparedSample], pad_id: int, image_size: int | None = None,
            images: Sequence | None = None, aspect_ratio: str | None = None) -> dict:
    """Right-padded batch tensors: input_ids, attention_mask, labels (+ pixel_values for the
    samples with an image, in batch order, preprocessed with ``image_size`` and ``aspect_ratio``
    unless ``images`` gives them). An image whose bytes changed since preparation is refused."""
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
        pix = [preprocess_image(load_image(Path(s.image_path), s.id, expect_sha=s.image_sha), image_size, aspect_ratio)
               for s in with_image] if images is None else list(images)
        batch["pixel_values"] = torch.from_numpy(np.stack(pix))
    return batch
