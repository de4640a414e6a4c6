"""The cascade's typed config (``ckd cascade CONFIG.yaml``): read from the nested YAML, validated
with every problem in one error before anything starts, printed at start and saved as
``cascade.json`` in the run directory.

The trainer is driven from its own typed config: per-step overrides (``train.steps.<step>``) are
fields of ``student_trainer.config.TrainConfig``, parsed like its command-line options and checked
with its own validation here, so a misspelt or renamed option fails before the first server starts.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ckd_common.config import CommandConfig, ConfigError, options, parse_value
from deploy.cascade.plan import STRATEGIES, plan
from logit_cache.meta import DEFAULT_VALUE_ENCODING, VALUE_ENCODINGS
from student_trainer.config import STEPS, TEACHER_GROUP, TrainConfig

# held-out samples per gap measurement: a few seconds of a 0.5B student's forwards on a GPU, plenty
# for a mean divergence (its standard error shrinks as 1/sqrt(n) and each sample has many positions)
DEFAULT_GAP_SAMPLES = 256
# TrainConfig fields the cascade sets itself (paths, devices, resumption, quiet output); every other
# option of the trainer can be overridden per step.
CASCADE_SETS = ("step", "model", "data", "out", "images", "cache", "teacher_fingerprint", "zero_stage", "resume",
                "progress", "tensorboard", "prepared")
TRAIN_OPTIONS = tuple(o.name for o in options(TrainConfig) if o.name not in CASCADE_SETS)
# options of `student_trainer distill` only (the teacher's cache): not for steps without a teacher
TEACHER_OPTIONS = tuple(o.name for o in options(TrainConfig) if o.group == TEACHER_GROUP)


@dataclass
class TeacherSpec:
    name: str
    model: str
    devices: list[str] = field(default_factory=lambda: ["cpu"])


@dataclass
class CascadeConfig(CommandConfig):
    """The resolved configuration of one cascade (``ckd cascade CONFIG.yaml``)."""

    run_dir: str
    strategy: str
    student: str
    pretrain_data: str
    instruct_data: str
    images: str | None = None
    eval_data: str | None = None              # a synth-style eval.jsonl (held-out questions)
    teachers: list[TeacherSpec] = field(default_factory=list)
    train_devices: list[str] = field(default_factory=lambda: ["cpu"])
    cache_root: str = "cache"
    k: int = 64
    encoding: str = DEFAULT_VALUE_ENCODING
    zero_stage: int = 1
    overlap: bool = True
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-step TrainConfig overrides
    server_args: list[str] = field(default_factory=list)
    fill_args: list[str] = field(default_factory=list)
    eval_batch_size: int = 16
    gap: bool = True                          # record the student's gap to each chain teacher (deploy.cascade.gaps)
    gap_max_samples: int | None = DEFAULT_GAP_SAMPLES  # held-out samples per gap measurement (None: all)

    @classmethod
    def from_yaml(cls, path: str | Path) -> CascadeConfig:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {p} does not exist"], "cascade config")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"{p} is not valid YAML: {e}"], "cascade config") from None
        return cls.from_dict(raw, base=p.parent)

    @classmethod
    def from_dict(cls, raw: dict, base: Path | None = None) -> CascadeConfig:
        """Nested YAML layout -> flat config. Relative paths resolve against ``base`` (the YAML's folder)."""
        problems = []
        known = {"run_dir", "strategy", "student", "teachers", "train", "data", "cache", "overlap", "server",
                 "fill", "eval", "gap"}
        unknown = sorted(set(raw) - known)
        if unknown:
            problems.append(f"unknown top-level keys {unknown}; known: {sorted(known)}")

        def rel(v):
            if v is None or base is None or "://" in str(v) or Path(v).is_absolute():
                return None if v is None else str(v)
            return str(base / v)

        data, train, cache = raw.get("data") or {}, raw.get("train") or {}, raw.get("cache") or {}
        teachers = []
        for i, t in enumerate(raw.get("teachers") or []):
            if not isinstance(t, dict) or "model" not in t:
                problems.append(f"teachers[{i}] needs at least 'model' (and 'name', 'devices')")
                continue
            teachers.append(TeacherSpec(str(t.get("name") or Path(t["model"]).name), rel(t["model"]),
                                        [str(d) for d in t.get("devices", ["cpu"])]))
        student = raw.get("student")
        if isinstance(student, dict):
            student = student.get("model")
        gap = raw.get("gap", True)
        if isinstance(gap, bool):
            gap = {"enabled": gap}
        if not isinstance(gap, dict) or set(gap) - {"enabled", "max_samples"}:
            problems.append(f"gap must be true/false or {{enabled: bool, max_samples: N or null}}, got {gap!r}")
            gap = {}
        steps = train.get("steps") or {}
        if not isinstance(steps, dict) or not all(isinstance(v or {}, dict) for v in steps.values()):
            problems.append("train.steps must map step names to option mappings, e.g. {dpt: {micro_batch: 8}}")
        if problems:
            raise ConfigError(problems, "cascade config")
        return cls(
            run_dir=rel(raw.get("run_dir", "runs/cascade")), strategy=str(raw.get("strategy", "")),
            student=rel(student), pretrain_data=rel(data.get("pretrain")), instruct_data=rel(data.get("instruct")),
            images=rel(data.get("images")), eval_data=rel(data.get("eval")), teachers=teachers,
            train_devices=[str(d) for d in train.get("devices", ["cpu"])],
            cache_root=rel(cache.get("root", "cache")), k=int(cache.get("k", 64)),
            encoding=str(cache.get("encoding", DEFAULT_VALUE_ENCODING)), zero_stage=int(train.get("zero_stage", 1)),
            overlap=bool(raw.get("overlap", True)), steps={str(k): dict(v or {}) for k, v in steps.items()},
            server_args=[str(a) for a in (raw.get("server") or {}).get("args", [])],
            fill_args=[str(a) for a in (raw.get("fill") or {}).get("args", [])],
            eval_batch_size=int((raw.get("eval") or {}).get("batch_size", 16)),
            gap=bool(gap.get("enabled", True)),
            gap_max_samples=(None if gap.get("max_samples", DEFAULT_GAP_SAMPLES) is None
                             else int(gap.get("max_samples", DEFAULT_GAP_SAMPLES))),
        )

    # -- what the stages need ------------------------------------------------------------------

    def data_of(self, split: str) -> str:
        return {"pretrain": self.pretrain_data, "instruct": self.instruct_data}[split]

    @property
    def train_ranks(self) -> int:
        return len(self.train_devices) if self.train_devices[0].startswith("cuda") else 1

    def train_config(self, step: str, model: str, out: str | Path, cache: str | None = None,
                     resume: bool = False, prepared: str | None = None) -> TrainConfig:
        """The trainer's config for one step of a stage: what the cascade sets plus the step's overrides."""
        overrides = {k: parse_value(TrainConfig, k, v) for k, v in self.steps.get(step, {}).items()}
        return TrainConfig(step=step, model=Path(model), data=Path(self.data_of(STEPS[step].split)), out=Path(out),
                           images=Path(self.images) if self.images else None,
                           prepared=Path(prepared) if prepared else None,
                           cache=cache if STEPS[step].uses_teacher else None, zero_stage=self.zero_stage,
                           resume=resume, progress=False, tensorboard=False, **overrides)

    # -- validation ----------------------------------------------------------------------------

    def problems(self, models: bool = True) -> list[str]:
        """Every problem of the config; ``models=False`` skips the model-compatibility check (it loads
        each tokenizer: a caller validating many configs of the same models does it once)."""
        out = []
        strategy = STRATEGIES.get(self.strategy)
        if strategy is None:
            out.append(f"strategy {self.strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}")
        elif len(self.teachers) < strategy.min_teachers:
            out.append(f"strategy {self.strategy} needs at least {strategy.min_teachers} teacher(s), "
                       f"got {len(self.teachers)}")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            out.append(f"teacher names must be unique, got {names}")
        paths = [("student", self.student), ("data.pretrain", self.pretrain_data), ("data.instruct", self.instruct_data)]
        for label, p in paths + [(f"teacher {t.name}", t.model) for t in self.teachers]:
            if p is None:
                out.append(f"{label} is required")
            elif label.startswith("data"):
                if not Path(p).is_file():
                    out.append(f"{label}: file {p} does not exist")
            elif not (Path(p) / "config.json").is_file():
                out.append(f"{label}: {p} is not a model directory (no config.json)")
        for label, p in (("data.images", self.images), ("data.eval", self.eval_data)):
            if p is not None and not Path(p).exists():
                out.append(f"{label}: {p} does not exist")
        for who, devs in [("train", self.train_devices)] + [(f"teacher {t.name}", t.devices) for t in self.teachers]:
            out += [f"{who}: {p}" for p in device_problems(devs)]
        if self.k < 1:
            out.append(f"cache.k must be >= 1, got {self.k}")
        if self.encoding not in VALUE_ENCODINGS:
            out.append(f"cache.encoding must be one of {VALUE_ENCODINGS}, got {self.encoding!r}")
        if self.gap_max_samples is not None and self.gap_max_samples < 1:
            out.append(f"gap.max_samples must be >= 1 (or null: every held-out sample), got {self.gap_max_samples}")
        if not 0 <= self.zero_stage <= 3:
            out.append(f"train.zero_stage must be 0..3, got {self.zero_stage}")
        out += self._override_problems()
        if not out:
            out += self._trainer_problems()
        if not out and models:
            out += self._model_compat_problems()
        return out

    def _override_problems(self) -> list[str]:
        """Each ``train.steps.<step>.<option>`` names a step of the trainer's table and one of its options
        (TrainConfig fields), with a value of the option's type."""
        out = []
        for step, ov in self.steps.items():
            if step not in STEPS:
                out.append(f"train.steps: unknown step {step!r}; steps are {', '.join(STEPS)}")
                continue
            for name, value in ov.items():
                if name not in TRAIN_OPTIONS:
                    why = ("is set by the cascade" if name in CASCADE_SETS else "is not an option of the trainer")
                    out.append(f"train.steps.{step}.{name} {why}; options are {', '.join(TRAIN_OPTIONS)}")
                elif name in TEACHER_OPTIONS and not STEPS[step].uses_teacher:
                    out.append(f"train.steps.{step}.{name}: step {step} reads no teacher cache")
                else:
                    try:
                        parse_value(TrainConfig, name, value)
                    except ValueError as e:
                        out.append(f"train.steps.{step}.{name}: {e}")
        return out

    def _trainer_problems(self) -> list[str]:
        """The trainer's own validation of every planned step, now rather than mid-run (batch sizes that do
        not divide, loss weights on a step without a teacher, ...)."""
        out = []
        cuda = self.train_devices[0].startswith("cuda")
        for stage in plan(self):
            model = stage.student_in if Path(stage.student_in, "config.json").is_file() else self.student
            cache = stage.teacher.cache_root if stage.teacher else None
            for step in stage.steps:
                cfg = self.train_config(step, model, stage.step_out(step), cache).resolved()
                out += [f"train.steps.{step}: {p}" for p in cfg.problems(world_size=self.train_ranks, cuda=cuda)
                        if f"train.steps.{step}: {p}" not in out]
        return out

    def _model_compat_problems(self) -> list[str]:
        """Every model must share tokenizer, vision config and visual-token count with the student:
        otherwise a cached target lines up with nothing."""
        ref = _model_signature(self.student)
        out = []
        for t in self.teachers:
            sig = _model_signature(t.model)
            for fld in ("tokenizer_hash", "vision", "num_visual_tokens"):
                if sig[fld] != ref[fld]:
                    shown = (sig[fld], ref[fld]) if fld != "vision" else ("(differs)", "(student's)")
                    out.append(f"teacher {t.name} ({t.model}): {fld} {shown[0]} != student's {shown[1]}")
        return out

    def validate(self) -> CascadeConfig:
        probs = self.problems()
        if probs:
            raise ConfigError(probs, "cascade config")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def device_problems(devices: list[str]) -> list[str]:
    """'cpu', 'cpu:N' (a simulated separate CPU device: same cores, scheduled as distinct) or 'cuda:N'."""
    out = []
    if not devices:
        return ["no devices given"]
    n_cuda = None
    for d in devices:
        kind, _, idx = d.partition(":")
        if kind == "cpu" and (not idx or idx.isdigit()):
            continue
        if kind == "cuda" and idx.isdigit():
            if n_cuda is None:
                import torch

                n_cuda = torch.cuda.device_count()
            if int(idx) >= n_cuda:
                out.append(f"device {d} does not exist ({n_cuda} CUDA device(s) visible)")
            continue
        out.append(f"device {d!r} is not 'cpu', 'cpu:N' or 'cuda:N'")
    kinds = {d.partition(":")[0] for d in devices}
    if len(kinds) > 1:
        out.append(f"devices mix CPU and CUDA: {devices}")
    return out


def _model_signature(model_dir: str) -> dict:
    from transformers import AutoTokenizer

    from ckd_common.tokenizer import tokenizer_hash

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    vc = cfg.get("vision_config", {})
    n = (vc.get("image_size", 0) // max(1, vc.get("patch_size", 1))) ** 2
    n -= 1 if cfg.get("vision_feature_select_strategy") == "default" else 0
    vision = {k: vc.get(k) for k in ("hidden_size", "image_size", "patch_size", "num_hidden_layers",
                                     "intermediate_size", "num_attention_heads")}
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return {"tokenizer_hash": tokenizer_hash(tok), "vision": vision, "num_visual_tokens": n}


__all__ = ["CascadeConfig", "TeacherSpec", "TRAIN_OPTIONS", "CASCADE_SETS", "device_problems"]
