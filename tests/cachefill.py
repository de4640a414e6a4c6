"""Test and bench helper: fill a logit_cache group in-process with a teacher on this machine
(ckd_common.teacher.TeacherRunner), no server.

It lives with the tests, not in a shipped package: the product path is ``teacher_server`` on
another GPU feeding ``logit_cache fill`` (deploy/fill.py). The trainer tests import it as
``cachefill`` (pytest puts tests/ on sys.path); the bench scripts add tests/ to sys.path to share
it. The group's metadata comes from the same factory as the fill's (``CacheMeta.for_dataset``),
so both writers record the same fields for the same teacher and data.
"""
from __future__ import annotations

from pathlib import Path


def fill_cache(teacher_dir: str | Path, data: str | Path, images: str | Path | None, template: str,
               cache_root: str | Path, k: int = 16, batch_size: int = 8, max_length: int = 2048,
               limit: int | None = None, vocab_limit: int | None = None, encoding: str = "f16") -> str:
    """Prepare ``data`` with the teacher's tokenizer (the prepared dataset under $CKD_PREPARED_DIR, which
    the trainer then opens), run the teacher, write one group; returns its name.

    ``limit`` fills only the first samples (to test missing targets); ``vocab_limit`` overrides the
    common vocabulary (to build a deliberately incompatible cache)."""
    import torch

    from ckd_common.model import load_vlm, model_info
    from ckd_common.prepared import PrepareSpec, obtain
    from ckd_common.teacher import TeacherInput, TeacherRunner
    from logit_cache import TARGET_KINDS, CacheMeta, open_group

    model, tok = load_vlm(teacher_dir)
    info = model_info(model, tok)
    ds = obtain(PrepareSpec.of(data, images, template, info, max_length), tok, log=None)  # as the trainer will
    vocab = vocab_limit or info.common_vocab
    meta = CacheMeta.for_dataset(ds, teacher_fingerprint=info.fingerprint, tokenizer_hash=info.tokenizer_hash,
                                 vocab_size=vocab, k=k, vision_strategy=info.vision_strategy,
                                 num_visual_tokens=info.num_visual_tokens, value_encoding=encoding,
                                 image_aspect_ratio=info.image_aspect_ratio,
                                 target_kinds=TARGET_KINDS)  # TeacherRunner produces every kind
    group = open_group(cache_root, meta=meta, create=True)
    runner = TeacherRunner(model, vocab_limit=vocab)
    samples = ds.samples[:limit] if limit is not None else ds.samples
    done = group.committed_keys()
    todo = list({s.key: s for s in samples if s.key not in done}.values())  # identical samples share a key
    with torch.no_grad(), group.writer() as w:
        for i in range(0, len(todo), batch_size):
            inputs = [TeacherInput.from_prepared(s, info.image_size, aspect_ratio=info.image_aspect_ratio)
                      for s in todo[i:i + batch_size]]
            for t in runner.targets(inputs, k):
                w.add(t)
    return group.name
