"""deploy: the top layer (orchestration) — the ``ckd`` command (models, data, fill, cascade, demo),
the fill that joins teacher servers to a cache (``fill.py``; also run as ``logit_cache fill``), the
cascade, and the recipes for launching teacher servers and trainers on split GPUs, one machine or many.

Run: ``ckd --help``; the embedded demo: ``make demo`` (= ``python -m deploy.demo``). See README.md.
"""
