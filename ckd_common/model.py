"""The VLM: stock transformers ``LlavaForConditionalGeneration`` = SigLIP vision tower (features
from layer -2) + mlp2x_gelu connector + Qwen2 LLM (DESIGN.md §2).

Loading is offline from local directories only:
- an HF llava directory (``load_vlm``);
- a TinyLLaVA-Factory checkpoint, converted to the HF layout (``convert_tinyllava``);
- a vision tower directory + an LLM directory + a fresh connector (``compose_vlm``);
- tiny random presets for tests and the demo (``init_preset``).
Weights are read with safetensors or ``torch.load(weights_only=True)``, never unpickled code.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Our names for the vision feature strategy -> transformers' names. 'patch' drops SigLIP's first
# token as TinyLLaVA/LLaVA-KD checkpoints do (728 tokens at 384/14); 'full' keeps all (729).
STRATEGY_TO_HF = {"full": "full", "patch": "default"}
HF_TO_STRATEGY = {v: k for k, v in STRATEGY_TO_HF.items()}


class ModelLoadError(RuntimeError):
    """A model directory is missing, of the wrong layout, or inconsistent (message says which)."""


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


# Tiny presets grow in LLM width/depth and share tokenizer, vision config and visual-token count,
# so distilling between them is meaningful.
PRESETS = {
    "tiny-student": Preset(64, 2, 4, 2, 128),
    "tiny-ta": Preset(96, 3, 4, 2, 192),
    "tiny-teacher": Preset(128, 4, 4, 2, 256),
}
# 28 px / patch 14: a 2x2 grid of visual tokens, one per cell of the synthetic scenes. One layer,
# features from layer -2 = the patch embeddings: a random but linear (so decodable) view of each
# cell's pixels, which the tiny models can learn to read in minutes on a CPU.
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                   image_size=28, patch_size=14)
TINY_VOCAB = 512
VISION_SEED = 1729  # every tiny preset gets the same vision tower weights (a shared frozen SigLIP)


def hf_strategy(strategy: str) -> str:
    if strategy not in STRATEGY_TO_HF:
        raise ValueError(f"unknown vision feature strategy {strategy!r}; choose 'full' or 'patch'")
    return STRATEGY_TO_HF[strategy]


def vision_strategy(config) -> str:
    """Our strategy name ('full' | 'patch') of a LlavaConfig."""
    return HF_TO_STRATEGY[config.vision_feature_select_strategy]


def num_visual_tokens(config) -> int:
    """Visual tokens per image for a LlavaConfig: (image/patch)^2, minus one for 'patch'."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n - 1 if config.vision_feature_select_strategy == "default" else n


# ---------------------------------------------------------------------------------------------
# building


def _llava_config(vision_config, text_config, strategy: str, image_token_id: int):
    from transformers import LlavaConfig

    cfg = LlavaConfig(
        vision_config=vision_config, text_config=text_config,
        vision_feature_layer=-2, vision_feature_select_strategy=hf_strategy(strategy),
        projector_hidden_act="gelu", image_token_index=image_token_id,
        multimodal_projector_bias=True,
    )
    cfg.image_seq_length = num_visual_tokens(cfg)
    return cfg


def _processor(tokenizer, vision_config, strategy: str):
    from transformers import LlavaProcessor, SiglipImageProcessor

    size = vision_config.image_size
    image_processor = SiglipImageProcessor(
        size={"height": size, "width": size}, resample=3, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=vision_config.patch_size,
                          vision_feature_select_strategy=hf_strategy(strategy),
                          image_token="<image>", num_additional_image_tokens=0)


