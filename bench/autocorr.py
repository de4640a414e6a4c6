"""Visual autocorrelation R = Z Z^T: Gram trick H (W^T W) H^T vs the naive product, side by side.

Sizes (defaults = the real student): Nv = 729 visual positions, d = 896, V = 151,936, batch 1
and 4 (samples per call). Z = H W^T is [Nv, V] (443 MB in float32 per sample); the Gram trick
never builds it.

What is timed (process CPU seconds, float32, torch CPU threads = all cores):
  teacher   forward only, the server's case: W is frozen, so G = W^T W is computed once per run
            (lm_head_gram) and each batch costs Nv d^2 + Nv^2 d per sample.       -> autocorr_time_ratio
  +gram     the same, but G is rebuilt inside the timed region (V d^2 once per batch): the cost
            when W changes every step.                                            -> ..._with_gram_b*
  train     forward + backward of sum_b rel_loss(R_b, target_b) w.r.t. H and W, G rebuilt per batch
            (the student trainer with a trainable lm_head).                       -> ..._train_b*
Note the honest arithmetic: building G costs V d^2 ~ 1.2e11 MACs, about as much as ONE naive
sample (Nv V d + Nv^2 V ~ 1.8e11), so without a cached G the trick wins only by amortising G over
the samples of a batch (and by never holding [Nv, V]); with a cached G it wins ~Nv V / d^2 ~ 100x.

Factored targets (format-2 caches): the trainer's relation term from the teacher's factor U [Nv, r]
(relation_loss with a FactorTarget) against the same term from the dense target U U^T, forward +
backward w.r.t. H and W with G rebuilt (DFT), flat and column:        -> rel_factored_time_ratio_*
and the teacher's factorisation of a batch of R (factor_autocorr: randomized subspace iteration
+ int8 quantisation + the exact share) against a full eigh, per sample: -> factorise_ms_*.
The factorisation runs on the teacher's GPU in production; these CPU times bound it from above.

Memory: peak RSS growth of each variant, measured in-process by resetting the kernel's high-water
mark (write "5" to /proc/self/clear_refs) before the call and reading VmHWM after it.
Accuracy: max |R_gram - R_naive| / max |R_naive| (both float32) against a float64 check.
Last line: `RESULT key=value ...`.

Measured 2026-11-24 on the shared 2-core / 24 GiB CPU box (abridged; forward peak ratios print 0
because the Gram variants allocate < 1 MiB: R itself is 2 MiB per sample):
RESULT autocorr_time_ratio=0.01062 autocorr_time_ratio_with_gram_b1=0.5384
autocorr_time_ratio_with_gram_b4=0.1548 autocorr_time_ratio_train_b1=0.3597
autocorr_time_ratio_train_b4=0.1222 autocorr_peak_mem_ratio_train_b1=0.4156
autocorr_peak_mem_ratio_train_b4=0.2006 autocorr_rel_err_gram=3.391e-07 autocorr_rel_err_naive=1.419e-06
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from _procmem import reset_peak, status_kib  # noqa: E402  (bench/ is on sys.path when run as a script)
from ckd_common.kd import gram_autocorr, lm_head_gram, rel_loss  # noqa: E402
from ckd_common.kd.relation import FactorTarget, factor_autocorr, relation_loss  # noqa: E402
from logit_cache.synthetic import teacher_like_autocorr  # noqa: E402


def measure(fn, repeats: int) -> tuple[float, float]:
    """(median CPU seconds, peak RSS growth MiB of the first call).

    CPU time (time.process_time: user + sys over all threads) rather than wall time, because the
    box is shared and the neighbours' load changes between the runs being compared."""
    times, peak = [], float("nan")
    for i in range(repeats):
        base = status_kib("VmRSS") / 1024
        exact = reset_peak()
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
        if i == 0 and exact:
            peak = status_kib("VmHWM") / 1024 - base
    return statistics.median(times), peak


