"""``ckd model convert --tinyllava`` at the paper's shapes: a random-initialised TinyLLaVA-Factory
checkpoint with the real configs (Qwen2.5-0.5B + SigLIP-so400m-patch14-384, vocab 151,936, tied
head) in the finetune-stage / released layout (one bf16 ``model.safetensors`` with TinyLLaVA's
transformers-4 key names, the configs embedded in config.json, the real Qwen2 tokenizer beside it)
is converted in a fresh subprocess whose wall time and peak RSS are measured; then the converted
model's logits (fp32, 728 visual tokens) are compared with TinyLLaVA's forward written out from
the source weights (tests/tinyllava_layouts.py).

Memory-heavy (~10 GiB at the high point of the check): run under the shared lock,
``.venv/bin/python bench/convert_tinyllava.py``. Needs the vendored
tokenizer (tests/fixtures/qwen2-tokenizer). Last line: ``RESULT key=value ...``.

Measured 2026-12-01 on the shared 2-core / 24 GiB CPU box (924M parameters, 1.73 GiB bf16 source):
the conversion took 5.3 s wall with a peak RSS of 2,216 MiB; the whole script 66 s and 9.3 GiB peak
(the parity check holds the source, a copy and the converted model in fp32).
RESULT convert_s=5.3 convert_peak_rss_mib=2216 source_gib=1.73 params_m=924 num_visual_tokens=728
vocab=151936 logits_max_abs_diff=0.0
"""
from __future__ import annotations

import argparse
import gc
import json
import lzma
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from bench._procmem import status_kib
from ckd_common.model import quiet_transformers
from ckd_common.tinyllava import convert_tinyllava
quiet_transformers()
t0 = time.perf_counter()
report = convert_tinyllava(sys.argv[1], sys.argv[2])
dt = time.perf_counter() - t0
print(report, file=sys.stderr)
print(json.dumps({{"seconds": dt, "peak_rss_kib": status_kib("VmHWM")}}))
"""


def _tokenizer(out: Path) -> Path:
    """The vendored Qwen2 tokenizer in the base models' configuration (eos = pad = <|endoftext|>)."""
    src = ROOT / "tests" / "fixtures" / "qwen2-tokenizer"
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".xz":
            (out / f.stem).write_bytes(lzma.decompress(f.read_bytes()))
        elif f.suffix == ".json":
            shutil.copy(f, out / f.name)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.update(eos_token="<|endoftext|>", model_max_length=2048, padding_side="right")
    cfg.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


def main() -> int:
    import torch

    from tests.tinyllava_layouts import (REAL_TEXT, REAL_VISION, TINY_TEXT, TINY_VISION, make_source, reference_logits,
                                         write_finetune)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="keep the checkpoints here (default: a temporary directory)")
    p.add_argument("--no-check", action="store_true", help="skip the logits comparison (saves ~4 GiB)")
    p.add_argument("--shapes", default="real", choices=["real", "tiny"],
                   help="real = Qwen2.5-0.5B + SigLIP-so400m (default); tiny = a smoke run of this script")
    args = p.parse_args()
    from ckd_common.model import quiet_transformers

    quiet_transformers()
    torch.set_num_threads(2)
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="convert-real-"))
    try:
        t0 = time.perf_counter()
        shapes = (REAL_TEXT, REAL_VISION) if args.shapes == "real" else (TINY_TEXT, TINY_VISION)
        src = make_source(*shapes, tied=True, seed=0)
        n_params = sum(p.numel() for m in (src.llm, src.vision, src.connector) for p in m.parameters())
        write_finetune(src, tmp / "tinyllava", _tokenizer(tmp / "tok"), dtype=torch.bfloat16, names="tf4")
        size = sum(f.stat().st_size for f in (tmp / "tinyllava").iterdir())
        print(f"source: {n_params / 1e6:.0f}M parameters, {size / 2**30:.2f} GiB on disk, written in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        if args.no_check:
            del src
        gc.collect()

        r = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), str(tmp / "tinyllava"),
                            str(tmp / "hf")], capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        lines = r.stderr.strip().splitlines()
        print("\n".join(lines[next((i for i, x in enumerate(lines) if x.startswith("converted")), len(lines)):]))
        child = json.loads(r.stdout.strip().splitlines()[-1])
        result = {"convert_s": round(child["seconds"], 1),
                  "convert_peak_rss_mib": round(child["peak_rss_kib"] / 1024),
                  "source_gib": round(size / 2**30, 2), "params_m": round(n_params / 1e6)}

        if not args.no_check:
            from ckd_common.model import load_vlm, model_info

            model, tok = load_vlm(tmp / "hf")
            info = model_info(model, tok)
            text = tok("Describe the image in detail.", add_special_tokens=False)["input_ids"]
            torch.manual_seed(0)
            pixels = torch.randn(1, 3, 384, 384)
            nv = info.num_visual_tokens
            with torch.no_grad():
                ours = model(input_ids=torch.tensor([text[:2] + [info.image_token_id] * nv + text[2:]]),
                             pixel_values=pixels).logits
            del model
            gc.collect()
            ref = reference_logits(src, torch.tensor([text[:2] + [info.image_token_id] + text[2:]]), 2, pixels,
                                   "patch", torch.bfloat16)
            result.update(num_visual_tokens=nv, vocab=int(ours.shape[-1]),
                          logits_max_abs_diff=float((ours - ref).abs().max()))
        print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
