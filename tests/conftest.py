"""Shared fixtures: tiny model presets and synthetic data, built once per test session."""
from __future__ import annotations

import json
import lzma
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _prepared_data_root(tmp_path_factory):
    """Prepared datasets (ckd_common.prepared) made by this session, in-process or by the processes it
    starts, go to a temporary root: never the user's ~/.cache."""
    os.environ["CKD_PREPARED_DIR"] = str(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{'tiny-student': dir, 'tiny-ta': dir, 'tiny-teacher': dir} ('full' strategy)."""
    from ckd_common.model import PRESETS, init_preset

    root = tmp_path_factory.mktemp("models")
    return {name: init_preset(name, root / name) for name in PRESETS}


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from ckd_common.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, seed=0, n_pretrain=24, n_instruct=24, n_eval=10)
    return out


@pytest.fixture(scope="session")
def wide_synth_dir(synth_dir, tmp_path_factory):
    """The synthetic data with every image cropped to 112x64: there 'pad' and 'square' preprocessing
    give different pixels (the synthetic images are square)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("wide-synth")
    (root / "images").mkdir()
    for img in (synth_dir / "images").glob("*.png"):
        Image.open(img).crop((0, 0, 112, 64)).save(root / "images" / img.name)
    for f in ("pretrain.json", "instruct.json", "eval.jsonl"):
        shutil.copy(synth_dir / f, root / f)
    return root


@pytest.fixture(scope="session")
def student(tiny_models):
    from ckd_common.model import load_vlm

    return load_vlm(tiny_models["tiny-student"])


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread while a module trains: OpenMP spin-waits collapse on a shared 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


QWEN2_TOKENIZER = Path(__file__).parent / "fixtures" / "qwen2-tokenizer"  # vendored, see its README


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir(tmp_path_factory) -> Path:
    """The real Qwen2 tokenizer as published (Instruct configuration: eos <|im_end|>, pad
    <|endoftext|>, a ChatML chat template), decompressed into a temporary directory."""
    out = tmp_path_factory.mktemp("qwen2-tokenizer")
    for f in QWEN2_TOKENIZER.iterdir():
        if f.suffix == ".xz":
            (out / f.stem).write_bytes(lzma.decompress(f.read_bytes()))
        elif f.suffix == ".json":
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def qwen2_base_tokenizer_dir(qwen2_tokenizer_dir, tmp_path_factory) -> Path:
    """The same tokenizer in the base models' configuration (Qwen2.5-0.5B/1.5B/3B, what
    TinyLLaVA-Factory saves beside a qwen2_base checkpoint): eos = pad = <|endoftext|>, no chat template."""
    out = tmp_path_factory.mktemp("qwen2-base-tokenizer")
    for f in qwen2_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.update(eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=2048, padding_side="right")
    cfg.pop("chat_template")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    smap = json.loads((out / "special_tokens_map.json").read_text())
    smap["eos_token"] = dict(smap["eos_token"], content="<|endoftext|>")
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2))
    return out
