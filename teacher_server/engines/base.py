"""The engine interface: what the service needs from whatever runs the teacher."""
from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ckd_common.model import ModelInfo
from ckd_common.targets import SampleTargets
from ckd_common.teacher import TeacherInput


class BatchObserver(Protocol):
    """Told about every batch the engine runs (the service's Prometheus metrics)."""

    def on_batch(self, samples: int, tokens: int, padded_tokens: int, seconds: float) -> None: ...


@dataclass
class EngineDescription:
    model: ModelInfo
    dtype: str
    device: str
    tokenizer: object = None               # served at /v1/tokenizer so clients prepare identically
    target_kinds: list[str] = field(default_factory=lambda: ["text", "visual", "autocorr"])


class Engine(abc.ABC):
    """Runs one teacher. ``load`` blocks (called off the event loop by the app's lifespan);
    ``targets`` is awaited by request handlers and may batch across concurrent calls."""

    name = "base"
    # False: the service only checks an image's header and never decodes it (the null engine)
    needs_pixels = True

    @abc.abstractmethod
    def load(self) -> EngineDescription:
        """Load the model; return what /v1/info reports."""

    @abc.abstractmethod
    async def targets(self, inputs: Sequence[TeacherInput], k: int, vocab_limit: int) -> list[SampleTargets]:
        """Targets for ``inputs`` in order. Raises teacher_server.errors.ServerError subclasses."""

    @property
    @abc.abstractmethod
    def queued_tokens(self) -> int:
        """Tokens admitted and not yet finished (the admission check compares it with a cap)."""

    @property
    @abc.abstractmethod
    def queued_samples(self) -> int: ...

    @abc.abstractmethod
    def close(self, drain: bool = True) -> None:
        """Stop; with ``drain`` finish every admitted sample first (graceful shutdown)."""

    def tokens_per_second(self) -> float:
        """Recent forward throughput, used to size Retry-After; 0 when unknown."""
        return 0.0
