"""Train-time top-k' (docs/design.md §4.7): targets read from a cache filled at k and cut to k' give
the loss of a cache filled at k', within the stated bound, through the real cache (Zarr, both value
encodings)."""
from __future__ import annotations

import math

import pytest
import torch

from ckd_common.kd import KDObjective, collate_targets, fused_kd_loss, truncate_topk
from ckd_common.kd.batch import build_rows
from ckd_common.kd.divergences import divergence_of_rows, teacher_buckets
from ckd_common.targets import SampleTargets
from logit_cache import CacheMeta, CacheReader, open_group
from logit_cache.synthetic import random_key
from test_losses import make_batch, sample_targets, visual_start

K, K_PRIME = 8, 3
U16 = 2.0 ** -11     # float16 unit roundoff: the cache stores tails in float16
SUB16 = 2.0 ** -25   # half the smallest float16 subnormal: absolute rounding of tiny tails


def cache_of(root, samples, k, enc, vocab):
    meta = CacheMeta(teacher_fingerprint="t", tokenizer_hash="tok", template="qwen2_base",
                     dataset_fingerprint="ds0123456789abcdef", vocab_size=vocab, k=k, vision_strategy="full",
                     num_visual_tokens=4, value_encoding=enc)
    g = open_group(root, meta=meta, create=True)
    keyed = [SampleTargets(random_key(i), s.text, s.visual, s.autocorr) for i, s in enumerate(samples)]
    with g.writer() as w:
        for s in keyed:
            w.add(s)
    reader = CacheReader(g)
    return collate_targets(reader.get_many([s.key for s in keyed]))


def tau_derivative_bound(kind, beta, tau_a, tau_b, q_tail):
    """max over tau in [tau_a, tau_b] of |dD/dtau| (each derivative is monotone in tau: endpoints)."""
    out = []
    for tau in (tau_a, tau_b):
        if kind == "forward_kl":
            out.append((torch.log(tau) + 1 - torch.log(q_tail)).abs())
        elif kind == "reverse_kl":
            out.append(q_tail / tau)
        elif kind == "jsd":
            out.append(beta * (torch.log(tau) - torch.log(beta * tau + (1 - beta) * q_tail)).abs())
        else:
            out.append(torch.full_like(tau, 0.5))
    return torch.maximum(*out)


@pytest.mark.parametrize("enc", ["f16", "q8"])
def test_k_prime_on_a_k_cache_equals_a_k_prime_cache_within_the_bound(tmp_path, enc):
    bt = make_batch(lengths=(14, 11, 9), spans=((1, 4), (0, 4), None), vocab=19, seed=21)
    vocab = bt["weight"].shape[0]
    sent_k, sent_kp = sample_targets(bt, k=K), sample_targets(bt, k=K_PRIME)  # what the teacher sends
    read_k = cache_of(tmp_path / "k", sent_k, K, enc, vocab)
    read_kp = cache_of(tmp_path / "kp", sent_kp, K_PRIME, enc, vocab)
    truth = collate_targets(sent_k)

    labels, v0 = bt["labels"], visual_start(bt)
    rows_k = build_rows(labels, read_k, v0, None, torch.float64)
    rows_kp = build_rows(labels, read_kp, v0, None, torch.float64)
    rows_true = build_rows(labels, truth, v0, None, torch.float64)
    ids_c, lp_c, tail_c = truncate_topk(rows_k.ids, rows_k.logprobs, rows_k.tail, K_PRIME)
    # the same K' and bit-identical log-probs: both encodings are per entry (q8's row offset is the top-1)
    assert torch.equal(ids_c, rows_kp.ids) and torch.equal(lp_c, rows_kp.logprobs)

    # the tails differ by the float16 rounding of the two stored tails and the encoding error of the
    # k - k' entries folded in:  |dtau| <= e16(tau_k) + e16(tau_k') + sum_{K \ K'} |p_hat - p| (+ float32 sums)
    def e16(t):
        return torch.maximum(t * U16, torch.full_like(t, SUB16))

    p_hat = torch.where(torch.isfinite(rows_k.logprobs), rows_k.logprobs.exp(), 0)[:, K_PRIME:]
    p_true = torch.where(torch.isfinite(rows_true.logprobs), rows_true.logprobs.exp(), 0)[:, K_PRIME:]
    tau_kp_true = build_rows(labels, collate_targets(sent_kp), v0, None, torch.float64).tail
    bound_tau = (e16(rows_true.tail) + e16(tau_kp_true) + (p_hat - p_true).abs().sum(-1) + 2.0 ** -22)
    d_tau = (tail_c - rows_kp.tail).abs()
    assert torch.all(d_tau <= bound_tau), (d_tau - bound_tau).max()
    assert float(d_tau.max()) < (2e-3 if enc == "f16" else 2e-2)

    z = (bt["hidden"] @ bt["weight"].T)[rows_k.b, rows_k.t]
    for obj in (KDObjective("forward_kl"), KDObjective("reverse_kl"), KDObjective("jsd", beta=0.3),
                KDObjective("tv")):
        cut = KDObjective(obj.divergence, obj.beta, top_k=K_PRIME)
        d_cut = divergence_of_rows(z, teacher_buckets(rows_k.ids, rows_k.logprobs, rows_k.tail, cut, vocab), cut)
        d_ref = divergence_of_rows(z, teacher_buckets(rows_kp.ids, rows_kp.logprobs, rows_kp.tail, obj, vocab), obj)
        lq = torch.log_softmax(z, -1)
        mask = torch.ones_like(lq, dtype=torch.bool).scatter(-1, ids_c, False)
        q_tail = torch.where(mask, lq.exp(), 0).sum(-1)
        row_bound = d_tau * tau_derivative_bound(obj.kind, obj.beta, tail_c, rows_kp.tail, q_tail)
        assert torch.all((d_cut - d_ref).abs() <= row_bound * (1 + 1e-6) + 1e-12), obj
        # the loss terms are convex combinations of the rows: the same bound holds for them
        a = fused_kd_loss(bt["hidden"], bt["weight"], labels, read_k, v0, objective=cut)
        b = fused_kd_loss(bt["hidden"], bt["weight"], labels, read_kp, v0, objective=obj)
        for term in ("kl_text", "kl_vis"):
            assert abs(float(a[term] - b[term])) <= float(row_bound.max()) + 1e-6, (obj, term)
        assert a["ce"].item() == b["ce"].item() and a["rel"].item() == b["rel"].item()


def test_k_prime_larger_than_the_cache_is_the_whole_cache():
    bt = make_batch()
    batch = collate_targets(sample_targets(bt, k=4))
    a = fused_kd_loss(bt["hidden"], bt["weight"], bt["labels"], batch, visual_start(bt))
    b = fused_kd_loss(bt["hidden"], bt["weight"], bt["labels"], batch, visual_start(bt), objective=KDObjective(top_k=9))
    assert all(math.isclose(a[k].item(), b[k].item(), rel_tol=0, abs_tol=0) for k in a)
