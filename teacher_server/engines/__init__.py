"""Teacher engines behind one interface: ``hf`` (transformers, CPU or GPU; the default),
``vllm`` (optional extra ``pip install llava-ckd[vllm]``, GPU only, imported only when chosen) and
``null`` (no forward pass: precomputed synthetic targets of the teacher's shapes, for measuring the
host side of a fill; see engines/null.py)."""
from __future__ import annotations

from .base import BatchObserver, Engine, EngineDescription

ENGINES = ("hf", "vllm", "null")


def make_engine(config, observer: BatchObserver | None = None) -> Engine:
    if config.engine == "hf":
        from .hf import HFEngine

        return HFEngine(config, observer)
    if config.engine == "vllm":
        from .vllm import VLLMEngine  # raises a clear ImportError-derived message without vllm

        return VLLMEngine(config, observer)
    if config.engine == "null":
        from .null import NullEngine

        return NullEngine(config, observer)
    raise ValueError(f"unknown engine {config.engine!r}; choose one of {ENGINES}")


__all__ = ["Engine", "EngineDescription", "BatchObserver", "make_engine", "ENGINES"]
