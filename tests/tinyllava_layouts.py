"""Writers of TinyLLaVA-Factory checkpoints exactly as its code lays them out (transformers 4.40),
for the conversion tests and bench/convert_tinyllava.py. Not a test module.

From TinyLLaVA-Factory (github.com/TinyLLaVA/TinyLLaVA_Factory):
- ``tinyllava/training_recipe/base.py`` ``BaseTrainingRecipe.save``: tokenizer + ``config.json`` in the
  output dir always; then either ``trainer.save_model`` (finetune stage: ``model.safetensors`` of the
  whole ``TinyLlavaForConditionalGeneration``) or, for the pretrain stage, ``torch.save`` of
  ``language_model.named_parameters()`` / ``vision_tower._vision_tower.named_parameters()`` /
  ``connector.named_parameters()`` into ``language_model/``, ``vision_tower/``, ``connector/``
  (``pytorch_model.bin``) with the text and vision configs beside the first two.
- ``tinyllava/model/modeling_tinyllava.py``: the module names ``language_model``,
  ``vision_tower._vision_tower``, ``connector._connector`` (an ``nn.Sequential`` Linear, GELU, Linear).
- ``tinyllava/model/configuration_tinyllava.py``: the top config's fields; a released model's
  config.json (TinyLLaVA-Qwen2-0.5B-SigLIP) for what is embedded and how.
Transformers 4.40's SigLIP names its parameters ``vision_model.*``; transformers 5 drops that level.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# The released TinyLLaVA-Qwen2.5-0.5B-SigLIP geometry, and a tiny one with the same vision input
# (384 px, patch 14: 729 patches) for logits-parity tests.
REAL_TEXT = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, max_position_embeddings=32768, max_window_layers=24)
REAL_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   image_size=384, patch_size=14)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, max_window_layers=2)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=384, patch_size=14)
QWEN_VOCAB = 151936


@dataclass
class Source:
    """What a TinyLLaVA checkpoint holds, in memory: the three parts and their configs."""

    llm: nn.Module            # Qwen2ForCausalLM
    vision: nn.Module         # SiglipVisionModel
    connector: nn.Sequential  # Linear, GELU, Linear
    text_config_json: dict    # as TinyLLaVA embeds it (a diff against transformers 4.40's defaults)
    vision_config_json: dict
    tied: bool


def make_source(text: dict = TINY_TEXT, vision: dict = TINY_VISION, tied: bool = True, seed: int = 0,
                vocab: int = QWEN_VOCAB) -> Source:
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    text_json = {"_name_or_path": "Qwen/Qwen2.5-0.5B", "architectures": ["Qwen2ForCausalLM"],
                 "bos_token_id": 151643, "eos_token_id": 151643, "model_type": "qwen2", "rope_theta": 1000000.0,
                 "sliding_window": 32768, "tie_word_embeddings": tied, "torch_dtype": "bfloat16",
                 "use_sliding_window": False, "vocab_size": vocab, **text}
    vision_json = {"model_name_or_path": "google/siglip-so400m-patch14-384", "model_name_or_path2": "",
                   "model_type": "siglip_vision_model", **vision}
    torch.manual_seed(seed)
    # rms_norm_eps 1e-6 and hidden_act silu are transformers 4.40's defaults, hence absent above
    llm = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in text_json.items() if not k.startswith("_")},
                                       rms_norm_eps=1e-6))
    if not tied:
        with torch.no_grad():  # a distinct head
            llm.lm_head.weight.normal_(0, 0.02)
    vis = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in vision_json.items()
                                                  if not k.startswith("model_name")}))
    h_v, h_t = vision["hidden_size"], text["hidden_size"]
    connector = nn.Sequential(nn.Linear(h_v, h_t), nn.GELU(), nn.Linear(h_t, h_t))
    for m in (llm, vis, connector):
        m.eval()
    with torch.no_grad():  # visible biases/norms, so a mix-up of any weight shows in the logits
        for m in (vis, connector):
            for name, p in m.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.normal_(0, 0.1)
    return Source(llm, vis, connector, text_json, vision_json, tied)


def _llm_params(src: Source) -> dict[str, torch.Tensor]:
    """``named_parameters()`` of the Qwen2ForCausalLM: a tied lm_head is deduplicated away."""
    return {k: v.detach() for k, v in src.llm.named_parameters()}


def _vision_params(src: Source, names: str) -> dict[str, torch.Tensor]:
    prefix = "vision_model." if names == "tf4" else ""
    return {prefix + k: v.detach() for k, v in src.vision.named_parameters()}


def _connector_params(src: Source) -> dict[str, torch.Tensor]:
    return {"_connector." + k: v.detach() for k, v in src.connector.named_parameters()}


def top_config(src: Source, strategy: str = "patch", aspect: str = "square", connector: str = "mlp2x_gelu",
               layer: int = -2) -> dict:
    """The TinyLlavaConfig's config.json (fields as configuration_tinyllava.py writes them)."""
    return {"architectures": ["TinyLlavaForConditionalGeneration"], "cache_dir": None, "connector_type": connector,
            "hidden_size": src.text_config_json["hidden_size"], "ignore_index": -100, "image_aspect_ratio": aspect,
            "image_token_index": -200, "llm_model_name_or_path": "Qwen/Qwen2.5-0.5B", "model_type": "tinyllava",
            "num_queries": 128, "num_resampler_layers": 3, "pad_token": "<|endoftext|>", "pad_token_id": 151643,
            "resampler_hidden_size": 768, "text_config": src.text_config_json, "tokenizer_model_max_length": 2048,
            "tokenizer_name_or_path": "Qwen/Qwen2.5-0.5B", "tokenizer_padding_side": "right",
            "tokenizer_use_fast": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
            "tune_type_connector": "full", "tune_type_llm": "full", "tune_type_vision_tower": "frozen",
            "tune_vision_tower_from_layer": 0, "use_cache": True, "vision_config": src.vision_config_json,
            "vision_feature_layer": layer, "vision_feature_select_strategy": strategy,
            "vision_hidden_size": src.vision_config_json["hidden_size"],
            "vision_model_name_or_path": "google/siglip-so400m-patch14-384", "vision_model_name_or_path2": "",
            "vocab_size": src.text_config_json["vocab_size"]}