def naive_autocorr(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    z = h @ w.T  # [Nv, V]
    return z @ z.T


def factored(args, weight: torch.Tensor, hs: list[torch.Tensor], rank: int = 48) -> dict[str, float]:
    """The relation term from a factor vs from its dense matrix; the teacher's factorisation cost."""
    import numpy as np

    nv = hs[0].shape[0]
    g = torch.Generator().manual_seed(1)
    u = torch.randn(nv, rank, generator=g) * (0.8 ** torch.arange(rank, dtype=torch.float32))
    out = {}
    for variant in ("flat", "column"):
        def step(target):
            def run():
                w = weight.detach().requires_grad_()
                h = hs[0].detach().requires_grad_()
                relation_loss(h, lm_head_gram(w), target, variant).backward()
            return run
        t_dense, _ = measure(step(u @ u.T), args.repeats)
        t_fact, _ = measure(step(FactorTarget(u)), args.repeats)
        print(f"relation term ({variant}, rank {rank}, fwd+bwd, G rebuilt): dense target {t_dense:.3f} s, "
              f"factor {t_fact:.3f} s", flush=True)
        out[f"rel_factored_time_ratio_{variant}"] = t_fact / t_dense
    rng = np.random.default_rng(0)
    rs = torch.from_numpy(np.stack([teacher_like_autocorr(nv, args.dim, rng, "typical") for _ in range(4)]))
    factor_autocorr(rs[:1])
    t_sub, _ = measure(lambda: factor_autocorr(rs), 1)
    t_eigh, _ = measure(lambda: torch.linalg.eigh(rs), 1)
    print(f"teacher factorisation of 4 x R[{nv}, {nv}] on CPU: factor_autocorr {t_sub / 4 * 1e3:.0f} ms/sample "
          f"(subspace iteration, quantisation, exact share); a full eigh alone {t_eigh / 4 * 1e3:.0f} ms/sample")
    out["factorise_ms_per_sample"] = t_sub / 4 * 1e3
    out["eigh_ms_per_sample"] = t_eigh / 4 * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=896)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--visual", type=int, default=729)
    ap.add_argument("--batches", type=str, default="1,4")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the fast (Gram) variants")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    nv, d, vocab = args.visual, args.dim, args.vocab
    weight = torch.randn(vocab, d, generator=g) * 0.05
    batches = [int(b) for b in args.batches.split(",")]
    hs = [torch.randn(nv, d, generator=g) for _ in range(max(batches))]
    targets = []
    for _ in range(max(batches)):
        r = torch.randn(nv, nv, generator=g)
        targets.append(r @ r.T)

    # warm-up (thread pools, kernel selection) on a small slice, then accuracy
    naive_autocorr(hs[0][:8], weight[:1024]), gram_autocorr(hs[0][:8], weight[:1024])
    with torch.no_grad():
        gram = lm_head_gram(weight)
        r_gram, r_naive = gram_autocorr(hs[0], gram=gram), naive_autocorr(hs[0], weight)
        r64 = naive_autocorr(hs[0].double(), weight.double())
    scale = float(r64.abs().max())
    err_gram = float((r_gram.double() - r64).abs().max()) / scale
    err_naive = float((r_naive.double() - r64).abs().max()) / scale
    print(f"float32 max rel error vs float64: gram {err_gram:.2e}  naive {err_naive:.2e}")
    del r_gram, r_naive, r64

    kv: dict[str, float] = {"autocorr_rel_err_gram": err_gram, "autocorr_rel_err_naive": err_naive}
    fwd_ratios = []
    for batch in batches:
        h_b, t_b = hs[:batch], targets[:batch]

        @torch.no_grad()
        def naive_fwd():
            return [naive_autocorr(h, weight) for h in h_b]

        @torch.no_grad()
        def gram_cached():
            return [gram_autocorr(h, gram=gram) for h in h_b]

        @torch.no_grad()
        def gram_built():
            g_ = lm_head_gram(weight)
            return [gram_autocorr(h, gram=g_) for h in h_b]

        def train(use_gram: bool):
            def step():
                w = weight.detach().requires_grad_()
                hh = [h.detach().requires_grad_() for h in h_b]
                g_ = lm_head_gram(w) if use_gram else None
                losses = [
                    rel_loss(gram_autocorr(h, gram=g_) if use_gram else naive_autocorr(h, w), t)
                    for h, t in zip(hh, t_b)
                ]
                torch.stack(losses).sum().backward()
            return step

        t_naive, m_naive = measure(naive_fwd, 1)
        t_cached, m_cached = measure(gram_cached, args.repeats)
        t_built, m_built = measure(gram_built, 1)
        t_tr_naive, m_tr_naive = measure(train(False), 1)
        t_tr_gram, m_tr_gram = measure(train(True), 1)
        print(
            f"batch={batch}: forward naive {t_naive:.3f} s ({m_naive:.0f} MiB) | gram cached G {t_cached:.4f} s "
            f"({m_cached:.0f} MiB) | gram incl. G {t_built:.3f} s ({m_built:.0f} MiB) | "
            f"fwd+bwd naive {t_tr_naive:.2f} s ({m_tr_naive:.0f} MiB) vs gram {t_tr_gram:.2f} s ({m_tr_gram:.0f} MiB)",
            flush=True,
        )
        kv[f"autocorr_time_ratio_b{batch}"] = t_cached / t_naive
        kv[f"autocorr_time_ratio_with_gram_b{batch}"] = t_built / t_naive
        kv[f"autocorr_time_ratio_train_b{batch}"] = t_tr_gram / t_tr_naive
        # at small --vocab/--visual the naive peak can stay under the 1 MiB resolution: no ratio then
        kv[f"autocorr_peak_mem_ratio_b{batch}"] = m_cached / m_naive if m_naive > 0 else float("nan")
        kv[f"autocorr_peak_mem_ratio_train_b{batch}"] = m_tr_gram / m_tr_naive if m_tr_naive > 0 else float("nan")
        fwd_ratios.append(t_cached / t_naive)
    kv["autocorr_time_ratio"] = max(fwd_ratios)
    kv.update(factored(args, weight, hs))
    lead = ["autocorr_time_ratio"]
    print("RESULT " + " ".join(f"{k}={kv[k]:.4g}" for k in lead + sorted(k for k in kv if k not in lead)))


if __name__ == "__main__":
    main()
