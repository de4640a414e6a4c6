"""The relation-loss error a cache's stored image targets cost, against the teacher's dense R of the same
samples (bench/real_shapes.py runs this as a child once the teacher server is stopped).

For every image sample of the given splits that the cache holds:
  R_T     the teacher's dense R/||R||_F, recomputed in-process (TeacherRunner autocorr="dense": the oracle
          the stored int8 factor is made from), its visual top-k ids checked against the stored ones (the
          same sample, the same teacher);
  H_S, G  the student's own final-norm hidden states on the visual span (its real-config, random-initialised
          weights) and its lm_head Gram W^T W, as the trainer's fused loss takes them; and, as a second
          student, Gaussian H_S with the same G (an unrelated student);
  error   |(1 - cos) from the stored factor - (1 - cos) from R_T| through ckd_common.kd.relation.relation_loss
          (the function the fused loss calls), both relation variants, and the relative error of its gradient
          with respect to H_S and G; the stored share and the share the factor really has against R_T.
The teacher and the student are loaded one after the other (the peak is one model's).

    python bench/_stored_target_error.py TEACHER STUDENT CACHE DATA:IMAGES:TEMPLATE [...]

Last line: one JSON object (max over samples, and the per-sample rows).
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckd_common.kd.relation import FactorTarget, relation_loss, relation_target  # noqa: E402
from ckd_common.model import load_vlm, model_info  # noqa: E402
from ckd_common.prepared import PrepareSpec, obtain  # noqa: E402
from ckd_common.teacher import TeacherInput, TeacherRunner  # noqa: E402
from logit_cache import CacheReader, find_group, open_group  # noqa: E402

VARIANTS = ("flat", "column")


def image_samples(model_dir: str, splits: list[tuple[str, str, str]]):
    """(model, info, prepared image samples by key) for ``model_dir``, as the fill / trainer prepare them."""
    model, tok = load_vlm(model_dir)
    info = model_info(model, tok)
    samples = {}
    for data, images, template in splits:
        ds = obtain(PrepareSpec.of(data, images, template, info), tok, log=None)
        samples.update({s.key: (s, ds.fingerprint, template) for s in ds.samples if s.has_image})
    return model, info, samples


def teacher_side(teacher: str, cache: str, splits):
    """key -> (dense R_T [Nv, Nv] float32, stored AutocorrFactor)."""
    model, info, samples = image_samples(teacher, splits)
    runner = TeacherRunner(model, vocab_limit=info.common_vocab, autocorr="dense")
    readers: dict[tuple[str, str], CacheReader] = {}
    out = {}
    for key, (s, fp, template) in samples.items():
        if (fp, template) not in readers:
            readers[(fp, template)] = CacheReader(open_group(cache, find_group(cache, fp, template)))
        reader = readers[(fp, template)]
        if key not in reader:
            continue
        stored = reader.get(key)
        with torch.no_grad():
            t = runner.targets([TeacherInput.from_prepared(s, info.image_size, aspect_ratio=info.image_aspect_ratio)],
                               reader.group.meta.k)[0]
        same = float(np.mean(t.visual.ids == stored.visual.ids))
        out[key] = (np.asarray(t.autocorr, np.float32), stored.autocorr, same)
    del runner, model
    gc.collect()
    return out


def errors(h_s: torch.Tensor, g_s: torch.Tensor, r_t: np.ndarray, factor) -> dict:
    """|delta(1-cos)| and the gradient's relative error (w.r.t. H_S and G), per variant; and cos(R_S, R_T)."""
    dense, fac = torch.from_numpy(r_t), relation_target(factor)
    assert isinstance(fac, FactorTarget)
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    row = {}
    for variant in VARIANTS:
        res = []
        for tgt in (dense, fac):
            h, g = h_s.detach().clone().requires_grad_(), g_s.detach().clone().requires_grad_()
            loss = relation_loss(h, g, tgt, variant)
            gh, gg = torch.autograd.grad(loss, (h, g))
            res.append((float(loss), gh, gg))
        (l0, gh0, gg0), (l1, gh1, gg1) = res
        row[variant] = {"loss_dense": l0, "err": abs(l1 - l0), "grad_err": max(rel(gh1, gh0), rel(gg1, gg0))}
    return row


def main(argv: list[str]) -> int:
    teacher, student, cache, *specs = argv
    splits = [tuple(s.rsplit(":", 2)) for s in specs]
    targets = teacher_side(teacher, cache, splits)
    if not targets:
        print(f"stored-target error: the cache {cache} holds none of the image samples of {specs}", file=sys.stderr)
        return 1
    model, info, samples = image_samples(student, splits)
    runner = TeacherRunner(model, vocab_limit=info.common_vocab)  # its hidden states and lm_head Gram only
    g_s = runner.gram.detach().float()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for key, (r_t, factor, same_ids) in targets.items():
        if key not in samples:
            raise SystemExit(f"stored-target error: sample {key} of the cache is not among the student's prepared "
                             f"samples (tokenizer or template differ); use a student with the teacher's tokenizer")
        s = samples[key][0]
        x = TeacherInput.from_prepared(s, info.image_size, aspect_ratio=info.image_aspect_ratio)
        with torch.no_grad():
            h_own = runner.hidden_states([x])[0, s.visual_start:s.visual_start + s.num_visual].float()
        h_rand = torch.randn(h_own.shape, generator=gen)
        rn = r_t / max(float(np.linalg.norm(r_t)), 1e-30)
        true_share = 1.0 - float(np.linalg.norm(rn - np.asarray(factor, np.float32)) ** 2)
        rows.append({"key": key, "nv": int(s.num_visual), "rank": factor.rank, "stored_share": factor.share,
                     "share_vs_dense": true_share, "visual_ids_equal": same_ids,
                     "own": errors(h_own, g_s, r_t, factor), "random": errors(h_rand, g_s, r_t, factor)})
    worst = lambda who, what: max(r[who][v][what] for r in rows for v in VARIANTS)  # noqa: E731
    print(json.dumps({"samples": len(rows), "rel_err": worst("own", "err"), "rel_grad_err": worst("own", "grad_err"),
                      "rel_err_random": worst("random", "err"), "rel_grad_err_random": worst("random", "grad_err"),
                      "min_share_vs_dense": min(r["share_vs_dense"] for r in rows), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
