"""Image preprocessing is part of the model: 'square' and 'pad' (LLaVA-1.5's expand2square with the
processor's mean colour, then SigLIP's resize) give different pixels; the mode a checkpoint records
is what the saved processor, the server, the trainer and eval use; a cache filled under another
mode is refused (test_trainer.py parametrizes that refusal)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ckd_common.data import PAD_COLOUR, Preparer, collate, expand_to_square, preprocess_image
from ckd_common.model import init_preset, load_vlm, model_fingerprint, model_info

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _reference_expand2square(pil_img, background_color):
    """TinyLLaVA-Factory's ImagePreprocess.expand2square (tinyllava/data/image_preprocess.py)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


@pytest.mark.parametrize("size", [(53, 37), (37, 53), (40, 40), (41, 38)])
def test_expand_to_square_is_the_reference(size):
    img = _image(*size)
    assert PAD_COLOUR == tuple(int(x * 255) for x in (0.5, 0.5, 0.5))  # SigLIP's image_mean
    ours, ref = expand_to_square(img), _reference_expand2square(img, PAD_COLOUR)
    assert ours.size == ref.size and np.array_equal(np.asarray(ours), np.asarray(ref))


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    root = tmp_path_factory.mktemp("aspect")
    return {a: init_preset("tiny-student", root / a, aspect_ratio=a) for a in ("square", "pad")}


@pytest.mark.parametrize("aspect", ["square", "pad"])
@pytest.mark.parametrize("size", [(53, 37), (30, 90), (64, 64)])
def test_preprocess_equals_the_saved_processor(aspect, size, presets):
    """What stock tools get from the checkpoint (AutoProcessor) = what the project feeds the model."""
    from transformers import AutoProcessor

    img = _image(*size, seed=size[0])
    proc = AutoProcessor.from_pretrained(presets[aspect])
    ref = proc.image_processor(images=img, return_tensors="np")["pixel_values"][0]
    ours = preprocess_image(img, 28, aspect)
    assert ours.shape == ref.shape == (3, 28, 28)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_pad_and_square_differ_only_for_non_square_images():
    wide = _image(90, 30)
    assert np.abs(preprocess_image(wide, 56, "pad") - preprocess_image(wide, 56, "square")).max() > 0.5
    sq = _image(40, 40)
    np.testing.assert_array_equal(preprocess_image(sq, 56, "pad"), preprocess_image(sq, 56, "square"))
    with pytest.raises(ValueError, match="image_aspect_ratio 'anyres' is not supported"):
        preprocess_image(wide, 56, "anyres")


def test_the_mode_is_recorded_and_fingerprinted(presets):
    models = {a: load_vlm(d) for a, d in presets.items()}
    infos = {a: model_info(*m) for a, m in models.items()}
    assert infos["square"].image_aspect_ratio == "square" and infos["pad"].image_aspect_ratio == "pad"
    for a, d in presets.items():
        assert json.loads((d / "config.json").read_text())["image_aspect_ratio"] == a
    # same weights: only the preprocessing differs, and that changes what the model computes
    assert infos["square"].fingerprint != infos["pad"].fingerprint
    # a checkpoint without the field (written before it existed) is 'square', with the same fingerprint
    square = models["square"][0]
    del square.config.image_aspect_ratio
    assert model_fingerprint(square) == infos["square"].fingerprint
    assert model_info(square, models["square"][1]).image_aspect_ratio == "square"


def test_collate_and_teacher_inputs_use_the_given_mode(presets, wide_synth_dir):
    from ckd_common.teacher import TeacherInput

    model, tok = load_vlm(presets["pad"])
    info = model_info(model, tok)
    recs = [r for r in json.loads((wide_synth_dir / "instruct.json").read_text()) if "image" in r][:2]
    samples = [Preparer(tok, "qwen2_base", info.num_visual_tokens, info.image_token_id, wide_synth_dir / "images")
               .prepare(r) for r in recs]
    batch = collate(samples, tok.pad_token_id, info.image_size, aspect_ratio="pad")
    for i, s in enumerate(samples):
        want = preprocess_image(Image.open(s.image_path), info.image_size, "pad")
        np.testing.assert_array_equal(batch["pixel_values"][i].numpy(), want)
        t = TeacherInput.from_prepared(s, info.image_size, aspect_ratio="pad")
        np.testing.assert_array_equal(t.pixel_values, want)
    with pytest.raises(ValueError, match="aspect_ratio"):
        collate(samples, tok.pad_token_id, info.image_size)
    with pytest.raises(ValueError, match="aspect_ratio"):
        TeacherInput.from_prepared(samples[0], info.image_size)


