"""Feedback on rank 0: a progress bar (step, loss terms, samples/s, ETA), TensorBoard scalars,
``metrics.jsonl`` (one line per optimizer step), and at the end a loss-curve PNG and a JSON summary."""
from __future__ import annotations

import json
from pathlib import Path

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CURVE = "loss_curve.png"
TERMS = ("total", "ce", "kl_text", "kl_vis", "rel")


class Feedback:
    def __init__(self, out: Path, total_steps: int, start_step: int, *, enabled: bool, progress: bool,
                 tensorboard: bool, terms: tuple[str, ...], desc: str):
        self.out, self.total, self.enabled, self.terms = out, total_steps, enabled, terms
        self.bar = self.tb = None
        if not enabled:
            return
        metrics = out / METRICS
        if metrics.exists():  # a resumed run replaces the steps after its checkpoint
            keep = [ln for ln in metrics.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= start_step]
            metrics.write_text("".join(ln + "\n" for ln in keep))
        self._metrics = open(metrics, "a")
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None)
            except ImportError:
                print("student_trainer: tensorboard is not installed; TensorBoard scalars are off "
                      "(pip install 'llava-ckd[trainer]')")

    def step(self, rec: dict) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps(rec) + "\n")
        self._metrics.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])
        if self.bar is not None:
            post = {t: f"{rec[t]:.4f}" for t in self.terms}
            post["samples/s"] = f"{rec['samples_per_s']:.1f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def read_metrics(out: Path) -> list[dict]:
    p = Path(out) / METRICS
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


def plot_curve(records: list[dict], terms: tuple[str, ...], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    kd = [t for t in terms if t in ("kl_text", "kl_vis", "rel")]
    panels = [[t for t in terms if t not in kd]] + ([kd] if kd else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, group in zip(axes[0], panels):
        for t in group:
            ax.plot(steps, [max(r[t], 1e-12) if t in kd else r[t] for r in records], label=t, lw=1.2)
        if group is kd:  # KD terms are orders of magnitude below CE: their own panel, log scale
            ax.set_yscale("log")
            ax.set_title("distillation terms")
        else:
            ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def summarize(records: list[dict], terms: tuple[str, ...], extra: dict) -> dict:
    def mean(rs, t):
        return sum(r[t] for r in rs) / len(rs) if rs else None

    head, tail = records[: max(1, len(records) // 10)], records[-max(1, len(records) // 10):]
    out = dict(extra)
    out["steps"] = len(records)
    out["first"] = {t: mean(head, t) for t in terms}
    out["last"] = {t: mean(tail, t) for t in terms}
    return out
