"""A checkpoint we write prompts correctly in stock tools: plain transformers (no project import, in
a subprocess) renders the project's generation prompt with ``apply_chat_template`` — same string,
same ids — stops generating at ``<|endoftext|>`` even when the tokenizer's eos is ``<|im_end|>``,
and its greedy answers on the synthetic benchmark equal ``student_trainer eval``'s."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ckd_common.model import TINY_VISION, init_preset, llava_config, load_vlm, save_vlm
from ckd_common.templates import IMAGE_MARKER, encode_with_image, get_template

pytestmark = pytest.mark.integration  # subprocesses with plain transformers

ENDOFTEXT, IM_END = 151643, 151645
ROUNDS = {  # (history, question) -> messages as a chat UI sends them
    "one": ([], "What colour is the circle?\nAnswer the question using a single word or phrase."),
    "image_only": ([], ""),
    "several": ([("What colour is the circle?", "red"), ("How many shapes are there?", "2")], "Where is 你好 🙂?"),
}


def _plain(code: str, *args) -> dict:
    """Run ``code`` with plain transformers in a fresh interpreter; it prints one JSON object."""
    code += "\nassert not [m for m in sys.modules if m.split('.')[0] in " \
            "('ckd_common', 'student_trainer', 'teacher_server', 'logit_cache', 'deploy')]\n"
    r = subprocess.run([sys.executable, "-c", "import sys, json\n" + code, *map(str, args)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def real_tokenizer_student(qwen2_tokenizer_dir, tmp_path_factory):
    """A tiny llava with the REAL Qwen2 tokenizer in its Instruct configuration (eos <|im_end|>, a
    ChatML chat template of its own) and an untied lm_head, saved by save_vlm for qwen2_base."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    tok = AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                       eos_token_id=IM_END, pad_token_id=ENDOFTEXT)
    cfg = llava_config(SiglipVisionConfig(**TINY_VISION), text, "full", tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    out = tmp_path_factory.mktemp("real-tok") / "student"
    save_vlm(model, tok, out, "qwen2_base")
    return out


_RENDER = """
from PIL import Image
from transformers import AutoProcessor
d, cases = sys.argv[1], json.loads(sys.argv[2])
proc = AutoProcessor.from_pretrained(d)
out = {}
for name, (history, question) in cases.items():
    msgs = []
    for i, (q, a) in enumerate(history):
        content = [{"type": "image"}, {"type": "text", "text": q}] if i == 0 else q
        msgs += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": [{"type": "text", "text": question}] if history else
                 [{"type": "image"}] + ([{"type": "text", "text": question}] if question else [])})
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    enc = proc(images=Image.new("RGB", (40, 30), (200, 20, 20)), text=text, return_tensors="pt")
    out[name] = [text, enc["input_ids"][0].tolist()]
print(json.dumps(out))
"""


def test_apply_chat_template_renders_the_project_prompt(real_tokenizer_student):
    got = _plain(_RENDER, real_tokenizer_student, json.dumps(ROUNDS))
    model, tok = load_vlm(real_tokenizer_student)
    t = get_template("qwen2_base")
    nv = 4  # 28 px / patch 14, 'full'
    for name, (history, question) in ROUNDS.items():
        prompt = t.prompt_for_generation(question, has_image=True, history=history)
        text, ids = got[name]
        assert text == prompt, name
        ours = []
        for i in encode_with_image(prompt, lambda s: tok(s, add_special_tokens=False)["input_ids"]):
            ours += [model.config.image_token_id] * nv if i == IMAGE_MARKER else [i]
        assert ids == ours, name
    assert got["image_only"][0].endswith("USER: <image> ASSISTANT:")


_GENERATE = """
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
d = sys.argv[1]
proc = AutoProcessor.from_pretrained(d)
model = LlavaForConditionalGeneration.from_pretrained(d).eval()
msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
enc = proc(images=Image.new("RGB", (40, 30), (200, 20, 20)), text=proc.apply_chat_template(
    msgs, add_generation_prompt=True), return_tensors="pt")
n = enc["input_ids"].shape[1]
with torch.inference_mode():
    default = model.generate(**enc, max_new_tokens=5, do_sample=False)[0, n:].tolist()
    with_tokenizer_eos = model.generate(**enc, max_new_tokens=5, do_sample=False,
                                        eos_token_id=proc.tokenizer.eos_token_id)[0, n:].tolist()
print(json.dumps({"eos": proc.tokenizer.eos_token, "default": default, "tokenizer_eos": with_tokenizer_eos}))
"""


def test_generation_stops_at_endoftext_although_the_tokenizer_eos_is_im_end(real_tokenizer_student, tmp_path):
    from PIL import Image

    from ckd_common.data import preprocess_image

    model, tok = load_vlm(real_tokenizer_student)
    prompt = get_template("qwen2_base").prompt_for_generation("What colour?", has_image=True)
    ids = []
    for i in encode_with_image(prompt, lambda s: tok(s, add_special_tokens=False)["input_ids"]):
        ids += [model.config.image_token_id] * 4 if i == IMAGE_MARKER else [i]
    pixels = torch.from_numpy(preprocess_image(Image.new("RGB", (40, 30), (200, 20, 20)), 28, "square"))[None]
    seen = {}
    hook = model.lm_head.register_forward_hook(lambda m, a, o: seen.__setitem__("h", a[0][0, -1].detach()))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, -1]
        hook.remove()
        # make <|endoftext|> the greedy first token of this prompt: its row of the (untied) head
        # scores h at one more than the best other token
        h = seen["h"]
        model.lm_head.weight[ENDOFTEXT] = h * (float(logits.max()) + 1.0) / float(h @ h)
    save_vlm(model, tok, tmp_path / "stops", "qwen2_base")
    got = _plain(_GENERATE, tmp_path / "stops")
    assert got["eos"] == "<|im_end|>"
    assert got["default"] == [ENDOFTEXT]  # generation_config's eos: the template's stop token
    assert got["tokenizer_eos"][0] == ENDOFTEXT and len(got["tokenizer_eos"]) > 1  # without it: runs on


