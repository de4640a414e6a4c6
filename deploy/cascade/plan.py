"""The plan of a cascade: which stages a strategy runs, in which order, with which teacher.

The strategies are known here and only here: config validation (how many teachers a strategy
needs), the teacher chain in summaries and the demo's table rows all derive from
:data:`STRATEGIES`. A stage's steps come from the trainer's step table
(``student_trainer.config``): the LLaVA-KD recipe (DPT -> SFT -> DFT) per distillation stage, the
TinyLLaVA recipe (PT -> FT) for the baseline.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, TypeVar

from student_trainer.config import LLAVA_KD_STEPS, STEPS, TINYLLAVA_STEPS

T = TypeVar("T")
STUDENT = "student"  # how chains name the model the cascade trains


class _TeacherSpec(Protocol):
    name: str
    model: str
    devices: list[str]


class PlanInput(Protocol):
    """What the plan reads of a cascade config (deploy.cascade.config.CascadeConfig, which imports this
    module: a Protocol, not an import, keeps the two free of a cycle)."""

    run_dir: str
    strategy: str
    student: str
    cache_root: str
    teachers: list[_TeacherSpec]


@dataclass(frozen=True)
class Teacher:
    """A teacher as a stage sees it: a fixed checkpoint, or the output of an earlier stage."""

    name: str
    model: str
    devices: tuple[str, ...]
    cache_root: str
    produced_by: str | None = None  # the stage whose final model this is (top-down)


@dataclass(frozen=True)
class Stage:
    id: str
    learner: str                   # who is trained: STUDENT or the name of a teacher being distilled
    student_in: str                # model directory the stage starts from (may be produced earlier)
    teacher: Teacher | None
    out: str
    steps: tuple[str, ...]
    # where each step writes, when not ``out/<step>`` (``ckd ablate`` shares identical steps between points)
    step_dirs: tuple[tuple[str, str], ...] = ()

    def step_out(self, step: str) -> Path:
        return Path(dict(self.step_dirs).get(step) or Path(self.out) / step)

    @property
    def final(self) -> str:
        return str(self.step_out(self.steps[-1]) / "final")

    @property
    def cache_needs(self) -> tuple[tuple[str, str], ...]:
        """(data split, template) of every step that reads the teacher's cache, in step order."""
        out: list[tuple[str, str]] = []
        for s in self.steps:
            need = (STEPS[s].split, STEPS[s].template)
            if STEPS[s].uses_teacher and need not in out:
                out.append(need)
        return tuple(out)


@dataclass(frozen=True)
class Strategy:
    name: str
    method: str                                   # its name in reports and the demo's table
    description: str
    min_teachers: int
    uses: Callable[[Sequence], Sequence]          # the configured teachers (smallest first) it uses
    stages: Callable[[PlanInput, dict[str, Teacher], Path], list[Stage]]
    control: bool = False                         # a control for another strategy (not a method of the paper)

    def teachers_used(self, teachers: Sequence[T]) -> list[T]:
        return list(self.uses(teachers))


def _baseline(cfg, teachers, run):
    return [Stage("baseline", STUDENT, cfg.student, None, str(run / "stages" / "baseline"), TINYLLAVA_STEPS)]


def _single(cfg, teachers, run):
    t = teachers[cfg.teachers[-1].name]
    return [Stage(f"kd-{t.name}", STUDENT, cfg.student, t, str(run / "stages" / f"kd-{t.name}"), LLAVA_KD_STEPS)]


def _bottom_up(cfg, teachers, run):
    stages, model = [], cfg.student
    for i, spec in enumerate(cfg.teachers, 1):
        sid = f"s{i}-{spec.name}"
        stages.append(Stage(sid, STUDENT, model, teachers[spec.name], str(run / "stages" / sid), LLAVA_KD_STEPS))
        model = stages[-1].final
    return stages


def _repeat(cfg, teachers, run):
    """The compute control of bottom-up: as many stages (at least two), every one from the Teacher."""
    t = teachers[cfg.teachers[-1].name]
    stages, model = [], cfg.student
    for i in range(1, max(2, len(cfg.teachers)) + 1):
        sid = f"r{i}-{t.name}"
        stages.append(Stage(sid, STUDENT, model, t, str(run / "stages" / sid), LLAVA_KD_STEPS))
        model = stages[-1].final
    return stages


