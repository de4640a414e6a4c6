"""Fill a logit_cache group in-process with a teacher on this machine (ckd_common.teacher).

For tests, benchmarks and small CPU runs only; the production path is teacher_server on another
GPU feeding the cache. The group's metadata is exactly what the trainer expects for a student
that shares the teacher's tokenizer and visual-token count.
"""
from __future__ import annotations

from pathlib import Path


def fill_cache(teacher_dir: str | Path, data: str | Path, images: str | Path | None, template: str,
               cache_root: str | Path, k: int = 16, batch_size: int = 8, max_length: int = 2048,
               limit: int | None = None, vocab_limit: int | None = None) -> str:
    """Prepare ``data`` with the teacher's tokenizer, run the teacher, write one group; returns its name.

    ``limit`` fills only the first samples (to test missing targets); ``vocab_limit`` overrides the
    common vocabulary (to build a deliberately incompatible cache)."""
    import torch

    from ckd_common.data import prepare_file
    from ckd_common.model import load_vlm, model_info
    from ckd_common.teacher import TeacherInput, TeacherRunner
    from logit_cache import CacheMeta, open_group

    model, tok = load_vlm(teacher_dir)
    info = model_info(model, tok)
    ds = prepare_file(data, tok, template, info.num_visual_tokens, info.image_token_id, images, max_length)
    vocab = vocab_limit or min(info.vocab_size, info.tokenizer_vocab_size)
    has_image = any(s.has_image for s in ds.samples)
    meta = CacheMeta(teacher_fingerprint=info.fingerprint, tokenizer_hash=info.tokenizer_hash, template=ds.template,
                     dataset_fingerprint=ds.fingerprint, vocab_size=vocab, k=k,
                     vision_strategy=info.vision_strategy if has_image else "none",
                     num_visual_tokens=info.num_visual_tokens if has_image else 0,
                     image_aspect_ratio=info.image_aspect_ratio)
    group = open_group(cache_root, meta=meta, create=True)
    runner = TeacherRunner(model, vocab_limit=vocab)
    samples = ds.samples[:limit] if limit is not None else ds.samples
    done = group.committed_keys()
    todo = list({s.key: s for s in samples if s.key not in done}.values())  # identical samples share a key
    with torch.no_grad(), group.writer() as w:
        for i in range(0, len(todo), batch_size):
            inputs = [TeacherInput.from_prepared(s, info.image_size, aspect_ratio=info.image_aspect_ratio) for s in todo[i:i + batch_size]]
            for t in runner.targets(inputs, k):
                w.add(t)
    return group.name
