"""The factored autocorrelation: the teacher's factorisation (share honest, rank minimal, capped,
deterministic) and the student's relation term from the factor = the dense term (values and
gradients, both variants, both computation paths), through collate -> fused loss -> oracle, and
the teacher runner's factor against its dense oracle."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ckd_common.kd import KDWeights, collate_targets, fused_kd_loss, kd_loss_from_logits, lm_head_gram, rel_loss
from ckd_common.kd.reference import rel_loss_tail_dense
from ckd_common.kd.relation import (FactorTarget, factor_autocorr, factor_dense, rel_loss_factored, relation_loss,
                                    relation_target, share_error_bound)
from ckd_common.kd.terms import gram_autocorr
from ckd_common.targets import AutocorrFactor, SampleTargets, SparseTopK, dense_autocorr
from logit_cache.synthetic import teacher_like_autocorr


def _psd(n: int, rank: int, seed: int, decay: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, rank, generator=g, dtype=torch.float64) * decay ** torch.arange(rank, dtype=torch.float64)
    return (h @ h.T).float()


def _residual(r: torch.Tensor, codes, scale, rank) -> float:
    r = r.double() / r.double().norm()
    u = (codes[:rank].double() * scale[:rank, None].double()).T
    return float((r - u @ u.T).square().sum())


# ---------------------------------------------------------------------------------------------
# teacher side
@pytest.mark.parametrize("n, true_rank", [(6, 6), (40, 12), (200, 60)])  # eigh path, eigh, subspace path
def test_stored_share_is_the_real_error_and_the_rank_is_minimal(n, true_rank):
    r = _psd(n, true_rank, seed=n)
    codes, scale, rank, share, tail = factor_autocorr(r, share=0.999, max_rank=64)
    rank = int(rank)
    assert codes.dtype == torch.int8 and codes.shape == (min(64, n), n)
    assert abs(_residual(r, codes, scale, rank) - (1 - float(share))) < 1e-6  # quantisation included
    assert float(share) > 0.998  # int8 quantisation costs little next to the 1e-3 asked
    # minimal: the exact eigenvalues of one column less do not reach the share
    w = torch.linalg.eigvalsh(r.double() / r.double().norm()).flip(0).clamp_min(0)
    assert float(w[:rank].square().sum()) >= 0.999 - 1e-6
    assert float(w[:rank - 1].square().sum()) < 0.999
    assert not codes[rank:].any() and not scale[rank:].any()
    # the tail trace is what the stored factor leaves out of tr(R^)
    u = (codes[:rank].double() * scale[:rank, None].double()).T
    rn = r.double() / r.double().norm()
    assert abs(float(tail) - float(torch.trace(rn) - u.square().sum())) < 1e-5


def test_head_columns_are_int8_trailing_ones_coarse_within_the_budget():
    """Columns up to head_share of ||R||_F^2 use the int8 range, later ones [-7, 7]; a head column
    counts two against max_rank (the byte budget), so a flat spectrum keeps max_rank - head columns."""
    r = _psd(200, 200, seed=3, decay=0.995)
    codes, scale, rank, share, tail = factor_autocorr(r, share=0.9999, max_rank=60, head_share=0.5)
    w = torch.linalg.eigvalsh(r.double() / r.double().norm()).flip(0).clamp_min(0)
    head = int((w.square().cumsum(0) < 0.5).sum()) + 1
    assert int(rank) == 60 - head and head > 1
    assert codes[:head].abs().amax(1).min() == 127
    assert codes[head:int(rank)].abs().max() == 7 and not codes[int(rank):].any()
    assert abs(_residual(r, codes, scale, int(rank)) - (1 - float(share))) < 1e-6
    assert float(tail) > 0  # a flat spectrum cut by the budget leaves much out

def test_cap_batch_zero_and_scale_invariance():
    rs = torch.stack([_psd(50, 50, seed=1, decay=0.99), torch.zeros(50, 50), _psd(50, 3, seed=2)])
    codes, scale, rank, share, tail = factor_autocorr(rs, share=0.9999, max_rank=10)
    assert rank.tolist()[0] == 10 - 5 and float(share[0]) < 0.9999  # capped (5 head columns count two)
    assert rank.tolist()[1] == 0 and float(share[1]) == 1.0          # R = 0 is stored exactly, as rank 0
    assert rank.tolist()[2] == 3
    assert float(tail[0]) > 0 and float(tail[1]) == 0.0              # capped: much left out; R = 0: nothing
    one = factor_autocorr(rs[2] * 1e7, share=0.9999, max_rank=10)    # raw entries reach 1e6-1e8: same factor
    assert torch.equal(one[0], codes[2]) and torch.allclose(one[1], scale[2] * 1, rtol=1e-5)
    again = factor_autocorr(rs, share=0.9999, max_rank=10)           # deterministic (fixed-seed subspace start)
    assert all(torch.equal(x, y) for x, y in zip(again, (codes, scale, rank, share, tail)))


def test_teacher_like_factor_meets_its_bound():
    """On a teacher-like R the captured share is high at a small rank, and the relation-loss error
    against the dense R stays within the bound the share implies (and far inside it)."""
    rng = np.random.default_rng(0)
    r = teacher_like_autocorr(100, 64, rng, "typical")
    f = factor_dense(r)
    assert isinstance(f, AutocorrFactor) and f.rank < 40 and f.share > 0.9998
    h = torch.randn(100, 64, dtype=torch.float64)
    g = lm_head_gram(torch.randn(300, 64, dtype=torch.float64))
    for variant in ("flat", "column"):
        dense = float(rel_loss(gram_autocorr(h, gram=g), torch.from_numpy(r).double(), variant))
        fact = float(relation_loss(h, g, FactorTarget(torch.from_numpy(f.factor()).double()), variant))
        assert abs(dense - fact) <= share_error_bound(f.share) / 5  # the bound is a worst case: far inside it
        corr = float(relation_loss(h, g, relation_target(f), variant))  # with the tail estimate
        assert f.tail_trace is not None and abs(dense - corr) <= share_error_bound(f.share) / 5


# ---------------------------------------------------------------------------------------------
# student side: parity with the dense term
@pytest.mark.parametrize("variant", ["flat", "column"])
@pytest.mark.parametrize("nv, d", [(7, 12), (12, 5)])  # Nv <= d: R_S built; Nv > d: Grams only
def test_factored_relation_term_equals_dense(variant, nv, d):
    torch.manual_seed(nv * d)
    h = torch.randn(nv, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, d, dtype=torch.float64, requires_grad=True)  # V > d: G = W^T W of full rank
    u = torch.randn(nv, 3, dtype=torch.float64)
    fact = rel_loss_factored(h, lm_head_gram(w), u, variant)
    dense = rel_loss(gram_autocorr(h, w), u @ u.T, variant)
    torch.testing.assert_close(fact, dense)
    gf = torch.autograd.grad(fact, (h, w))
    gd = torch.autograd.grad(dense, (h, w))
    for a, b in zip(gf, gd):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda h, w: rel_loss_factored(h, lm_head_gram(w), u, variant), (h, w))
    g = torch.randn(d, d, dtype=torch.float64, requires_grad=True)  # any G, not only symmetric ones
    a = torch.autograd.grad(rel_loss_factored(h, g, u, variant), g)[0]
    b = torch.autograd.grad(rel_loss(gram_autocorr(h, gram=g), u @ u.T, variant), g)[0]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("variant", ["flat", "column"])
@pytest.mark.parametrize("nv, d, r", [(7, 12, 3), (12, 5, 3), (9, 6, 0), (6, 8, 6)])  # both paths, rank 0, full rank
def test_tail_corrected_factored_term_equals_its_dense_version(variant, nv, d, r):
    """With a tail trace the factored term (Grams, Q = orth(U)) equals the plain dense estimate
    U U^T + c P (reference.rel_loss_tail_dense), values and gradients w.r.t. H, W and any G."""
    torch.manual_seed(nv * d + r)
    h = torch.randn(nv, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, d, dtype=torch.float64, requires_grad=True)
    u = torch.randn(nv, r, dtype=torch.float64) * 0.3
    tau = 0.07
    fact = rel_loss_factored(h, lm_head_gram(w), u, variant, tau)
    dense = rel_loss_tail_dense(gram_autocorr(h, w), u, tau, variant)
    torch.testing.assert_close(fact, dense)
    for a, b in zip(torch.autograd.grad(fact, (h, w)), torch.autograd.grad(dense, (h, w))):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda h, w: rel_loss_factored(h, lm_head_gram(w), u, variant, tau), (h, w))
    g = torch.randn(d, d, dtype=torch.float64, requires_grad=True)
    a = torch.autograd.grad(rel_loss_factored(h, g, u, variant, tau), g)[0]
    b = torch.autograd.grad(rel_loss_tail_dense(gram_autocorr(h, gram=g), u, tau, variant), g)[0]
    torch.testing.assert_close(a, b)
    f32 = rel_loss_factored(h.detach().float() * 300, lm_head_gram(w.detach().float()), u.float(), variant, tau)
    assert abs(f32.item() - dense.item()) < 1e-4  # float32, large entries: the unit scaling keeps it exact enough


def test_factored_term_float32_at_large_scale_and_zero_targets():
    torch.manual_seed(0)
    h = (torch.randn(20, 8) * 300).requires_grad_()  # R entries ~1e9: squares would overflow without scaling
    g = lm_head_gram(torch.randn(50, 8) * 30)
    u = torch.randn(20, 4)
    for variant in ("flat", "column"):
        fact = rel_loss_factored(h, g, u, variant)
        dense = rel_loss(gram_autocorr(h.double(), gram=g.double()), (u @ u.T).double(), variant)
        assert torch.isfinite(fact) and abs(fact.item() - dense.item()) < 1e-5
        zero = rel_loss_factored(h, g, torch.zeros(20, 0), variant)  # rank 0 (R = 0): cos 0, no NaN
        (gh,) = torch.autograd.grad(zero, h)
        assert zero.item() == 1.0 and torch.isfinite(gh).all()


def _batch(seed: int, vocab: int, nv: int, factor: bool):
    rng = np.random.default_rng(seed)

    def topk(n, k=4):
        lp = np.log(rng.dirichlet(np.ones(k + 1), n)[:, :k]).astype(np.float32)
        return SparseTopK(rng.integers(0, vocab, (n, k)), lp, (1 - np.exp(lp).sum(1)).astype(np.float32))

    samples, labels = [], torch.full((2, 14), -100)
    for b in range(2):
        h = rng.standard_normal((nv, 3))
        r = h @ h.T
        r /= np.linalg.norm(r)
        ac = factor_dense(r, max_rank=4) if factor else r.astype(np.float32)  # rank 3 of 5 kept: a tail
        labels[b, 9:13] = torch.as_tensor(rng.integers(0, vocab, 4))
        samples.append(SampleTargets(f"{b:032x}", topk(4), topk(nv), ac))
    return samples, labels


@pytest.mark.parametrize("variant", ["flat", "column"])
def test_fused_loss_from_factors_equals_dense_targets_of_the_same_matrix(variant):
    """collate -> fused_kd_loss with factor targets = with the dense matrices U U^T (values, dH, dW),
    and the test oracle (from logits) agrees; with their tail traces, the oracle's dense estimate agrees."""
    vocab, nv, d = 40, 5, 6
    samples, labels = _batch(0, vocab, nv, factor=True)
    dense = [SampleTargets(s.key, s.text, s.visual, dense_autocorr(s.autocorr)) for s in samples]
    with_tail = collate_targets(samples)
    assert all(t.tail_trace is not None for t in with_tail.autocorr)
    samples = [SampleTargets(s.key, s.text, s.visual, AutocorrFactor(s.autocorr.codes, s.autocorr.scale,
                                                                      s.autocorr.share)) for s in samples]
    tf, td = collate_targets(samples), collate_targets(dense)
    assert isinstance(tf.autocorr[0], FactorTarget) and td.autocorr[0].shape == (nv, nv)
    torch.manual_seed(1)
    hidden = torch.randn(2, 14, d, dtype=torch.float64)
    weight = torch.randn(vocab, d, dtype=torch.float64)
    out = []
    for t in (tf, td):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        res = fused_kd_loss(h, w, labels, t, [1, 2], weights=KDWeights(rel=3.0), rel_variant=variant, chunk_size=4)
        res["total"].backward()
        out.append((res, h.grad, w.grad))
    (rf, hf, wf), (rd, hd, wd) = out
    torch.testing.assert_close(rf["rel"], rd["rel"])
    assert float(rf["rel"]) > 0
    torch.testing.assert_close(hf, hd)
    torch.testing.assert_close(wf, wd)
    logits = (hidden @ weight.T).requires_grad_()
    ref = kd_loss_from_logits(logits, labels, tf, [1, 2], weights=KDWeights(rel=3.0), rel_variant=variant)
    torch.testing.assert_close(ref["rel"], rf["rel"])
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    res = fused_kd_loss(h, w, labels, with_tail, [1, 2], weights=KDWeights(rel=3.0), rel_variant=variant, chunk_size=4)
    res["total"].backward()
    z = (hidden @ weight.T).requires_grad_()
    ref = kd_loss_from_logits(z, labels, with_tail, [1, 2], weights=KDWeights(rel=3.0), rel_variant=variant)
    torch.testing.assert_close(ref["rel"], res["rel"])
    assert abs(float(res["rel"]) - float(rf["rel"])) > 1e-6  # the tail estimate changed the term


