"""The LLaVA-KD distillation loss, shared by the teacher server and the trainer (contract: docs/design.md).

Import the public API from here (``from ckd_common.kd import fused_kd_loss, KDWeights``); the
modules split it by job:

weights.py          KDWeights(ce, kl_text, kl_vis, rel), REL_VARIANTS: the owner of both rules
objective.py        KDObjective(divergence, beta, temperature, t2_scale, top_k), DIVERGENCES: what the
                    KD terms measure (forward/reverse KL, TRL's generalised JSD, TV; T; top-k')
teacher_targets.py  teacher side: sparse targets and the autocorrelation target
    topk_with_tail(logits, k, vocab_limit)                  -> ids, logprobs, tail
    teacher_targets_from_hidden(hidden, weight, k, ...)     -> ids, logprobs, tail
    normalized_autocorr(hidden, weight | gram)              -> R / ||R||_F  [Nv, Nv] float32
relation.py         the autocorrelation as a low-rank factor (the stored form): teacher-side
    factor_autocorr(R) -> int8 factor + captured share + tail trace; student-side relation_loss(h, G, target)
    from a dense target or a FactorTarget without the teacher's Nv x Nv matrix
batch.py            BatchTargets / collate_targets(list[SampleTargets]) -> batched sparse targets
divergences.py      the divergences of the (k+1)-bucket coarsening, teacher and student side
    sparse_divergence(student_logits, ids, logprobs, tail, objective) -> per-position divergence
    sparse_kl(student_logits, ids, logprobs, tail)          -> per-position (k+1)-bucket KL
    truncate_topk(ids, logprobs, tail, k')                  -> top-k' of the stored k, rest in the tail
terms.py            the other terms and their shared helpers
    lm_head_gram(weight)                                    -> W^T W  [d, d]
    gram_autocorr(hidden, weight | gram)                    -> R = H W^T W H^T (differentiable)
    rel_loss(student_R, teacher_R, variant)                 -> 1 - cosine
    response_mask(labels)                                   -> the text positions R
fused.py            fused_kd_loss(hidden, weight, labels, targets, visual_start, weights=KDWeights(...),
                                  objective=KDObjective(...))
                    the training loss: chunked, lm_head fused, no [positions, V] logits
reference.py        TEST ORACLES (never used in training)
    llava_kd_loss_dense(student_logits, teacher_logits, labels, visual_mask, weights, rel_variant)
    kd_loss_from_logits(logits, labels, targets, visual_start, ...)   fused_kd_loss, dense logits
    dense_divergence(log_p, log_q, divergence, beta)        -> TRL-style full-distribution divergence

Conventions shared by every function of this package
----------------------------------------------------
* The KD terms (kl_text, kl_vis) are the divergence of KDObjective, by default forward
  KL(p_teacher || q_student) at temperature 1 on every stored entry; the names stay kl_* for every
  divergence. Sum over the vocabulary (buckets), mean over positions; objective.scale (T^2) applied.
* Text positions of a sample are R = {t : labels[t+1] != -100} (the logits at t predict t+1);
  visual positions are the visual span [v0, v0+Nv), unshifted.
* Batch reduction: every term is averaged over a sample's own positions, then over the samples
  that have the term (a text-only sample contributes no visual terms; a sample without any
  supervised position contributes no text terms). A term nobody has is 0 (still attached to the
  graph, so ``total.backward()`` always works).
* total = KDWeights.total(ce, kl_text, kl_vis, rel) = ce*CE + kl_text*KL_text + kl_vis*KL_vis
  + rel*REL (the paper's alpha, beta, gamma, delta).
* Arithmetic dtype: float32 for half / bfloat16 / float32 inputs, float64 for float64 inputs
  (the promotion of the input dtype with float32). float64 exists for gradcheck-level tests.
* Vocabulary: the teacher distribution is taken over the *common* vocabulary, i.e. the first
  ``vocab_limit`` ids (the teacher softmax is renormalised over them), so ids the student cannot
  represent (Qwen2.5-7B has 152,064 rows, the small models 151,936) never appear in targets and
  the teacher's p sums to 1 over ids the student has. The student q is always normalised over the
  student's FULL vocabulary.
* Sparse targets: per position the teacher's top-k ids, their log-probs and the tail mass
  tau = 1 - sum_{i in K} p_i. An entry is part of the top-k bucket set K iff its log-prob is
  finite; entries with log-prob -inf are padding (k larger than the vocabulary; id 0 by
  convention) and are ignored wherever they appear.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# weights.py and objective.py are plain Python; the torch modules load on first use, so that configs
# and CLIs that only need KDWeights / REL_VARIANTS / KDObjective (student_trainer.config) stay free of
# the torch import.
from ckd_common.kd.objective import DIVERGENCES, KDObjective, check_divergence
from ckd_common.kd.weights import REL_VARIANTS, KDWeights, check_rel_variant

_LAZY = {
    "BatchTargets": "batch", "collate_targets": "batch",
    "fused_kd_loss": "fused",
    "kd_loss_from_logits": "reference", "llava_kd_loss_dense": "reference",
    "normalized_autocorr": "teacher_targets", "teacher_targets_from_hidden": "teacher_targets",
    "topk_with_tail": "teacher_targets",
    "IGNORE_INDEX": "terms", "gram_autocorr": "terms", "lm_head_gram": "terms", "rel_loss": "terms",
    "response_mask": "terms",
    "sparse_divergence": "divergences", "sparse_kl": "divergences", "truncate_topk": "divergences",
    "FactorTarget": "relation", "factor_autocorr": "relation", "rel_loss_factored": "relation",
    "relation_loss": "relation",
}

if TYPE_CHECKING:
    from ckd_common.kd.batch import BatchTargets, collate_targets  # noqa: F401
    from ckd_common.kd.divergences import sparse_divergence, sparse_kl, truncate_topk  # noqa: F401
    from ckd_common.kd.fused import fused_kd_loss  # noqa: F401
    from ckd_common.kd.reference import kd_loss_from_logits, llava_kd_loss_dense  # noqa: F401
    from ckd_common.kd.relation import (  # noqa: F401
        FactorTarget, factor_autocorr, rel_loss_factored, relation_loss)
    from ckd_common.kd.teacher_targets import (  # noqa: F401
        normalized_autocorr, teacher_targets_from_hidden, topk_with_tail)
    from ckd_common.kd.terms import (  # noqa: F401
        IGNORE_INDEX, gram_autocorr, lm_head_gram, rel_loss, response_mask)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["DIVERGENCES", "KDObjective", "KDWeights", "REL_VARIANTS", "check_divergence", "check_rel_variant", *_LAZY]