def test_server_preprocesses_with_the_teachers_mode(wide_synth_dir, tmp_path):
    """A 'pad' teacher behind the real FastAPI app returns the targets of pad pixels."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ckd_common.teacher import TeacherInput, TeacherRunner
    from ckd_common.wire import CONTENT_TYPE_REQUEST, TargetsRequest, WireSample, decode_response, encode_request
    from teacher_server.app import create_app
    from teacher_server.config import ServerConfig

    d = init_preset("tiny-teacher", tmp_path / "pad-teacher", aspect_ratio="pad")
    model, tok = load_vlm(d)
    info = model_info(model, tok)
    rec = json.loads((wide_synth_dir / "instruct.json").read_text())[0]
    s = Preparer(tok, "qwen2_base", info.num_visual_tokens, info.image_token_id, wide_synth_dir / "images").prepare(rec)
    with TestClient(create_app(ServerConfig(model_dir=str(d)), exit_on_load_failure=False)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "model did not load"
            time.sleep(0.05)
        assert client.get("/v1/info").json()["image_aspect_ratio"] == "pad"
        ws = WireSample(s.key, s.input_ids.copy(), s.response_positions, s.visual_start, s.num_visual,
                        open(s.image_path, "rb").read(), s.id)
        r = client.post("/v1/targets", content=encode_request(TargetsRequest([ws], 8, None, "qwen2_base")),
                        headers={"Content-Type": CONTENT_TYPE_REQUEST})
    assert r.status_code == 200, r.text
    got = decode_response(r.content).targets[0]
    runner = TeacherRunner(model, vocab_limit=info.common_vocab)
    pad, square = (runner.targets([TeacherInput.from_prepared(s, info.image_size, aspect_ratio=a)], 8)[0]
                   for a in ("pad", "square"))
    np.testing.assert_allclose(got.text.logprobs, pad.text.logprobs, atol=1e-4)
    np.testing.assert_allclose(got.autocorr, pad.autocorr, atol=1e-5)
    assert np.abs(np.asarray(got.autocorr) - np.asarray(square.autocorr)).max() > 1e-3  # dense U U^T of each factor


@pytest.mark.integration
def test_trainer_uses_the_students_mode(presets, wide_synth_dir, tmp_path):
    """The first step's CE of a 'pad' student = the model's own loss on pad pixels (not square)."""
    from student_trainer.cli import main

    model, tok = load_vlm(presets["pad"])
    info = model_info(model, tok)
    recs = json.loads((wide_synth_dir / "pretrain.json").read_text())[:4]
    (tmp_path / "four.json").write_text(json.dumps(recs))
    rc = main(["train", "--step", "pt", "--model", str(presets["pad"]), "--data", str(tmp_path / "four.json"),
               "--images", str(wide_synth_dir / "images"), "--out", str(tmp_path / "o"), "--global-batch", "4",
               "--micro-batch", "4", "--max-steps", "1", "--num-workers", "0", "--no-progress", "--no-tensorboard",
               "--holdout", "0"])  # all four samples: the reference loss below is over all of them
    assert rc == 0
    ce = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[0])["ce"]
    prep = Preparer(tok, "pretrain", info.num_visual_tokens, info.image_token_id, wide_synth_dir / "images")
    samples = [prep.prepare(r) for r in recs]
    losses = {}
    with torch.no_grad():  # the trainer's CE: each sample's mean over its response tokens, then over samples
        for a in ("pad", "square"):
            losses[a] = sum(float(model(**collate([s], tok.pad_token_id, info.image_size, aspect_ratio=a)).loss)
                            for s in samples) / len(samples)
    assert ce == pytest.approx(losses["pad"], rel=1e-4)
    assert abs(losses["pad"] - losses["square"]) > 1e-3
    final = tmp_path / "o" / "final"
    assert json.loads((final / "config.json").read_text())["image_aspect_ratio"] == "pad"
    assert json.loads((final / "config.json").read_text())["ckd_template"] == "pretrain"  # the step's template
