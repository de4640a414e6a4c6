"""Wall time of a bottom-up CKD cascade (TA -> student, then Teacher -> student) over the plain
single-teacher LLaVA-KD run, and what overlapping the next stage's cache fill with training saves.

Everything runs for real (teacher servers, fills, DeepSpeed trainer, as child processes) on the tiny
presets and synthetic data. Separate devices are simulated: teachers on 'cpu:0', training on
'cpu:1' — separate processes scheduled as if on different devices, but sharing this machine's cores,
so the overlap saving here is a lower bound of what two GPUs give. Each run uses a fresh cache root
(no reuse); a warm-up cascade runs first. Last line: RESULT ckd_over_kd_wall=... overlap_saving=...

    python bench/cascade.py [--n 48] [--max-steps 4]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=48, help="samples per split")
    ap.add_argument("--max-steps", type=int, default=4, help="optimizer steps per training step")
    args = ap.parse_args()

    from ckd_common.model import init_preset, quiet_transformers
    from ckd_common.synth import synthesize
    from deploy.cascade import CascadeConfig, run_cascade
    from student_trainer.config import LLAVA_KD_STEPS

    quiet_transformers()
    root = Path(tempfile.mkdtemp(prefix="bench-cascade-"))
    synthesize(root / "data", seed=0, n_pretrain=args.n, n_instruct=args.n, n_eval=10)
    for p in ("tiny-student", "tiny-ta", "tiny-teacher"):
        init_preset(p, root / "models" / p)
    steps = {s: {"lr": 1e-3, "global_batch": 8, "micro_batch": 8, "max_steps": args.max_steps} for s in LLAVA_KD_STEPS}

    def run(name: str, strategy: str, teachers: list[str], overlap: bool) -> float:
        models = {"ta": "tiny-ta", "teacher": "tiny-teacher"}
        cfg = CascadeConfig.from_dict({
            "run_dir": f"runs/{name}", "strategy": strategy, "student": "models/tiny-student",
            "teachers": [{"name": t, "model": f"models/{models[t]}", "devices": ["cpu:0"]} for t in teachers],
            "train": {"devices": ["cpu:1"], "steps": steps},
            "data": {"pretrain": "data/pretrain.json", "instruct": "data/instruct.json", "images": "data/images"},
            "cache": {"root": f"cache-{name}", "k": 16}, "overlap": overlap,
            "server": {"args": ["--torch-threads", "1"]},
        }, base=root)
        t = time.perf_counter()
        run_cascade(cfg, log=lambda *_: None)
        wall = time.perf_counter() - t
        print(f"{name:<22} {wall:7.1f} s", flush=True)
        return wall

    # the first DeepSpeed start of a machine pays one-off costs (cold caches, extension loading):
    # take them outside the measurement
    run("warm-up", "single", ["teacher"], overlap=True)
    kd = run("single", "single", ["teacher"], overlap=True)
    ckd_on = run("bottom-up-overlap", "bottom-up", ["ta", "teacher"], overlap=True)
    ckd_off = run("bottom-up-serial", "bottom-up", ["ta", "teacher"], overlap=False)
    print(f"outputs under {root}")
    print(f"RESULT ckd_over_kd_wall={ckd_on / kd:.3f} overlap_saving={1 - ckd_on / ckd_off:.3f} "
          f"kd_wall_s={kd:.1f} ckd_wall_s={ckd_on:.1f} ckd_serial_wall_s={ckd_off:.1f}")


if __name__ == "__main__":
    main()
