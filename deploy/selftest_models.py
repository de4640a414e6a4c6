"""Models and data for ``ckd selftest`` and ``bench/real_shapes.py``: random-initialised VLMs with the
real configs (the paper's shapes) or the tiny presets, and LLaVA-format data with real-size JPEGs.

The paper's shapes (docs/environment.md §4): a SigLIP-so400m-patch14-384 vision tower (428 M
parameters), a Qwen2.5-0.5B student LLM (494 M) and a Qwen2.5-1.5B teacher-assistant (1,544 M), a
vocabulary of 151,936 rows, 728 visual tokens per image (``patch``, as TinyLLaVA / LLaVA-KD) or 729
(``full``), and the real Qwen2 tokenizer vendored in ``tests/fixtures/qwen2-tokenizer`` (in the base
models' configuration: eos = pad = ``<|endoftext|>``). Nothing is downloaded: the weights are random,
the configs and the tokenizer are real, so every shape, memory and time is the real one.
"""
from __future__ import annotations

import json
import lzma
import random
import shutil
from pathlib import Path

from ckd_common.templates import QWEN2_BASE

# Qwen2.5 base models' config.json (the fields that differ from Qwen2Config's defaults)
QWEN25 = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, max_position_embeddings=32768, max_window_layers=24),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, max_position_embeddings=131072, max_window_layers=28),
}
QWEN25_COMMON = dict(vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1e6,
                     hidden_act="silu", use_sliding_window=False, bos_token_id=151643, eos_token_id=151643)
SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=384, patch_size=14)
STRATEGY_TOKENS = {"patch": 728, "full": 729}
# The vendored tokenizer (tests/fixtures/qwen2-tokenizer, Apache-2.0): found in a source checkout.
TOKENIZER_FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "qwen2-tokenizer"


class SelftestSetupError(RuntimeError):
    """A prerequisite of the self-test / rehearsal is missing (the message says how to provide it)."""


def qwen2_base_tokenizer(out: str | Path, source: str | Path | None = None) -> Path:
    """The real Qwen2 tokenizer in the base models' configuration, written to ``out``.

    ``source``: a tokenizer directory (e.g. your Qwen2.5 checkpoint) used as is; by default the
    vendored fixture is decompressed and configured as the base models ship it."""
    out = Path(out)
    if source is not None:
        if not (Path(source) / "tokenizer_config.json").is_file():
            raise SelftestSetupError(f"--tokenizer {source}: no tokenizer_config.json there")
        shutil.copytree(source, out, dirs_exist_ok=True)
        return out
    if not TOKENIZER_FIXTURE.is_dir():
        raise SelftestSetupError(f"the vendored Qwen2 tokenizer {TOKENIZER_FIXTURE} is missing (not a source "
                                 f"checkout?): pass --tokenizer DIR (any Qwen2/Qwen2.5 tokenizer directory)")
    out.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FIXTURE.iterdir():
        if f.suffix == ".xz":
            (out / f.stem).write_bytes(lzma.decompress(f.read_bytes()))
        elif f.suffix == ".json":
            shutil.copy(f, out / f.name)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.update(eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=2048, padding_side="right")
    cfg.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    smap = json.loads((out / "special_tokens_map.json").read_text())
    smap["eos_token"] = dict(smap["eos_token"], content="<|endoftext|>")
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2))
    return out


def real_llava_config(llm: str, image_token_id: int, strategy: str = "patch"):
    """The LlavaConfig of SigLIP-so400m-384 + Qwen2.5-``llm`` (``0.5b`` | ``1.5b``)."""
    from transformers import Qwen2Config, SiglipVisionConfig

    from ckd_common.model import llava_config

    if llm not in QWEN25:
        raise ValueError(f"unknown LLM size {llm!r}; choose one of {sorted(QWEN25)}")
    text = Qwen2Config(**QWEN25_COMMON, **QWEN25[llm], pad_token_id=151643)
    return llava_config(SiglipVisionConfig(**SIGLIP_SO400M_384), text, strategy, image_token_id)


