"""The VLM: presets, loading with plain transformers, TinyLLaVA conversion, composition, fingerprints."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ckd_common.cli import main as ckd_main
from ckd_common.model import (ModelLoadError, compose_vlm, convert_tinyllava, init_preset, load_vlm,
                              model_fingerprint, model_info, num_visual_tokens)


def test_presets_share_tokenizer_vision_and_grow(tiny_models):
    infos, models = {}, {}
    for name, d in tiny_models.items():
        models[name], tok = load_vlm(d)
        infos[name] = model_info(models[name], tok)
    s, a, t = infos["tiny-student"], infos["tiny-ta"], infos["tiny-teacher"]
    assert s.tokenizer_hash == a.tokenizer_hash == t.tokenizer_hash
    assert s.num_visual_tokens == a.num_visual_tokens == t.num_visual_tokens
    assert s.vocab_size == a.vocab_size == t.vocab_size
    assert s.hidden_size < a.hidden_size < t.hidden_size
    sizes = [sum(p.numel() for p in models[n].parameters()) for n in ("tiny-student", "tiny-ta", "tiny-teacher")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    vs = [models[n].model.vision_tower.state_dict() for n in ("tiny-student", "tiny-ta", "tiny-teacher")]
    for k in vs[0]:
        assert torch.equal(vs[0][k], vs[1][k]) and torch.equal(vs[0][k], vs[2][k])


def test_preset_loads_with_plain_transformers(tiny_models):
    """No project code imported: the saved directory is a stock HF llava checkpoint."""
    code = f"""
import sys, torch
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration
from PIL import Image
d = {str(tiny_models['tiny-student'])!r}
m = LlavaForConditionalGeneration.from_pretrained(d)
tok = AutoTokenizer.from_pretrained(d)
proc = AutoProcessor.from_pretrained(d)
enc = proc(images=Image.new('RGB', (60, 60), (255, 0, 0)), text='<image>\\nWhat colour?', return_tensors='pt')
out = m(**enc)
assert not any(k.startswith('ckd_common') for k in sys.modules)
print(out.logits.shape[-1], int((enc['input_ids'] == m.config.image_token_id).sum()))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    vocab, nv = map(int, r.stdout.split()[-2:])
    assert vocab == 512 and nv == 4  # 28 px / patch 14 = 2x2 visual tokens


def test_num_visual_tokens_for_real_siglip_sizes():
    from transformers import LlavaConfig, Qwen2Config, SiglipVisionConfig

    for strategy, n in (("full", 729), ("default", 728)):
        cfg = LlavaConfig(vision_config=SiglipVisionConfig(image_size=384, patch_size=14),
                          text_config=Qwen2Config(), vision_feature_select_strategy=strategy)
        assert num_visual_tokens(cfg) == n


def _tinyllava_dir(src_model, tok, out):
    """Write ``src_model`` in TinyLLaVA-Factory's layout: what its training recipe saves."""
    (out / "language_model").mkdir(parents=True)
    (out / "vision_tower").mkdir()
    (out / "connector").mkdir()
    lm_model = src_model.model.language_model
    text_cfg = src_model.config.text_config
    # TinyLLaVA saves named_parameters() of the Qwen2ForCausalLM: the tied lm_head is absent
    lm_sd = {f"model.{k}": v.clone() for k, v in lm_model.state_dict().items()}
    torch.save(lm_sd, out / "language_model" / "pytorch_model.bin")
    text_cfg.save_pretrained(out / "language_model")
    torch.save({k: v.clone() for k, v in src_model.model.vision_tower.state_dict().items()},
               out / "vision_tower" / "pytorch_model.bin")
    src_model.config.vision_config.save_pretrained(out / "vision_tower")
    p = src_model.model.multi_modal_projector
    torch.save({"_connector.0.weight": p.linear_1.weight.clone(), "_connector.0.bias": p.linear_1.bias.clone(),
                "_connector.2.weight": p.linear_2.weight.clone(), "_connector.2.bias": p.linear_2.bias.clone()},
               out / "connector" / "pytorch_model.bin")
    (out / "config.json").write_text(json.dumps({
        "model_type": "tinyllava", "connector_type": "mlp2x_gelu", "vision_feature_layer": -2,
        "vision_feature_select_strategy": "patch", "image_aspect_ratio": "square"}))
    tok.save_pretrained(out)
    return {"lm": lm_sd, "vision": src_model.model.vision_tower.state_dict(),
            "connector": (p.linear_1.weight, p.linear_1.bias, p.linear_2.weight, p.linear_2.bias)}


