"""The compute behind a cascade's student: optimizer steps and teacher forward passes, planned before
a run and measured after it, so every results table can show what each number cost (issue 15.7).

* optimizer steps: summed over every training step of every stage of the plan (a top-down run's
  distillation of the TA included; training the TA and Teacher themselves is not);
* teacher forward passes = cached teacher targets consumed: the samples of every distilling step
  (DPT, DFT), epochs counted. Each is one teacher forward pass made once, when the cache was filled,
  and read again by every run that reuses the cache.

:func:`extend_last_step` makes the step-matched controls: a strategy's last step (the baseline's FT,
single KD's DFT) run for as many optimizer steps as the method it is compared with.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from deploy.cascade.plan import Stage
from student_trainer.config import STEPS


@dataclass(frozen=True)
class Compute:
    optimizer_steps: int
    teacher_samples: int  # cached teacher targets consumed (= teacher forward passes behind the KD terms)

    def __add__(self, other: Compute) -> Compute:
        return Compute(self.optimizer_steps + other.optimizer_steps, self.teacher_samples + other.teacher_samples)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.optimizer_steps} optimizer steps, {self.teacher_samples} teacher forward passes"


NONE = Compute(0, 0)


def _of_step(step: str, steps: int, global_batch: int) -> Compute:
    return Compute(steps, steps * global_batch if STEPS[step].uses_teacher else 0)


def measured(stages: Sequence[Stage]) -> Compute | None:
    """What the finished steps of ``stages`` did (their ``final/trainer_state.json``); None if one is missing."""
    total = NONE
    for st in stages:
        for step in st.steps:
            state = st.step_out(step) / "final" / "trainer_state.json"
            if not state.is_file():
                return None
            s = json.loads(state.read_text())
            total += Compute(int(s["step"]), int(s["samples_seen"]) if STEPS[step].uses_teacher else 0)
    return total


def samples_per_split(cfg) -> dict[str, int]:
    """Records of each data split of a cascade config (what the trainer schedules over, bad records aside)."""
    from ckd_common.data import read_records

    return {split: len(read_records(cfg.data_of(split))) for split in ("pretrain", "instruct")}


def planned_steps(cfg, stages: Sequence[Stage], samples: dict[str, int]) -> dict[tuple[str, str], Compute]:
    """(stage id, step) -> the compute that step will take under ``cfg``'s trainer options."""
    from student_trainer.data import num_steps

    out = {}
    for st in stages:
        for step in st.steps:
            tc = cfg.train_config(step, st.student_in, st.step_out(step), "cache").resolved()
            n = num_steps(samples[STEPS[step].split], tc.global_batch, tc.epochs, tc.max_steps)
            out[(st.id, step)] = _of_step(step, n, tc.global_batch)
    return out


def planned(cfg, stages: Sequence[Stage], samples: dict[str, int]) -> Compute:
    return sum(planned_steps(cfg, stages, samples).values(), NONE)


def extend_last_step(cfg, stages: Sequence[Stage], samples: dict[str, int], target_steps: int) -> dict[str, dict]:
    """Trainer overrides ``{step: {epochs, max_steps}}`` that make the plan's last step run long enough for
    the whole plan to take ``target_steps`` optimizer steps (a step-matched control). ValueError when the
    other steps alone take that many."""
    per = planned_steps(cfg, stages, samples)
    last = stages[-1].id, stages[-1].steps[-1]
    need = target_steps - sum(c.optimizer_steps for k, c in per.items() if k != last)
    if need < 1:
        raise ValueError(f"cannot match {target_steps} optimizer steps: the steps before {last[1]} already take "
                         f"{target_steps - need}")
    tc = cfg.train_config(last[1], stages[-1].student_in, Path("."), "cache").resolved()
    per_epoch = samples[STEPS[last[1]].split] // tc.global_batch
    return {last[1]: {"epochs": float(math.ceil(need / max(1, per_epoch))), "max_steps": need}}
