"""The VLM: stock transformers ``LlavaForConditionalGeneration`` = SigLIP vision tower (features
from layer -2) + mlp2x_gelu connector + Qwen2 LLM (docs/design.md §2).

Loading is offline from local directories only:
- an HF llava directory (``load_vlm``);
- a TinyLLaVA-Factory checkpoint, converted to the HF layout (``convert_tinyllava``, in
  ``ckd_common.tinyllava``);
- a vision tower directory + an LLM directory + a fresh connector (``compose_vlm``);
- tiny random presets for tests and the demo (``init_preset``).
Weights are read with safetensors or ``torch.load(weights_only=True)``, never unpickled code.

Every checkpoint is written by :func:`save_vlm`: besides weights and tokenizer it records what the
model was trained with, so stock tools use it as we do — the image preprocessing
(``image_aspect_ratio``: ``square`` | ``pad``, in config.json and the saved image processor), the
conversation template (``ckd_template`` in config.json; its Jinja chat template on tokenizer and
processor) and the stop token (generation_config.json's ``eos_token_id``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ckd_common.templates import QWEN2_BASE

# Our names for the vision feature strategy -> transformers' names. 'patch' drops SigLIP's first
# token as TinyLLaVA/LLaVA-KD checkpoints do (728 tokens at 384/14); 'full' keeps all (729).
STRATEGY_TO_HF = {"full": "full", "patch": "default"}
HF_TO_STRATEGY = {v: k for k, v in STRATEGY_TO_HF.items()}
# Image preprocessing before the SigLIP resize (LLaVA's / TinyLLaVA's ``image_aspect_ratio``):
# 'square' resizes the image as it is; 'pad' first expands it to a square filled with the image
# processor's mean colour (LLaVA-1.5's expand2square). ckd_common.data.preprocess_image owns it.
IMAGE_ASPECT_RATIOS = ("square", "pad")
DEFAULT_ASPECT_RATIO = "square"  # what every checkpoint without the field was trained with here
TEMPLATE_CONFIG_KEY = "ckd_template"  # config.json: the conversation template the model was trained with
# SigLIP's processor constants (docs/design.md §2): 0.5 mean/std, bicubic; the pad colour is int(0.5*255).
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


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


def check_aspect_ratio(value: str, where: str = "image_aspect_ratio") -> str:
    if value not in IMAGE_ASPECT_RATIOS:
        raise ModelLoadError(f"{where}: image_aspect_ratio {value!r} is not supported; "
                             f"choose one of {list(IMAGE_ASPECT_RATIOS)}")
    return value


def image_aspect_ratio(config) -> str:
    """The image preprocessing a LlavaConfig was trained with ('square' when not recorded)."""
    return getattr(config, "image_aspect_ratio", None) or DEFAULT_ASPECT_RATIO


def model_template(config) -> str | None:
    """The conversation template recorded in a checkpoint's config (None for other checkpoints)."""
    return getattr(config, TEMPLATE_CONFIG_KEY, None)