def _tinyllava_reference_logits(src_dir, ids, image_pos, pixel_values):
    """TinyLLaVA's forward written out from the SOURCE files: SigLIP layer -2 minus the first token,
    connector Linear-GELU-Linear, spliced into the Qwen2 input embeddings, tied lm_head."""
    from transformers import AutoConfig, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    vis = SiglipVisionModel(SiglipVisionConfig.from_pretrained(src_dir / "vision_tower")).eval()
    vis.load_state_dict(torch.load(src_dir / "vision_tower" / "pytorch_model.bin", weights_only=True))
    feats = vis(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    c = torch.load(src_dir / "connector" / "pytorch_model.bin", weights_only=True)
    feats = F.linear(F.gelu(F.linear(feats, c["_connector.0.weight"], c["_connector.0.bias"])),
                     c["_connector.2.weight"], c["_connector.2.bias"])
    lm = Qwen2ForCausalLM(AutoConfig.from_pretrained(src_dir / "language_model")).eval()
    sd = torch.load(src_dir / "language_model" / "pytorch_model.bin", weights_only=True)
    lm.load_state_dict(sd, strict=False)
    lm.lm_head.weight = lm.model.embed_tokens.weight
    emb = lm.model.embed_tokens(ids)
    emb = torch.cat([emb[:, :image_pos], feats, emb[:, image_pos + 1:]], dim=1)
    return lm(inputs_embeds=emb).logits, feats.shape[1]


def test_convert_tinyllava_gives_identical_logits(tmp_path):
    src_model, tok = load_vlm(init_preset("tiny-ta", tmp_path / "hf", strategy="patch", seed=5))
    src = tmp_path / "tinyllava"
    _tinyllava_dir(src_model, tok, src)
    with pytest.raises(ModelLoadError, match="TinyLLaVA-Factory checkpoint; convert it first"):
        load_vlm(src)
    assert ckd_main(["model", "convert", "--tinyllava", str(src), "--out", str(tmp_path / "conv")]) == 0
    conv, conv_tok = load_vlm(tmp_path / "conv")
    assert conv.config.vision_feature_select_strategy == "default"  # 'patch': drop SigLIP's first token

    torch.manual_seed(0)
    pix = torch.randn(1, 3, 28, 28)
    text = conv_tok("hello red circle", add_special_tokens=False)["input_ids"]
    nv = model_info(conv, conv_tok).num_visual_tokens
    img = conv.config.image_token_id
    with torch.no_grad():
        ref, n_feats = _tinyllava_reference_logits(src, torch.tensor([text[:1] + [img] + text[1:]]), 1, pix)
        ours = conv(input_ids=torch.tensor([text[:1] + [img] * nv + text[1:]]), pixel_values=pix).logits
    assert n_feats == nv == 3
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_convert_errors(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ModelLoadError, match="not a TinyLLaVA-Factory checkpoint"):
        convert_tinyllava(tmp_path / "x", tmp_path / "y")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_vlm(tmp_path / "x")


def test_compose_from_vision_and_llm_dirs(tmp_path, tiny_models):
    src, tok = load_vlm(tiny_models["tiny-student"])
    src.model.vision_tower.save_pretrained(tmp_path / "siglip")
    llm_dir = tmp_path / "qwen"
    from transformers import Qwen2ForCausalLM

    llm = Qwen2ForCausalLM(src.config.text_config)
    llm.model.load_state_dict(src.model.language_model.state_dict())
    llm.tie_weights()
    llm.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    out = compose_vlm(tmp_path / "siglip", llm_dir, tmp_path / "composed", strategy="patch", seed=1)
    m, t = load_vlm(out)
    assert model_info(m, t).num_visual_tokens == 3
    for k, v in src.model.vision_tower.state_dict().items():
        assert torch.equal(m.model.vision_tower.state_dict()[k], v)
    for k, v in src.model.language_model.state_dict().items():
        assert torch.equal(m.model.language_model.state_dict()[k], v)
    assert torch.equal(m.lm_head.weight, src.model.language_model.embed_tokens.weight)


def test_fingerprint_tracks_weights(student):
    model, _ = student
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(model)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.bias[0] += 1
        try:
            assert model_fingerprint(model) != fp
        finally:
            model.model.multi_modal_projector.linear_1.bias[0] -= 1
    assert model_fingerprint(model) == fp


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert ckd_main(["model", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ckd: error:" in err and "Traceback" not in err
