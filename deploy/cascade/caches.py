"""Is a teacher's cache already complete? Answered cheaply enough to ask on every re-run.

A cache group is reusable for a (data split, template) when it holds every sample's key and was
filled by this exact teacher (weights fingerprint). Both facts are computed once per run and
remembered: the prepared data per (data file, template, tokenizer, visual tokens) — every teacher
of a cascade shares the student's tokenizer, so each split is prepared once, not once per teacher —
and each teacher's fingerprint per (directory, dtype, size and mtime of every file in it), taken
from a running server's ``/v1/info`` when one is up, else by loading the weights once. A teacher
whose files change gets a new key, so a changed teacher is still detected.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from deploy.cascade.plan import Teacher
from deploy.cascade.supervise import CascadeError


def weights_dtype(devices) -> str:
    """The dtype a teacher server loads (and fingerprints) the weights in: bf16 on CUDA, fp32 on CPU."""
    return "bfloat16" if devices[0].startswith("cuda") else "float32"


def model_files_key(model_dir: str | Path) -> tuple:
    """What a fingerprint of ``model_dir`` depends on, cheaply: each file's name, size and mtime."""
    root = Path(model_dir).resolve()
    return (str(root),) + tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                       for p in root.iterdir() if p.is_file()))


class CacheCheck:
    """Per-run memo of prepared data and teacher fingerprints; thread-safe (fills may overlap)."""

    def __init__(self, data_of, images: str | None):
        self._data_of = data_of                  # split -> data file
        self._images = images
        self._datasets: dict[tuple, Any] = {}
        self._fingerprints: dict[tuple, str] = {}
        self._lock = threading.RLock()
        self.fingerprints_computed = 0           # weights loaded to fingerprint a teacher (tests read it)

    # -- prepared data -------------------------------------------------------------------------

    def dataset(self, teacher: Teacher, split: str, template: str):
        from transformers import AutoConfig, AutoTokenizer

        from ckd_common.data import prepare_file
        from ckd_common.model import num_visual_tokens
        from ckd_common.tokenizer import tokenizer_hash

        tok = AutoTokenizer.from_pretrained(teacher.model, local_files_only=True)
        mcfg = AutoConfig.from_pretrained(teacher.model, local_files_only=True)
        data = self._data_of(split)
        key = (data, template, tokenizer_hash(tok), num_visual_tokens(mcfg), mcfg.image_token_id, self._images)
        with self._lock:
            if key not in self._datasets:
                self._datasets[key] = prepare_file(data, tok, template, num_visual_tokens(mcfg), mcfg.image_token_id,
                                                   self._images, on_error="skip")
            return self._datasets[key]

    # -- teacher fingerprints ------------------------------------------------------------------

    def _fingerprint_key(self, teacher: Teacher) -> tuple:
        return (weights_dtype(teacher.devices),) + model_files_key(teacher.model)

    def remember_fingerprint(self, teacher: Teacher, fingerprint: str) -> None:
        """The fingerprint a server reported for ``teacher`` (its ``/v1/info``): no need to load it here."""
        with self._lock:
            self._fingerprints[self._fingerprint_key(teacher)] = fingerprint

    def fingerprint(self, teacher: Teacher) -> str:
        import torch

        from ckd_common.model import load_vlm, model_fingerprint

        key = self._fingerprint_key(teacher)
        with self._lock:
            if key not in self._fingerprints:
                model, _ = load_vlm(teacher.model, dtype=getattr(torch, weights_dtype(teacher.devices)))
                self._fingerprints[key] = model_fingerprint(model)
                self.fingerprints_computed += 1
                del model
            return self._fingerprints[key]

    # -- the questions -------------------------------------------------------------------------

    def complete_group(self, teacher: Teacher, split: str, template: str):
        """The teacher's cache group that holds every sample of ``split`` (prepared with ``template``),
        or None. Says nothing yet about which teacher filled it: see :meth:`check_teacher`."""
        from logit_cache import GroupNotFoundError, find_group, open_group

        if not Path(teacher.model, "config.json").is_file():
            return None  # a teacher an earlier stage has not produced yet
        ds = self.dataset(teacher, split, template)
        try:
            group = open_group(teacher.cache_root, find_group(teacher.cache_root, ds.fingerprint, ds.template))
        except (GroupNotFoundError, FileNotFoundError):
            return None
        return group if {s.key for s in ds.samples} <= group.committed_keys() else None

    def check_teacher(self, teacher: Teacher, group, fingerprint: str | None = None) -> None:
        """CascadeError unless ``group`` was filled by this exact teacher."""
        fp = fingerprint or self.fingerprint(teacher)
        if group.meta.teacher_fingerprint != fp:
            raise CascadeError(f"cache {teacher.cache_root} holds targets of a different '{teacher.name}' "
                               f"(fingerprint {group.meta.teacher_fingerprint} != {fp}); "
                               f"point cache.root elsewhere or delete it")

    def complete(self, teacher: Teacher, split: str, template: str) -> bool:
        """True when the teacher's cache root already holds every sample of ``split`` for this exact
        teacher (weights fingerprint), tokenizer and template."""
        group = self.complete_group(teacher, split, template)
        if group is None:
            return False
        self.check_teacher(teacher, group)
        return True
