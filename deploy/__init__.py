"""deploy: the top layer (orchestration). It imports every other package; nothing imports it.

- ``cli.py``: the ``ckd`` umbrella command (model, data, fill, cascade, demo);
- ``fill.py`` + ``fill_pipeline.py``: teacher servers -> a logit cache (also run as ``logit_cache fill``);
- ``cascade/``: bottom-up / top-down / single / none cascades as child processes (config, plan,
  supervision, run);
- ``demo.py``: the embedded default run (``make demo``);
- ``recipes/``: launching servers and trainers on split GPUs, one machine or many, Slurm, systemd.

See deploy/README.md.
"""
