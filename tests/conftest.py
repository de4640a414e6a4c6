"""Shared fixtures: tiny model presets and synthetic data, built once per test session."""
from __future__ import annotations

import os

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
