"""Results tables and plots of runs compared side by side (``ckd ablate``, the demo, ``bench/method.py``).

A :class:`Row` is one method or grid point: its accuracy per column (each held-out category of the
synthetic benchmark, or the benchmark's score) over seeds, and the compute behind it (optimizer
steps, teacher forward passes = cached targets consumed; ``deploy.cascade.compute``). The table
shows mean ± sample std over seeds and the compute; the footnote gives the evaluation's own
standard error (binomial, one model), which bounds how small a difference between rows can mean
anything even with many seeds.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

AVERAGE = "avg"


@dataclass
class Row:
    label: str
    chain: str
    scores: dict[str, list[float]]           # column -> one value per seed
    optimizer_steps: list[int] = field(default_factory=list)
    teacher_samples: list[int] = field(default_factory=list)
    n: dict[str, int] = field(default_factory=dict)  # column -> held-out questions behind each value
    extra: dict[str, str] = field(default_factory=dict)  # further columns, shown as given (e.g. the gap)

    @classmethod
    def from_summaries(cls, label: str, chain: str, summaries: list[dict], **kw) -> Row:
        """A row of cascade summaries (``summary.json``: ``eval``, ``optimizer_steps``, ``teacher_samples``)."""
        row = cls(label, chain, {}, **kw)
        for s in summaries:
            row.add(s["eval"], s.get("optimizer_steps"), s.get("teacher_samples"))
        return row

    def add(self, result: dict, optimizer_steps: int | None = None, teacher_samples: int | None = None) -> None:
        """One seed: an eval result record (ckd_eval) and its compute."""
        for col, acc, n in eval_columns(result):
            self.scores.setdefault(col, []).append(acc)
            self.n[col] = n
        if optimizer_steps is not None:
            self.optimizer_steps.append(int(optimizer_steps))
        if teacher_samples is not None:
            self.teacher_samples.append(int(teacher_samples))

    def mean(self, col: str) -> float:
        v = self.scores.get(col, [])
        return statistics.fmean(v) if v else float("nan")

    def std(self, col: str) -> float:
        v = self.scores.get(col, [])
        return statistics.stdev(v) if len(v) > 1 else float("nan")

    @property
    def seeds(self) -> int:
        return max((len(v) for v in self.scores.values()), default=0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = {c: self.mean(c) for c in self.scores}
        d["std"] = {c: self.std(c) for c in self.scores}
        return d


def eval_columns(result: dict) -> list[tuple[str, float, int]]:
    """(column, accuracy, n) of one eval result: every category it reports, then the benchmark's score."""
    cats = (result.get("details") or {}).get("categories") or {}
    cols = [(c, float(v["acc"]), int(v["n"])) for c, v in cats.items()]
    return cols + [(AVERAGE if cats else result.get("bench", "score"), float(result["score"]), int(result["n"]))]


def columns(rows: list[Row]) -> list[str]:
    out: list[str] = []
    for r in rows:
        out += [c for c in r.scores if c not in out and c != AVERAGE]
    return out + ([AVERAGE] if any(AVERAGE in r.scores for r in rows) else [])


def _cell(row: Row, col: str) -> str:
    if col not in row.scores:
        return "-"
    m, s = row.mean(col), row.std(col)
    return f"{m:.1f}" if math.isnan(s) else f"{m:.1f} ± {s:.1f}"


def _compute(values: list[int]) -> str:
    if not values:
        return "-"
    return str(values[0]) if len(set(values)) == 1 else f"{statistics.fmean(values):.0f}"


def format_table(rows: list[Row]) -> str:
    cols = columns(rows)
    extra = list(dict.fromkeys(k for r in rows for k in r.extra))
    head = ["method", "teacher chain", "seeds", "opt steps", "teacher fwd", *cols, *extra]
    body = [[r.label, r.chain, str(r.seeds), _compute(r.optimizer_steps), _compute(r.teacher_samples),
             *(_cell(r, c) for c in cols), *(r.extra.get(k, "-") for k in extra)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    left = 2  # the two text columns are left-aligned, numbers right-aligned

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), "-" * len(line(head))] + [line(b) for b in body])


def footnote(rows: list[Row]) -> str:
    """What the columns mean, and the evaluation's standard error (binomial; at 50 % it is largest)."""
    n_cat = min((n for r in rows for c, n in r.n.items() if c != AVERAGE), default=None)
    n_all = min((r.n[AVERAGE] for r in rows if AVERAGE in r.n), default=None)
    out = ["accuracy (%): mean ± sample std over seeds (one seed: the value); opt steps = optimizer steps of "
           "every training step of the run; teacher fwd = cached teacher targets the run consumed (teacher "
           "forward passes behind its KD terms)."]
    if n_cat:
        se_cat = 50.0 / math.sqrt(n_cat)
        se_avg = 50.0 / math.sqrt(n_all) if n_all else float("nan")
        out.append(f"evaluation standard error of one model (binomial, at 50 %): {se_cat:.1f} points per category "
                   f"(n = {n_cat} questions), {se_avg:.1f} on the average (n = {n_all}); two rows evaluated on the "
                   f"same questions differ by more than ~{2 * math.sqrt(2) * se_avg:.1f} on the average only "
                   f"~5 % of the time by evaluation noise alone (seed-to-seed training noise comes on top: the ±).")
    return "\n".join(out)


def plot(rows: list[Row], out: Path, title: str = "") -> Path:
    """Grouped bars: one group per column, one bar per row, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = columns(rows)
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cols) * max(1, len(rows)) * 0.45 + 2), 3.8))
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(cols))]
        means = [r.mean(c) for c in cols]
        errs = [0.0 if math.isnan(r.std(c)) else r.std(c) for c in cols]
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=r.label)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(rows: list[Row], out_dir: Path, title: str, name: str = "results") -> dict:
    """``<name>.md`` (table + footnote), ``<name>.json`` (every value per seed), ``<name>.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    md, js, png = out_dir / f"{name}.md", out_dir / f"{name}.json", out_dir / f"{name}.png"
    md.write_text(f"{title}\n\n```\n{table}\n```\n\n{footnote(rows)}\n")
    tmp = js.with_suffix(".tmp")
    tmp.write_text(json.dumps({"title": title, "rows": [r.to_dict() for r in rows]}, indent=1))
    tmp.replace(js)
    plot(rows, png, title)
    return {"table": table + "\n" + footnote(rows), "md": str(md), "json": str(js), "png": str(png),
            "rows": [r.to_dict() for r in rows]}
