"""The step table and the typed, validated trainer config.

One trainer runs every step; a step is only configuration (:class:`StepSpec`): which template its
data uses, which parts train, whether a teacher cache is read, and the recipe defaults
(LLaVA-KD / TinyLLaVA: DPT/PT lr 1e-3 global batch 256; SFT/DFT/FT lr 2e-5 global batch 128;
AdamW, cosine, 3% warm-up, weight decay 0, 1 epoch, max length 2048). Every default is
overridable; ``TrainConfig.resolved()`` fills the step defaults, ``validate()`` reports every
problem at once (ckd_common.config.ConfigError), and the resolved config is printed at start and
saved next to every checkpoint as ``student_trainer.json``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ckd_common.config import CommandConfig, ConfigError, path_problems
from ckd_common.holdout import DEFAULT_HOLDOUT
from ckd_common.kd.objective import DEFAULT_JSD_BETA, DIVERGENCES, KDObjective
from ckd_common.kd.weights import REL_VARIANTS, KDWeights
from ckd_common.templates import PRETRAIN, QWEN2_BASE

CONFIG_FILE = "student_trainer.json"
PARTS = ("vision", "connector", "llm")  # the vision tower is frozen in every step
TRAINABLE_PARTS = PARTS[1:]


@dataclass(frozen=True)
class StepSpec:
    name: str
    description: str
    recipe: str                   # the recipe the step belongs to: "tinyllava" or "llava-kd"
    split: str                    # the data it reads: "pretrain" (captions) or "instruct" (SPLITS)
    template: str                 # ckd_common.templates name the data is prepared with
    trainable: tuple[str, ...]    # subset of PARTS
    uses_teacher: bool            # reads cached targets (KD terms) or CE only
    lr: float
    global_batch: int


# In training order within each recipe: recipe_steps() reads the order from here.
STEPS: dict[str, StepSpec] = {s.name: s for s in (
    StepSpec("pt", "TinyLLaVA pre-training: captions, CE, connector only", "tinyllava", "pretrain", PRETRAIN, ("connector",), False, 1e-3, 256),
    StepSpec("ft", "TinyLLaVA fine-tuning: instructions, CE, connector + LLM", "tinyllava", "instruct", QWEN2_BASE, ("connector", "llm"), False, 2e-5, 128),
    StepSpec("dpt", "LLaVA-KD distilled pre-training: captions, full KD loss, connector only", "llava-kd", "pretrain", PRETRAIN, ("connector",), True, 1e-3, 256),
    StepSpec("sft", "LLaVA-KD SFT: instructions, CE only, connector + LLM", "llava-kd", "instruct", QWEN2_BASE, ("connector", "llm"), False, 2e-5, 128),
    StepSpec("dft", "LLaVA-KD distilled fine-tuning: instructions, full KD loss, connector + LLM", "llava-kd", "instruct", QWEN2_BASE, ("connector", "llm"), True, 2e-5, 128),
)}
SPLITS = ("pretrain", "instruct")


def recipe_steps(recipe: str) -> tuple[str, ...]:
    """The steps of a recipe, in training order."""
    return tuple(s.name for s in STEPS.values() if s.recipe == recipe)


TINYLLAVA_STEPS = recipe_steps("tinyllava")  # PT -> FT: the baseline, no teacher
LLAVA_KD_STEPS = recipe_steps("llava-kd")    # DPT -> SFT -> DFT: one distillation stage (`distill --step all`)
TRAIN_STEPS = ("pt", "ft", "sft")      # `student_trainer train`
DISTILL_STEPS = ("dpt", "dft")         # `student_trainer distill` (+ 'all' = dpt -> sft -> dft)
PRECISIONS = ("auto", "fp32", "bf16")
# gradient_checkpointing unset (auto): on for LLMs of at least this many parameters. Qwen2.5-0.5B (494M)
# needs it to train at micro-batch 2 in 24 GiB (docs/environment.md §4); a few-million-parameter LLM
# gains nothing from it but the recompute.
GC_AUTO_MIN_LLM_PARAMS = 100_000_000
ON_MISSING = ("error", "skip")

# The command line's option groups (ckd_common.config.add_arguments); `train` has no TEACHER_GROUP.
TEACHER_GROUP = "teacher"
OPTION_GROUPS = {TEACHER_GROUP: "teacher cache (distill only)",
                 "optimisation": "optimisation (defaults: the step's LLaVA-KD recipe)", "engine": "engine",
                 "loss": "loss: alpha*ce + beta*kl_text + gamma*kl_vis + delta*rel", "data": "data",
                 "checkpoints": "checkpoints and feedback"}


def _opt(default=dataclasses.MISSING, **meta):
    """A TrainConfig field and its command-line metadata (help, choices, group)."""
    return field(default=default, metadata=meta)


def _step_default(attr: str) -> str:
    by_value: dict = {}
    for s in STEPS.values():
        by_value.setdefault(getattr(s, attr), []).append(s.name)
    return "default: " + ", ".join(f"{'/'.join(names)} {v:g}" for v, names in by_value.items())


@dataclass
class TrainConfig(CommandConfig):
    """One training step. ``None`` fields take the step's recipe default in ``resolved()``."""

    step: str = _opt(choices=tuple(STEPS), help="; ".join(f"{s.name}: {s.description}" for s in STEPS.values()))
    model: Path = _opt(help="student: an HF llava directory")
    data: Path = _opt(help="LLaVA json / jsonl")
    out: Path = _opt(help="run directory (checkpoints, final/, metrics, TensorBoard)")
    images: Path | None = _opt(None, help="image root of the data's 'image' fields")
    # the teacher's cached targets (DPT/DFT only: `student_trainer distill`)
    cache: str | None = _opt(None, group=TEACHER_GROUP, help="logit cache root (path or fsspec URL); the group "
                             "matching the data's fingerprint and template is picked")
    teacher_fingerprint: str | None = _opt(None, group=TEACHER_GROUP,
                                           help="also require the cache to come from this teacher")
    on_missing: str = _opt("error", group=TEACHER_GROUP, choices=ON_MISSING,
                           help="samples without cached targets: fail (default) or leave them out and count them")
    # optimisation (recipe defaults)
    lr: float | None = _opt(None, group="optimisation", help=_step_default("lr"))
    global_batch: int | None = _opt(None, group="optimisation", help="samples per optimizer step over all ranks; "
                                    + _step_default("global_batch"))
    micro_batch: int = _opt(4, group="optimisation", help="samples per forward per rank")
    epochs: float = _opt(1.0, group="optimisation")
    max_steps: int | None = _opt(None, group="optimisation", help="stop after this many optimizer steps")
    trainable: list[str] | None = _opt(None, group="optimisation", choices=TRAINABLE_PARTS,
                                       help="a part this step trains (repeat the option for several), instead of the "
                                       "step's own; the vision tower stays frozen. E.g. pt with --trainable connector "
                                       "--trainable llm is TinyLLaVA-Factory's full pre-training (the LLM trained on "
                                       "captions too): how the demo's tiny teachers, whose LLMs start random, pre-train")
    warmup_ratio: float = _opt(0.03, group="optimisation")
    weight_decay: float = _opt(0.0, group="optimisation")
    grad_clip: float = _opt(1.0, group="optimisation", help="0 = off")
    adam_betas: tuple[float, float] = _opt((0.9, 0.999), group="optimisation", metavar=("B1", "B2"),
                                           help="AdamW betas")
    adam_eps: float = _opt(1e-8, group="optimisation", help="AdamW epsilon")
    max_length: int = _opt(2048, group="optimisation")
    seed: int = _opt(0, group="optimisation")
    # engine
    zero_stage: int = _opt(2, group="engine", choices=(0, 1, 2, 3))
    precision: str = _opt("auto", group="engine", choices=PRECISIONS, help="auto: bf16 on GPU, fp32 on CPU")
    gradient_checkpointing: bool | None = _opt(
        None, group="engine", help="recompute the LLM's activations in the backward (less memory, ~1/3 more compute); "
        f"default: auto = on when the LLM has >= {GC_AUTO_MIN_LLM_PARAMS // 10**6}M parameters (real-size models), "
        "off for smaller ones (the tiny presets)")
    # loss (alpha ce, beta kl_text, gamma kl_vis, delta rel); None -> 1 with a teacher, 0 without
    alpha: float | None = _opt(None, group="loss", help="default 1 (always)")
    beta: float | None = _opt(None, group="loss", help="default 1 (0 without a teacher)")
    gamma: float | None = _opt(None, group="loss", help="default 1 (0 without a teacher or with --no-visual-kd)")
    delta: float | None = _opt(None, group="loss", help="default 1 (0 without a teacher or with --no-visual-kd)")
    rel_variant: str = _opt("flat", group="loss", choices=REL_VARIANTS)
    # what the KD terms (beta, gamma) measure: ckd_common.kd.objective, docs/design.md §4.7
    divergence: str = _opt("forward_kl", group="loss", choices=DIVERGENCES,
                           help="divergence of the KD terms: forward_kl (LLaVA-KD), reverse_kl, jsd (TRL's "
                                "generalised JSD with --jsd-beta), tv")
    jsd_beta: float | None = _opt(None, group="loss", help=f"--divergence jsd: TRL's beta in [0, 1]; 0 = forward "
                                  f"KL, 1 = reverse KL (default {DEFAULT_JSD_BETA})")
    kd_temperature: float = _opt(1.0, group="loss", help="temperature T of the KD terms (teacher p^(1/T) "
                                 "renormalised over the k+1 buckets, student logits / T)")
    kd_t2_scale: bool = _opt(True, group="loss", help="multiply the KD terms by T^2 (Hinton)")
    kd_top_k: int | None = _opt(None, group="loss", help="use only the top-k' <= k of the cache's entries per "
                                "position, the rest joins the tail bucket (default: all k)")
    visual_kd: bool = _opt(True, group="loss", help="the visual terms (kl_vis, rel); --no-visual-kd distils "
                           "the response positions only and skips the visual rows' lm_head")
    chunk_size: int = _opt(256, group="loss", help="positions per fused lm_head chunk")
    # data
    group_by_length: bool = _opt(True, group="data", help="micro-batches of similar length")
    num_workers: int = _opt(2, group="data", help="prefetching loader workers")
    prefetch: int = _opt(4, group="data", help="micro-batches prefetched per worker")
    data_on_error: str = _opt("raise", group="data", choices=("raise", "skip"), help="bad records at preparation")
    prepared: Path | None = _opt(None, group="data", help="the prepared dataset to use (a directory `ckd data "
                                 "prepare` printed); refused if made for other inputs or stale. Default: opened, or "
                                 "built once, under $CKD_PREPARED_DIR (docs/prepared-data.md)")
    holdout: float = _opt(DEFAULT_HOLDOUT, group="data", help="fraction of samples never trained on, chosen by "
                          "sample-key hash, where `ckd gap` measures the student (0 = train on all)")
    # checkpoints and feedback
    save_every: int = _opt(0, group="checkpoints", help="periodic checkpoint every N steps (0: final only)")
    keep_last: int = _opt(2, group="checkpoints")
    resume: bool = _opt(False, group="checkpoints", help="continue from the newest checkpoint in --out")
    progress: bool = _opt(True, group="checkpoints", help="progress bar")
    tensorboard: bool = _opt(True, group="checkpoints", help="TensorBoard scalars under OUT/tb")

    # -- resolution ----------------------------------------------------------------------------
    @property
    def spec(self) -> StepSpec:
        return STEPS[self.step]

    @property
    def trainable_parts(self) -> tuple[str, ...]:
        """What this step trains: ``--trainable`` when given, else the step's own parts."""
        return tuple(self.trainable) if self.trainable else self.spec.trainable

    def resolved(self) -> "TrainConfig":
        """A copy with paths as Paths and every None default filled from the step table."""
        if self.step not in STEPS:
            return self  # validate() reports it
        spec = STEPS[self.step]
        kd = 1.0 if spec.uses_teacher else 0.0
        vis = kd if self.visual_kd else 0.0
        return dataclasses.replace(
            self,
            model=Path(self.model), data=Path(self.data), out=Path(self.out),
            images=Path(self.images) if self.images is not None else None,
            prepared=Path(self.prepared) if self.prepared is not None else None,
            lr=spec.lr if self.lr is None else float(self.lr),
            global_batch=spec.global_batch if self.global_batch is None else int(self.global_batch),
            alpha=1.0 if self.alpha is None else float(self.alpha),
            beta=kd if self.beta is None else float(self.beta),
            gamma=vis if self.gamma is None else float(self.gamma),
            delta=vis if self.delta is None else float(self.delta),
            jsd_beta=(DEFAULT_JSD_BETA if self.divergence == "jsd" else None) if self.jsd_beta is None
            else float(self.jsd_beta),
            adam_betas=tuple(float(b) for b in self.adam_betas),
        )

    @property
    def weights(self) -> KDWeights:
        """The loss weights of a resolved config (alpha, beta, gamma, delta = ce, kl_text, kl_vis, rel)."""
        return KDWeights(ce=self.alpha, kl_text=self.beta, kl_vis=self.gamma, rel=self.delta)

    @property
    def objective(self) -> KDObjective:
        """What the KD terms measure (divergence, temperature, top-k') of a resolved config."""
        return KDObjective(self.divergence, DEFAULT_JSD_BETA if self.jsd_beta is None else self.jsd_beta,
                           self.kd_temperature, self.kd_t2_scale, self.kd_top_k)

    # -- validation ----------------------------------------------------------------------------
    def problems(self, world_size: int | None = None, cuda: bool | None = None) -> list[str]:
        p: list[str] = []
        if self.step not in STEPS:
            p.append(f"step {self.step!r} is unknown; choose one of {sorted(STEPS)}")
            return p
        spec = STEPS[self.step]
        p += path_problems(model=(self.model, "dir"), data=(self.data, "file"))
        if self.model is not None and Path(self.model).is_dir() and not (Path(self.model) / "config.json").is_file():
            p.append(f"model: {self.model} has no config.json (expected an HF llava directory)")
        if self.images is not None and not Path(self.images).is_dir():
            p.append(f"images: directory {self.images} does not exist")
        if self.prepared is not None and not Path(self.prepared).is_dir():
            p.append(f"prepared: directory {self.prepared} does not exist")
        if self.out is None:
            p.append("out is required")
        elif Path(self.out).exists() and not Path(self.out).is_dir():
            p.append(f"out: {self.out} exists and is not a directory")
        if spec.uses_teacher and not self.cache:
            p.append(f"step {self.step} distils from cached teacher targets: --cache is required")
        if not spec.uses_teacher and self.cache:
            p.append(f"step {self.step} uses no teacher: --cache must not be given (use dpt/dft to distil)")
        if self.lr is not None and not self.lr > 0:
            p.append(f"lr must be > 0, got {self.lr}")
        gb = self.global_batch
        if gb is not None and gb < 1:
            p.append(f"global_batch must be >= 1, got {gb}")
        if self.micro_batch < 1:
            p.append(f"micro_batch must be >= 1, got {self.micro_batch}")
        if gb is not None and gb >= 1 and self.micro_batch >= 1:
            per = self.micro_batch * (world_size or 1)
            if gb % per:
                p.append(f"global_batch {gb} must be a multiple of micro_batch {self.micro_batch} x "
                         f"{world_size or 1} rank(s) = {per}")
        if not self.epochs > 0:
            p.append(f"epochs must be > 0, got {self.epochs}")
        if self.trainable is not None and (not self.trainable or set(self.trainable) - set(TRAINABLE_PARTS)):
            p.append(f"trainable must name parts among {TRAINABLE_PARTS} (the vision tower is always frozen), got "
                     f"{list(self.trainable)}")
        if self.max_steps is not None and self.max_steps < 1:
            p.append(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            p.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            p.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            p.append(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if self.max_length < 16:
            p.append(f"max_length must be >= 16, got {self.max_length}")
        if self.zero_stage not in (0, 1, 2, 3):
            p.append(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            p.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision == "bf16" and cuda is False:
            p.append("precision bf16 needs a GPU; on CPU the trainer runs fp32 (use --precision auto or fp32)")
        if self.zero_stage == 0 and (self.precision == "bf16" or (self.precision == "auto" and cuda)):
            p.append("bf16 (the GPU default) needs zero_stage >= 1: DeepSpeed ZeRO-0 with bf16 does not train "
                     "correctly; use --zero-stage 1..3 or --precision fp32")
        for name in ("alpha", "beta", "gamma", "delta"):
            v = getattr(self, name)
            if v is not None and v < 0:
                p.append(f"{name} must be >= 0, got {v}")
            if name != "alpha" and not spec.uses_teacher and v:
                p.append(f"{name}={v}: step {self.step} has no teacher, only alpha (CE) applies")
        if self.rel_variant not in REL_VARIANTS:
            p.append(f"rel_variant must be one of {REL_VARIANTS}, got {self.rel_variant!r}")
        p += self._kd_problems(spec)
        if self.chunk_size < 1:
            p.append(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.num_workers < 0:
            p.append(f"num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch < 1:
            p.append(f"prefetch must be >= 1, got {self.prefetch}")
        if self.on_missing not in ON_MISSING:
            p.append(f"on_missing must be one of {ON_MISSING}, got {self.on_missing!r}")
        if self.data_on_error not in ("raise", "skip"):
            p.append(f"data_on_error must be 'raise' or 'skip', got {self.data_on_error!r}")
        if not 0.0 <= self.holdout < 0.5:
            p.append(f"holdout must be in [0, 0.5) (a small held-out fraction; 0 = train on all), got {self.holdout}")
        if self.save_every < 0:
            p.append(f"save_every must be >= 0 (0 = only the final checkpoint), got {self.save_every}")
        if self.keep_last < 1:
            p.append(f"keep_last must be >= 1, got {self.keep_last}")
        return p

    def _kd_problems(self, spec: StepSpec) -> list[str]:
        """The KD objective's options: valid values, and set only where a teacher is read."""
        p: list[str] = []
        if self.divergence not in DIVERGENCES:
            p.append(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.jsd_beta is not None:
            if not 0.0 <= self.jsd_beta <= 1.0:
                p.append(f"jsd_beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {self.jsd_beta}")
            if self.divergence != "jsd":
                p.append(f"jsd_beta={self.jsd_beta} applies to --divergence jsd only (divergence is {self.divergence})")
        if not (self.kd_temperature > 0 and self.kd_temperature < float("inf")):
            p.append(f"kd_temperature must be a finite number > 0, got {self.kd_temperature}")
        if self.kd_top_k is not None and self.kd_top_k < 1:
            p.append(f"kd_top_k must be >= 1 (or unset: every cached entry), got {self.kd_top_k}")
        if not self.visual_kd:
            for name in ("gamma", "delta"):
                if getattr(self, name):
                    p.append(f"{name}={getattr(self, name)}: --no-visual-kd switches the visual terms off; "
                             f"leave --{name} unset")
        if not spec.uses_teacher:
            changed = [f"{name}={getattr(self, name)!r}" for name, default in KD_OPTION_DEFAULTS.items()
                       if getattr(self, name) != default and not (name == "jsd_beta" and self.divergence == "jsd")]
            if changed:
                p.append(f"{', '.join(changed)}: step {self.step} has no teacher, the KD options do not apply")
        return p

    def validate(self, world_size: int | None = None, cuda: bool | None = None) -> "TrainConfig":
        probs = self.problems(world_size, cuda)
        if probs:
            raise ConfigError(probs, f"student_trainer {self.step} config")
        return self

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = super().to_dict()
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        d = json.loads(Path(path).read_text())
        d.pop("config", None)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # fields that may differ between a run and its --resume (everything else must match)
    # (gradient checkpointing only trades memory for compute: the same losses and gradients, tested;
    # `prepared` is where the prepared data was found: the training set's hash guards its content)
    RESUME_FREE = ("resume", "progress", "tensorboard", "num_workers", "prefetch", "save_every", "keep_last",
                   "prepared", "gradient_checkpointing")

    def resume_differences(self, saved: "TrainConfig") -> list[str]:
        a, b = self.to_dict(), saved.to_dict()
        return [f"{k}: now {a[k]!r}, checkpoint {b.get(k)!r}" for k in a
                if k not in self.RESUME_FREE and a[k] != b.get(k)]


# the KD objective's options (`--step all` resets them for its SFT step, which has no teacher)
KD_OPTION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                      if f.name in ("divergence", "jsd_beta", "kd_temperature", "kd_t2_scale", "kd_top_k", "visual_kd")}


__all__ = ["KD_OPTION_DEFAULTS", "STEPS", "StepSpec", "TrainConfig", "ConfigError", "CONFIG_FILE", "TRAIN_STEPS",
           "DISTILL_STEPS", "PARTS", "TRAINABLE_PARTS", "SPLITS", "OPTION_GROUPS", "TEACHER_GROUP", "recipe_steps", "TINYLLAVA_STEPS",
           "LLAVA_KD_STEPS", "GC_AUTO_MIN_LLM_PARAMS"]
