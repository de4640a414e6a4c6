"""``ckd model convert --tinyllava``: every layout TinyLLaVA-Factory writes converts, and the
converted llava's logits equal TinyLLaVA's forward written out from the source weights.

The sources are built in TinyLLaVA's real layouts and key names (tests/tinyllava_layouts.py, from
its saving code) at tiny widths but the real SigLIP-so400m-384 input geometry (384 px, patch 14:
728 / 729 visual tokens), with the real Qwen2 tokenizer (vocab 151,936) beside config.json."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from ckd_common.cli import main as ckd_main
from ckd_common.model import ModelLoadError, load_vlm, model_info
from ckd_common.tinyllava import convert_tinyllava
from tests.tinyllava_layouts import make_source, reference_logits, write_finetune, write_pretrain

IMAGE_POS = 3


@pytest.fixture(scope="module")
def sources():
    return {"tied": make_source(tied=True, seed=1), "untied": make_source(tied=False, seed=2)}


def _check_logits(src, out, strategy, dtype, layer=-2):
    model, tok = load_vlm(out)  # fp32
    info = model_info(model, tok)
    nv = 728 if strategy == "patch" else 729
    assert info.num_visual_tokens == nv and model.config.vision_feature_layer == layer
    text = tok("Describe the picture, 你好 🙂", add_special_tokens=False)["input_ids"]
    ids = text[:IMAGE_POS] + [info.image_token_id] + text[IMAGE_POS:]
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids[:IMAGE_POS] + [info.image_token_id] * nv + ids[IMAGE_POS + 1:]]),
                     pixel_values=pixels).logits
    ref = reference_logits(src, torch.tensor([ids]), IMAGE_POS, pixels, strategy, dtype, layer)
    assert ours.shape == ref.shape == (1, len(ids) - 1 + nv, 151936)
    # = assert_close(rtol=0, atol=1e-5) (a NaN fails too), without its temporaries of 111M elements
    assert ours.dtype == ref.dtype and float((ours - ref).abs().max()) <= 1e-5
    return model, tok, info


# (name, writer kwargs) — each a layout TinyLLaVA-Factory writes
CASES = {
    # finetune stage / released TinyLLaVA-Qwen2-0.5B-SigLIP: one model.safetensors, bf16, tied, tf4 names
    "finetune-single-bf16-tied-tf4-patch": ("tied", "finetune", dict(dtype=torch.bfloat16, names="tf4")),
    # released TinyLLaVA-Qwen2.5-3B-SigLIP style: shards + index; here fp16, untied, tf5 names, cls_patch
    "finetune-sharded-fp16-untied-tf5-cls_patch": ("untied", "finetune", dict(
        dtype=torch.float16, names="tf5", shards=3, strategy="cls_patch")),
    # Trainer with save_safetensors=False: pytorch_model.bin keeps the tied head's second name
    "finetune-bin-fp32-tied-tf4-pad": ("tied", "finetune", dict(dtype=torch.float32, fmt="bin", aspect="pad")),
    # pretrain stage: language_model/ vision_tower/ connector/ pytorch_model.bin, fp32, tied, tf4 names
    "pretrain-split-fp32-tied-tf4-patch": ("tied", "pretrain", dict(dtype=torch.float32, names="tf4")),
    # pretrain stage with language_model/ as an HF dir (sharded safetensors), bf16, untied, layer -3
    "pretrain-hfdir-bf16-untied-tf5-cls_patch": ("untied", "pretrain", dict(
        dtype=torch.bfloat16, names="tf5", llm_as_hf_dir=True, strategy="cls_patch", layer=-3)),
}


@pytest.mark.slow  # two forwards with [729, 151936] logits and the real tokenizer twice: ~5 s CPU per layout
@pytest.mark.parametrize("case", list(CASES))
def test_layout_converts_with_identical_logits(case, sources, qwen2_base_tokenizer_dir, tmp_path):
    which, stage, kw = CASES[case]
    src = sources[which]
    writer = write_finetune if stage == "finetune" else write_pretrain
    writer(src, tmp_path / "tinyllava", qwen2_base_tokenizer_dir, **kw)
    with pytest.raises(ModelLoadError, match="TinyLLaVA-Factory checkpoint; convert it first"):
        load_vlm(tmp_path / "tinyllava")
    report = convert_tinyllava(tmp_path / "tinyllava", tmp_path / "out")
    strategy = {"cls_patch": "full"}.get(kw.get("strategy", "patch"), "patch")
    assert report.strategy == strategy and report.tied == src.tied
    assert report.dtype == str(kw["dtype"]).removeprefix("torch.")
    assert report.layout.startswith("whole" if stage == "finetune" else "split")
    model, tok, info = _check_logits(src, tmp_path / "out", strategy, kw["dtype"], kw.get("layer", -2))
    assert info.image_aspect_ratio == kw.get("aspect", "square")
    assert (model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()) == src.tied
    # the tokenizer beside config.json, with <image> among the unused embedding rows
    assert info.image_token_id == 151646 and info.vocab_size == 151936 and info.tokenizer_vocab_size == 151647
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 151643  # <|endoftext|>: qwen2_base's answers end there
    assert not list(tmp_path.glob(".tmp-*"))


def test_cli_convert_prints_the_report(sources, qwen2_base_tokenizer_dir, tmp_path, capsys):
    write_finetune(sources["tied"], tmp_path / "src", qwen2_base_tokenizer_dir, shards=2)
    assert ckd_main(["model", "convert", "--tinyllava", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
                     "--template", "pretrain"]) == 0
    out = capsys.readouterr().out
    assert "whole (finetune stage" in out and "728 visual tokens" in out and "chat template: pretrain" in out
    assert json.loads((tmp_path / "o" / "config.json").read_text())["ckd_template"] == "pretrain"
    # the destination is never overwritten
    assert ckd_main(["model", "convert", "--tinyllava", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _rewrite_safetensors(path, fn):
    from safetensors.torch import load_file, save_file

    sd = fn(load_file(str(path)))
    save_file(sd, str(path))


@pytest.fixture(scope="module")
def good_finetune(sources, qwen2_base_tokenizer_dir, tmp_path_factory):
    return write_finetune(sources["tied"], tmp_path_factory.mktemp("ok") / "src", qwen2_base_tokenizer_dir, shards=2)


def _copy(good, tmp_path):
    d = tmp_path / "src"
    shutil.copytree(good, d)
    return d


def _converts_with_error(d, tmp_path, match):
    with pytest.raises(ModelLoadError, match=match):
        convert_tinyllava(d, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))  # nothing half-written


def test_unknown_keys_name_the_file_the_keys_and_what_was_expected(good_finetune, tmp_path):
    d = _copy(good_finetune, tmp_path)
    for shard in d.glob("model-*.safetensors"):
        _rewrite_safetensors(shard, lambda sd: {("model." + k if k.startswith("connector.") else k): v
                                                for k, v in sd.items()})
    _converts_with_error(d, tmp_path, r"model-0000\d-of-00002\.safetensors: 4 weight\(s\) match no parameter.*"
                                      r"'model\.connector\._connector\.0\.bias'.*expected language_model\.model\.\*")


def test_missing_weights_are_named_in_the_source_naming(good_finetune, tmp_path):
    d = _copy(good_finetune, tmp_path)
    for shard in sorted(d.glob("model-*.safetensors")):
        _rewrite_safetensors(shard, lambda sd: {k: v for k, v in sd.items() if "layers.1.mlp.down_proj" not in k})
    _converts_with_error(d, tmp_path, r"1 parameter\(s\) .* not in .*'language_model\.model\.layers\.1\.mlp"
                                      r"\.down_proj\.weight'")


def test_untied_without_lm_head_is_refused(sources, qwen2_base_tokenizer_dir, tmp_path):
    write_finetune(sources["untied"], tmp_path / "src", qwen2_base_tokenizer_dir, lm_head_in_file=False)
    _converts_with_error(tmp_path / "src", tmp_path, "language_model.lm_head.weight.*tie_word_embeddings is false")


def test_shape_mismatch_names_key_and_shapes(good_finetune, tmp_path):
    d = _copy(good_finetune, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    _converts_with_error(d, tmp_path, r"language_model\.model\.layers\.\d\.mlp\.\w+_proj\.weight has shape "
                                      r"\(\d+, \d+\), but the config .* implies")


def test_missing_shard_and_missing_index(good_finetune, tmp_path):
    d = _copy(good_finetune, tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    _converts_with_error(d, tmp_path, r"index\.json names shard\(s\) that are not there: "
                                      r"\['model-00002-of-00002\.safetensors'\]")
    (d / "model.safetensors.index.json").unlink()
    _converts_with_error(d, tmp_path, "without their index")


@pytest.mark.parametrize("field,value,match", [
    ("vision_feature_select_strategy", "spatial", "'spatial' is unknown; expected 'patch'.*'cls_patch'"),
    ("connector_type", "mlp3x_gelu", "connector_type 'mlp3x_gelu' does not convert"),
    ("image_aspect_ratio", "anyres", "image_aspect_ratio 'anyres' is not supported"),
    ("model_type", "llava", "model_type 'llava', expected 'tinyllava'"),
])
def test_config_options_that_do_not_convert(good_finetune, tmp_path, field, value, match):
    d = _copy(good_finetune, tmp_path)
    _edit_config(d, **{field: value})
    _converts_with_error(d, tmp_path, match)


def test_other_llms_lora_and_missing_parts_are_refused(good_finetune, sources, qwen2_base_tokenizer_dir, tmp_path):
    d = _copy(good_finetune, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["model_type"] = "phi"
    (d / "config.json").write_text(json.dumps(cfg))
    _converts_with_error(d, tmp_path, "the LLM is 'phi'; only Qwen2")
    shutil.rmtree(d)
    d = _copy(good_finetune, tmp_path)
    (d / "adapter_config.json").write_text("{}")
    _converts_with_error(d, tmp_path, "LoRA/QLoRA checkpoint")
    shutil.rmtree(d)
    write_pretrain(sources["tied"], d, qwen2_base_tokenizer_dir)
    shutil.rmtree(d / "connector")
    _converts_with_error(d, tmp_path, r"no TinyLLaVA-Factory weights.*only \['language_model', 'vision_tower'\]")
    for p in ("vision_tower", "language_model"):
        shutil.rmtree(d / p)
    for f in d.glob("*.json"):
        if f.name != "config.json":
            f.unlink()
    _converts_with_error(d, tmp_path, "no TinyLLaVA-Factory weights")


def test_cli_error_is_one_line(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert ckd_main(["model", "convert", "--tinyllava", str(tmp_path / "x"), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ckd: error: not a TinyLLaVA-Factory checkpoint") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_corrupt_weight_file_is_named(sources, qwen2_base_tokenizer_dir, tmp_path):
    write_pretrain(sources["tied"], tmp_path / "src", qwen2_base_tokenizer_dir)
    (tmp_path / "src" / "connector" / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    _converts_with_error(tmp_path / "src", tmp_path, r"connector/pytorch_model\.bin: unreadable weight file")