def _top_down(cfg, teachers, run):
    chain = list(reversed(cfg.teachers))  # largest first: it distils the next one down, which then serves, ...
    stages: list[Stage] = []
    teacher = teachers[chain[0].name]
    for i, spec in enumerate(chain[1:], 1):
        sid = f"td{i}-{teacher.name}-to-{spec.name}"
        stages.append(Stage(sid, spec.name, spec.model, teacher, str(run / "stages" / sid), LLAVA_KD_STEPS))
        # a distilled teacher is new weights: its cache lives with the run, not the shared root
        teacher = Teacher(f"{spec.name}-distilled", stages[-1].final, tuple(spec.devices), str(run / "cache" / sid),
                          produced_by=sid)
    sid = f"td{len(chain)}-{teacher.name}-to-{STUDENT}"
    stages.append(Stage(sid, STUDENT, cfg.student, teacher, str(run / "stages" / sid), LLAVA_KD_STEPS))
    return stages


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("none", "TinyLLaVA (PT->FT)", "TinyLLaVA baseline: PT -> FT, no teacher", 0,
             lambda ts: ts[:0], _baseline),
    Strategy("single", "LLaVA-KD (single)", "plain LLaVA-KD: student <- teachers[-1] (DPT -> SFT -> DFT)", 1,
             lambda ts: ts[-1:], _single),
    Strategy("bottom-up", "CKD bottom-up", "CKD: student <- teachers[0] (TA), then <- teachers[1] (Teacher), ...; "
             "each DPT -> SFT -> DFT", 1, lambda ts: ts, _bottom_up),
    Strategy("top-down", "top-down", "teachers[-1] distils teachers[-2] first (DPT -> SFT -> DFT); the distilled "
             "TA then serves the next one down, ... the student", 2, lambda ts: ts, _top_down),
    Strategy("repeat", "repeat (control)", "compute control of bottom-up: student <- teachers[-1], then <- "
             "teachers[-1] again, ... (as many stages as bottom-up, at least two); each DPT -> SFT -> DFT", 1,
             lambda ts: ts[-1:], _repeat, control=True),
)}


def plan(cfg: PlanInput) -> list[Stage]:
    """The stages of ``cfg.strategy``, in the order they run."""
    run = Path(cfg.run_dir)
    teachers = {t.name: Teacher(t.name, t.model, tuple(t.devices), str(Path(cfg.cache_root) / t.name))
                for t in cfg.teachers}
    return STRATEGIES[cfg.strategy].stages(cfg, teachers, run)


def place_steps(stages: Sequence[Stage], where: Callable[[Stage, str, str], str | Path]) -> list[Stage]:
    """The same stages with step ``s`` of stage ``st`` writing to ``where(st, s, model_in)`` (``model_in``:
    the model the step starts from). Later stages that start from a moved final model follow it; a
    teacher an earlier stage produced (top-down) follows it too, its cache beside that model (the
    targets depend on nothing else)."""
    moved: dict[str, str] = {}
    out = []
    for st in stages:
        student_in = moved.get(st.student_in, st.student_in)
        teacher = st.teacher
        if teacher is not None and teacher.model in moved:
            final = Path(moved[teacher.model])
            teacher = replace(teacher, model=str(final), cache_root=str(final.parent / "teacher_cache"))
        model, dirs = student_in, []
        for step in st.steps:
            d = str(where(replace(st, student_in=student_in, teacher=teacher), step, model))
            dirs.append((step, d))
            model = str(Path(d) / "final")
        new = replace(st, student_in=student_in, teacher=teacher, step_dirs=tuple(dirs))
        moved[st.final] = new.final
        out.append(new)
    return out


def chain(stages: Sequence[Stage]) -> str:
    """Who teaches whom, e.g. ``ta -> student ; teacher -> student`` (bottom-up) or
    ``teacher -> ta -> student`` (top-down: a distilled model goes on teaching); ``-`` without a teacher."""
    chains: list[tuple[str, list[str]]] = []  # (id of the stage that ends it, names)
    for st in stages:
        if st.teacher is None:
            continue
        if st.teacher.produced_by is not None and chains and chains[-1][0] == st.teacher.produced_by:
            chains[-1] = (st.id, chains[-1][1] + [st.learner])
        else:
            chains.append((st.id, [st.teacher.name, st.learner]))
    return " ; ".join(" -> ".join(names) for _, names in chains) or "-"


def teacher_chain(cfg: PlanInput) -> str:
    return chain(plan(cfg))
