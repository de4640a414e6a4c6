"""The KD divergences on sparse targets (ckd_common.kd.divergences, docs/design.md §4.7):
forward / reverse KL, TRL's generalised JSD and total variation in the (k+1)-bucket form, the
temperature, train-time top-k', and the fused kernel's parity with the autograd path for each."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ckd_common.kd import (KDObjective, KDWeights, collate_targets, fused_kd_loss, kd_loss_from_logits,
                           sparse_divergence, topk_with_tail, truncate_topk)
from ckd_common.kd.divergences import (TAIL_FLOOR, bucket_divergence, bucket_divergence_grad, tempered_tail_log,
                                       teacher_buckets)
from ckd_common.kd.reference import dense_divergence
from test_losses import KEYS, assert_dicts_close, make_batch, sample_targets, visual_start

# every divergence, the JSD at TRL's endpoints and inside
OBJECTIVES = [KDObjective("forward_kl"), KDObjective("reverse_kl"), KDObjective("jsd", beta=0.0),
              KDObjective("jsd", beta=0.3), KDObjective("jsd", beta=1.0), KDObjective("tv")]
OBJ_IDS = ["fkl", "rkl", "jsd0", "jsd.3", "jsd1", "tv"]


def logits(n, v, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * scale


def float64_topk(zt, k):
    """topk_with_tail with float64 log-probs and tail (the stored float32 would cost precision)."""
    ids, lp, _ = topk_with_tail(zt, k)
    full = torch.log_softmax(zt, -1)
    valid = torch.isfinite(lp)
    lp = torch.where(valid, full.gather(-1, ids), lp.double())
    rest = full.scatter(-1, torch.where(valid, ids, ids[:, :1]), float("-inf"))
    tail = torch.logsumexp(rest, -1).exp() if k < zt.shape[-1] else torch.zeros(zt.shape[0], dtype=zt.dtype)
    return ids, lp, tail


def bucketed(logp_full, ids):
    """Explicit (k+1)-bucket distribution of full log-probs: [log p_K, log p_tail] (plain indexing)."""
    rows = []
    for n in range(logp_full.shape[0]):
        k_ids = ids[n].tolist()
        others = [j for j in range(logp_full.shape[1]) if j not in k_ids]
        rows.append(torch.cat([logp_full[n, k_ids], torch.logsumexp(logp_full[n, others], 0)[None]]))
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------
# 1. parity with the dense divergence (TRL's formulas)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("obj", OBJECTIVES, ids=OBJ_IDS)
@pytest.mark.parametrize("temp", [1.0, 0.5, 3.0])
def test_full_k_equals_dense_full_vocabulary_divergence(obj, temp):
    """k = V (and k > V: padding): the bucket divergence IS the full-vocabulary one, values and grads."""
    obj = KDObjective(obj.divergence, obj.beta, temperature=temp)
    zt, zs0 = logits(6, 13, 1), logits(6, 13, 2, 1.5)
    for k in (13, 16):
        ids, lp, tail = float64_topk(zt, k)
        zs = zs0.clone().requires_grad_()
        got = sparse_divergence(zs, ids, lp, tail, obj)
        (g_got,) = torch.autograd.grad(got.sum(), zs)
        zs2 = zs0.clone().requires_grad_()
        ref = dense_divergence(torch.log_softmax(zt / temp, -1), torch.log_softmax(zs2 / temp, -1), obj.divergence,
                               obj.beta)
        (g_ref,) = torch.autograd.grad(ref.sum(), zs2)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("obj", OBJECTIVES, ids=OBJ_IDS)
@pytest.mark.parametrize("k", [1, 4, 12])
def test_topk_equals_dense_divergence_of_the_bucketed_distributions(obj, k):
    """k < V: the dense divergence of the explicitly bucketed (k+1)-point distributions, and never
    above the full-vocabulary divergence (every one of them is an f-divergence)."""
    zt, zs0 = logits(7, 17, 3), logits(7, 17, 4, 1.5)
    ids, lp, tail = float64_topk(zt, k)
    zs = zs0.clone().requires_grad_()
    got = sparse_divergence(zs, ids, lp, tail, obj)
    (g_got,) = torch.autograd.grad(got.sum(), zs)
    zs2 = zs0.clone().requires_grad_()
    lq = torch.log_softmax(zs2, -1)
    ref = dense_divergence(bucketed(torch.log_softmax(zt, -1), ids), bucketed(lq, ids), obj.divergence, obj.beta)
    (g_ref,) = torch.autograd.grad(ref.sum(), zs2)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12)
    full = dense_divergence(torch.log_softmax(zt, -1), lq.detach(), obj.divergence, obj.beta)
    assert torch.all(got <= full + 1e-12)


@pytest.mark.parametrize("temp", [0.5, 2.0])
@pytest.mark.parametrize("obj", OBJECTIVES, ids=OBJ_IDS)
def test_temperature_topk_is_the_bucketed_divergence_with_the_tail_estimate(obj, temp):
    """k < V at T != 1: teacher buckets p_K^(1/T) and the estimated tempered tail, renormalised; the
    student buckets of z / T are exact. Everything but the tail estimate is checked here."""
    obj = KDObjective(obj.divergence, obj.beta, temperature=temp)
    zt, zs0 = logits(5, 17, 5), logits(5, 17, 6, 1.5)
    ids, lp, tail = float64_topk(zt, 4)
    zs = zs0.clone().requires_grad_()
    got = sparse_divergence(zs, ids, lp, tail, obj)
    (g_got,) = torch.autograd.grad(got.sum(), zs)
    lt = tempered_tail_log(lp, torch.isfinite(lp), tail.log(), temp, 17)
    lp_b = torch.log_softmax(torch.cat([lp / temp, lt[:, None]], -1), -1)
    zs2 = zs0.clone().requires_grad_()
    ref = dense_divergence(lp_b, bucketed(torch.log_softmax(zs2 / temp, -1), ids), obj.divergence, obj.beta)
    (g_ref,) = torch.autograd.grad(ref.sum(), zs2)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12)


def test_dense_oracle_matches_the_textbook_formulas():
    """The oracle itself (TRL's F.kl_div form) against the definitions written out in numpy."""
    p = torch.softmax(logits(3, 9, 7), -1)
    q = torch.softmax(logits(3, 9, 8), -1)
    pn, qn = p.numpy(), q.numpy()
    kl = lambda a, b: (a * np.log(a / b)).sum(-1)  # noqa: E731
    for beta in (0.2, 0.5, 0.9):
        m = beta * pn + (1 - beta) * qn
        np.testing.assert_allclose(dense_divergence(p.log(), q.log(), "jsd", beta).numpy(),
                                   beta * kl(pn, m) + (1 - beta) * kl(qn, m), rtol=1e-12)
    np.testing.assert_allclose(dense_divergence(p.log(), q.log(), "forward_kl").numpy(), kl(pn, qn), rtol=1e-12)
    np.testing.assert_allclose(dense_divergence(p.log(), q.log(), "reverse_kl").numpy(), kl(qn, pn), rtol=1e-12)
    np.testing.assert_allclose(dense_divergence(p.log(), q.log(), "tv").numpy(), 0.5 * np.abs(pn - qn).sum(-1))


# ---------------------------------------------------------------------------------------------
# 2. TRL's beta convention and its endpoints
# ---------------------------------------------------------------------------------------------
def test_jsd_endpoints_are_exactly_the_kls_and_the_interior_is_unscaled():
    zt, zs = logits(6, 15, 9), logits(6, 15, 10)
    ids, lp, tail = float64_topk(zt, 5)
    d = {name: sparse_divergence(zs, ids, lp, tail, obj) for name, obj in zip(OBJ_IDS, OBJECTIVES)}
    assert torch.equal(d["jsd0"], d["fkl"]) and torch.equal(d["jsd1"], d["rkl"])  # TRL's branches, bit for bit
    # inside, JSD(beta) = beta KL(p||m) + (1-beta) KL(q||m) -> 0 at both ends, like TRL's (not rescaled):
    # JSD(beta) / beta -> KL(p||q) as beta -> 0 and JSD(beta) / (1 - beta) -> KL(q||p) as beta -> 1
    eps = 1e-6
    near0 = sparse_divergence(zs, ids, lp, tail, KDObjective("jsd", beta=eps))
    near1 = sparse_divergence(zs, ids, lp, tail, KDObjective("jsd", beta=1 - eps))
    torch.testing.assert_close(near0 / eps, d["fkl"], rtol=1e-3, atol=1e-8)  # O(beta) off
    torch.testing.assert_close(near1 / eps, d["rkl"], rtol=1e-3, atol=1e-8)
    jsd_half = sparse_divergence(zs, ids, lp, tail, KDObjective("jsd", beta=0.5))
    assert torch.all(jsd_half <= math.log(2) + 1e-12)  # JSD(1/2) is bounded by log 2
    assert torch.all(d["tv"] <= 1.0)


def test_objective_validation_and_description():
    with pytest.raises(ValueError) as e:
        KDObjective("kl", beta=1.5, temperature=0.0, top_k=0)
    assert all(s in str(e.value) for s in ("divergence", "beta", "temperature", "top_k"))
    assert KDObjective("jsd", beta=0.0).kind == "forward_kl" and KDObjective("jsd", beta=1.0).kind == "reverse_kl"
    assert KDObjective(temperature=2.0).scale == 4.0 and KDObjective(temperature=2.0, t2_scale=False).scale == 1.0
    assert KDObjective("jsd", beta=0.25, temperature=2, top_k=8).describe() == \
        "jsd(beta=0.25), T=2 (x T^2), top-8 of the stored k"


# ---------------------------------------------------------------------------------------------
# 3. the closed-form gradients the fused kernel uses
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.7),
                                       ("tv", 0.5)])
