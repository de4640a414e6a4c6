"""deploy: the top layer — the ``ckd`` command (models, data, demo; the cascade later) and the
recipes for launching teacher servers and trainers on split GPUs, one machine or many.

Run: ``ckd --help``; the embedded demo: ``make demo`` (= ``python -m deploy.demo``).
"""
