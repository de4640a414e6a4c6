"""The evaluation command's one typed config (``ckd_eval`` / ``student_trainer eval``).

Declared once here: the command line is derived from the fields (``ckd_common.config.add_arguments``;
``cli.py`` adds only the positional ACTION), validated with every problem in one
``ConfigError`` before any model is loaded, printed at start and saved next to what the command
writes: ``<out>/eval_config.json`` for a run, ``<out>/<bench>_score_config.json`` for ``score``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ckd_common.config import CommandConfig
from ckd_common.templates import TEMPLATE_NAMES
from ckd_eval.common import EvalError
from ckd_eval.scorers import BENCHMARKS, PAPER_BENCHMARKS, Benchmark, get_benchmark

ACTIONS = ("run", "score")
DTYPES = ("float32", "bfloat16", "float16")
RUN_CONFIG_FILE = "eval_config.json"


def _help(text: str, **meta) -> dict:
    """A field's command-line metadata (ckd_common.config.add_arguments): its help text and more."""
    return {"help": text, **meta}


def parse_benches(spec: str | None) -> list[Benchmark]:
    """``--bench`` (comma-separated; 'paper' = the seven of the paper) as benchmarks, in order."""
    if not spec:
        raise EvalError("--bench is required")
    names = []
    for n in (x.strip() for x in spec.split(",")):
        names.extend(PAPER_BENCHMARKS if n == "paper" else [n] if n else [])
    return [get_benchmark(n) for n in dict.fromkeys(names)]


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``--annotation BENCH=PATH`` (repeatable) as {bench: path}."""
    out = {}
    for p in pairs:
        if "=" not in p:
            raise EvalError(f"--annotation expects BENCH=PATH, got {p!r}")
        k, v = p.split("=", 1)
        get_benchmark(k)
        out[k] = v
    return out


@dataclass
class EvalConfig(CommandConfig):
    # the positional ACTION (cli.py adds it); every other field is an option of the same name
    action: str = field(default="run", metadata=_help(
        "run = generate + score (default); score = score an existing answer file", cli=False))
    bench: str | None = field(default=None, metadata=_help(
        f"comma-separated benchmarks ({','.join(BENCHMARKS)}; 'paper' = the seven of the paper)"))
    model: str | None = field(default=None, metadata=_help("HF llava model directory (run)"))
    data_root: str | None = field(default=None, metadata=_help(
        "evaluation data root in the LLaVA-1.5 layout (see ckd_eval/README.md)"))
    out: str | None = field(default=None, metadata=_help(
        "output directory: <out>/<bench>/answers.jsonl, result.json; <out>/results.json"))
    template: str | None = field(default=None, metadata=_help(
        "conversation template; default: the one the checkpoint records, else qwen2_base"))
    batch_size: int = field(default=8, metadata=_help("questions per generate() call"))
    max_new_tokens: int | None = field(default=None, metadata=_help(
        "override the per-benchmark limit (128; 1024 for ScienceQA)"))
    limit: int | None = field(default=None, metadata=_help(
        "only the first N questions of each benchmark (smoke tests)"))
    device: str = field(default="cpu", metadata=_help("cpu or cuda[:N]"))
    dtype: str = field(default="float32", metadata=_help("model dtype for generation", choices=DTYPES))
    annotation: list[str] = field(default_factory=list, metadata=_help(
        "override a benchmark's annotations path (run); repeatable", metavar="BENCH=PATH"))
    overwrite: bool = field(default=False, metadata=_help("regenerate answer files instead of resuming"))
    allow_partial: bool = field(default=False, metadata=_help(
        "score incomplete answer files over the answered questions (marked partial)"))
    progress: bool = field(default=True, metadata=_help("progress bars"))
    answers: str | None = field(default=None, metadata=_help("answer file to score (score)"))
    annotations: str | None = field(default=None, metadata=_help(
        "annotations path (score); default: the benchmark's path under --data-root"))
    questions: str | None = field(default=None, metadata=_help("question file (score; needed by pope and mmmu)"))

    def problems(self) -> list[str]:
        p = []
        benches: list[Benchmark] = []
        try:
            benches = parse_benches(self.bench)
        except EvalError as e:
            p.append(str(e))
        try:
            parse_overrides(self.annotation)
        except EvalError as e:
            p.append(str(e))
        if self.action not in ACTIONS:
            p.append(f"action {self.action!r}: choose one of {', '.join(ACTIONS)}")
        elif self.action == "run" and not (self.model and self.out and self.data_root):
            p.append("eval run needs --model, --bench, --data-root and --out")
        elif self.action == "score":
            if len(benches) > 1:
                p.append("eval score takes exactly one --bench")
            if not self.answers:
                p.append("eval score needs --answers FILE.jsonl")
        if self.template is not None and self.template not in TEMPLATE_NAMES:
            p.append(f"--template {self.template!r}: choose one of {', '.join(TEMPLATE_NAMES)}")
        if self.dtype not in DTYPES:
            p.append(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        for name in ("batch_size", "max_new_tokens", "limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                p.append(f"--{name.replace('_', '-')} must be at least 1 (got {v})")
        return p

    @property
    def benches(self) -> list[Benchmark]:
        return parse_benches(self.bench)

    @property
    def overrides(self) -> dict[str, str]:
        return parse_overrides(self.annotation)

    @property
    def score_out(self) -> Path:
        """Where ``score`` writes (default: next to the answers)."""
        return Path(self.out) if self.out else Path(self.answers).parent