def _cast(sd: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def _save_tensors(sd: dict, d: Path, fmt: str, shards: int, stem: str = "model") -> None:
    """safetensors or torch .bin, one file or ``shards`` files + the HF index."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    base = "model" if fmt == "safetensors" else "pytorch_model"

    def write(part: dict, path: Path) -> None:
        if fmt == "safetensors":
            save_file(part, str(path), metadata={"format": "pt"})
        else:
            torch.save(part, path)

    if shards == 1:
        write(sd, d / f"{base}.{ext}")
        return
    keys = list(sd)
    per = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"{base}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: sd[k] for k in keys[i * per:(i + 1) * per]}
        write(part, d / name)
        for k, v in part.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    (d / f"{base}.{ext}.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                            "weight_map": weight_map}, indent=2))


def write_finetune(src: Source, out: Path, tokenizer_dir: Path, *, dtype=torch.bfloat16, names: str = "tf4",
                   fmt: str = "safetensors", shards: int = 1, lm_head_in_file: bool | None = None,
                   **top) -> Path:
    """The finetune-stage / released layout: HF Trainer.save_model of the whole model. With
    safetensors a tied lm_head is dropped (one name per storage); torch .bin keeps both names."""
    sd = {"language_model." + k: v for k, v in _llm_params(src).items()}
    keep_head = (not src.tied) or (fmt == "bin") if lm_head_in_file is None else lm_head_in_file
    sd.pop("language_model.lm_head.weight", None)  # named_parameters() has it only when untied
    if keep_head:
        sd["language_model.lm_head.weight"] = src.llm.lm_head.weight.detach()
    sd.update({"vision_tower._vision_tower." + k: v for k, v in _vision_params(src, names).items()})
    sd.update({"connector." + k: v for k, v in _connector_params(src).items()})
    _save_tensors(_cast(sd, dtype), out, fmt, shards)
    _write_common(src, out, tokenizer_dir, top)
    return out


def write_pretrain(src: Source, out: Path, tokenizer_dir: Path, *, dtype=torch.float32, names: str = "tf4",
                   llm_as_hf_dir: bool = False, **top) -> Path:
    """The pretrain-stage layout: language_model/, vision_tower/, connector/ (torch.save of
    named_parameters()), configs beside the first two. ``llm_as_hf_dir``: language_model/ as an HF
    directory instead (sharded model.safetensors + index)."""
    lm = _cast(_llm_params(src), dtype)  # lm_head.weight only when untied
    if llm_as_hf_dir:
        _save_tensors(lm, out / "language_model", "safetensors", 2)
    else:
        (out / "language_model").mkdir(parents=True)
        torch.save(lm, out / "language_model" / "pytorch_model.bin")
    (out / "language_model" / "config.json").write_text(json.dumps(src.text_config_json, indent=2))
    (out / "vision_tower").mkdir()
    torch.save(_cast(_vision_params(src, names), dtype), out / "vision_tower" / "pytorch_model.bin")
    vcfg = {k: v for k, v in src.vision_config_json.items() if not k.startswith("model_name")}
    (out / "vision_tower" / "config.json").write_text(json.dumps({"architectures": ["SiglipVisionModel"], **vcfg}))
    (out / "connector").mkdir()
    torch.save(_cast(_connector_params(src), dtype), out / "connector" / "pytorch_model.bin")
    _write_common(src, out, tokenizer_dir, top)
    return out


def _write_common(src: Source, out: Path, tokenizer_dir: Path, top: dict) -> None:
    import shutil

    (out / "config.json").write_text(json.dumps(top_config(src, **top), indent=2))
    for f in tokenizer_dir.iterdir():  # model.tokenizer.save_pretrained(output_dir): the slow Qwen2 files
        shutil.copy(f, out / f.name)


def reference_logits(src: Source, ids: torch.Tensor, image_pos: int, pixels: torch.Tensor, strategy: str,
                     dtype=torch.float32, layer: int = -2) -> torch.Tensor:
    """TinyLLaVA-Factory's forward, written out: SigLIP hidden state ``layer`` (``patch``: minus its
    first token), the connector, spliced in place of the one image token, the LLM. Weights are
    rounded through ``dtype`` as the checkpoint stores them, computed in fp32."""
    def r(m: nn.Module) -> nn.Module:
        import copy

        m = copy.deepcopy(m)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.to(dtype).float())
        return m.float().eval()

    llm, vis, con = r(src.llm), r(src.vision), r(src.connector)
    if src.tied:
        llm.lm_head.weight = llm.model.embed_tokens.weight
    with torch.no_grad():
        feats = vis(pixels, output_hidden_states=True).hidden_states[layer]
        if strategy == "patch":
            feats = feats[:, 1:]
        feats = con(feats)
        emb = llm.model.embed_tokens(ids)
        emb = torch.cat([emb[:, :image_pos], feats, emb[:, image_pos + 1:]], dim=1)
        return llm(inputs_embeds=emb).logits
