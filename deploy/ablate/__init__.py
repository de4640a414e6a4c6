"""``ckd ablate GRID.yaml``: many cascades from one set of caches, compared with error bars.

One cache per teacher (filled once, or reused: no teacher server starts when the caches are
complete), a base cascade config, a grid of trainer overrides (any ``TrainConfig`` option, per step)
and strategies, and a list of seeds. Every point x seed runs from the same student checkpoint;
identical training steps are computed once and shared; every point is evaluated; the table
(mean ± std over seeds per category, with each row's optimizer steps and teacher forward passes)
and a plot are written to the run directory.

Modules, one job each:
  config  the grid: points, seeds, overrides validated against TrainConfig (every problem in one error)
  run     the points as cascades with shared steps; resume; Ctrl-C
  report  the results table and plot (also the demo's and bench/method.py's)
"""
from deploy.ablate.config import AblateConfig, Point
from deploy.ablate.report import Row, format_table, write_report
from deploy.ablate.run import Ablation, run_ablation, step_key

__all__ = ["AblateConfig", "Point", "Ablation", "run_ablation", "step_key", "Row", "format_table", "write_report"]
