"""deploy: the top layer (orchestration). It imports every other package; nothing imports it.

- ``cli.py``: the ``ckd`` umbrella command (model, data, fill, cascade, ablate, gap, demo, selftest);
- ``fill.py`` + ``fill_pipeline.py`` + ``fill_frames.py`` + ``fill_lock.py``: teacher servers -> a logit
  cache (also run as ``logit_cache fill``): the typed config and CLI, senders and writer threads, wire
  answers decoded straight into cache segments, one live fill per cache group;
- ``cascade/``: the strategies of ``cascade/plan.py`` (none, single, bottom-up, top-down, repeat) run as
  child processes (config, plan, supervision, caches, compute, run);
- ``ablate/``: ``ckd ablate``, a grid of cascades x seeds from shared caches and shared steps;
- ``demo.py``: the embedded default run (``make demo``);
- ``selftest*.py``: ``ckd selftest``, the machine check before a long job (the real-shape models and the
  measured child processes are shared with ``bench/real_shapes.py``);
- ``recipes/``: launching servers and trainers on split GPUs, one machine or many, Slurm, systemd.

See deploy/README.md.
"""
