"""The temperature's tail approximation on sparse targets, against the exact dense computation.

At T != 1 the KD terms need the teacher's tempered distribution p^(1/T) / Z. The cache stores the
top-k log-probs and the tail mass tau at T = 1; the top-k part tempers exactly, but the tail
bucket's tempered mass sum_{j not in K} p_j^(1/T) depends on how tau is spread, which is not
stored. ckd_common.kd.divergences estimates it with a power law in rank anchored at the k-th stored
probability ("powerlaw", used in training). This script measures, on the cache benchmark's
teacher-like distributions (logit_cache.synthetic: Zipf prior + context boosts + random sharpness,
peaked and heavy-tailed positions) at the real vocabulary V = 151,936, against the exact dense
KL(p^(1/T)/Z || softmax(z_S / T)) over the full vocabulary:

  exact-buckets  the (k+1)-bucket KL with the exact tempered tail: the bucketing error alone
  powerlaw       what training uses (bucketing + tail estimate)
  uniform        tau spread evenly over the V - k tail ids (the other simple estimate)
  topk-renorm    what most KD tools do (axolotl): teacher renormalised over its top-k, tempered,
                 renormalised; student over the full vocabulary; no tail bucket

for T in {0.5, 2, 4} and k in {64 (the cascade's default), 16}. Reported per method: the relative
error of the mean KD value (|mean L - mean L_exact| / mean L_exact), the mean per-position relative
error, the relative L2 error of the gradient w.r.t. the student's logits (what training follows),
and the mean absolute error of the tempered tail probability. The student is the teacher's logits
with a random sharpness and Gaussian noise (a student that roughly agrees with its teacher).

    .venv/bin/python bench/temperature.py [--positions 256] [--vocab 151936] [--ks 64,16]

Last line: RESULT with, at the first k (64) and per T, the powerlaw estimate's per-position, gradient
and mean-value errors (T2_pos_err, T2_grad_err, T2_kl_err), the same for the bucketing alone
(T2_bucket_*), and the gradient errors of the uniform estimate and of top-k renormalisation. The
mean-value error can hide errors of opposite sign across positions (the uniform estimate's large
per-position errors nearly cancel at T = 4); the per-position and gradient errors do not.

Measured 2026-12-01 on the shared 2-core box (256 positions, V = 151,936; 89 s; table: docs/design.md §4.7):
RESULT k=64 T0.5_pos_err=0.0002504 T0.5_grad_err=0.0003913 T0.5_kl_err=0.0008155
T0.5_bucket_pos_err=0.0002617 T0.5_bucket_grad_err=0.0001976 T0.5_bucket_kl_err=0.000944
T0.5_uniform_grad_err=0.001321 T0.5_topk_renorm_grad_err=0.00267 T2_pos_err=0.3366
T2_grad_err=0.04667 T2_kl_err=0.1947 T2_bucket_pos_err=0.3287 T2_bucket_grad_err=0.007317
T2_bucket_kl_err=0.1974 T2_uniform_grad_err=0.2864 T2_topk_renorm_grad_err=1.385 T4_pos_err=0.7738
T4_grad_err=0.08263 T4_kl_err=0.3424 T4_bucket_pos_err=0.7644 T4_bucket_grad_err=0.00707
T4_bucket_kl_err=0.3304 T4_uniform_grad_err=0.4503 T4_topk_renorm_grad_err=3.387
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from ckd_common.kd import KDObjective, topk_with_tail
from ckd_common.kd.divergences import (TeacherBuckets, bucket_divergence, bucket_logprobs, divergence_of_rows,
                                       student_buckets, teacher_buckets)
from logit_cache.synthetic import teacher_like_topk

TEMPS = (0.5, 2.0, 4.0)
METHODS = ("exact-buckets", "powerlaw", "uniform", "topk-renorm")


def teacher_like_logits(n, vocab, seed=0, zipf_s=1.0, boost_mean=5.0, boost_std=2.5, noise_std=1.5, candidates=32,
                        temp_log_std=0.3, batch=256):
    """The dense logits behind logit_cache.synthetic.teacher_like_topk (same model, same random draws;
    main() checks that their top-k equals teacher_like_topk's)."""
    g = torch.Generator().manual_seed(seed)
    prior = -zipf_s * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    pri_p = torch.softmax(prior, 0)
    out = []
    for s in range(0, n, batch):
        b = min(batch, n - s)
        z = prior.expand(b, vocab) + noise_std * torch.randn(b, vocab, generator=g)
        m = min(candidates, vocab)
        cand = torch.multinomial(pri_p, b * m, replacement=True, generator=g).view(b, m)
        z.scatter_add_(1, cand, torch.randn(b, m, generator=g) * boost_std + boost_mean)
        out.append(z * torch.exp(torch.randn(b, 1, generator=g) * temp_log_std))
    return torch.cat(out)


def topk_renorm_kl(zs_t, ids, lp, temp):
    """axolotl-style: p over K renormalised, tempered, renormalised; student log q over the full vocabulary."""
    lp_t = torch.log_softmax(lp.double() / temp, -1)
    lq = zs_t.gather(-1, ids) - torch.logsumexp(zs_t, -1, keepdim=True)
    return (lp_t.exp() * (lp_t - lq)).sum(-1)


def measure(zt_all, zs_all, k, temp, chunk):
    vocab = zt_all.shape[1]
    acc = {m: {"val": 0.0, "abs": 0.0, "grad_sq": 0.0, "tail": 0.0} for m in METHODS}
    exact_val = exact_grad_sq = 0.0
    per_pos_rel = {m: 0.0 for m in METHODS}
    n = zt_all.shape[0]
    objective = KDObjective(temperature=temp, t2_scale=False)
    for s in range(0, n, chunk):
        zt = zt_all[s:s + chunk].double()
        zs0 = zs_all[s:s + chunk].double()
        lp_full = torch.log_softmax(zt / temp, -1)
        lq_full = torch.log_softmax(zs0 / temp, -1)
        ex = (lp_full.exp() * (lp_full - lq_full)).sum(-1)
        ex_grad = (lq_full.exp() - lp_full.exp()) / temp  # d KL / d z_S
        exact_val += float(ex.sum())
        exact_grad_sq += float((ex_grad ** 2).sum())
        ids, lp, tail = topk_with_tail(zt.float(), k)  # what a teacher server sends (float32)
        lp, tail = lp.double(), tail.double()
        in_k = torch.zeros_like(zt, dtype=torch.bool).scatter_(-1, ids, True)
        exact_tail = torch.logsumexp(torch.where(in_k, float("-inf"), lp_full), -1)  # log P_T(tail), normalised
        for m in METHODS:
            zs = zs0.clone().requires_grad_()
            if m == "topk-renorm":
                val = topk_renorm_kl(zs / temp, ids, lp, temp)
                tail_p = torch.zeros_like(exact_tail)
            else:
                if m == "exact-buckets":
                    tb = teacher_buckets(ids, lp, tail, KDObjective(), vocab)
                    tb = TeacherBuckets(tb.ids, tb.valid, lp_full.gather(-1, ids), exact_tail, tb.has_tail)
                else:
                    tb = teacher_buckets(ids, lp, tail, objective, vocab, tail_rule=m)
                tail_p = tb.lp_tail.exp()
                if m == "exact-buckets":
                    zt_s = zs / temp
                    sb = student_buckets(zt_s, torch.logsumexp(zt_s, -1), tb.ids, tb.valid)
                    val = bucket_divergence(*bucket_logprobs(tb, sb), "forward_kl")
                else:
                    val = divergence_of_rows(zs, tb, objective)
            (grad,) = torch.autograd.grad(val.sum(), zs)
            a = acc[m]
            val = val.detach()
            a["val"] += float(val.sum())
            a["abs"] += float((val - ex).abs().sum())
            a["grad_sq"] += float(((grad - ex_grad) ** 2).sum())
            a["tail"] += float((tail_p - exact_tail.exp()).abs().sum())
            per_pos_rel[m] += float(((val - ex).abs() / ex.clamp_min(1e-12)).sum())
    out = {}
    for m in METHODS:
        a = acc[m]
        out[m] = {"kl_err": abs(a["val"] - exact_val) / exact_val, "pos_err": per_pos_rel[m] / n,
                  "grad_err": math.sqrt(a["grad_sq"] / exact_grad_sq), "tail_err": a["tail"] / n}
    return exact_val / n, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--ks", default="64,16")
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    ks = [int(x) for x in a.ks.split(",")]
    t0 = time.perf_counter()
    zt = teacher_like_logits(a.positions, a.vocab, seed=a.seed)
    ref = teacher_like_topk(a.positions, a.vocab, max(ks), seed=a.seed)
    got_ids, got_lp, _ = topk_with_tail(zt, max(ks))
    same = (got_ids.numpy() == ref.ids).mean()
    if same < 0.999 or not torch.allclose(got_lp, torch.from_numpy(ref.logprobs), atol=1e-4):
        print(f"bench/temperature.py: the dense logits do not reproduce logit_cache.synthetic ({same:.4f} of the "
              f"top-k ids agree); update teacher_like_logits to its model", file=sys.stderr)
        return 1
    g = torch.Generator().manual_seed(a.seed + 1)
    zs = zt * torch.exp(torch.randn(a.positions, 1, generator=g) * 0.2) + torch.randn(zt.shape, generator=g) * 1.0
    tau = torch.from_numpy(ref.tail).double()
    print(f"teacher-like distributions: {a.positions} positions, V={a.vocab}; tau at k={max(ks)}: median "
          f"{float(tau.median()):.2e}, 90th pct {float(tau.quantile(0.9)):.3f}, max {float(tau.max()):.3f} "
          f"(top-k ids reproduce logit_cache.synthetic: {same:.4f})")
    result = {}
    for k in ks:
        for temp in TEMPS:
            mean_kl, res = measure(zt, zs, k, temp, a.chunk)
            print(f"k={k:<3d} T={temp:<4g} exact dense KL {mean_kl:.4f} nats/position")
            for m in METHODS:
                r = res[m]
                print(f"    {m:<14s} mean-KL rel err {r['kl_err']:8.4f}   per-position rel err {r['pos_err']:8.4f}   "
                      f"grad rel L2 err {r['grad_err']:8.4f}   |dP_tail| {r['tail_err']:.4f}")
            if k == ks[0]:
                tag = f"T{temp:g}"
                for key, m in (("", "powerlaw"), ("bucket_", "exact-buckets")):
                    for err in ("pos_err", "grad_err", "kl_err"):
                        result[f"{tag}_{key}{err}"] = res[m][err]
                result[f"{tag}_uniform_grad_err"] = res["uniform"]["grad_err"]
                result[f"{tag}_topk_renorm_grad_err"] = res["topk-renorm"]["grad_err"]
    print(f"({time.perf_counter() - t0:.0f} s)")
    print(f"RESULT k={ks[0]} " + " ".join(f"{key}={v:.4g}" for key, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