def test_bucket_gradient_closed_form_equals_autograd(kind, beta):
    g = torch.Generator().manual_seed(11)
    lp = torch.log_softmax(torch.randn(8, 6, generator=g, dtype=torch.float64), -1)
    lq = torch.log_softmax(torch.randn(8, 6, generator=g, dtype=torch.float64), -1)
    lp[0, 2] = lp[1, 5] = float("-inf")  # empty teacher buckets (padding, an empty tail)
    lq[1, 5] = float("-inf")  # empty on both sides
    if kind != "forward_kl":  # where the teacher has mass, forward KL is +inf by definition
        lq[2, 0] = float("-inf")
    lq = lq.requires_grad_()
    val = bucket_divergence(lp, lq, kind, beta)
    (auto,) = torch.autograd.grad(val.sum(), lq)
    closed = bucket_divergence_grad(lp, lq.detach(), kind, beta)
    assert torch.isfinite(val).all() and torch.isfinite(auto).all()
    torch.testing.assert_close(closed, auto, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# 4. edge cases: no NaN anywhere
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("obj", OBJECTIVES, ids=OBJ_IDS)
@pytest.mark.parametrize("temp", [0.5, 1.0, 4.0])
def test_no_nan_empty_tail_full_tail_padding_no_mass_extreme_logits(obj, temp):
    obj = KDObjective(obj.divergence, obj.beta, temperature=temp)
    v = 9
    ids = torch.tensor([[0, 1, 2], [3, 4, 0], [5, 6, 7], [0, 0, 0], [1, 2, 3], [0, 1, 2]])
    lp = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)],  # empty tail (tau = 0), ids outside K
                       [-0.5, -1.0, float("-inf")],          # padding entry
                       [-40.0, -41.0, -42.0],                # a tail of 1 (top-k entries negligible)
                       [float("-inf")] * 3,                  # no teacher mass at all (CE-only targets)
                       [-1e-6, -20.0, -25.0],                # peaked
                       [-1.0, -1.5, -2.0]], dtype=torch.float64)
    tail = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.2], dtype=torch.float64)
    tail[1] = 1 - lp[1, :2].exp().sum()
    tail[4] = 1 - lp[4].exp().sum()
    z = logits(6, v, 12)
    z[4] = torch.tensor([1e4, -1e4, 3.0, -1e4, 0.0, 1e4, -1e4, 2.0, 0.0], dtype=torch.float64)  # extreme
    z = z.requires_grad_()
    d = sparse_divergence(z, ids, lp, tail, obj)
    (grad,) = torch.autograd.grad(d.sum(), z)
    assert torch.isfinite(d).all() and torch.isfinite(grad).all(), (d, grad)
    assert d[3] == 0 and torch.all(grad[3] == 0)  # no teacher mass: no term
    assert torch.all(d >= -1e-12)


