"""``student_trainer eval``: generate answers and score them with the official rules.

  student_trainer eval --model DIR --bench vqav2,gqa,textvqa,sqa,mme,pope,mmmu[,synth] \\
                       --data-root DIR --out DIR [--batch-size 8 --limit N --allow-partial ...]
  student_trainer eval score --bench NAME --answers FILE.jsonl --annotations PATH \\
                       [--questions FILE] [--out DIR] [--allow-partial]

``python -m student_trainer.eval ...`` is the same command. See ``student_trainer/eval/README.md``
for every benchmark's layout under ``--data-root`` and its scoring quirks.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

from student_trainer.eval.common import PROMPT_VERSION, EvalError, read_answers, read_json, read_questions, write_json
from student_trainer.eval.scorers import BENCHMARKS, PAPER_BENCHMARKS, Benchmark, get_benchmark


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.description = __doc__.split("\n\n")[0]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("action", nargs="?", default="run", choices=["run", "score"],
                   help="run = generate + score (default); score = score an existing answer file")
    p.add_argument("--bench", default=None,
                   help=f"comma-separated benchmarks ({','.join(BENCHMARKS)}; 'paper' = the seven of the paper)")
    p.add_argument("--model", help="HF llava model directory (run)")
    p.add_argument("--data-root", help="evaluation data root in the LLaVA-1.5 layout (see README)")
    p.add_argument("--out", help="output directory: <out>/<bench>/answers.jsonl, result.json; <out>/results.json")
    p.add_argument("--template", default=None,
                   help="conversation template; default: the one the checkpoint records, else qwen2_base")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="override the per-benchmark limit (128; 1024 for ScienceQA)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions of each benchmark (smoke tests)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--annotation", action="append", default=[], metavar="BENCH=PATH",
                   help="override a benchmark's annotations path (run); repeatable")
    p.add_argument("--overwrite", action="store_true", help="regenerate answer files instead of resuming")
    p.add_argument("--allow-partial", action="store_true",
                   help="score incomplete answer files over the answered questions (marked partial)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--answers", help="answer file to score (score)")
    p.add_argument("--annotations", help="annotations path (score); default: the benchmark's path under --data-root")
    p.add_argument("--questions", help="question file (score; needed by pope and mmmu)")
    return p


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
                        f"source: {bench.source}; see student_trainer/eval/README.md)")
    if not annotations.exists():
        raise EvalError(f"{bench.name}: annotations {annotations} not found (expected layout: "
                        f"--data-root/{bench.annotations}; source: {bench.source}; see student_trainer/eval/README.md)")


def _benches(spec: str | None) -> list[Benchmark]:
    if not spec:
        raise EvalError("--bench is required")
    names = []
    for n in (x.strip() for x in spec.split(",")):
        names.extend(PAPER_BENCHMARKS if n == "paper" else [n] if n else [])
    return [get_benchmark(n) for n in dict.fromkeys(names)]


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise EvalError(f"--annotation expects BENCH=PATH, got {p!r}")
        k, v = p.split("=", 1)
        get_benchmark(k)
        out[k] = v
    return out


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


def _run(args) -> int:
    benches = _benches(args.bench)
    if not args.model or not args.out:
        raise EvalError("eval run needs --model, --bench, --data-root and --out")
    root = Path(args.data_root) if args.data_root else None
    overrides = _overrides(args.annotation)
    plan = []
    for b in benches:  # check every input before loading the model
        q, img, ann = _paths(b, root, overrides)
        _check_inputs(b, q, ann)
        plan.append((b, q, img, ann))
    from student_trainer.eval.generate import Generator, check_images, load_items, run_generation

    gen = Generator(args.model, template=args.template, device=args.device, dtype=args.dtype)
    out = Path(args.out)
    results = []
    for b, q, img, ann in plan:
        items = load_items(b, q, img, args.limit)
        check_images(items, b, img)
        max_new = args.max_new_tokens or b.max_new_tokens
        bdir = out / b.name
        counts = run_generation(gen, items, bdir / "answers.jsonl", max_new, batch_size=args.batch_size,
                                overwrite=args.overwrite, progress=not args.no_progress, desc=b.name)
        res = score_file(b, bdir / "answers.jsonl", ann, q, out_dir=bdir,
                         allow_partial=args.allow_partial or args.limit is not None, limit=args.limit)
        res["model"] = {"dir": str(args.model), "fingerprint": gen.fingerprint, **gen.info.to_dict()}
        res.update(template=gen.template.name, prompt_version=PROMPT_VERSION, max_new_tokens=max_new,
                   generation=counts, limit=args.limit, batch_size=args.batch_size)
        write_json(bdir / "result.json", res)
        results.append(res)
    _merge_results(out, results)
    print(format_table(results))
    print(f"results: {out / 'results.json'}")
    return 0


def _score(args) -> int:
    benches = _benches(args.bench)
    if len(benches) != 1:
        raise EvalError("eval score takes exactly one --bench")
    b = benches[0]
    if not args.answers:
        raise EvalError("eval score needs --answers FILE.jsonl")
    root = Path(args.data_root) if args.data_root else None
    if args.annotations:
        ann = Path(args.annotations)
    elif root is not None:
        ann = _paths(b, root, {})[2]
    else:
        raise EvalError(f"{b.name}: give --annotations (expected: {b.annotations}) or --data-root")
    if not ann.exists():
        raise EvalError(f"{b.name}: annotations {ann} not found (expected: {b.annotations}; source: {b.source})")
    qpath = Path(args.questions) if args.questions else (_paths(b, root, {})[0] if root is not None else None)
    if qpath is not None and not qpath.is_file():
        if args.questions or b.needs_questions:
            raise EvalError(f"{b.name}: question file {qpath} not found (expected: {b.questions}; source: {b.source})")
        qpath = None
    out = Path(args.out) if args.out else Path(args.answers).parent
    res = score_file(b, Path(args.answers), ann, qpath, out_dir=out, allow_partial=args.allow_partial)
    write_json(out / f"{b.name}_result.json", res)
    print(format_table([res]))
    print(f"result: {out / (b.name + '_result.json')}")
    print(json.dumps({"bench": b.name, "score": res["score"]}))
    return 0


def run_eval(args) -> int:
    """Entry point for ``student_trainer eval`` (returns an exit code; errors print one line)."""
    from ckd_common.data import DataError
    from ckd_common.model import ModelLoadError
    from ckd_common.templates import TemplateError

    try:
        return _score(args) if args.action == "score" else _run(args)
    except (EvalError, DataError, ModelLoadError, TemplateError) as e:
        print(f"student_trainer eval: error: {e}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    p = configure_parser(argparse.ArgumentParser(prog="student_trainer eval"))
    return run_eval(p.parse_args(argv))
