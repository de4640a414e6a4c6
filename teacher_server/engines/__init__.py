"""Teacher engines behind one interface: ``hf`` (transformers, CPU or GPU; the default) and
``vllm`` (optional extra ``pip install llava-ckd[vllm]``, GPU only, imported only when chosen)."""
from __future__ import annotations

from .base import BatchObserver, Engine, EngineDescription

ENGINES = ("hf", "vllm")


def make_engine(config, observer: BatchObserver | None = None) -> Engine:
    if config.engine == "hf":
        from .hf import HFEngine

        return HFEngine(config, observer)
    if config.engine == "vllm":
        from .vllm import VLLMEngine  # raises a clear ImportError-derived message without vllm

        return VLLMEngine(config, observer)
    raise ValueError(f"unknown engine {config.engine!r}; choose one of {ENGINES}")


__all__ = ["Engine", "EngineDescription", "BatchObserver", "make_engine", "ENGINES"]