def test_teacher_runner_factor_against_its_dense_oracle(tiny_models, synth_dir):
    """The teacher's stored form (the factor) against its dense path: the same top-k, and a factor
    whose share is its real distance from the dense R/||R||_F."""
    from ckd_common.data import prepare_file
    from ckd_common.model import load_vlm, model_info
    from ckd_common.teacher import TeacherInput, TeacherRunner

    model, tok = load_vlm(tiny_models["tiny-teacher"])
    info = model_info(model, tok)
    ds = prepare_file(synth_dir / "pretrain.json", tok, "pretrain", info.num_visual_tokens, info.image_token_id,
                      synth_dir / "images")
    inputs = [TeacherInput.from_prepared(s, info.image_size, aspect_ratio=info.image_aspect_ratio)
              for s in ds.samples[:4]]
    fac = TeacherRunner(model, vocab_limit=info.common_vocab).targets(inputs, 8)
    den = TeacherRunner(model, vocab_limit=info.common_vocab, autocorr="dense").targets(inputs, 8)
    for f, d in zip(fac, den):
        assert isinstance(f.autocorr, AutocorrFactor) and isinstance(d.autocorr, np.ndarray)
        np.testing.assert_array_equal(f.visual.ids, d.visual.ids)
        r = d.autocorr / np.linalg.norm(d.autocorr)
        assert abs(float(np.linalg.norm(r - f.autocorr.dense()) ** 2) - (1 - f.autocorr.share)) < 1e-5
        assert f.autocorr.share > 0.999 and f.autocorr.num_visual == info.num_visual_tokens
    with pytest.raises(ValueError, match="autocorr="):
        TeacherRunner(model, autocorr="triangle")


