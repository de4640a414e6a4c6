"""``ckd_eval`` (= ``student_trainer eval``): generate answers and score them with the official rules.

  python -m ckd_eval --model DIR --bench vqav2,gqa,textvqa,sqa,mme,pope,mmmu[,synth] \\
                     --data-root DIR --out DIR [--batch-size 8 --limit N --allow-partial ...]
  python -m ckd_eval score --bench NAME --answers FILE.jsonl --annotations PATH \\
                     [--questions FILE] [--out DIR] [--allow-partial]

``ckd_eval``, ``python -m ckd_eval`` and ``student_trainer eval`` are the same command. The flags are
derived from ``ckd_eval.config.EvalConfig`` (one option per field). See ``ckd_eval/README.md`` for
every benchmark's layout under ``--data-root`` and its scoring quirks.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from dataclasses import fields
from pathlib import Path

from ckd_common.config import ConfigError, add_arguments, from_args
from ckd_eval.common import PROMPT_VERSION, EvalError, read_answers, read_json, read_questions, write_json
from ckd_eval.config import ACTIONS, RUN_CONFIG_FILE, EvalConfig
from ckd_eval.scorers import Benchmark


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command line of ``EvalConfig``: one option per field (ckd_common.config.add_arguments: help
    texts, defaults, choices and types come from the fields), plus the positional ACTION."""
    p.description = __doc__.split("\n\n")[0]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n\n", 1)[1]
    action = next(f for f in fields(EvalConfig) if f.name == "action")
    p.add_argument("action", nargs="?", default=action.default, choices=ACTIONS, help=action.metadata["help"])
    add_arguments(p, EvalConfig)
    return p