_ANSWER = """
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
d, qfile, images, n = sys.argv[1:5]
proc = AutoProcessor.from_pretrained(d)
model = LlavaForConditionalGeneration.from_pretrained(d).eval()
out = {}
for line in open(qfile):
    q = json.loads(line)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["text"]}]}]
    enc = proc(images=Image.open(images + "/" + q["image"]), text=proc.apply_chat_template(
        msgs, add_generation_prompt=True), return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**enc, max_new_tokens=int(n), do_sample=False)
    out[q["question_id"]] = proc.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
print(json.dumps(out))
"""


@pytest.mark.parametrize("aspect", ["square", "pad"])
def test_plain_transformers_answers_equal_student_trainer_eval(aspect, synth_dir, wide_synth_dir, tmp_path,
                                                               capsys):
    from ckd_eval.cli import main as eval_main

    data = synth_dir if aspect == "square" else wide_synth_dir
    # A random tiny model answers every question alike; with its weights scaled up its answers depend
    # on the image and the question, so equal answers mean equal prompts, pixels and stopping.
    model, tok = load_vlm(init_preset("tiny-student", tmp_path / "student", aspect_ratio=aspect, seed=3))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(10.0)
    model_dir = save_vlm(model, tok, tmp_path / "sharp", "qwen2_base")
    # batch size 1: the same computation as the plain loop (batched = single is test_eval_e2e's job)
    assert eval_main(["--model", str(model_dir), "--bench", "synth", "--data-root", str(data), "--out",
                      str(tmp_path / "out"), "--max-new-tokens", "6", "--batch-size", "1", "--no-progress"]) == 0
    capsys.readouterr()
    ours = {r["question_id"]: r["text"] for r in map(json.loads, (tmp_path / "out" / "synth" / "answers.jsonl")
                                                      .read_text().splitlines())}
    plain = _plain(_ANSWER, model_dir, data / "eval.jsonl", data / "images", 6)
    assert plain == ours
    assert len(set(ours.values())) > len(ours) // 2  # input-dependent answers: the comparison means something
