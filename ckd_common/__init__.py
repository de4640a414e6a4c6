"""ckd_common: what every package of the LLaVA-CKD toolkit agrees on — the VLM (model), data and
templates, sample keys, teacher targets, the distillation loss (ckd_common.kd) and typed configs.

Run: ``ckd model init|convert|compose|info``, ``ckd data synth|prepare``, ``ckd demo``.
"""
__version__ = "0.1.0"