def build_real_vlm(llm: str, out: str | Path, tokenizer_dir: str | Path, strategy: str = "patch", seed: int = 0,
                   template: str = QWEN2_BASE) -> Path:
    """Write a random-initialised VLM with the real configs to ``out`` (bf16 weights: half the disk
    and write time; every command loads them in the dtype it computes in)."""
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from ckd_common.model import save_vlm
    from ckd_common.tokenizer import IMAGE_TOKEN

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if IMAGE_TOKEN not in tok.get_vocab():  # as `ckd model compose` does
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    cfg = real_llava_config(llm, tok.convert_tokens_to_ids(IMAGE_TOKEN), strategy)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: 2 bytes per parameter at the peak, not 4 + 2
    try:
        model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(previous)
    save_vlm(model, tok, out, template)
    return Path(out)


def build_tiny_vlm(preset: str, out: str | Path, strategy: str = "full") -> Path:
    from ckd_common.model import init_preset

    return init_preset(preset, out, strategy)


# ---------------------------------------------------------------------------------------------
# data in the LLaVA formats (LLaVA-Pretrain captions, LLaVA-665k instructions), real-size JPEGs

_WORDS = ("the a small large red blue green white black wooden metal old new person man woman child dog cat car "
          "bus tree street table window building sky road field water boat plate food shirt sign light wall door "
          "standing sitting walking holding near next behind in on under with of and is are two three several "
          "background front left right top bottom side corner middle bright dark colourful empty busy quiet").split()
CAPTION_PROMPTS = ("Describe the image concisely.", "Render a clear and concise summary of the photo.",
                   "Give a brief description of the image.", "Share a concise interpretation of the image provided.")


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def _paragraph(rng: random.Random, words: int) -> str:
    out, left = [], words
    while left > 0:
        n = min(left, rng.randint(8, 18))
        out.append(_sentence(rng, n))
        left -= n
    return " ".join(out)


def write_jpeg(path: Path, rng: random.Random, size: tuple[int, int] = (640, 480), quality: int = 95) -> int:
    """A photo-like JPEG (smooth colour fields + texture + noise: ~150 KB at 640x480, as a COCO photo); returns its bytes."""
    import numpy as np
    from PIL import Image

    w, h = size
    g = np.random.default_rng(rng.randrange(1 << 30))
    coarse = Image.fromarray(g.integers(0, 256, (h // 40 + 1, w // 40 + 1, 3), dtype=np.uint8))
    base = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float32)
    mid = np.asarray(Image.fromarray(g.integers(0, 256, (h // 6, w // 6, 3), dtype=np.uint8)).resize((w, h)),
                     dtype=np.float32)
    img = 0.7 * base + 0.3 * mid + g.normal(0, 6, (h, w, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=quality)
    return path.stat().st_size


def write_llava_data(out: str | Path, n_captions: int, n_instructions: int, n_images: int | None = None,
                     image_size: tuple[int, int] = (640, 480), instruction_words: int = 260, rounds: int = 3,
                     seed: int = 0) -> dict:
    """``out/pretrain.json`` (captions), ``out/instruct.json`` (multi-round instructions) and
    ``out/images/*.jpg``; ``n_images`` distinct images are shared round-robin by the samples (sample
    keys still differ by their text). ``instruction_words``: answer words per instruction sample
    (~260 words + 728 visual tokens is ~1,100 tokens, a long LLaVA-665k sample). Returns the paths
    and the mean JPEG size."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    n_img = n_images or max(n_captions, n_instructions, 1)
    sizes = [write_jpeg(out / "images" / f"{i:06d}.jpg", rng, image_size) for i in range(n_img)]
    captions = [{"id": f"cap-{i:06d}", "image": f"{i % n_img:06d}.jpg",
                 "conversations": [{"from": "human", "value": f"<image>\n{rng.choice(CAPTION_PROMPTS)}"},
                                   {"from": "gpt", "value": _sentence(rng, rng.randint(8, 16))}]}
                for i in range(n_captions)]
    instructions = []
    for i in range(n_instructions):
        conv = []
        for r in range(rounds):
            q = _sentence(rng, rng.randint(6, 12)).rstrip(".") + "?"
            conv += [{"from": "human", "value": ("<image>\n" if r == 0 else "") + q},
                     {"from": "gpt", "value": _paragraph(rng, max(1, instruction_words // rounds))}]
        instructions.append({"id": f"inst-{i:06d}", "image": f"{(i + n_captions) % n_img:06d}.jpg",
                             "conversations": conv})
    (out / "pretrain.json").write_text(json.dumps(captions))
    (out / "instruct.json").write_text(json.dumps(instructions))
    return {"pretrain": out / "pretrain.json", "instruct": out / "instruct.json", "images": out / "images",
            "jpeg_bytes_mean": sum(sizes) / len(sizes)}
