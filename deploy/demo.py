"""The embedded default: the whole method on synthetic data and tiny models, on CPU (``make demo``).

1. synthesise the shapes dataset (captions, instructions, held-out questions);
2. build the tiny presets and train the tiny TA and tiny Teacher with the baseline recipe (PT -> FT);
3. run four cascades for the tiny student — ``none`` (TinyLLaVA PT -> FT), ``single`` (LLaVA-KD,
   Teacher -> student), ``bottom-up`` (CKD: TA -> student, then Teacher -> student) and
   ``top-down`` (Teacher -> TA, distilled TA -> student) — each through ``ckd cascade``: real teacher
   servers, real caches (shared, so the Teacher's cache is filled once and reused), the DeepSpeed
   trainer;
4. evaluate every model on the held-out questions and print a table like the paper's (method,
   teacher chain, accuracy per question category, average) and write a loss-curve PNG.

Run: ``python -m deploy.demo [--workdir runs/demo]``. Re-running reuses everything finished.
Whatever ordering comes out is reported as is: tiny models, minutes of CPU training.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from student_trainer.config import STEPS

CATEGORIES = ("colour", "shape", "count", "position", "existence")
# Tiny random models need a far larger learning rate than the recipe's 2e-5 for pretrained LLMs;
# 1e-3 learns the synthetic task, 3e-3 was measured to diverge into answering the prior.
TEACHER_STEPS = {"pt": {"lr": 1e-3, "global_batch": 16, "micro_batch": 16},
                 "ft": {"lr": 1e-3, "global_batch": 16, "micro_batch": 16, "epochs": 6}}
STUDENT_STEPS = {name: {"lr": 1e-3, "global_batch": 16, "micro_batch": 16,
                        "epochs": 1 if s.split == "pretrain" else 3} for name, s in STEPS.items()}
DEMO_TEACHERS = ("ta", "teacher")  # smallest first; each strategy of the plan (a row of the table) uses its share


def _cascade_config(work: Path, run: str, strategy: str, student: str, teachers: dict[str, str], steps: dict):
    from deploy.cascade import CascadeConfig

    return CascadeConfig.from_dict({
        "run_dir": f"runs/{run}", "strategy": strategy, "student": student,
        # teachers on one simulated device, training on another: next-stage fills overlap training
        "teachers": [{"name": n, "model": m, "devices": ["cpu:0"]} for n, m in teachers.items()],
        "train": {"devices": ["cpu:1"], "steps": steps},
        "data": {"pretrain": "data/pretrain.json", "instruct": "data/instruct.json", "images": "data/images",
                 "eval": "data/eval.jsonl"},
        "cache": {"root": "cache", "k": 16},
        "server": {"args": ["--torch-threads", "1"]},
        "eval": {"batch_size": 25},
    }, base=work)


def _row(label: str, chain: str, result: dict) -> dict:
    cats = result["details"]["categories"]
    return {"method": label, "chain": chain, **{c: cats.get(c, {}).get("acc", float("nan")) for c in CATEGORIES},
            "average": result["score"]}


def _table(rows: list[dict]) -> str:
    head = f"{'method':<22}{'teacher chain':<32}" + "".join(f"{c:>10}" for c in CATEGORIES) + f"{'avg':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<22}{r['chain']:<32}" + "".join(f"{r[c]:>10.1f}" for c in CATEGORIES)
                     + f"{r['average']:>8.1f}")
    return "\n".join(lines)


def _loss_curves(work: Path, runs: dict[str, list[Path]], out: Path) -> None:
    """One panel per method: the training loss of every step of its last stage, in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.2), squeeze=False)
    for ax, (label, step_dirs) in zip(axes[0], runs.items()):
        offset = 0
        for d in step_dirs:
            f = d / "metrics.jsonl"
            if not f.is_file():
                continue
            recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            ys = [r.get("total", r.get("loss")) for r in recs]
            ax.plot(range(offset, offset + len(ys)), ys, label=d.name)
            offset += len(ys)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss (total)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run_demo(workdir: str | Path = "runs/demo", seed: int = 0, log=print) -> dict:
    from ckd_common.model import init_preset
    from ckd_common.synth import synthesize
    from deploy.cascade import STRATEGIES, plan, run_cascade, teacher_chain

    work = Path(workdir).resolve()
    t0 = time.perf_counter()
    quiet = lambda *_: None  # noqa: E731 - the cascades' own chatter goes to their logs

    def stage(msg: str) -> None:
        log(f"==> [{time.perf_counter() - t0:6.1f}s] {msg}")

    stage(f"synthetic data -> {work / 'data'}")
    if not (work / "data" / "eval.jsonl").is_file():
        synthesize(work / "data", seed=seed, n_pretrain=200, n_instruct=800, n_eval=100)
    stage("tiny presets -> models/")
    for p in ("tiny-student", "tiny-ta", "tiny-teacher"):
        if not (work / "models" / p / "config.json").is_file():
            init_preset(p, work / "models" / p, seed=seed)

    rows, curves = [], {}
    teachers = {}
    for name, preset in zip(DEMO_TEACHERS, ("tiny-ta", "tiny-teacher")):
        stage(f"training the tiny {name} with the baseline recipe (PT -> FT)")
        cfg = _cascade_config(work, f"{name}-baseline", "none", f"models/{preset}", {}, TEACHER_STEPS)
        summary = run_cascade(cfg, log=quiet)
        teachers[name] = summary["final"]
        rows.append(_row(f"{name} (PT->FT)", "- (the teacher itself)", summary["eval"]))

    for strategy in STRATEGIES.values():
        stage(f"student: {strategy.method}")
        cfg = _cascade_config(work, f"student-{strategy.name}", strategy.name, "models/tiny-student",
                              {n: teachers[n] for n in strategy.teachers_used(DEMO_TEACHERS)}, STUDENT_STEPS)
        summary = run_cascade(cfg, log=quiet)
        rows.append(_row(strategy.method, teacher_chain(cfg), summary["eval"]))
        last = plan(cfg)[-1]
        curves[strategy.method] = [last.step_out(s) for s in last.steps]

    png = work / "loss_curves.png"
    _loss_curves(work, curves, png)
    table = _table(rows)
    (work / "results.md").write_text("Accuracy (%) on the held-out synthetic questions\n\n```\n" + table + "\n```\n")
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    log("\nAccuracy (%) on the held-out synthetic questions (tiny models, CPU; reported as measured)\n")
    log(table)
    log(f"\nloss curves: {png}\nresults: {work / 'results.md'}; every run (configs, logs, timelines, "
        f"checkpoints) under {work / 'runs'}")
    log(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return {"rows": rows, "png": str(png), "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from ckd_common.model import quiet_transformers

    quiet_transformers()
    run_demo(args.workdir, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