def test_reverse_kl_takes_an_empty_tail_as_the_floor():
    zt = torch.tensor([[2.0, 1.0, float("-inf"), float("-inf"), 0.5]], dtype=torch.float64)
    zs = torch.tensor([[0.3, -0.2, 0.1, 0.4, 0.0]], dtype=torch.float64)
    ids, lp, tail = float64_topk(zt, 3)
    assert tail.item() == 0.0
    got = sparse_divergence(zs, ids, lp, tail, KDObjective("reverse_kl"))
    lq = torch.log_softmax(zs, -1)[0]
    q_tail = lq[[2, 3]].exp().sum()
    hand = (lq[ids[0]].exp() * (lq[ids[0]] - lp[0])).sum() + q_tail * (q_tail.log() - math.log(TAIL_FLOOR))
    assert got.item() == pytest.approx(hand.item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# 5. temperature: the tail estimate
# ---------------------------------------------------------------------------------------------
def test_tail_estimate_recovers_a_power_law_tail_and_lies_between_the_extremes():
    vocab, k = 20000, 32
    r = torch.arange(1, vocab + 1, dtype=torch.float64)
    for s in (0.8, 1.2, 2.0):
        p = r ** -s
        p = p / p.sum()
        lp = p[:k].log()[None]
        tau = p[k:].sum()[None]
        for temp in (0.5, 2.0, 4.0):
            exact = torch.logsumexp(p[k:].log() / temp, 0)
            est = tempered_tail_log(lp, torch.ones_like(lp, dtype=torch.bool), tau.log(), temp, vocab)
            assert abs(est.item() - exact.item()) < 0.05, (s, temp, est.item(), exact.item())  # within 5 %
    # random stored rows: the estimate lies between the two extreme tails consistent with them
    g = torch.Generator().manual_seed(13)
    lp = torch.log_softmax(torch.randn(50, 1000, generator=g, dtype=torch.float64) * 2, -1).topk(8, -1).values
    tau = 1 - lp.exp().sum(-1)
    for temp in (0.5, 2.0):
        a = 1 / temp
        est = tempered_tail_log(lp, torch.ones_like(lp, dtype=torch.bool), tau.log(), temp, 1000)
        uniform = tempered_tail_log(lp, torch.ones_like(lp, dtype=torch.bool), tau.log(), temp, 1000, "uniform")
        flat = tau.log() + (a - 1) * lp[:, -1]  # tau / p_min ids at p_min
        lo, hi = torch.minimum(uniform, flat), torch.maximum(uniform, flat)
        assert torch.all(est >= lo - 1e-6) and torch.all(est <= hi + 1e-6)


def test_temperature_renormalises_the_buckets_and_t1_keeps_the_stored_values():
    zt = logits(4, 30, 14)
    ids, lp, tail = float64_topk(zt, 5)
    one = teacher_buckets(ids, lp, tail, KDObjective(), 30)
    assert torch.equal(one.lp_k, lp) and torch.equal(one.lp_tail, tail.log())
    for temp in (0.5, 2.0):
        tb = teacher_buckets(ids, lp, tail, KDObjective(temperature=temp), 30)
        total = torch.logsumexp(torch.cat([tb.lp_k, tb.lp_tail[:, None]], -1), -1)
        torch.testing.assert_close(total, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)
        # the top-k entries keep their ratios p_i^(1/T)
        torch.testing.assert_close(tb.lp_k[:, 1:] - tb.lp_k[:, :1], (lp[:, 1:] - lp[:, :1]) / temp)


# ---------------------------------------------------------------------------------------------
# 6. train-time k' <= k
# ---------------------------------------------------------------------------------------------
def test_truncate_topk_equals_targets_taken_at_k_prime():
    zt = logits(9, 40, 15)
    ids, lp, tail = float64_topk(zt, 16)
    for kp in (1, 4, 15):
        ids_p, lp_p, tail_p = float64_topk(zt, kp)
        a = truncate_topk(ids, lp, tail, kp)
        assert torch.equal(a[0], ids_p) and torch.equal(a[1], lp_p)
        torch.testing.assert_close(a[2], tail_p, rtol=1e-12, atol=1e-15)
    assert truncate_topk(ids, lp, tail, 16)[0] is ids and truncate_topk(ids, lp, tail, None)[0] is ids
    # ties (quantised log-probs): the stored order wins; padding stays padding
    ids_t = torch.tensor([[7, 3, 5, 0]])
    lp_t = torch.tensor([[-1.0, -2.0, -2.0, float("-inf")]])
    got = truncate_topk(ids_t, lp_t, torch.tensor([0.1]), 2)
    assert got[0].tolist() == [[7, 3]]
    got = truncate_topk(torch.tensor([[4, 0, 0]]), torch.tensor([[-0.1, float("-inf"), float("-inf")]]),
                        torch.tensor([0.0]), 2)
    assert got[0].tolist() == [[4, 0]] and torch.isneginf(got[1][0, 1])


# ---------------------------------------------------------------------------------------------
# 7. the fused kernel = the autograd path, for every objective
# ---------------------------------------------------------------------------------------------
FUSED_OBJECTIVES = [KDObjective("reverse_kl"), KDObjective("jsd", beta=0.3), KDObjective("tv"),
                    KDObjective(temperature=2.0), KDObjective("jsd", beta=0.6, temperature=0.5, t2_scale=False),
                    KDObjective("reverse_kl", temperature=3.0, top_k=3), KDObjective(top_k=2)]
FUSED_IDS = ["rkl", "jsd.3", "tv", "fkl-T2", "jsd.6-T.5-noT2", "rkl-T3-k3", "fkl-k2"]


@pytest.mark.parametrize("obj", FUSED_OBJECTIVES, ids=FUSED_IDS)
@pytest.mark.parametrize("chunk", [3, 1000])
def test_fused_equals_autograd_path_values_and_grads(obj, chunk):
    bt = make_batch(dtype=torch.float32, seed=chunk)
    batch = collate_targets(sample_targets(bt, k=6))
    weights = KDWeights(ce=1.0, kl_text=0.7, kl_vis=0.3, rel=2.0)
    h = bt["hidden"].clone().requires_grad_()
    w = bt["weight"].clone().requires_grad_()
    fused = fused_kd_loss(h, w, bt["labels"], batch, visual_start(bt), weights=weights, objective=obj,
                          chunk_size=chunk, teacher_vocab=25)
    g1 = torch.autograd.grad(fused["total"], (h, w))
    dense = kd_loss_from_logits(h @ w.T, bt["labels"], batch, visual_start(bt), weights=weights, objective=obj,
                                teacher_vocab=25)
    g2 = torch.autograd.grad(dense["total"], (h, w))
    assert_dicts_close(fused, dense, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("obj", [KDObjective("reverse_kl", temperature=2.0, top_k=2),
                                 KDObjective("jsd", beta=0.4, temperature=0.7), KDObjective("tv", top_k=3)],
                         ids=["rkl-T2-k2", "jsd.4-T.7", "tv-k3"])
def test_fused_gradcheck_float64(obj):
    bt = make_batch(lengths=(7, 5), spans=((0, 2), None), vocab=7, dim=3)
    batch = collate_targets(sample_targets(bt, k=4))

    def f(h, w):
        return fused_kd_loss(h, w, bt["labels"], batch, [0, 0], objective=obj, chunk_size=2,
                             reusable_backward=True)["total"]

    h = bt["hidden"].clone().requires_grad_()
    w = bt["weight"].clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (h, w))


def test_fused_default_objective_is_unchanged_and_t2_scales_the_kd_terms():
    bt = make_batch()
    batch = collate_targets(sample_targets(bt, k=5))
    args = (bt["hidden"], bt["weight"], bt["labels"], batch, visual_start(bt))
    base = fused_kd_loss(*args)
    assert_dicts_close(base, fused_kd_loss(*args, objective=KDObjective("jsd", beta=0.0)), rtol=0, atol=0)
    hot = fused_kd_loss(*args, objective=KDObjective(temperature=2.0))
    plain = fused_kd_loss(*args, objective=KDObjective(temperature=2.0, t2_scale=False))
    for key in ("kl_text", "kl_vis"):
        torch.testing.assert_close(hot[key], 4.0 * plain[key], rtol=1e-12, atol=0)
    for key in ("ce", "rel"):  # temperature touches only the KD divergence terms
        torch.testing.assert_close(hot[key], base[key], rtol=0, atol=0)


def test_fused_no_nan_extreme_logits_for_every_objective():
    bt = make_batch(dtype=torch.float32)
    scale = 1e4 / float((bt["hidden"] @ bt["weight"].T).abs().max())
    bt["t_hidden"] = bt["t_hidden"] * 1e4 / float((bt["t_hidden"] @ bt["t_weight"].T).abs().max())
    batch = collate_targets(sample_targets(bt, k=5))
    for obj in OBJECTIVES + FUSED_OBJECTIVES:
        h = (bt["hidden"] * scale).requires_grad_()
        w = bt["weight"].clone().requires_grad_()
        out = fused_kd_loss(h, w, bt["labels"], batch, visual_start(bt), objective=obj, chunk_size=3)
        grads = torch.autograd.grad(out["total"], (h, w))
        assert all(torch.isfinite(out[k]).all() for k in KEYS), obj
        assert all(torch.isfinite(g).all() for g in grads), obj


@pytest.mark.parametrize("obj", OBJECTIVES + FUSED_OBJECTIVES, ids=OBJ_IDS + FUSED_IDS)
def test_fused_edge_targets_empty_tail_full_tail_padding_no_mass(obj):
    """Cached rows at the edges, through the fused kernel and the autograd path: finite and equal."""
    from ckd_common.kd import response_mask
    from ckd_common.targets import SampleTargets, SparseTopK

    bt = make_batch(lengths=(12, 10), spans=(None, None), vocab=9, dim=4)
    n_rows = response_mask(bt["labels"]).sum(1).tolist()
    edge_ids = np.array([[0, 1, 2], [3, 4, 0], [5, 6, 7], [0, 0, 0], [8, 2, 1]])
    edge_lp = np.array([[math.log(0.7), math.log(0.2), math.log(0.1)],  # tau = 0, ids outside K
                        [math.log(0.6), math.log(0.3), -np.inf],        # padding
                        [-40.0, -41.0, -42.0],                          # a tail of 1
                        [-np.inf] * 3,                                  # no teacher mass
                        [math.log(0.5), math.log(0.2), math.log(0.1)]], np.float32)
    edge_tail = np.array([0.0, 0.1, 1.0, 0.0, 0.2], np.float32)
    samples = []
    for b, n in enumerate(n_rows):
        pick = np.arange(n) % len(edge_ids)
        samples.append(SampleTargets(f"s{b}", SparseTopK(edge_ids[pick], edge_lp[pick], edge_tail[pick])))
    batch = collate_targets(samples)
    h = bt["hidden"].float().clone().requires_grad_()
    w = bt["weight"].float().clone().requires_grad_()
    fused = fused_kd_loss(h, w, bt["labels"], batch, None, objective=obj, chunk_size=4)
    g1 = torch.autograd.grad(fused["total"], (h, w))
    dense = kd_loss_from_logits(h @ w.T, bt["labels"], batch, None, objective=obj)
    g2 = torch.autograd.grad(dense["total"], (h, w))
    assert all(torch.isfinite(fused[k]).all() for k in KEYS) and all(torch.isfinite(g).all() for g in g1 + g2)
    assert_dicts_close(fused, dense, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
