"""Peak memory and time of the student KD loss: fused chunked vs dense, side by side in one run.

Sizes (defaults = the real student): d = 896, V = 151,936, 729 visual + 500 response positions per
sample, batch 1 and 4, sparse targets with k = 64. Each measurement is forward + backward of the
total loss w.r.t. the final hidden states and the lm_head weight, starting from hidden states
(the matmul with lm_head is part of what is measured, because fusing it is the point).

Methods
  fused      ckd_common.kd.fused_kd_loss (chunks of --chunk positions)
  dense      logits = H W^T materialised, then kd_loss_from_logits (same sparse targets)
  reference  logits = H W^T materialised, then llava_kd_loss_dense against full teacher logits
             (the teacher logits are an input: allocated before the measurement starts)

How memory is measured (CPU, no CUDA allocator statistics): every (method, batch) runs in a fresh
subprocess. After building its inputs the child records VmRSS, resets the kernel's peak-RSS mark
(writing "5" to /proc/self/clear_refs resets VmHWM, Linux >= 4.0), runs forward + backward and
reads VmHWM. peak = VmHWM - baseline VmRSS: every byte the loss allocated at its high point,
including the gradients of H and W that both methods must produce. Large tensors are mmap'ed by
glibc and returned on free, so RSS follows the live tensors closely. If clear_refs is not
writable the child falls back to ru_maxrss, whose peak may include input construction (flagged
in the output; the ratio is then less trustworthy).

Time: the ratio uses process CPU time (user + sys of all threads, time.process_time), because
this box is shared and wall time of runs taken minutes apart depends on the neighbours' load;
wall-time ratios are printed too (loss_wall_ratio*).

Ratios are fused / reference and fused / dense, per batch size; the summary keys
loss_peak_mem_ratio / loss_time_ratio are the worst case over the batch sizes where the reference
was measured. A dense run that would not fit in MemAvailable is skipped (on a 24 GiB box the dense
paths at batch 4 need ~20-32 GiB); for every batch the fused peak is also compared with a strict
lower bound of any unfused path (logits + their gradient + dW). Last line: `RESULT key=value ...`.

Measured 2026-11-24 on the shared 2-core / 24 GiB CPU box (heavily loaded, so wall times are long),
defaults (chunk 128, k 64): fused 821 MiB / 27 s CPU, dense 8054 MiB / 49 s, reference 5155 MiB /
40 s at batch 1; fused 848 MiB / 89 s CPU at batch 4 (dense paths skipped: ~24-32 GiB needed).
RESULT loss_peak_mem_ratio=0.1593 loss_time_ratio=0.6874 loss_peak_mem_ratio_vs_dense=0.102
loss_peak_mem_ratio_vs_dense_lower_bound_b4=0.1363 loss_time_ratio_vs_dense=0.5601 (abridged)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from _procmem import reset_peak, status_kib  # noqa: E402  (bench/ is on sys.path when run as a script)


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def build_inputs(batch: int, args, with_teacher: bool):
    import torch

    from ckd_common.kd import collate_targets
    from ckd_common.targets import SampleTargets, SparseTopK

    g = torch.Generator().manual_seed(0)
    nv, nr, d, vocab, k = args.visual, args.response, args.dim, args.vocab, args.k
    seq = nv + nr + 1  # visual span, then the response; labels at v0+Nv+1 .. end
    hidden = (torch.randn(batch, seq, d, generator=g) * 0.5).requires_grad_()
    weight = (torch.randn(vocab, d, generator=g) * 0.05).requires_grad_()
    labels = torch.full((batch, seq), -100, dtype=torch.long)
    labels[:, nv + 1 :] = torch.randint(0, vocab, (batch, nr), generator=g)
    visual_mask = torch.zeros(batch, seq, dtype=torch.bool)
    visual_mask[:, :nv] = True

    def topk(n: int) -> SparseTopK:
        # distinct ids per row (a strided walk through the vocabulary), 90 % of the mass in the top-k
        offs = torch.randint(0, vocab, (n, 1), generator=g)
        ids = (offs + torch.arange(k) * (vocab // k)) % vocab
        p = torch.softmax(torch.randn(n, k, generator=g), -1) * 0.9
        return SparseTopK(ids.numpy(), p.log().numpy(), torch.full((n,), 0.1).numpy())

    samples = []
    for _ in range(batch):
        r = torch.randn(nv, nv, generator=g)
        r = r @ r.T
        samples.append(SampleTargets("k", topk(nr), topk(nv), (r / r.norm()).numpy()))
    targets = collate_targets(samples)
    teacher_logits = torch.randn(batch, seq, vocab, generator=g) if with_teacher else None
    return hidden, weight, labels, visual_mask, targets, teacher_logits


def child(method: str, batch: int, args) -> dict:
    import torch

    from ckd_common.kd import fused_kd_loss, kd_loss_from_logits, llava_kd_loss_dense

    torch.set_num_threads(args.threads)
    hidden, weight, labels, visual_mask, targets, teacher_logits = build_inputs(batch, args, method == "reference")
    v0 = [0] * batch

    def step():
        if method == "fused":
            out = fused_kd_loss(hidden, weight, labels, targets, v0, chunk_size=args.chunk)
        elif method == "dense":
            out = kd_loss_from_logits(hidden @ weight.T, labels, targets, v0)
        else:
            out = llava_kd_loss_dense(hidden @ weight.T, teacher_logits, labels, visual_mask)
        out["total"].backward()
        return float(out["total"])

    baseline = status_kib("VmRSS")
    exact = reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    value = step()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (peak - baseline) / 1024, "seconds": seconds, "cpu_seconds": cpu, "loss": value,
            "exact_peak": exact}


def run_child(method: str, batch: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--batch", str(batch)]
    for key in ("dim", "vocab", "visual", "response", "k", "chunk", "threads"):
        cmd += [f"--{key}", str(getattr(args, key))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=896)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--visual", type=int, default=729)
    ap.add_argument("--response", type=int, default=500)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--batches", type=str, default="1,4")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--methods", type=str, default="fused,dense,reference")
    ap.add_argument("--min-free-gib", type=float, default=2.0,
                    help="skip a dense run whose estimated need exceeds MemAvailable minus this")
    ap.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args)))
        return

    methods = args.methods.split(",")
    results: dict[tuple[str, int], dict] = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        rows = batch * (args.visual + args.response + 1)
        logits_gib = rows * args.vocab * 4 / 2**30
        for method in methods:
            # dense paths hold many [rows, V] float32 tensors (measured at batch 1: dense ~11x,
            # reference ~7x + its teacher-logits input); refuse to push the shared box into OOM
            need = {"fused": 1.0, "dense": 11.5 * logits_gib, "reference": 8.5 * logits_gib}[method]
            if need > _mem_available_gib() - args.min_free_gib:
                print(f"skip {method} batch={batch}: needs ~{need:.1f} GiB, {_mem_available_gib():.1f} available")
                continue
            r = run_child(method, batch, args)
            results[(method, batch)] = r
            print(f"{method:9s} batch={batch}  peak={r['peak_mib']:9.1f} MiB  wall={r['seconds']:7.2f} s  "
                  f"cpu={r['cpu_seconds']:7.2f} s  "
                  f"loss={r['loss']:.4f}{'' if r['exact_peak'] else '  (ru_maxrss fallback)'}", flush=True)

    kv: dict[str, float] = {}
    for base in ("reference", "dense"):
        mem, tim = [], []
        for (method, batch), r in results.items():
            if method != base or ("fused", batch) not in results:
                continue
            f = results[("fused", batch)]
            suffix = "" if base == "reference" else "_vs_dense"
            kv[f"loss_peak_mem_ratio{suffix}_b{batch}"] = f["peak_mib"] / r["peak_mib"]
            kv[f"loss_time_ratio{suffix}_b{batch}"] = f["cpu_seconds"] / r["cpu_seconds"]
            kv[f"loss_wall_ratio{suffix}_b{batch}"] = f["seconds"] / r["seconds"]
            mem.append(kv[f"loss_peak_mem_ratio{suffix}_b{batch}"])
            tim.append(kv[f"loss_time_ratio{suffix}_b{batch}"])
        if mem:
            suffix = "" if base == "reference" else "_vs_dense"
            kv[f"loss_peak_mem_ratio{suffix}"] = max(mem)
            kv[f"loss_time_ratio{suffix}"] = max(tim)
    for (method, batch), r in results.items():
        kv[f"peak_mib_{method}_b{batch}"] = r["peak_mib"]
    # Where a dense run does not fit this box, compare with what ANY unfused path must hold at its
    # peak: the [B, L, V] float32 logits, their gradient and W's gradient (a strict lower bound;
    # printed for every batch so it can be checked against the measured dense runs).
    for batch in [int(b) for b in args.batches.split(",")]:
        if ("fused", batch) in results:
            rows = batch * (args.visual + args.response + 1)
            bound_mib = (2 * rows * args.vocab + args.vocab * args.dim) * 4 / 2**20
            kv[f"loss_peak_mem_ratio_vs_dense_lower_bound_b{batch}"] = results[("fused", batch)]["peak_mib"] / bound_mib
    lead = [k for k in ("loss_peak_mem_ratio", "loss_time_ratio") if k in kv]
    rest = [k for k in sorted(kv) if k not in lead]
    print("RESULT " + " ".join(f"{k}={kv[k]:.4g}" for k in lead + rest))


if __name__ == "__main__":
    main()
