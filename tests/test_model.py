"""The VLM: presets, loading with plain transformers, composition, fingerprints (TinyLLaVA
conversion: test_tinyllava_convert.py; what a saved checkpoint records: test_checkpoint_contract.py)."""
import subprocess
import sys

import pytest
import torch

from ckd_common.cli import main as ckd_main
from ckd_common.model import ModelLoadError, compose_vlm, load_vlm, model_fingerprint, model_info, num_visual_tokens


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


@pytest.mark.integration
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


def test_load_errors(tmp_path):
    (tmp_path / "x").mkdir()
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
