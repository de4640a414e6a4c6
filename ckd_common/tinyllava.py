"""TinyLLaVA-Factory checkpoints -> the HF llava layout (``ckd model convert --tinyllava SRC --out DST``).

What TinyLLaVA-Factory (transformers 4.40) writes, from its own code:

* **every stage** (``training_recipe/base.py`` ``BaseTrainingRecipe.save``): ``config.json`` — a
  ``TinyLlavaConfig`` (``model/configuration_tinyllava.py``: ``model_type`` ``tinyllava``,
  ``connector_type``, ``vision_feature_layer``, ``vision_feature_select_strategy`` ``patch`` |
  ``cls_patch``, ``image_aspect_ratio``, the LLM's and the vision tower's configs embedded as
  ``text_config`` / ``vision_config``, saved as diffs against the transformers-4.40 defaults) — and
  the tokenizer files beside it.
* **pretrain stage** ("split" layout, ``save`` when the output dir is not a finetune one):
  ``language_model/pytorch_model.bin`` = the LLM's ``named_parameters()`` (``model.*``; the tied
  ``lm_head.weight`` is deduplicated away) + ``language_model/config.json``;
  ``vision_tower/pytorch_model.bin`` = ``_vision_tower.named_parameters()`` of the SigLIP
  (``vision_model.*`` under transformers 4) + ``vision_tower/config.json``;
  ``connector/pytorch_model.bin`` = ``connector.named_parameters()`` (``_connector.0.*``,
  ``_connector.2.*``: Linear, GELU, Linear in ``model/connector/mlp.py``). ``language_model/`` may
  also be an HF directory (``model.safetensors``, sharded with an index, ``lm_head`` present or not).
* **finetune stage and the released models** ("whole" layout: HF Trainer's ``save_model``):
  ``model.safetensors``, or shards + ``model.safetensors.index.json`` (``pytorch_model*.bin`` with
  ``save_safetensors=False``) with keys ``language_model.model.*``, ``language_model.lm_head.weight``
  (absent when tied: safetensors keeps one name per storage), ``vision_tower._vision_tower.vision_model.*``
  and ``connector._connector.*`` (the modules of ``model/modeling_tinyllava.py``).

Transformers 5 drops SigLIP's ``vision_model.`` level; both spellings are accepted. The forward is
TinyLLaVA's ``VisionTower.forward`` + connector + LLM, which is exactly HF llava's with
``vision_feature_select_strategy`` ``default`` (``patch``: drop the first token, 728 at 384/14) or
``full`` (``cls_patch``: keep all 729). LoRA checkpoints (``adapter_config.json``) are refused:
merge them first.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ckd_common.model import (ModelLoadError, check_aspect_ratio, llava_config, num_visual_tokens, save_vlm)

# TinyLLaVA's strategy names (and ours) -> ours.
STRATEGIES = {"patch": "patch", "cls_patch": "full", "full": "full"}
CONNECTOR = {"_connector.0.weight": "model.multi_modal_projector.linear_1.weight",
             "_connector.0.bias": "model.multi_modal_projector.linear_1.bias",
             "_connector.2.weight": "model.multi_modal_projector.linear_2.weight",
             "_connector.2.bias": "model.multi_modal_projector.linear_2.bias"}
# The configs embedded in TinyLLaVA's config.json are diffs against transformers 4.40's defaults;
# these are those defaults (Qwen2Config / SiglipVisionConfig.__init__ of v4.40), so a newer
# transformers with other defaults cannot change the architecture read.
LEGACY_QWEN2_DEFAULTS = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, hidden_act="silu", max_position_embeddings=32768, initializer_range=0.02,
    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, use_sliding_window=False,
    sliding_window=4096, max_window_layers=28, attention_dropout=0.0)
LEGACY_SIGLIP_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0)
# Non-persistent buffers that older savers sometimes included; recomputed by the model, never needed.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq", "position_ids")
WHOLE_NAMES = ("language_model.model.*, language_model.lm_head.weight (untied heads only), "
               "vision_tower._vision_tower.vision_model.* (transformers 4) or vision_tower._vision_tower.* "
               "(transformers 5), connector._connector.{0,2}.{weight,bias}")
SPLIT_NAMES = {"language_model": "model.* and lm_head.weight (untied heads only)",
               "vision_tower": "vision_model.* (transformers 4) or embeddings.*/encoder.*/post_layernorm.*/head.* "
                               "(transformers 5)",
               "connector": "_connector.{0,2}.{weight,bias} (mlp2x_gelu)"}


@dataclass
class ConversionReport:
    src: Path
    dst: Path
    layout: str                 # 'split (pretrain stage)' | 'whole (finetune stage / released)'
    files: list[str]
    dtype: str
    tied: bool
    strategy: str               # ours: 'patch' (728 at 384/14) | 'full' (729)
    num_visual_tokens: int
    image_aspect_ratio: str
    template: str
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {self.src} -> {self.dst}",
                 f"  layout: {self.layout}; {len(self.files)} weight file(s): {', '.join(self.files)}",
                 f"  weights: {self.dtype}, lm_head {'tied to the embeddings' if self.tied else 'untied'}",
                 f"  vision: strategy {self.strategy} ({self.num_visual_tokens} visual tokens), "
                 f"image_aspect_ratio {self.image_aspect_ratio}",
                 f"  chat template: {self.template} (--template to change)"]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


# ---------------------------------------------------------------------------------------------
# files


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot read it as JSON ({e})") from None


def weight_files(d: Path) -> list[Path]:
    """The weight files of a directory: an index's shards, or the single file (safetensors first)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = d / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelLoadError(f"{index}: no 'weight_map' (expected {{parameter name: shard file}})")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (d / s).is_file()]
            if missing:
                raise ModelLoadError(f"{index} names shard(s) that are not there: {missing}; copy every shard "
                                     f"of the checkpoint")
            return [d / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (d / single).is_file():
            return [d / single]
    shards = sorted(d.glob("*.safetensors")) + sorted(d.glob("pytorch_model-*.bin"))
    if shards:
        raise ModelLoadError(f"{d}: shards {[s.name for s in shards]} without their index "
                             f"(model.safetensors.index.json / pytorch_model.bin.index.json); copy it too")
    raise ModelLoadError(f"{d}: no weights (model.safetensors, pytorch_model.bin, or shards with an index)")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:  # memory-mapped: the weights are read once, when the converted model is written
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # only the legacy (pre-zip) torch.save format cannot be mapped
                raise
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch/safetensors raise many types for broken files
        first = (str(e).strip().splitlines() or [""])[0]
        raise ModelLoadError(f"{path}: unreadable weight file ({type(e).__name__}: {first})") from None
    if not isinstance(sd, dict):
        raise ModelLoadError(f"{path}: expected a dict of named tensors, got {type(sd).__name__}")
    return sd


# ---------------------------------------------------------------------------------------------
# names: TinyLLaVA's -> ours (LlavaForConditionalGeneration of transformers 5)


def _lm(k: str) -> str | None:
    if k.startswith("model."):
        return "model.language_model." + k[len("model."):]
    return "lm_head.weight" if k == "lm_head.weight" else None


def _vision(k: str) -> str:
    return "model.vision_tower." + k.removeprefix("vision_model.")


def _connector(k: str) -> str | None:
    return CONNECTOR.get(k)


_WHOLE_PREFIXES = (("language_model.", _lm), ("vision_tower._vision_tower.", _vision), ("connector.", _connector))
_SPLIT_PARTS = {"language_model": _lm, "vision_tower": _vision, "connector": _connector}


def _map_whole(k: str) -> str | None:
    for prefix, fn in _WHOLE_PREFIXES:
        if k.startswith(prefix):
            return fn(k[len(prefix):])
    return None


def _display(target: str, layout: str) -> str:
    """Our parameter name in the source's naming, for messages."""
    inverse = {v: k for k, v in CONNECTOR.items()}
    if target.startswith("model.language_model."):
        k, part = "model." + target[len("model.language_model."):], "language_model"
    elif target == "lm_head.weight":
        k, part = target, "language_model"
    elif target.startswith("model.vision_tower."):
        k, part = "vision_model." + target[len("model.vision_tower."):], "vision_tower"
    else:
        k, part = inverse.get(target, target), "connector"
    if layout == "whole":
        return (part + "._vision_tower." if part == "vision_tower" else part + ".") + k
    return f"{part}/: {k}"


def _some(names, n: int = 6) -> str:
    names = sorted(names)
    return repr(names[:n])[:-1] + (f", ... ({len(names)} in all)]" if len(names) > n else "]")


# ---------------------------------------------------------------------------------------------
# configs


def _legacy(d: dict, defaults: dict) -> dict:
    return {**defaults, **{k: v for k, v in d.items() if k not in ("model_name_or_path", "model_name_or_path2")}}


def _text_config(src: Path, top: dict, split: bool):
    from transformers import Qwen2Config

    path = src / "language_model" / "config.json"
    where, d = (path, _read_json(path)) if split and path.is_file() else (src / "config.json", top.get("text_config"))
    if not isinstance(d, dict):
        raise ModelLoadError(f"{src / 'config.json'}: no 'text_config' (TinyLLaVA-Factory embeds the LLM's config)")
    if d.get("model_type") != "qwen2":
        raise ModelLoadError(f"{where}: the LLM is {d.get('model_type')!r}; only Qwen2/Qwen2.5 LLMs convert (the "
                             f"project's templates are Qwen2's)")
    return Qwen2Config(**_legacy(d, LEGACY_QWEN2_DEFAULTS))


def _vision_config(src: Path, top: dict, split: bool):
    from transformers import SiglipVisionConfig

    path = src / "vision_tower" / "config.json"
    where, d = (path, _read_json(path)) if split and path.is_file() else (src / "config.json", top.get("vision_config"))
    if isinstance(d, dict) and d.get("model_type") == "siglip":  # a full SigLIP config: take its vision half
        d = d.get("vision_config")
    if not isinstance(d, dict) or d.get("model_type") != "siglip_vision_model":
        found = d.get("model_type") if isinstance(d, dict) else None
        raise ModelLoadError(f"{where}: the vision tower is {found!r}; only SigLIP ('siglip_vision_model') converts")
    return SiglipVisionConfig(**_legacy(d, LEGACY_SIGLIP_VISION_DEFAULTS))


def _options(src: Path, top: dict) -> tuple[str, int, str]:
    cfg = src / "config.json"
    connector = top.get("connector_type")
    if connector != "mlp2x_gelu":
        raise ModelLoadError(f"{cfg}: connector_type {connector!r} does not convert; only 'mlp2x_gelu' (the "
                             f"LLaVA projector: Linear, GELU, Linear) has an HF llava equivalent")
    strategy = top.get("vision_feature_select_strategy", "patch")
    if strategy not in STRATEGIES:
        raise ModelLoadError(f"{cfg}: vision_feature_select_strategy {strategy!r} is unknown; expected 'patch' (drop "
                             f"the first token: 728 at 384/14), 'cls_patch' (keep all: 729) or our 'full'")
    layer = top.get("vision_feature_layer", -2)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ModelLoadError(f"{cfg}: vision_feature_layer {layer!r} must be one integer layer index")
    aspect = top.get("image_aspect_ratio") or "square"
    check_aspect_ratio(aspect, str(cfg))
    return STRATEGIES[strategy], layer, aspect


def _tokenizer(src: Path, top: dict):
    from transformers import AutoTokenizer

    from ckd_common.tokenizer import IMAGE_TOKEN

    tok_dir = next((d for d in (src, src / "language_model") if (d / "tokenizer_config.json").is_file()), None)
    if tok_dir is None:
        raise ModelLoadError(f"{src}: no tokenizer files (tokenizer_config.json with vocab.json/merges.txt or "
                             f"tokenizer.json) beside config.json; TinyLLaVA-Factory saves them there")
    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = top.get("pad_token") or tok.eos_token
    if IMAGE_TOKEN not in tok.get_vocab():
        # Qwen's tokenizer has no <image> (TinyLLaVA uses the id -200); its id lands among the unused
        # embedding rows (151,646 < 151,936).
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


# ---------------------------------------------------------------------------------------------
# conversion


def _layout(src: Path) -> str:
    split = all((src / p).is_dir() for p in _SPLIT_PARTS)
    whole = any(src.glob("*.safetensors")) or any(src.glob("pytorch_model*.bin")) or any(
        (src / f).is_file() for f in ("model.safetensors.index.json", "pytorch_model.bin.index.json"))
    if split and whole:
        raise ModelLoadError(f"{src} holds both the pretrain layout (language_model/, vision_tower/, connector/) and "
                             f"finetune weights (model.safetensors / pytorch_model.bin); keep one of them")
    if split:
        return "split"
    if whole:
        return "whole"
    partial = [p for p in _SPLIT_PARTS if (src / p).is_dir()]
    raise ModelLoadError(
        f"{src}: no TinyLLaVA-Factory weights: expected model.safetensors (or shards + model.safetensors.index.json, "
        f"or pytorch_model.bin) from the finetune stage, or language_model/, vision_tower/ and connector/ from the "
        f"pretrain stage" + (f" (only {partial} found)" if partial else ""))


def _collect(src: Path, layout: str, expected: dict[str, torch.Size]):
    """(state dict in our names, file of each key, weight files, notes); errors name the file and keys."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    files: list[Path] = []
    notes: list[str] = []
    parts = [(None, _map_whole, src)] if layout == "whole" else [(p, fn, src / p) for p, fn in _SPLIT_PARTS.items()]
    for part, fn, d in parts:
        for f in weight_files(d):
            files.append(f)
            unmatched, ignored = [], 0
            for k, v in read_weights(f).items():
                if k.endswith(_IGNORABLE_SUFFIXES):
                    ignored += 1
                    continue
                target = fn(k)
                if target is None or target not in expected:
                    unmatched.append(k)
                    continue
                if target in out:
                    raise ModelLoadError(f"{f}: {k!r} names the same parameter as a weight of {origin[target]} "
                                         f"({_display(target, layout)}); mixed naming, keep one copy")
                if tuple(v.shape) != tuple(expected[target]):
                    raise ModelLoadError(f"{f}: {k} has shape {tuple(v.shape)}, but the config "
                                         f"({src / 'config.json'}) implies {tuple(expected[target])}")
                out[target], origin[target] = v, f
            if unmatched:
                names = WHOLE_NAMES if part is None else SPLIT_NAMES[part]
                raise ModelLoadError(f"{f}: {len(unmatched)} weight(s) match no parameter of the model its config "
                                     f"describes: {_some(unmatched)}; expected {names}")
            if ignored:
                notes.append(f"{f.name}: {ignored} non-persistent buffer(s) (rotary inv_freq / position_ids) ignored")
    return out, origin, files, notes


def _common_dtype(sd: dict[str, torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in sd.values() if t.is_floating_point()}
    if not dtypes:
        raise ModelLoadError("no floating-point weights found")
    if len(dtypes) == 1:
        return dtypes.pop()
    return torch.float32  # mixed (e.g. an fp32 vision tower next to a bf16 LLM): lossless


def convert_tinyllava(src: str | os.PathLike, dst: str | os.PathLike, template: str | None = None,
                      progress: bool = False) -> ConversionReport:
    """Convert the TinyLLaVA-Factory checkpoint ``src`` into an HF llava directory ``dst`` (written
    atomically: a temporary sibling renamed at the end). ``template`` (default ``qwen2_base``, what
    TinyLLaVA's Qwen2 finetune stage and its released models use) becomes the chat template."""
    from transformers import LlavaForConditionalGeneration

    from ckd_common.templates import QWEN2_BASE, get_template

    src, dst = Path(src), Path(dst)
    template = get_template(template or QWEN2_BASE).name
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"not a TinyLLaVA-Factory checkpoint: {cfg_path} missing")
    top = _read_json(cfg_path)
    if top.get("model_type") != "tinyllava":
        raise ModelLoadError(f"not a TinyLLaVA-Factory checkpoint: {cfg_path} has model_type "
                             f"{top.get('model_type')!r}, expected 'tinyllava'")
    if (src / "adapter_config.json").is_file():
        raise ModelLoadError(f"{src} is a LoRA/QLoRA checkpoint (adapter_config.json): merge the adapters into the "
                             f"weights first (TinyLLaVA-Factory's load_pretrained_model merges them; save the merged "
                             f"model with save_pretrained) and convert that")
    if dst.exists() and any(dst.iterdir()):
        raise ModelLoadError(f"{dst} exists and is not empty; remove it or choose another --out")
    layout = _layout(src)
    strategy, layer, aspect = _options(src, top)
    text_cfg = _text_config(src, top, layout == "split")
    vision_cfg = _vision_config(src, top, layout == "split")
    cfg = llava_config(vision_cfg, text_cfg, strategy, 0, aspect_ratio=aspect, vision_feature_layer=layer)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in LlavaForConditionalGeneration(cfg).state_dict().items()}
    if progress:
        print(f"ckd model convert: reading {src} ({layout} layout)", flush=True)
    sd, origin, files, notes = _collect(src, layout, expected)

    # The SigLIP pooling head is unused by llava (features come from a hidden layer); TinyLLaVA's
    # checkpoints carry it. Without it, build the tower without one rather than leave it random.
    if not any(k.startswith("model.vision_tower.head.") for k in sd):
        cfg.vision_config.vision_use_head = False
        expected = {k: v for k, v in expected.items() if not k.startswith("model.vision_tower.head.")}
    tied = bool(text_cfg.tie_word_embeddings)
    emb = "model.language_model.embed_tokens.weight"
    if tied:
        head = sd.pop("lm_head.weight", None)
        if head is not None and emb in sd and not torch.equal(head, sd[emb]):
            notes.append(f"{origin['lm_head.weight'].name}: lm_head.weight differs from the embeddings but "
                         f"tie_word_embeddings is true, so (as in transformers) the embeddings are the head")
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sd))
    if missing:
        shown = [_display(k, layout) for k in missing]
        raise ModelLoadError(f"{src}: {len(missing)} parameter(s) of the model config.json describes are not in "
                             f"{[f.name for f in files]}: {_some(shown)}"
                             + ("; tie_word_embeddings is false, so the LLM needs its own lm_head.weight"
                                if "lm_head.weight" in missing else ""))

    from ckd_common.tokenizer import IMAGE_TOKEN

    tok = _tokenizer(src, top)
    cfg.image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if cfg.image_token_id >= text_cfg.vocab_size:
        raise ModelLoadError(f"<image> would get id {cfg.image_token_id} >= the LLM's vocab {text_cfg.vocab_size}")
    dtype = _common_dtype(sd)
    sd = {k: (v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v) for k, v in sd.items()}
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    model.load_state_dict(sd, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # a bug here, not a user problem: never save garbage
        raise ModelLoadError(f"internal error: parameters left unset after conversion: {left[:5]}")
    model.config.dtype = dtype
    model.config.text_config.dtype = dtype
    model.config.vision_config.dtype = dtype

    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_vlm(model, tok, tmp, template)
        if dst.exists():
            dst.rmdir()  # checked empty above
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ConversionReport(src, dst, "split (pretrain stage)" if layout == "split" else
                            "whole (finetune stage / released model)",
                            [str(f.relative_to(src)) for f in files], str(dtype).removeprefix("torch."), tied,
                            strategy, num_visual_tokens(cfg), aspect, template, notes)
