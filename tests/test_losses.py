"""Tests for ckd_common.kd: the LLaVA-KD reference, sparse targets, the fused chunked loss and
the Gram-trick autocorrelation. Small V / d only; the real sizes live in bench/."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ckd_common.kd import (
    KDWeights,
    collate_targets,
    fused_kd_loss,
    gram_autocorr,
    kd_loss_from_logits,
    llava_kd_loss_dense,
    lm_head_gram,
    normalized_autocorr,
    rel_loss,
    response_mask,
    sparse_kl,
    teacher_targets_from_hidden,
    topk_with_tail,
)
from ckd_common.targets import SampleTargets, SparseTopK

KEYS = ("total", "ce", "kl_text", "kl_vis", "rel")


# ---------------------------------------------------------------------------------------------
# fixtures: a ragged, right-padded batch with its teacher and cached sparse targets
# ---------------------------------------------------------------------------------------------
def make_batch(
    lengths=(12, 9, 7),
    spans=((1, 4), (0, 3), None),  # (v0, Nv) per sample, None = text-only
    vocab=19,
    dim=6,
    dtype=torch.float64,
    seed=0,
    response_start=None,
):
    """hidden [B, L, d], W [V, d], labels, visual_mask, teacher hidden/logits for a ragged batch.

    Sample b has lengths[b] real tokens; its supervised labels start after the visual span (or at
    response_start[b]) and the rest of the row is right padding (-100, not visual)."""
    g = torch.Generator().manual_seed(seed)
    bsz, seq = len(lengths), max(lengths)
    hidden = torch.randn(bsz, seq, dim, generator=g, dtype=dtype)
    weight = torch.randn(vocab, dim, generator=g, dtype=dtype)
    t_hidden = torch.randn(bsz, seq, dim, generator=g, dtype=dtype)
    t_weight = torch.randn(vocab, dim, generator=g, dtype=dtype) * 1.5
    labels = torch.full((bsz, seq), -100, dtype=torch.long)
    visual_mask = torch.zeros(bsz, seq, dtype=torch.bool)
    for b, (n, span) in enumerate(zip(lengths, spans)):
        start = (span[0] + span[1] + 1) if span else 2
        if response_start is not None:
            start = response_start[b]
        labels[b, start:n] = torch.randint(0, vocab, (max(0, n - start),), generator=g)
        if span:
            visual_mask[b, span[0] : span[0] + span[1]] = True
    return dict(
        hidden=hidden, weight=weight, labels=labels, visual_mask=visual_mask,
        t_hidden=t_hidden, t_weight=t_weight, spans=spans,
    )


def sample_targets(batch, k, vocab_limit=None):
    """The teacher side end to end: top-k + tail at R and the visual span, normalised autocorr."""
    labels, vm = batch["labels"], batch["visual_mask"]
    resp = response_mask(labels)
    out = []
    for b in range(labels.shape[0]):
        pos = resp[b].nonzero().squeeze(-1)
        ids, lp, tail = teacher_targets_from_hidden(
            batch["t_hidden"][b, pos], batch["t_weight"], k, vocab_limit=vocab_limit, chunk_size=4
        )
        text = SparseTopK(ids.numpy(), lp.numpy(), tail.numpy())
        visual = autocorr = None
        vpos = vm[b].nonzero().squeeze(-1)
        if vpos.numel():
            vi, vl, vt = teacher_targets_from_hidden(batch["t_hidden"][b, vpos], batch["t_weight"], k, vocab_limit)
            visual = SparseTopK(vi.numpy(), vl.numpy(), vt.numpy())
            autocorr = normalized_autocorr(batch["t_hidden"][b, vpos], batch["t_weight"][:vocab_limit]).numpy()
        out.append(SampleTargets(f"s{b}", text, visual, autocorr))
    return out


def visual_start(batch):
    return [s[0] if s else 0 for s in batch["spans"]]


def assert_dicts_close(a, b, keys=KEYS, **tol):
    for k in keys:
        torch.testing.assert_close(a[k].detach().double(), b[k].detach().double(), msg=lambda m: f"{k}: {m}", **tol)


# ---------------------------------------------------------------------------------------------
# 1. dense reference
# ---------------------------------------------------------------------------------------------
def literal_llava_kd(zs, zt, labels, vmask, variant="flat"):
    """Literal numpy transcription of LLaVA-KD Eq. 4 for ONE sample (float64, loops)."""
    zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    def kl(pt, ps):
        p, q = softmax(pt), softmax(ps)
        return sum(p[i] * math.log(p[i] / q[i]) for i in range(len(p)) if p[i] > 0)

    resp = [t for t in range(len(labels) - 1) if labels[t + 1] != -100]
    ce = np.mean([-math.log(softmax(zs[t])[labels[t + 1]]) for t in resp])
    kl_text = np.mean([kl(zt[t], zs[t]) for t in resp])
    vis = [t for t in range(len(labels)) if vmask[t]]
    kl_vis = np.mean([kl(zt[t], zs[t]) for t in vis])
    rs, rt = zs[vis] @ zs[vis].T, zt[vis] @ zt[vis].T
    if variant == "flat":
        rel = 1 - (rs * rt).sum() / (np.linalg.norm(rs) * np.linalg.norm(rt))
    else:
        cols = [rs[:, j] @ rt[:, j] / (np.linalg.norm(rs[:, j]) * np.linalg.norm(rt[:, j])) for j in range(len(vis))]
        rel = 1 - np.mean(cols)
    return dict(ce=ce, kl_text=kl_text, kl_vis=kl_vis, rel=rel, total=ce + kl_text + kl_vis + rel)


@pytest.mark.parametrize("variant", ["flat", "column"])
def test_dense_batch1_equals_literal_formula(variant):
    bt = make_batch(lengths=(11,), spans=((1, 4),))
    zs = bt["hidden"] @ bt["weight"].T
    zt = bt["t_hidden"] @ bt["t_weight"].T
    out = llava_kd_loss_dense(zs, zt, bt["labels"], bt["visual_mask"], rel_variant=variant)
    ref = literal_llava_kd(zs[0], zt[0], bt["labels"][0].tolist(), bt["visual_mask"][0].tolist(), variant)
    for k in KEYS:
        assert out[k].dtype == torch.float64
        assert out[k].item() == pytest.approx(ref[k], rel=1e-10, abs=1e-12), k


def test_dense_padded_batch_equals_mean_of_batch1():
    # sample 2 is text-only; sample 3 has an image but no supervised token (all labels -100)
    bt = make_batch(lengths=(12, 9, 7, 6), spans=((1, 4), (0, 3), None, (0, 2)), response_start=(6, 4, 2, 99))
    zs = (bt["hidden"] @ bt["weight"].T).float()
    zt = (bt["t_hidden"] @ bt["t_weight"].T).float()
    lengths = (12, 9, 7, 6)
    out = llava_kd_loss_dense(zs, zt, bt["labels"], bt["visual_mask"])
    singles = [
        llava_kd_loss_dense(zs[b : b + 1, :n], zt[b : b + 1, :n], bt["labels"][b : b + 1, :n], bt["visual_mask"][b : b + 1, :n])
        for b, n in enumerate(lengths)
    ]
    has_text = [0, 1, 2]  # sample 3 has nothing supervised
    has_img = [0, 1, 3]
    expect = {
        "ce": np.mean([singles[b]["ce"].item() for b in has_text]),
        "kl_text": np.mean([singles[b]["kl_text"].item() for b in has_text]),
        "kl_vis": np.mean([singles[b]["kl_vis"].item() for b in has_img]),
        "rel": np.mean([singles[b]["rel"].item() for b in has_img]),
    }
    expect["total"] = sum(expect.values())
    for k in KEYS:
        assert out[k].dtype == torch.float32
        assert out[k].item() == pytest.approx(expect[k], rel=1e-5), k


def test_dense_float32_for_bf16_input_and_teacher_vocab_restriction():
    bt = make_batch(lengths=(10,), spans=((0, 3),), vocab=13)
    zs = bt["hidden"] @ bt["weight"].T
    zt = bt["t_hidden"] @ bt["t_weight"].T
    extra = torch.full((1, 10, 4), 50.0, dtype=zt.dtype)  # teacher-only ids with huge logits
    out_big = llava_kd_loss_dense(zs, torch.cat([zt, extra], -1), bt["labels"], bt["visual_mask"])
    out = llava_kd_loss_dense(zs, zt, bt["labels"], bt["visual_mask"])
    for k in ("ce", "kl_text", "kl_vis"):  # restricted before the softmax: extra ids are ignored
        assert out_big[k].item() == pytest.approx(out[k].item(), rel=1e-12)
    out_bf = llava_kd_loss_dense(zs.bfloat16(), zt.bfloat16(), bt["labels"], bt["visual_mask"])
    assert all(out_bf[k].dtype == torch.float32 for k in KEYS)


# ---------------------------------------------------------------------------------------------
# 2. sparse targets
# ---------------------------------------------------------------------------------------------
def dense_kl(zt, zs):
    lp, lq = torch.log_softmax(zt.double(), -1), torch.log_softmax(zs.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def test_topk_with_tail_basic_and_padding():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 11, generator=g, dtype=torch.float64) * 3
    ids, lp, tail = topk_with_tail(z, 4)
    ref = torch.log_softmax(z, -1)
    assert ids.dtype == torch.long and lp.dtype == torch.float32 and tail.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref.gather(-1, ids))
    torch.testing.assert_close(tail.double(), 1 - lp.double().exp().sum(-1))
    assert torch.all(lp[:, :-1] >= lp[:, 1:])
    # k larger than the vocabulary: padded with id 0 / -inf, tail exactly 0
    ids, lp, tail = topk_with_tail(z, 14)
    assert torch.equal(ids[:, 11:], torch.zeros(5, 3, dtype=torch.long))
    assert torch.isneginf(lp[:, 11:]).all() and torch.isfinite(lp[:, :11]).all()
    assert torch.equal(tail, torch.zeros(5))


def test_topk_vocab_limit_restricts_before_softmax():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 15, generator=g)
    z[:, 12:] = 30.0  # ids the student does not have must never show up, even when they dominate
    ids, lp, tail = topk_with_tail(z, 5, vocab_limit=12)
    assert int(ids.max()) < 12
    ref = torch.log_softmax(z[:, :12], -1)
    torch.testing.assert_close(lp, ref.gather(-1, ids))
    torch.testing.assert_close(tail + lp.exp().sum(-1), torch.ones(6))


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_teacher_targets_from_hidden_matches_topk(chunk):
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(10, 4, generator=g), torch.randn(20, 4, generator=g)
    got = teacher_targets_from_hidden(h, w, 6, vocab_limit=17, chunk_size=chunk)
    ref = topk_with_tail(h @ w.T, 6, vocab_limit=17)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    empty = teacher_targets_from_hidden(h[:0], w, 6)
    assert [tuple(x.shape) for x in empty] == [(0, 6), (0, 6), (0,)]


def test_sparse_kl_full_k_equals_dense_kl():
    g = torch.Generator().manual_seed(4)
    zt, zs = torch.randn(7, 13, generator=g, dtype=torch.float64) * 2, torch.randn(7, 13, generator=g, dtype=torch.float64)
    for k in (13, 16):  # k = V and k > V (padding, duplicate id 0)
        ids, lp, tail = topk_with_tail(zt, k)
        lp = torch.log_softmax(zt, -1).gather(-1, ids.clamp_max(12)).where(torch.isfinite(lp), lp.double())
        torch.testing.assert_close(sparse_kl(zs, ids, lp, tail), dense_kl(zt, zs), rtol=1e-10, atol=1e-12)


def test_sparse_kl_topk_is_bucket_kl_and_below_dense():
    g = torch.Generator().manual_seed(5)
    zt, zs = torch.randn(9, 17, generator=g, dtype=torch.float64) * 2, torch.randn(9, 17, generator=g, dtype=torch.float64)
    p, q = torch.softmax(zt, -1).numpy(), torch.softmax(zs, -1).numpy()
    for k in (1, 4, 16):
        ids = torch.log_softmax(zt, -1).topk(k, -1).indices
        lp = torch.log_softmax(zt, -1).gather(-1, ids)
        tail = 1 - lp.exp().sum(-1)
        got = sparse_kl(zs, ids, lp, tail)
        for n in range(9):  # (k+1)-bucket KL by hand
            K = ids[n].tolist()
            pk, qk = p[n, K], q[n, K]
            pt, qt = 1 - pk.sum(), 1 - qk.sum()
            hand = float((pk * np.log(pk / qk)).sum() + pt * np.log(pt / qt))
            assert got[n].item() == pytest.approx(hand, rel=1e-9, abs=1e-12)
        assert torch.all(got <= dense_kl(zt, zs) + 1e-12)


def test_sparse_kl_zero_tail_minus_inf_and_grads():
    # teacher with -inf logits: exact tail 0 with k < V; student with extreme logits
    zt = torch.tensor([[2.0, 1.0, float("-inf"), float("-inf"), 0.5]], dtype=torch.float64)
    zs = torch.tensor([[1e4, -1e4, 3.0, -1e4, 0.0]], dtype=torch.float64, requires_grad=True)
    ids, lp, tail = topk_with_tail(zt, 3)
    assert tail.item() == 0.0
    kl = sparse_kl(zs, ids, lp, tail)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(zs.grad).all()
    # tail > 0 while the student's tail mass underflows to 0: finite (huge) KL, finite grads
    zs2 = torch.tensor([[1e4, 1e4, -1e4, -1e4, -1e4]], requires_grad=True)
    ids, lp, tail = topk_with_tail(torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]]), 2)
    kl2 = sparse_kl(zs2, ids, lp, tail)
    kl2.sum().backward()
    assert torch.isfinite(kl2).all() and kl2.item() > 1e3 and torch.isfinite(zs2.grad).all()
    with pytest.raises(ValueError, match="student vocab"):
        sparse_kl(zs.detach(), torch.tensor([[7, 0, 1]]), lp.new_zeros(1, 3), tail)


def test_sparse_kl_gradcheck():
    g = torch.Generator().manual_seed(6)
    zt = torch.randn(4, 9, generator=g, dtype=torch.float64)
    zs = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    ids, lp, tail = topk_with_tail(zt, 3)
    lp, tail = lp.double(), tail.double()
    assert torch.autograd.gradcheck(lambda z: sparse_kl(z, ids, lp, tail), (zs,))


# ---------------------------------------------------------------------------------------------
# 4. Gram-trick autocorrelation and rel
# ---------------------------------------------------------------------------------------------
def test_gram_autocorr_equals_naive_with_gradients():
    g = torch.Generator().manual_seed(7)
    h = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(23, 5, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(6, 6, generator=g, dtype=torch.float64)
    r = gram_autocorr(h, w)
    z = h @ w.T
    r_naive = z @ z.T
    torch.testing.assert_close(r, r_naive, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad((r * up).sum(), (h, w))
    g2 = torch.autograd.grad((r_naive * up).sum(), (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gram_autocorr(h, gram=lm_head_gram(w)), r)
    assert torch.autograd.gradcheck(lambda a, b: gram_autocorr(a, b), (h, w))


def test_normalized_autocorr_float32_under_autocast():
    g = torch.Generator().manual_seed(8)
    h, w = torch.randn(5, 4, generator=g) * 30, torch.randn(11, 4, generator=g) * 30
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = normalized_autocorr(h, w)
    z = (h.double() @ w.double().T)
    naive = z @ z.T
    assert r.dtype == torch.float32
    torch.testing.assert_close(r.double(), naive / naive.norm(), rtol=1e-5, atol=1e-6)
    assert torch.equal(normalized_autocorr(torch.zeros(3, 4), w), torch.zeros(3, 3))


def test_rel_loss_variants_scale_invariance_and_zero():
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    flat = 1 - (a * b).sum() / (a.norm() * b.norm())
    col = 1 - ((a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))).mean()
    torch.testing.assert_close(rel_loss(a, b), flat)
    torch.testing.assert_close(rel_loss(a * 1e30, b, "column"), col)
    z = torch.zeros(3, 3, requires_grad=True)
    out = rel_loss(z, torch.ones(3, 3))
    out.backward()
    assert out.item() == 1.0 and torch.isfinite(z.grad).all()
    with pytest.raises(ValueError):
        rel_loss(a, b, "rows")


# ---------------------------------------------------------------------------------------------
# 3. fused chunked loss
# ---------------------------------------------------------------------------------------------
def test_collate_targets_layout_and_alignment_errors():
    bt = make_batch()
    samples = sample_targets(bt, k=5)
    samples[2] = SampleTargets("s2", SparseTopK(samples[2].text.ids[:, :3], samples[2].text.logprobs[:, :3], samples[2].text.tail))
    batch = collate_targets(samples)
    assert batch.k == 5 and batch.batch_size == 3
    assert batch.text_counts() == response_mask(bt["labels"]).sum(1).tolist()
    assert batch.vis_counts() == [4, 3, 0] and batch.autocorr[2] is None
    assert torch.isneginf(batch.text_logprobs[batch.text_offsets[2] :, 3:]).all()  # padded k
    bad = bt["labels"].clone()
    bad[1, -1] = 3  # one more response position than the targets have
    with pytest.raises(ValueError, match="do not align"):
        fused_kd_loss(bt["hidden"], bt["weight"], bad, batch, visual_start(bt))
    with pytest.raises(ValueError, match="visual_len"):
        fused_kd_loss(bt["hidden"], bt["weight"], bt["labels"], batch, visual_start(bt), visual_len=[4, 2, 0])


@pytest.mark.parametrize("variant", ["flat", "column"])
def test_fused_equals_dense_from_full_topk_equals_reference(variant):
    """fused == dense logits with k = V sparse targets == llava_kd_loss_dense (float64)."""
    bt = make_batch()
    vocab = bt["weight"].shape[0]
    batch = collate_targets(sample_targets(bt, k=vocab))
    h = bt["hidden"].clone().requires_grad_()
    w = bt["weight"].clone().requires_grad_()
    fused = fused_kd_loss(h, w, bt["labels"], batch, visual_start(bt), chunk_size=5, rel_variant=variant)
    g_fused = torch.autograd.grad(fused["total"], (h, w))
    logits = h @ w.T
    from_logits = kd_loss_from_logits(logits, bt["labels"], batch, visual_start(bt), rel_variant=variant)
    zt = bt["t_hidden"] @ bt["t_weight"].T
    ref = llava_kd_loss_dense(logits, zt, bt["labels"], bt["visual_mask"], rel_variant=variant)
    g_ref = torch.autograd.grad(ref["total"], (h, w))
    assert_dicts_close(fused, from_logits, rtol=1e-12, atol=1e-12)
    # the cached targets are float32 (log-probs, autocorr), hence the looser match to the reference
    assert_dicts_close(fused, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_fused_with_larger_teacher_vocab_equals_reference():
    """A 7B-style teacher with extra vocabulary rows: targets restricted to the common vocabulary."""
    bt = make_batch()
    vocab = bt["weight"].shape[0]
    g = torch.Generator().manual_seed(11)
    bt["t_weight"] = torch.cat([bt["t_weight"], torch.randn(4, bt["t_weight"].shape[1], generator=g, dtype=torch.float64) * 3])
    batch = collate_targets(sample_targets(bt, k=vocab, vocab_limit=vocab))
    assert int(batch.text_ids.max()) < vocab and int(batch.vis_ids.max()) < vocab
    fused = fused_kd_loss(bt["hidden"], bt["weight"], bt["labels"], batch, visual_start(bt), chunk_size=6)
    zt = bt["t_hidden"] @ bt["t_weight"].T  # [B, L, V + 4]
    ref = llava_kd_loss_dense(bt["hidden"] @ bt["weight"].T, zt, bt["labels"], bt["visual_mask"])
    assert_dicts_close(fused, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
@pytest.mark.parametrize("k", [3, 19])
def test_fused_matches_dense_path_float32_values_and_grads(chunk, k):
    bt = make_batch(dtype=torch.float32, seed=chunk)
    batch = collate_targets(sample_targets(bt, k=k))
    weights = KDWeights(ce=1.0, kl_text=0.7, kl_vis=0.3, rel=2.0)
    h = bt["hidden"].clone().requires_grad_()
    w = bt["weight"].clone().requires_grad_()
    fused = fused_kd_loss(h, w, bt["labels"], batch, visual_start(bt), weights=weights, chunk_size=chunk)
    g1 = torch.autograd.grad(fused["total"], (h, w))
    dense = kd_loss_from_logits(h @ w.T, bt["labels"], batch, visual_start(bt), weights=weights)
    g2 = torch.autograd.grad(dense["total"], (h, w))
    assert all(fused[key].dtype == torch.float32 for key in KEYS)
    assert_dicts_close(fused, dense, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_fused_tied_head_gradients():
    """Tied embeddings: W is also the input embedding, so both gradient paths meet on it."""
    torch.manual_seed(10)
    vocab, dim = 19, 6
    bt = make_batch(vocab=vocab, dim=dim, dtype=torch.float32)
    batch = collate_targets(sample_targets(bt, k=6))
    emb = torch.nn.Embedding(vocab, dim)
    mix = torch.nn.Linear(dim, dim)
    input_ids = torch.randint(0, vocab, bt["labels"].shape)

    def run(fused: bool):
        emb.zero_grad(), mix.zero_grad()
        hidden = torch.tanh(mix(emb(input_ids)))
        if fused:
            out = fused_kd_loss(hidden, emb.weight, bt["labels"], batch, visual_start(bt), chunk_size=3)
        else:
            out = kd_loss_from_logits(hidden @ emb.weight.T, bt["labels"], batch, visual_start(bt))
        out["total"].backward()
        return out, emb.weight.grad.clone(), mix.weight.grad.clone()

    f, *gf = run(True)
    d, *gd = run(False)
    assert_dicts_close(f, d, rtol=1e-5, atol=1e-6)
    for a, b in zip(gf, gd):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_fused_gradcheck_float64():
    bt = make_batch(lengths=(7, 5), spans=((0, 2), None), vocab=7, dim=3)
    batch = collate_targets(sample_targets(bt, k=3))
    labels = bt["labels"]

    def f(h, w):
        return fused_kd_loss(h, w, labels, batch, [0, 0], chunk_size=2, reusable_backward=True)["total"]

    h = bt["hidden"].clone().requires_grad_()
    w = bt["weight"].clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (h, w))


def test_fused_autocast_bf16_and_no_grad():
    bt = make_batch(dtype=torch.float32, vocab=31, dim=16)
    batch = collate_targets(sample_targets(bt, k=8))
    h = bt["hidden"].clone().requires_grad_()
    w = bt["weight"].clone().requires_grad_()
    ref = fused_kd_loss(h, w, bt["labels"], batch, visual_start(bt), chunk_size=4)
    g_ref = torch.autograd.grad(ref["total"], (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_kd_loss(h, w, bt["labels"], batch, visual_start(bt), chunk_size=4)
    g = torch.autograd.grad(out["total"], (h, w))
    assert all(out[k].dtype == torch.float32 for k in KEYS)
    assert g[0].dtype == torch.float32 and g[1].dtype == torch.float32
    assert_dicts_close(out, ref, rtol=3e-2, atol=3e-2)
    for a, b in zip(g, g_ref):
        assert torch.isfinite(a).all()
        assert (a - b).norm() / b.norm() < 0.05
    with torch.no_grad():
        ng = fused_kd_loss(h, w, bt["labels"], batch, visual_start(bt), chunk_size=4)
    assert_dicts_close(ng, ref, rtol=0, atol=0)


def test_fused_frozen_head_with_cached_gram():
    """DPT-like: lm_head frozen, G cached once; the gradient w.r.t. hidden still matches."""
    bt = make_batch()
    batch = collate_targets(sample_targets(bt, k=5))
    h = bt["hidden"].clone().requires_grad_()
    gram = lm_head_gram(bt["weight"])
    fused = fused_kd_loss(h, bt["weight"], bt["labels"], batch, visual_start(bt), gram=gram, chunk_size=4)
    (g1,) = torch.autograd.grad(fused["total"], (h,))
    dense = kd_loss_from_logits(h @ bt["weight"].T, bt["labels"], batch, visual_start(bt))
    (g2,) = torch.autograd.grad(dense["total"], (h,))
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


def test_fused_single_backward_guard():
    bt = make_batch()
    batch = collate_targets(sample_targets(bt, k=4))
    h = bt["hidden"].clone().requires_grad_()
    out = fused_kd_loss(h, bt["weight"], bt["labels"], batch, visual_start(bt))
    out["total"].backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="reusable_backward"):
        out["total"].backward()


def test_fused_gram_passed_in_equals_built():
    bt = make_batch()
    batch = collate_targets(sample_targets(bt, k=4))
    a = fused_kd_loss(bt["hidden"], bt["weight"], bt["labels"], batch, visual_start(bt))
    b = fused_kd_loss(bt["hidden"], bt["weight"], bt["labels"], batch, visual_start(bt), gram=lm_head_gram(bt["weight"]))
    assert_dicts_close(a, b, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------
# 5. no NaN / inf anywhere
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["extreme", "all_masked_sample", "text_only", "nothing"])
def test_no_nan_or_inf(case):
    spans = ((1, 4), (0, 3), None)
    response_start = None
    if case == "all_masked_sample":
        response_start = (6, 99, 2)
    if case in ("text_only", "nothing"):
        spans = (None, None, None)
    if case == "nothing":
        response_start = (99, 99, 99)
    bt = make_batch(spans=spans, response_start=response_start, dtype=torch.float32)
    scale = 1.0
    if case == "extreme":
        # logits of +-1e4: hidden and weights such that z = h W^T reaches 1e4 in magnitude
        scale = 1e4 / float((bt["hidden"] @ bt["weight"].T).abs().max())
        bt["t_hidden"] = bt["t_hidden"] * 1e4 / float((bt["t_hidden"] @ bt["t_weight"].T).abs().max())
    batch = collate_targets(sample_targets(bt, k=5))
    h = (bt["hidden"] * scale).requires_grad_()
    w = bt["weight"].clone().requires_grad_()
    outs = {
        "fused": fused_kd_loss(h, w, bt["labels"], batch, visual_start(bt), chunk_size=3),
        "logits": kd_loss_from_logits(h @ w.T, bt["labels"], batch, visual_start(bt)),
        "dense": llava_kd_loss_dense(h @ w.T, bt["t_hidden"] @ bt["t_weight"].T, bt["labels"], bt["visual_mask"]),
    }
    for name, out in outs.items():
        grads = torch.autograd.grad(out["total"], (h, w))
        for k in KEYS:
            assert torch.isfinite(out[k]).all(), (name, k)
        for gr in grads:
            assert torch.isfinite(gr).all(), name
        if case in ("text_only", "nothing"):
            assert out["kl_vis"].item() == 0 and out["rel"].item() == 0
        if case == "nothing":
            assert out["total"].item() == 0
    if case != "extreme":  # at +-1e4 float32 logits the paths legitimately differ in rounding
        assert_dicts_close(outs["fused"], outs["logits"], rtol=1e-5, atol=1e-6)
