"""Teacher side of the loss: the sparse targets a teacher produces for one sample.

Top-k log-probs + tail mass over the common vocabulary, computed from final hidden states a chunk
of positions at a time (no [N, V] tensor beyond one chunk), and the Frobenius-normalised visual
autocorrelation target. Used by ckd_common.teacher (the server's and online baselines' forward).
The Gram matrix W^T W (lm_head_gram) lives in terms.py, beside gram_autocorr that also builds it.

Conventions (vocabulary restriction, padding of k): ckd_common/kd/__init__.py.
"""
from __future__ import annotations

import torch

from ckd_common.kd.terms import compute_dtype, gram_autocorr, safe_unit

__all__ = ["normalized_autocorr", "teacher_targets_from_hidden", "topk_with_tail"]


def topk_with_tail(
    logits: torch.Tensor, k: int, vocab_limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher top-k targets for one chunk of logits [N, V'].

    The teacher distribution is softmax over the first ``vocab_limit`` ids (the common vocabulary;
    default: all V'), i.e. restricted BEFORE the softmax, so p sums to 1 over ids the student can
    represent and no id >= vocab_limit is ever emitted.

    Returns ids int64 [N, k], logprobs float32 [N, k] (descending), tail float32 [N] in [0, 1].
    When k exceeds the vocabulary the extra columns are padding: id 0, log-prob -inf.
    The tail is computed as exp(logsumexp of the log-probs outside the top-k) rather than
    1 - sum(exp(top-k)), which would lose all precision when the tail is tiny.
    """
    if logits.ndim != 2:
        raise ValueError(f"topk_with_tail expects [N, V] logits, got {tuple(logits.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if vocab_limit is not None:
        logits = logits[:, :vocab_limit]
    n, vocab = logits.shape
    log_p = torch.log_softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)
    kk = min(k, vocab)
    vals, ids = log_p.topk(kk, dim=-1)
    rest = log_p.scatter(-1, ids, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1).exp().clamp(0.0, 1.0) if kk < vocab else log_p.new_zeros(n)
    if kk < k:
        vals = torch.cat([vals, vals.new_full((n, k - kk), float("-inf"))], dim=-1)
        ids = torch.cat([ids, ids.new_zeros((n, k - kk))], dim=-1)
    return ids.long(), vals.float(), tail.float()


@torch.no_grad()
def teacher_targets_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    k: int,
    vocab_limit: int | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_with_tail(hidden @ W^T) computed ``chunk_size`` positions at a time.

    hidden [N, d] (final-norm hidden states), lm_head_weight [V', d]. Only the first vocab_limit
    rows of W are multiplied (the common vocabulary), and no [N, V] tensor exists beyond one
    [chunk_size, V] chunk. The matmul runs in the inputs' dtype (bf16 on a GPU server, as the
    model's own lm_head would), the softmax/top-k in float32. Outputs stay on the input device.
    """
    if hidden.ndim != 2:
        raise ValueError(f"hidden must be [N, d], got {tuple(hidden.shape)}")
    w = lm_head_weight if vocab_limit is None else lm_head_weight[:vocab_limit]
    parts = [
        topk_with_tail(hidden[s : s + chunk_size] @ w.T, k)
        for s in range(0, hidden.shape[0], max(1, chunk_size))
    ]
    if not parts:
        dev = hidden.device
        return (
            torch.zeros((0, k), dtype=torch.long, device=dev),
            torch.zeros((0, k), dtype=torch.float32, device=dev),
            torch.zeros((0,), dtype=torch.float32, device=dev),
        )
    return tuple(torch.cat(x) for x in zip(*parts))  # type: ignore[return-value]



@torch.no_grad()
def normalized_autocorr(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor | None = None,
    *,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher target: gram_autocorr(...) / ||R||_F as float32 [Nv, Nv] (zeros if R == 0).

    Stored normalised because the cosine in rel_loss is scale invariant and raw entries overflow
    fp16. The normalisation divides by max|R| first so the squared sum cannot overflow."""
    r = gram_autocorr(hidden, lm_head_weight, gram=gram)
    return safe_unit(r).float()