def test_wire_sends_the_factor_verbatim_and_refuses_inconsistent_ranks():
    """Wire version 2: the factor travels as stored (int8 codes + scales + share); a dense R (the
    oracle path) is factorised on encode; a header whose rank exceeds Nv is a WireError."""
    import json

    from ckd_common.wire import (RESPONSE_MAGIC, WIRE_VERSION, TargetsResponse, WireError, decode_frame,
                                 decode_response, encode_frame, encode_response)

    assert WIRE_VERSION == 2
    samples, _ = _batch(3, 40, 5, factor=True)
    dense = SampleTargets("d" * 32, samples[1].text, samples[1].visual, dense_autocorr(samples[1].autocorr))
    got = decode_response(encode_response(TargetsResponse([samples[0], dense], 4, 40, "fp"))).targets
    f = got[0].autocorr
    assert np.array_equal(f.codes, samples[0].autocorr.codes) and np.array_equal(f.scale, samples[0].autocorr.scale)
    assert f.share == samples[0].autocorr.share
    d = got[1].autocorr
    assert isinstance(d, AutocorrFactor) and d.share > 0.999
    meta, arrays = decode_frame(encode_response(TargetsResponse(samples[:1], 4, 40, "fp")), RESPONSE_MAGIC)
    meta["samples"][0]["autocorr_rank"] = 6  # > num_visual = 5
    with pytest.raises(WireError, match="autocorr_rank"):
        decode_response(encode_frame(RESPONSE_MAGIC, json.loads(json.dumps(meta)), dict(arrays)))