def config_from_args(a: argparse.Namespace) -> EvalConfig:
    return from_args(EvalConfig, a, action=a.action)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on an argparse subparsers object (``func`` = :func:`run_eval`)."""
    p = subparsers.add_parser("eval", help="evaluate a checkpoint on the paper's benchmarks, or score answer files")
    configure_parser(p)
    p.set_defaults(func=run_eval)
    return p


# ---------------------------------------------------------------------------------------------


def _paths(bench: Benchmark, data_root: Path | None, overrides: dict[str, str]) -> tuple[Path, Path, Path]:
    if data_root is None:
        raise EvalError("--data-root is required")
    root = data_root
    if bench.name == "synth" and not (root / bench.questions).exists() and (root / "eval.jsonl").exists():
        return root / "eval.jsonl", root / "images", Path(overrides.get("synth", root / "eval.jsonl"))
    return root / bench.questions, root / bench.images, Path(overrides.get(bench.name, root / bench.annotations))


def _check_inputs(bench: Benchmark, questions: Path, annotations: Path) -> None:
    layout = f"--data-root/{bench.questions}"
    if not questions.is_file():
        raise EvalError(f"{bench.name}: question file {questions} not found (expected layout: {layout}; "
                        f"source: {bench.source}; see ckd_eval/README.md)")
    if not annotations.exists():
        raise EvalError(f"{bench.name}: annotations {annotations} not found (expected layout: "
                        f"--data-root/{bench.annotations}; source: {bench.source}; see ckd_eval/README.md)")


def score_file(bench: Benchmark, answers_path: Path, annotations: Path, questions_path: Path | None = None,
               out_dir: Path | None = None, allow_partial: bool = False, limit: int | None = None) -> dict:
    """Score one answer file; returns the result record (without the model part)."""
    if questions_path is None and bench.needs_questions:
        raise EvalError(f"{bench.name}: scoring needs the question file (--questions, or --data-root with "
                        f"{bench.questions})")
    answers, bad = read_answers(answers_path, tolerant=bench.name == "vqav2")
    questions = None
    if questions_path is not None:
        questions = read_questions(questions_path, bench.questions)
        if limit is not None:
            questions = questions[:limit]
    kwargs = {"bad_lines": bad} if bench.name == "vqav2" else {}
    res = bench.scorer.score(answers, annotations, questions=questions, out_dir=out_dir,
                             allow_partial=allow_partial, **kwargs)
    meta = next((a.get("metadata") for a in answers if isinstance(a.get("metadata"), dict)), None) or {}
    partial = bool(allow_partial and questions is not None and len(answers) < len(questions))
    partial = partial or bool(res["details"].get("missing")) or bool(res["details"].get("missing_perception_subtasks"))
    return {"bench": bench.name, "metric": res["metric"], "score": res["score"], "n": res["n"],
            "partial": partial or bool(limit), "details": res["details"], "files": res.get("files", {}),
            "scorer_version": bench.scorer_version, "official_script": bench.official,
            "prompt_version": meta.get("prompt_version", "unknown (answer file from another tool)"),
            "template": meta.get("template"), "max_new_tokens": meta.get("max_new_tokens"),
            "answers": str(answers_path), "annotations": str(annotations),
            "questions": str(questions_path) if questions_path else None, "n_answers": len(answers),
            "model": {"fingerprint": meta.get("model_fingerprint", "unknown"),
                      "model_id": answers[0].get("model_id") if answers else None},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def format_table(results: list[dict]) -> str:
    rows = [("bench", "metric", "score", "n", "")]
    for r in results:
        s = "-" if r["score"] is None else f"{r['score']:.2f}"
        rows.append((r["bench"], r["metric"], s, str(r["n"]), "partial" if r.get("partial") else ""))
        if r["bench"] == "synth":
            for c, v in r["details"]["categories"].items():
                rows.append(("  " + c, "accuracy", f"{v['acc']:.2f}", str(v["n"]), ""))
        if r["bench"] == "mme":
            rows.append(("  perception %", "score / 20", f"{r['details']['perception_percent']:.2f}", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _merge_results(out: Path, new: list[dict]) -> dict:
    path = out / "results.json"
    merged = read_json(path, "results") if path.exists() else {"benchmarks": {}}
    for r in new:
        merged["benchmarks"][r["bench"]] = r
    merged["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_json(path, merged)
    (out / "results.md").write_text(format_table(list(merged["benchmarks"].values())) + "\n")
    return merged


def _run(cfg: EvalConfig) -> int:
    root = Path(cfg.data_root)
    plan = []
    for b in cfg.benches:  # check every input before loading the model
        q, img, ann = _paths(b, root, cfg.overrides)
        _check_inputs(b, q, ann)
        plan.append((b, q, img, ann))
    out = Path(cfg.out)
    cfg.save(out / RUN_CONFIG_FILE)
    from ckd_eval.generate import Generator, check_images, load_items, run_generation

    gen = Generator(cfg.model, template=cfg.template, device=cfg.device, dtype=cfg.dtype)
    results = []
    for b, q, img, ann in plan:
        items = load_items(b, q, img, cfg.limit)
        check_images(items, b, img)
        max_new = cfg.max_new_tokens or b.max_new_tokens
        bdir = out / b.name
        counts = run_generation(gen, items, bdir / "answers.jsonl", max_new, batch_size=cfg.batch_size,
                                overwrite=cfg.overwrite, progress=cfg.progress, desc=b.name)
        res = score_file(b, bdir / "answers.jsonl", ann, q, out_dir=bdir,
                         allow_partial=cfg.allow_partial or cfg.limit is not None, limit=cfg.limit)
        res["model"] = {"dir": str(cfg.model), "fingerprint": gen.fingerprint, **gen.info.to_dict()}
        res.update(template=gen.template.name, prompt_version=PROMPT_VERSION, max_new_tokens=max_new,
                   generation=counts, limit=cfg.limit, batch_size=cfg.batch_size)
        write_json(bdir / "result.json", res)
        results.append(res)
    _merge_results(out, results)
    print(format_table(results))
    print(f"results: {out / 'results.json'}")
    return 0


def _score(cfg: EvalConfig) -> int:
    b = cfg.benches[0]
    root = Path(cfg.data_root) if cfg.data_root else None
    if cfg.annotations:
        ann = Path(cfg.annotations)
    elif root is not None:
        ann = _paths(b, root, {})[2]
    else:
        raise EvalError(f"{b.name}: give --annotations (expected: {b.annotations}) or --data-root")
    if not ann.exists():
        raise EvalError(f"{b.name}: annotations {ann} not found (expected: {b.annotations}; source: {b.source})")
    qpath = Path(cfg.questions) if cfg.questions else (_paths(b, root, {})[0] if root is not None else None)
    if qpath is not None and not qpath.is_file():
        if cfg.questions or b.needs_questions:
            raise EvalError(f"{b.name}: question file {qpath} not found (expected: {b.questions}; source: {b.source})")
        qpath = None
    out = cfg.score_out
    cfg.save(out / f"{b.name}_score_config.json")
    res = score_file(b, Path(cfg.answers), ann, qpath, out_dir=out, allow_partial=cfg.allow_partial)
    write_json(out / f"{b.name}_result.json", res)
    print(format_table([res]))
    print(f"result: {out / (b.name + '_result.json')}")
    print(json.dumps({"bench": b.name, "score": res["score"]}))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Entry point of ``ckd_eval`` / ``student_trainer eval`` (returns an exit code; errors print one line)."""
    from ckd_common.data import DataError
    from ckd_common.model import ModelLoadError
    from ckd_common.templates import TemplateError

    try:
        cfg = config_from_args(args).validate()
        print(cfg.describe())
        return _score(cfg) if cfg.action == "score" else _run(cfg)
    except (ConfigError, EvalError, DataError, ModelLoadError, TemplateError) as e:
        print(f"ckd_eval: error: {e}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    p = configure_parser(argparse.ArgumentParser(prog="ckd_eval"))
    return run_eval(p.parse_args(argv))