def num_visual_tokens(config) -> int:
    """Visual tokens per image for a LlavaConfig: (image/patch)^2, minus one for 'patch'."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n - 1 if config.vision_feature_select_strategy == "default" else n


# ---------------------------------------------------------------------------------------------
# building


def llava_config(vision_config, text_config, strategy: str, image_token_id: int, *,
                 aspect_ratio: str = DEFAULT_ASPECT_RATIO, vision_feature_layer: int = -2):
    from transformers import LlavaConfig

    cfg = LlavaConfig(
        vision_config=vision_config, text_config=text_config,
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=hf_strategy(strategy),
        projector_hidden_act="gelu", image_token_index=image_token_id,
        multimodal_projector_bias=True,
    )
    cfg.image_seq_length = num_visual_tokens(cfg)
    cfg.image_aspect_ratio = check_aspect_ratio(aspect_ratio)
    return cfg


def _image_processor(size: int, aspect_ratio: str):
    """The stock image processor doing what ckd_common.data.preprocess_image does (PIL backend,
    the one our parity tests cover): SigLIP's for 'square', LLaVA's with do_pad for 'pad'."""
    from transformers import LlavaImageProcessorPil, SiglipImageProcessorPil

    common = dict(size={"height": size, "width": size}, resample=3, do_resize=True, do_rescale=True,
                  rescale_factor=1 / 255, do_normalize=True, image_mean=list(SIGLIP_MEAN),
                  image_std=list(SIGLIP_STD))
    if check_aspect_ratio(aspect_ratio) == "pad":
        return LlavaImageProcessorPil(do_pad=True, do_center_crop=False, do_convert_rgb=True, **common)
    return SiglipImageProcessorPil(**common)


def _processor(tokenizer, config, template: str):
    from transformers import LlavaProcessor

    from ckd_common.templates import get_template

    vc = config.vision_config
    return LlavaProcessor(image_processor=_image_processor(vc.image_size, image_aspect_ratio(config)),
                          tokenizer=tokenizer, patch_size=vc.patch_size,
                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                          image_token="<image>", num_additional_image_tokens=0,
                          chat_template=get_template(template).chat_template)


def save_vlm(model, tokenizer, out_dir: str | Path, template: str) -> Path:
    """Write a llava checkpoint that stock transformers uses exactly as this project does.

    ``template`` is the conversation template the model was trained with (``ckd_common.templates``):
    it goes into config.json (``ckd_template``), becomes the chat template of the tokenizer and the
    processor, and its stop token becomes generation_config's ``eos_token_id`` (so ``generate``
    stops at ``<|endoftext|>`` even when the tokenizer's own eos is ``<|im_end|>``). The image
    preprocessing (config ``image_aspect_ratio``) selects the saved image processor."""
    from ckd_common.templates import get_template

    tpl = get_template(template)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    check_aspect_ratio(image_aspect_ratio(cfg), f"{out}: config")
    cfg.image_aspect_ratio = image_aspect_ratio(cfg)
    setattr(cfg, TEMPLATE_CONFIG_KEY, tpl.name)
    stop_id = tokenizer.convert_tokens_to_ids(tpl.stop_token)
    if stop_id is None or stop_id == tokenizer.unk_token_id:
        raise ModelLoadError(f"the tokenizer has no {tpl.stop_token!r} token, which ends every answer of "
                             f"template {tpl.name!r}")
    gen = model.generation_config
    gen.eos_token_id = int(stop_id)
    gen.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_id)
    gen.bos_token_id = None
    model.save_pretrained(str(out))
    previous = tokenizer.chat_template
    tokenizer.chat_template = tpl.chat_template
    try:
        tokenizer.save_pretrained(str(out))
        _processor(tokenizer, cfg, tpl.name).save_pretrained(str(out))
    finally:
        tokenizer.chat_template = previous
    return out


def init_preset(preset: str, out_dir: str | Path, strategy: str = "full", seed: int = 0,
                aspect_ratio: str = DEFAULT_ASPECT_RATIO, template: str = QWEN2_BASE):
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
    cfg = llava_config(vision, text, strategy, tok.convert_tokens_to_ids(IMAGE_TOKEN), aspect_ratio=aspect_ratio)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    torch.manual_seed(VISION_SEED)
    model.model.vision_tower.load_state_dict(SiglipVisionModel(vision).state_dict())
    save_vlm(model, tok, out, template)
    return out


# ---------------------------------------------------------------------------------------------
# loading


def is_tinyllava_dir(d: str | Path) -> bool:
    """A TinyLLaVA-Factory checkpoint (any layout): its config.json says model_type 'tinyllava'."""
    cfg = Path(d) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type") == "tinyllava"
    except (OSError, ValueError, AttributeError):
        return False


def _check_llava_dir(model_dir: str | Path) -> Path:
    """An HF llava directory whose config and saved processor agree; ModelLoadError otherwise."""
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise ModelLoadError(f"{d} is not a model directory (no config.json)")
    if is_tinyllava_dir(d):
        raise ModelLoadError(f"{d} is a TinyLLaVA-Factory checkpoint; convert it first: "
                             f"ckd model convert --tinyllava {d} --out DIR")
    raw = json.loads((d / "config.json").read_text())
    model_type = raw.get("model_type")
    if model_type != "llava":
        raise ModelLoadError(f"{d}: model_type is {model_type!r}, expected 'llava' "
                             f"(use 'ckd model compose' to build one from a vision tower and an LLM)")
    aspect = check_aspect_ratio(raw.get("image_aspect_ratio") or DEFAULT_ASPECT_RATIO, f"{d}/config.json")
    _check_image_processor(d, aspect)
    template = raw.get(TEMPLATE_CONFIG_KEY)
    if template is not None:
        from ckd_common.templates import TEMPLATE_NAMES

        if template not in TEMPLATE_NAMES:
            raise ModelLoadError(f"{d}/config.json: {TEMPLATE_CONFIG_KEY} {template!r} is not one of "
                                 f"{list(TEMPLATE_NAMES)}")
    return d


def load_vlm(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load (model, tokenizer) from an HF llava directory, offline."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    d = _check_llava_dir(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(str(d), dtype=dtype, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    return model.to(device), tok


def _check_image_processor(d: Path, aspect: str) -> None:
    """The saved image processor must preprocess as config.json says (stock tools read the former,
    we read the latter)."""
    for name, get in (("processor_config.json", lambda c: c.get("image_processor")),  # transformers 5
                      ("preprocessor_config.json", lambda c: c)):                     # transformers 4
        path = d / name
        if not path.is_file():
            continue
        image_processor = get(json.loads(path.read_text()))
        if not isinstance(image_processor, dict):
            continue
        do_pad = bool(image_processor.get("do_pad", False))
        if do_pad != (aspect == "pad"):
            raise ModelLoadError(f"{d}: config.json says image_aspect_ratio {aspect!r} but {name} has "
                                 f"do_pad={do_pad}; re-save the checkpoint (ckd_common.model.save_vlm) so both agree")


def lm_head_weight(model) -> torch.Tensor:
    return model.get_output_embeddings().weight


def compose_vlm(vision_dir: str | Path, llm_dir: str | Path, out_dir: str | Path, strategy: str = "full",
                seed: int = 0, aspect_ratio: str = DEFAULT_ASPECT_RATIO, template: str = QWEN2_BASE):
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
    cfg = llava_config(vcfg, llm.config, strategy, tok.convert_tokens_to_ids(IMAGE_TOKEN), aspect_ratio=aspect_ratio)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(llm.model.state_dict())
    model.lm_head.load_state_dict(llm.lm_head.state_dict())
    save_vlm(model, tok, out_dir, template)
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------
# fingerprints


@dataclass(frozen=True)
class ModelInfo:
    """What server, cache and trainer must agree on about a model (docs/design.md §2-§3)."""

    fingerprint: str
    tokenizer_hash: str
    vocab_size: int            # rows of the lm_head
    tokenizer_vocab_size: int  # real tokens; targets never hold ids beyond the common vocabulary
    hidden_size: int
    num_visual_tokens: int
    vision_strategy: str
    image_size: int
    image_token_id: int
    image_aspect_ratio: str = DEFAULT_ASPECT_RATIO  # 'square' | 'pad': part of what the pixels are

    @property
    def common_vocab(self) -> int:
        """Ids a distillation target may hold: [0, min(lm_head rows, real tokens)) (docs/design.md §2).

        The one owner of this rule: servers, fills, caches and the trainer all read it here."""
        return min(self.vocab_size, self.tokenizer_vocab_size)

    def to_dict(self) -> dict:
        return asdict(self)


_IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures",
                        "use_cache", "output_hidden_states", "output_attentions", "return_dict",
                        TEMPLATE_CONFIG_KEY}  # the prompt format is checked on its own (cache template)


def _canonical_config(cfg) -> dict:
    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in sorted(obj.items()) if k not in _IGNORED_CONFIG_KEYS}
        return obj
    d = clean(cfg.to_dict())
    # 'square' is what a checkpoint without the field means: same model, same fingerprint as before
    # the field existed (so existing caches stay valid); 'pad' changes the pixels, hence the fingerprint.
    if d.get("image_aspect_ratio", DEFAULT_ASPECT_RATIO) == DEFAULT_ASPECT_RATIO:
        d.pop("image_aspect_ratio", None)
    return d


def model_fingerprint(model) -> str:
    """sha256 over the architecture config and every weight's bytes (name, dtype, shape, data)."""
    h = hashlib.sha256()
    h.update(json.dumps(_canonical_config(model.config), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class DataContract:
    """What preparing data for a model needs of it (ModelInfo has the same fields), read from its
    config.json and tokenizer alone: no weights, so no fingerprint."""

    tokenizer_hash: str
    num_visual_tokens: int
    image_token_id: int
    image_aspect_ratio: str
    vision_strategy: str
    image_size: int


def data_contract(model_dir: str | Path):
    """(DataContract, tokenizer) of an HF llava directory, without loading its weights."""
    from transformers import AutoConfig, AutoTokenizer

    from ckd_common.tokenizer import tokenizer_hash

    d = _check_llava_dir(model_dir)
    cfg = AutoConfig.from_pretrained(str(d), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    return DataContract(tokenizer_hash(tok), num_visual_tokens(cfg), int(cfg.image_token_id), image_aspect_ratio(cfg),
                        vision_strategy(cfg), int(cfg.vision_config.image_size)), tok


def model_info(model, tokenizer) -> ModelInfo:
    return info_from_config(model.config, tokenizer, model_fingerprint(model), int(lm_head_weight(model).shape[0]))


def info_from_config(cfg, tokenizer, fingerprint: str, vocab_size: int | None = None) -> ModelInfo:
    """ModelInfo of a LlavaConfig + tokenizer without the weights (``vocab_size``: the lm_head's
    rows, default the config's). The null engine of teacher_server serves from this alone."""
    from ckd_common.tokenizer import tokenizer_hash

    return ModelInfo(
        fingerprint=fingerprint,
        tokenizer_hash=tokenizer_hash(tokenizer),
        vocab_size=int(cfg.text_config.vocab_size if vocab_size is None else vocab_size),
        tokenizer_vocab_size=len(tokenizer),
        hidden_size=int(cfg.text_config.hidden_size),
        num_visual_tokens=num_visual_tokens(cfg),
        vision_strategy=vision_strategy(cfg),
        image_size=int(cfg.vision_config.image_size),
        image_token_id=int(cfg.image_token_id),
        image_aspect_ratio=image_aspect_ratio(cfg),
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
