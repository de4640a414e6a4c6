"""Is a teacher's cache already complete? Answered cheaply enough to ask on every re-run.

A cache group is reusable for a (data split, template) when it holds every sample's key and was
filled by this exact teacher (weights fingerprint). Both facts are computed once per run and
remembered: the prepared data — the cascade prepares each split once, before any fill or training
step, and hands it in (``prepared``); every teacher of a cascade shares the student's tokenizer, so
one prepared dataset serves them all (checked) — and each teacher's fingerprint per (directory,
dtype, size and mtime of every file in it), taken from a running server's ``/v1/info`` when one is
up, else by loading the weights once. A teacher whose files change gets a new key, so a changed
teacher is still detected.
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

    def __init__(self, data_of, images: str | None, prepared=None):
        self._data_of = data_of                  # split -> data file
        self._images = images
        self._prepared = prepared                # (split, template) -> PreparedData; None: open/build by spec
        self._datasets: dict[tuple, Any] = {}
        self._fingerprints: dict[tuple, str] = {}
        self._lock = threading.RLock()
        self.fingerprints_computed = 0           # weights loaded to fingerprint a teacher (tests read it)

    # -- prepared data -------------------------------------------------------------------------

    def dataset(self, teacher: Teacher, split: str, template: str):
        """The prepared data of ``split`` as ``teacher`` sees it (its tokenizer, visual tokens, image token)."""
        from ckd_common.model import data_contract
        from ckd_common.prepared import PrepareSpec, obtain

        with self._lock:
            key = (teacher.model, split, template)
            if key not in self._datasets:
                contract, tok = data_contract(teacher.model)
                if self._prepared is None:
                    spec = PrepareSpec.of(self._data_of(split), self._images, template, contract)
                    self._datasets[key] = obtain(spec, tok, on_error="skip", log=None)
                else:
                    ds = self._prepared(split, template)
                    diffs = [f"{f} {getattr(contract, f)!r} != {getattr(ds.spec, f)!r}"
                             for f in ("tokenizer_hash", "num_visual_tokens", "image_token_id")
                             if getattr(contract, f) != getattr(ds.spec, f)]
                    if diffs:
                        raise CascadeError(f"teacher {teacher.name} ({teacher.model}) does not match the data prepared "
                                           f"for the student: " + "; ".join(diffs))
                    self._datasets[key] = ds
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
        return group if set(ds.keys) <= group.committed_keys() else None

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