def _save(model, tokenizer, out_dir: Path, strategy: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    _processor(tokenizer, model.config.vision_config, strategy).save_pretrained(str(out_dir))


def init_preset(preset: str, out_dir: str | Path, strategy: str = "full", seed: int = 0):
    """Write a random-initialised tiny llava checkpoint + tokenizer + processor to ``out_dir``."""
    from transformers import LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig, SiglipVisionModel

    from ckd_common.synth import tokenizer_corpus
    from ckd_common.tokenizer import IMAGE_TOKEN, save_tiny_tokenizer

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    out = Path(out_dir)
    p = PRESETS[preset]
    tok = save_tiny_tokenizer(out, tokenizer_corpus(), vocab_size=TINY_VOCAB - 16)
    vocab = TINY_VOCAB  # padded beyond len(tokenizer), like Qwen's 151,936 > 151,665
    text = Qwen2Config(vocab_size=vocab, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                       num_hidden_layers=p.num_hidden_layers, num_attention_heads=p.num_attention_heads,
                       num_key_value_heads=p.num_key_value_heads, max_position_embeddings=4096,
                       tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1e6,
                       bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = SiglipVisionConfig(**TINY_VISION)
    cfg = _llava_config(vision, text, strategy, tok.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    torch.manual_seed(VISION_SEED)
    model.model.vision_tower.load_state_dict(SiglipVisionModel(vision).state_dict())
    _save(model, tok, out, strategy)
    return out


# ---------------------------------------------------------------------------------------------
# loading


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _find_weights(d: Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory's weight files (single or sharded, safetensors or .bin)."""
    files = sorted(d.glob("*.safetensors")) or sorted(d.glob("pytorch_model*.bin"))
    if not files:
        raise ModelLoadError(f"no weights (*.safetensors or pytorch_model*.bin) in {d}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(_read_state_dict(f))
    return sd


def is_tinyllava_dir(d: str | Path) -> bool:
    d = Path(d)
    return (d / "language_model").is_dir() and (d / "connector").is_dir() and (d / "vision_tower").is_dir()


def load_vlm(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load (model, tokenizer) from an HF llava directory, offline."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise ModelLoadError(f"{d} is not a model directory (no config.json)")
    if is_tinyllava_dir(d):
        raise ModelLoadError(f"{d} is a TinyLLaVA-Factory checkpoint; convert it first: "
                             f"ckd model convert --tinyllava {d} --out DIR")
    model_type = json.loads((d / "config.json").read_text()).get("model_type")
    if model_type != "llava":
        raise ModelLoadError(f"{d}: model_type is {model_type!r}, expected 'llava' "
                             f"(use 'ckd model compose' to build one from a vision tower and an LLM)")
    model = LlavaForConditionalGeneration.from_pretrained(str(d), dtype=dtype, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    return model.to(device), tok


def lm_head_weight(model) -> torch.Tensor:
    return model.get_output_embeddings().weight


def convert_tinyllava(src: str | Path, dst: str | Path):
    """Convert a TinyLLaVA-Factory checkpoint directory into the HF llava layout in ``dst``."""
    from transformers import (AutoConfig, AutoTokenizer, LlavaForConditionalGeneration,
                              SiglipVisionConfig)

    from ckd_common.tokenizer import IMAGE_TOKEN

    src, dst = Path(src), Path(dst)
    problems = [f"{src / p} missing" for p in ("config.json", "language_model", "vision_tower", "connector")
                if not (src / p).exists()]
    if problems:
        raise ModelLoadError("not a TinyLLaVA-Factory checkpoint: " + "; ".join(problems))
    top = json.loads((src / "config.json").read_text())
    strategy = top.get("vision_feature_select_strategy", "patch")
    if strategy not in STRATEGY_TO_HF:
        raise ModelLoadError(f"{src}/config.json: vision_feature_select_strategy {strategy!r} is not 'patch' or 'full'")
    layer = top.get("vision_feature_layer", -2)
    if layer != -2:
        raise ModelLoadError(f"{src}/config.json: vision_feature_layer {layer} unsupported (only -2)")
    connector = top.get("connector_type", "mlp2x_gelu")
    if connector != "mlp2x_gelu":
        raise ModelLoadError(f"{src}/config.json: connector_type {connector!r} unsupported (only mlp2x_gelu)")

    text_cfg = AutoConfig.from_pretrained(str(src / "language_model"), local_files_only=True)
    vision_cfg = SiglipVisionConfig.from_pretrained(str(src / "vision_tower"), local_files_only=True)
    tok_dir = src if (src / "tokenizer_config.json").exists() else src / "language_model"
    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    if IMAGE_TOKEN not in tok.get_vocab():
        # Qwen's tokenizer has no <image>; its id lands among the unused embedding rows.
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id >= text_cfg.vocab_size:
        raise ModelLoadError(f"<image> would get id {image_token_id} >= the LLM's vocab {text_cfg.vocab_size}")

    cfg = _llava_config(vision_cfg, text_cfg, strategy, image_token_id)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    model = model.to_empty(device="cpu")

    lm = _find_weights(src / "language_model")
    emb_key = "model.embed_tokens.weight"
    if "lm_head.weight" not in lm:  # tied (Qwen2.5 <= 3B): named_parameters() dropped it
        lm["lm_head.weight"] = lm[emb_key]
    body = {k[len("model."):]: v for k, v in lm.items() if k.startswith("model.")}
    _load_exact(model.model.language_model, body, "language_model")
    _load_exact(model.lm_head, {"weight": lm["lm_head.weight"]}, "lm_head")
    vis = _find_weights(src / "vision_tower")
    vis = {k.removeprefix("_vision_tower."): v for k, v in vis.items()}
    _load_exact(model.model.vision_tower, vis, "vision_tower", allow_missing=("head.",))
    con = _find_weights(src / "connector")
    mapping = {"_connector.0.weight": "linear_1.weight", "_connector.0.bias": "linear_1.bias",
               "_connector.2.weight": "linear_2.weight", "_connector.2.bias": "linear_2.bias"}
    unknown = sorted(set(con) - set(mapping))
    if unknown:
        raise ModelLoadError(f"connector weights have unexpected keys {unknown}; expected {sorted(mapping)}")
    _load_exact(model.model.multi_modal_projector, {mapping[k]: v for k, v in con.items()}, "connector")
    _save(model, tok, dst, strategy)
    return dst


def _load_exact(module: torch.nn.Module, sd: dict, what: str, allow_missing: tuple[str, ...] = ()) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(allow_missing)
               and not k.endswith("position_ids")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise ModelLoadError(f"{what}: weights do not match the config: missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise ModelLoadError(f"{what}: {k} has shape {tuple(v.shape)}, config expects {tuple(own[k].shape)}")
    module.load_state_dict(sd, strict=False, assign=True)


def compose_vlm(vision_dir: str | Path, llm_dir: str | Path, out_dir: str | Path, strategy: str = "full",
                seed: int = 0):
    """A student to start DPT from: a SigLIP vision tower + a Qwen2 LLM + a fresh random connector."""
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration,
                              SiglipVisionConfig, SiglipVisionModel)

    from ckd_common.tokenizer import IMAGE_TOKEN

    vcfg_raw = AutoConfig.from_pretrained(str(vision_dir), local_files_only=True)
    vcfg = getattr(vcfg_raw, "vision_config", vcfg_raw)  # a full SigLIP dir holds text + vision
    if not isinstance(vcfg, SiglipVisionConfig):
        raise ModelLoadError(f"{vision_dir}: expected a SigLIP vision model, got {type(vcfg).__name__}")
    tok = AutoTokenizer.from_pretrained(str(llm_dir), local_files_only=True)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    llm = AutoModelForCausalLM.from_pretrained(str(llm_dir), local_files_only=True, dtype=torch.float32)
    vision = SiglipVisionModel.from_pretrained(str(vision_dir), config=vcfg, local_files_only=True,
                                               dtype=torch.float32)
    cfg = _llava_config(vcfg, llm.config, strategy, tok.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(llm.model.state_dict())
    model.lm_head.load_state_dict(llm.lm_head.state_dict())
    _save(model, tok, Path(out_dir), strategy)
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------
# fingerprints


@dataclass(frozen=True)
class ModelInfo:
    """What server, cache and trainer must agree on about a model (DESIGN.md §2-§3)."""

    fingerprint: str
    tokenizer_hash: str
    vocab_size: int            # rows of the lm_head
    tokenizer_vocab_size: int  # real tokens; targets never hold ids beyond the common vocabulary
    hidden_size: int
    num_visual_tokens: int
    vision_strategy: str
    image_size: int
    image_token_id: int

    @property
    def common_vocab(self) -> int:
        """Ids a distillation target may hold: [0, min(lm_head rows, real tokens)) (DESIGN §2).

        The one owner of this rule: servers, fills, caches and the trainer all read it here."""
        return min(self.vocab_size, self.tokenizer_vocab_size)

    def to_dict(self) -> dict:
        return asdict(self)


_IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures",
                        "use_cache", "output_hidden_states", "output_attentions", "return_dict"}


def _canonical_config(cfg) -> dict:
    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in sorted(obj.items()) if k not in _IGNORED_CONFIG_KEYS}
        return obj
    return clean(cfg.to_dict())


def model_fingerprint(model) -> str:
    """sha256 over the architecture config and every weight's bytes (name, dtype, shape, data)."""
    h = hashlib.sha256()
    h.update(json.dumps(_canonical_config(model.config), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def model_info(model, tokenizer) -> ModelInfo:
    from ckd_common.tokenizer import tokenizer_hash

    cfg = model.config
    return ModelInfo(
        fingerprint=model_fingerprint(model),
        tokenizer_hash=tokenizer_hash(tokenizer),
        vocab_size=int(lm_head_weight(model).shape[0]),
        tokenizer_vocab_size=len(tokenizer),
        hidden_size=int(cfg.text_config.hidden_size),
        num_visual_tokens=num_visual_tokens(cfg),
        vision_strategy=vision_strategy(cfg),
        image_size=int(cfg.vision_config.image_size),
        image_token_id=int(cfg.image_token_id),
    )


def describe(model_dir: str | os.PathLike) -> str:
    model, tok = load_vlm(model_dir)
    info = model_info(model, tok)
    n = sum(p.numel() for p in model.parameters())
    return f"{model_dir}: {n / 1e6:.2f}M params, " + ", ".join(f"{k}={v}" for k, v in info.to_dict().items())


def quiet_transformers() -> None:
    """For command-line entry points: transformers' per-load progress bars and the
    'torchvision not installed, using the PIL image processor' notice drown our own output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
