"""The parts of ``ckd selftest`` that run inside a child process (``python -m deploy.selftest_probes
NAME [ARGS]``): each prints one JSON line and exits 0, or prints its error and exits 1. In a child so
that the self-test itself never holds a CUDA context, a DeepSpeed build or a model in memory while
the trainer it checks runs beside it."""
from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata

PACKAGES = ("torch", "transformers", "tokenizers", "deepspeed", "accelerate", "safetensors", "zarr", "numcodecs",
            "numpy", "fastapi", "uvicorn", "httpx", "pydantic", "pillow", "tqdm")
REQUIRED = ("torch", "transformers", "tokenizers", "deepspeed", "safetensors", "zarr", "numcodecs", "numpy",
            "fastapi", "uvicorn", "httpx", "pydantic", "pillow")


def versions() -> dict:
    found, missing = {"python": platform.python_version()}, []
    for p in PACKAGES:
        try:
            found[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            (missing if p in REQUIRED else []).append(p)
    import torch

    found["torch.cuda"] = torch.version.cuda or "none"
    return {"versions": found, "missing": missing}


def devices(wanted: str) -> dict:
    """CPU facts, every GPU torch sees (name, memory, bf16, a bf16 matmul), and whether the devices
    asked for exist (``wanted``: comma-separated)."""
    import torch

    mem = {}
    try:
        with open("/proc/meminfo") as f:
            mem = {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.split(":")[0] in ("MemTotal", "MemAvailable")}
    except OSError:
        pass
    out = {"cpu": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                   "mem_total_gib": round(mem.get("MemTotal", 0) / 2**20, 1),
                   "mem_available_gib": round(mem.get("MemAvailable", 0) / 2**20, 1)}, "cuda": [], "problems": []}
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        a = torch.randn(256, 256, device=f"cuda:{i}", dtype=torch.bfloat16)
        ok = bool(torch.isfinite(a @ a).all())
        out["cuda"].append({"index": i, "name": p.name, "total_gib": round(total / 2**30, 1),
                            "free_gib": round(free / 2**30, 1), "capability": f"{p.major}.{p.minor}",
                            "bf16": bool(torch.cuda.is_bf16_supported()), "bf16_matmul": ok})
    for d in filter(None, wanted.split(",")):
        if d == "cpu":
            continue
        idx = int(d.split(":", 1)[1]) if ":" in d else 0
        if not d.startswith("cuda") or idx >= n:
            out["problems"].append(f"device {d} does not exist here ({n} CUDA device(s) visible)")
    return out


def ds_ops(compile_needed: bool, compile_all: bool) -> dict:
    """DeepSpeed's op report (as ``ds_report``): installed (pre-built) and compatible (can be JIT-built)
    ops; then JIT-builds the ops this trainer needs (on CPU the shared-memory comm op that
    ``init_distributed`` loads; none on GPU: the trainer uses torch's AdamW) or, with ``compile_all``,
    every compatible op, and says which built."""
    import deepspeed  # noqa: F401
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS
    from deepspeed.ops.op_builder.builder import probe_is_compatible
    from torch.utils.cpp_extension import is_ninja_available

    acc = get_accelerator()._name
    report = {"accelerator": acc, "ninja": is_ninja_available(), "installed": [], "compatible": [],
              "incompatible": [], "built": [], "build_failed": {}}
    for name, builder in ALL_OPS.items():
        if name == "deepspeed_not_implemented":
            continue
        report["installed" if installed_ops.get(name) else "compatible" if probe_is_compatible(builder, False)
               else "incompatible"].append(name)
    needed = ["deepspeed_shm_comm"] if acc == "cpu" else []
    todo = report["compatible"] if compile_all else (needed if compile_needed else [])
    for name in todo:
        if name in report["installed"]:
            continue
        try:
            ALL_OPS[name].load(verbose=False)
            report["built"].append(name)
        except Exception as e:  # a compiler error is the finding, reported per op
            report["build_failed"][name] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    report["needed"] = needed
    return report


def fused_loss(device: str, vocab: int, dim: int, nv: int, text: int, k: int) -> dict:
    """The trainer's fused loss against the plain one (materialised logits) on ``device``, at the given
    shapes: every term and the gradients of hidden states and lm_head."""
    import torch

    from ckd_common.kd import (KDWeights, collate_targets, fused_kd_loss, kd_loss_from_logits, normalized_autocorr,
                               teacher_targets_from_hidden)
    from ckd_common.targets import SampleTargets, SparseTopK

    g = torch.Generator().manual_seed(0)
    L = 1 + nv + text
    h = (torch.randn(1, L, dim, generator=g) * 0.5).to(device).requires_grad_()
    w = (torch.randn(vocab, dim, generator=g) * 0.05).to(device).requires_grad_()
    th, tw = torch.randn(L, dim, generator=g).to(device), (torch.randn(vocab, dim, generator=g) * 0.05).to(device)
    labels = torch.full((1, L), -100, dtype=torch.long)
    labels[0, 1 + nv:] = torch.randint(0, vocab, (text,), generator=g)
    labels = labels.to(device)
    resp = torch.arange(nv, L - 1, device=device)  # logits at t predict t+1
    vis = torch.arange(1, 1 + nv, device=device)

    def topk(rows):
        ids, lp, tail = teacher_targets_from_hidden(th[rows], tw, k)
        return SparseTopK(ids.cpu().numpy(), lp.cpu().numpy(), tail.cpu().numpy())

    autocorr = normalized_autocorr(th[vis], tw).cpu().numpy()
    targets = collate_targets([SampleTargets("s", topk(resp), topk(vis), autocorr)]).to(device)
    weights = KDWeights(ce=1.0, kl_text=1.0, kl_vis=1.0, rel=1.0)
    fused = fused_kd_loss(h, w, labels, targets, [1], weights=weights, chunk_size=256)
    gf = torch.autograd.grad(fused["total"], (h, w))
    dense = kd_loss_from_logits(h @ w.T, labels, targets, [1], weights=weights)
    gd = torch.autograd.grad(dense["total"], (h, w))
    terms = {t: (float(fused[t].detach()), float(dense[t].detach())) for t in ("total", "ce", "kl_text", "kl_vis", "rel")}
    rel = max(abs(a - b) / max(abs(b), 1e-6) for a, b in terms.values())
    grad = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(gf, gd))
    return {"terms": terms, "max_rel_term_diff": rel, "max_rel_grad_diff": grad, "positions": L, "vocab": vocab}


def stock_load(model_dir: str) -> dict:
    """Load a saved student with stock transformers (model + processor, its chat template) and run one
    forward on an image: what a user's own tools do with it."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, local_files_only=True)
    proc = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                    {"type": "text", "text": "What is this?"}]}],
                                      add_generation_prompt=True)
    inputs = proc(images=Image.new("RGB", (640, 480), (120, 80, 40)), text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    return {"tokens": int(inputs["input_ids"].shape[1]), "vocab": int(logits.shape[-1]),
            "finite": bool(torch.isfinite(logits).all())}


def machine(wanted: str) -> dict:
    return {**versions(), "devices": devices(wanted)}


PROBES = {"machine": machine, "ds_ops": ds_ops, "fused_loss": fused_loss,
          "stock_load": stock_load}


def main(argv: list[str]) -> int:
    name, args = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    try:
        from ckd_common.model import quiet_transformers

        quiet_transformers()
        print(json.dumps(PROBES[name](**args)))
        return 0
    except Exception as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
