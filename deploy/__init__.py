"""deploy: the top layer (orchestration). It imports every other package; nothing imports it.

- ``cli.py``: the ``ckd`` umbrella command (model, data, fill, cascade, demo, selftest);
- ``fill.py`` + ``fill_pipeline.py``: teacher servers -> a logit cache (also run as ``logit_cache fill``);
- ``cascade/``: bottom-up / top-down / single / none cascades as child processes (config, plan,
  supervision, run);
- ``demo.py``: the embedded default run (``make demo``);
- ``selftest*.py``: ``ckd selftest``, the machine check before a long job (the real-shape models and the
  measured child processes are shared with ``bench/real_shapes.py``);
- ``recipes/``: launching servers and trainers on split GPUs, one machine or many, Slurm, systemd.

See deploy/README.md.
"""
