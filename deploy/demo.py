"""The embedded default: the whole method on synthetic data and tiny models, on CPU (``make demo``).

1. synthesise the shapes dataset (captions, instructions, held-out questions per category);
2. build the tiny presets and train the tiny TA and tiny Teacher with the baseline recipe (PT -> FT; their
   PT trains the LLM too, as their LLMs start random), side by side (one core each);
3. run the paper's strategies for the tiny student — ``none`` (TinyLLaVA PT -> FT), ``single``
   (LLaVA-KD, Teacher -> student), ``bottom-up`` (CKD: TA -> student, then Teacher -> student) and
   ``top-down`` (Teacher -> TA, distilled TA -> student) — as one ``ckd ablate`` grid: real teacher
   servers, real caches (each teacher's filled once and reused by every strategy), the DeepSpeed
   trainer, training steps that are identical between strategies computed once, two points at a time;
4. evaluate every model on the held-out questions and print a table like the paper's (method,
   teacher chain, optimizer steps, teacher forward passes, accuracy per question category, average),
   the capacity-gap rows (each final student's gap to the Teacher, and each cascade's gap to every
   teacher of its chain before and after each stage), a loss-curve PNG and a bar chart.

``bench/method.py`` runs the same with the compute controls (``repeat``, step-matched baselines) for
several seeds. Run: ``python -m deploy.demo [--workdir runs/demo]``. Re-running reuses everything
finished. Whatever ordering comes out is reported as is: tiny models, minutes of CPU training.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from student_trainer.config import STEPS

DEMO_TEACHERS = ("ta", "teacher")  # smallest first; each strategy of the plan (a row of the table) uses its share
TEACHER_PRESETS = {"ta": "tiny-ta", "teacher": "tiny-teacher"}
STUDENT_PRESET = "tiny-student"
# the synthetic dataset (ckd_common.synth): n_eval held-out questions, split evenly over the categories
# (60 per category: one question is 1.7 points, a category's binomial std is <= 6.5 points). Every
# instruction image is asked all five categories (5 supervised answers per sequence instead of 2) and
# the questions go without LLaVA-1.5's short-answer instruction (sequences half as long): on 2 CPU
# cores that is what lets the tiny Teacher learn to read colour and shape in the demo's budget.
# 800 captions: the teachers pre-train their LLMs on them (below); the students' PT / DPT read them too.
SYNTH = {"n_pretrain": 800, "n_instruct": 800, "n_eval": 300, "rounds": (5, 5), "short_answer": False}
# Tiny random models need a far larger learning rate than the recipe's 2e-5 for pretrained LLMs;
# 1e-3 learns the synthetic task, 3e-3 was measured to diverge into answering the prior.
# A real teacher's LLM is pretrained; the tiny TA's and Teacher's start random. With PT training the
# connector only (the TinyLLaVA recipe) and FT 24 epochs, the tiny Teacher read count, colour and shape but
# found the asked cell only in some runs (held-out %, colour / count / existence / position / shape, seeds
# 0 / 2: 68 / 100 / 52 / 32 / 72 and 73 / 100 / 55 / 27 / 73; RoPE base, KV heads, learning rate, question
# forms and conversation layouts did not change that reliably). Pre-training the LLM too on the captions
# (TinyLLaVA-Factory's full pre-training: every caption names each object's colour, shape and cell) for
# 4 epochs, then FT 18 epochs (1,078 steps; the demo's budget): seeds 0 / 1 / 2: 85 / 100 / 67 / 60 / 85,
# 62 / 98 / 82 / 60 / 65, 58 / 100 / 78 / 58 / 73 -- every category clearly above chance in every seed (with
# FT 20 epochs: 53 / 100 / 72 / 68 / 77, 60 / 100 / 50 / 40 / 73, 67 / 100 / 77 / 62 / 68, and the demo took
# 612 s). The TA and Teacher train side by side, one core each.
TEACHER_STEPS = {"pt": {"lr": 1e-3, "global_batch": 16, "micro_batch": 16, "epochs": 4,
                        "trainable": ["connector", "llm"]},
                 "ft": {"lr": 1e-3, "global_batch": 16, "micro_batch": 16, "epochs": 18, "warmup_ratio": 0.1}}
# holdout 5 % (the trainer's default is 1 %): the capacity gap is measured on the held-out slice of the
# DFT data, ~40 samples of the demo's 800 instead of ~8. The students' PT / DPT (connector only) read a
# quarter of the 800 captions, 200 as before the teachers needed more: with all 800 the demo took 627 s.
STUDENT_STEPS = {name: {"lr": 1e-3, "global_batch": 16, "micro_batch": 16, "holdout": 0.05,
                        "epochs": 0.25 if s.split == "pretrain" else 3} for name, s in STEPS.items()}
# One torch thread per child process (trainer, server, eval): on 2 shared cores a 2-thread trainer's
# OpenMP spin-waits collapse as soon as anything else runs (the overlapped fill, the loader workers,
# another user): measured 4.2 s per TA step with 2 threads against 0.47 s with 1 on a loaded machine.
CHILD_THREADS = "1"
# ... and as many independent runs side by side as there are cores (2 here): the TA and the Teacher, then the
# grid's points (each a chain of short processes whose start-up would otherwise leave a core idle)
WORKERS = 2
MATCHED = "steps="  # a step-matched control's point name: f"{strategy},steps={reference strategy}"
MATCH_REFERENCE = "bottom-up"  # the method the step-matched controls are matched to (CKD)


def _cascade_config(work: Path, run: str, strategy: str, student: str, teachers: dict[str, str], steps: dict,
                    train_device: str = "cpu:1"):
    from deploy.cascade import CascadeConfig

    return CascadeConfig.from_dict({
        "run_dir": f"runs/{run}", "strategy": strategy, "student": student,
        # teachers on one simulated device, training on another: next-stage fills overlap training
        "teachers": [{"name": n, "model": m, "devices": ["cpu:0"]} for n, m in teachers.items()],
        "train": {"devices": [train_device], "steps": steps},
        "data": {"pretrain": "data/pretrain.json", "instruct": "data/instruct.json", "images": "data/images",
                 "eval": "data/eval.jsonl"},
        "cache": {"root": "cache", "k": 16},
        "server": {"args": ["--torch-threads", "1"]},
        "eval": {"batch_size": 50},
    }, base=work)


def student_grid(work: Path, teachers: dict[str, str], seeds: list[int], controls: bool = False):
    """The student's strategies as one ablation: the paper's (every strategy of the plan that is not a
    control) and, with ``controls``, the control strategies (``repeat``) and the step-matched baselines
    (``none`` and ``single`` with their last step run for as many optimizer steps as CKD bottom-up)."""
    from deploy.ablate import AblateConfig, Point
    from deploy.cascade import STRATEGIES

    base = _cascade_config(work, "students", MATCH_REFERENCE, f"models/{STUDENT_PRESET}", teachers, STUDENT_STEPS)
    points = [Point(s.name, s.name) for s in STRATEGIES.values() if not s.control]
    if controls:
        points += [Point(s.name, s.name) for s in STRATEGIES.values() if s.control]
        points += [Point(f"{s},{MATCHED}{MATCH_REFERENCE}", s, match_steps=MATCH_REFERENCE) for s in ("none", "single")]
    return AblateConfig(base, points, list(seeds))


def method_label(point) -> str:
    from deploy.cascade import STRATEGIES

    label = STRATEGIES[point.strategy].method
    if point.match_steps is not None:
        label += f", steps = {STRATEGIES[point.match_steps].method}"
    return label


def gap_to_teacher(model: str | Path, cfg, teacher: str = DEMO_TEACHERS[-1]) -> dict:
    """The capacity gap of ``model`` to ``teacher`` of the cascade config ``cfg`` (``student_trainer.gap``:
    mean sparse divergence to the teacher's cache on the held-out slice of the data its DFT cache was
    filled from, the DFT step's template and holdout), exactly as the cascades record it
    (``deploy.cascade.gaps``). Read from the grid's gap store when a cascade measured it already, else
    measured here and stored. ``{"error": ...}`` when it cannot be measured (e.g. an empty held-out slice)."""
    from deploy.cascade.gaps import STORE, GapStore, gap_job, measured_step, stored_gap
    from student_trainer.config import LLAVA_KD_STEPS

    job = gap_job(cfg, Path(cfg.cache_root) / teacher, measured_step(LLAVA_KD_STEPS), model, cfg.gap_max_samples)
    return stored_gap(GapStore(Path(cfg.run_dir) / STORE), job)


def _gap_text(gap: dict | None) -> str:
    if gap is None or "error" in gap:
        return "n/a"
    return " / ".join(f"{gap[k]:.3f}" for k in ("kl_text", "kl_vis", "rel") if k in gap)


def _loss_curves(runs: dict[str, list[Path]], out: Path) -> None:
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
            ax.plot(range(offset, offset + len(ys)), ys, label=d.name.split("-")[0])
            offset += len(ys)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss (total)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run_demo(workdir: str | Path = "runs/demo", seed: int = 0, log=print, seeds: list[int] | None = None,
             controls: bool = False, name: str = "results") -> dict:
    """The demo (one training seed ``seed``), or with ``seeds``/``controls`` the method bench. The data and
    the models' initialisation always come from ``seed``; ``seeds`` are the students' training seeds."""
    from ckd_common.model import init_preset
    from ckd_common.synth import synthesize
    from deploy.ablate import Ablation, Row, write_report
    from deploy.cascade import Cascade
    from deploy.cascade.gaps import CascadeGaps
    from deploy.cascade.supervise import Children, side_by_side

    work = Path(workdir).resolve()
    os.environ.setdefault("OMP_NUM_THREADS", CHILD_THREADS)  # inherited by every child the cascades start
    t0 = time.perf_counter()
    quiet = lambda *_: None  # noqa: E731 - the cascades' own chatter goes to their logs

    def stage(msg: str) -> None:
        log(f"==> [{time.perf_counter() - t0:6.1f}s] {msg}")

    stage(f"synthetic data -> {work / 'data'}")
    if not (work / "data" / "eval.jsonl").is_file():
        synthesize(work / "data", seed=seed, **SYNTH)
    stage("tiny presets -> models/")
    for p in (STUDENT_PRESET, *TEACHER_PRESETS.values()):
        if not (work / "models" / p / "config.json").is_file():
            init_preset(p, work / "models" / p, seed=seed)

    # the TA and the Teacher are independent: trained side by side, one core each
    stage(f"training the tiny {' and the tiny '.join(DEMO_TEACHERS)} with the baseline recipe (full PT -> FT), side by side")
    cfgs = [_cascade_config(work, f"{t}-baseline", "none", f"models/{TEACHER_PRESETS[t]}", {}, TEACHER_STEPS,
                            train_device=f"cpu:{i % WORKERS}") for i, t in enumerate(DEMO_TEACHERS)]
    children = Children()  # one set for both: Ctrl-C (main thread) stops both trainings at once
    with children.stop_on_signals():
        summaries = side_by_side(children, [Cascade(c.validate(), quiet, children).execute for c in cfgs],
                                 WORKERS, name="teacher")
    rows, teachers = [], {}
    for tname, summary in zip(DEMO_TEACHERS, summaries):
        teachers[tname] = summary["final"]
        rows.append(Row.from_summaries(f"{tname} (full PT->FT)", "- (the teacher itself)", [summary]))

    grid = student_grid(work, teachers, seeds if seeds is not None else [seed], controls).validate()
    stage(f"student: {', '.join(p.name for p in grid.points)} x seeds {grid.seeds} (one ckd ablate grid, "
          f"{WORKERS} points at a time)")
    ablation = Ablation(grid, log=lambda m: stage(m.removeprefix("[ablate] ")) if m.startswith("[ablate] ") else None,
                        workers=WORKERS)
    students = ablation.execute()
    gaps = {"untrained student": gap_to_teacher(work / "models" / STUDENT_PRESET, grid.base)}
    curves, along = {}, {}
    for point, row in zip(grid.points, students["rows"]):
        row.label = method_label(point)
        pcfg = grid.point_config(point, grid.seeds[0])
        stages = ablation.stages(pcfg)
        curves[row.label] = [stages[-1].step_out(s) for s in stages[-1].steps]
        gaps[row.label] = gap_to_teacher(stages[-1].final, grid.base)
        row.extra["gap to Teacher"] = _gap_text(gaps[row.label])
        rows.append(row)
        summary = Path(pcfg.run_dir) / "summary.json"
        along[row.label] = CascadeGaps.lines(json.loads(summary.read_text()).get("gap")) if summary.is_file() else []

    png = work / "loss_curves.png"
    _loss_curves(curves, png)
    title = (f"Accuracy (%) on the held-out synthetic questions (tiny models, CPU; training seeds {grid.seeds}; "
             "reported as measured)")
    report = write_report(rows, work, title, name=name)
    log(f"\n{title}\n")
    log(report["table"])
    width = max(map(len, [*gaps, *along]))  # the step-matched rows' labels are long
    log("\ncapacity gap to the Teacher (text KL / visual KL / relation distance on held-out cached samples; "
        "seed " + str(grid.seeds[0]) + "):")
    for label, gap in gaps.items():
        log(f"  {label:<{width}} {_gap_text(gap)}" + (f"  ({gap['error']})" if gap and "error" in gap else ""))
    log("\ncapacity gap along each cascade (text KL to each teacher of its chain; seed " + str(grid.seeds[0]) + "):")
    for label, lines in along.items():
        for line in lines:
            log(f"  {label:<{width}} {line}")
    log(f"\nloss curves: {png}\nresults: {report['md']} (plot {report['png']}); every run (configs, logs, "
        f"timelines, checkpoints) under {work / 'runs'}")
    seconds = time.perf_counter() - t0
    log(f"demo finished in {seconds:.0f} s")
    return {"rows": rows, "png": str(png), "seconds": seconds, "gaps": gaps, "points": grid.points}


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
