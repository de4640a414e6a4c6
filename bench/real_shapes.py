"""Real-shape rehearsal (issue 14): the whole path once at the paper's shapes, through the public commands.

Builds random-initialised models with the real configs — a Qwen2.5-0.5B student and a Qwen2.5-1.5B
teacher-assistant, both on SigLIP-so400m-patch14-384 (728 visual tokens, or 729 with ``--strategy
full``), vocabulary 151,936, the real Qwen2 tokenizer (tests/fixtures) — and LLaVA-format data with
640x480 JPEGs (~150 KB, LLaVA-Pretrain captions and LLaVA-665k multi-round instructions of ~1,100
tokens). Then, each as a child process (deploy/selftest_pipeline.py):

1. ``ckd data prepare`` of each split (a larger copy of the data, for a samples/s figure: the build's
   rate from the command's report, start-up excluded; bench/prepare.py measures it properly);
2. ``teacher_server serve`` of the 1.5B TA; ``logit_cache fill`` of a few samples of each split, the
   server's forward time (its /metrics) separated from the rest;
3. the cache's stored bytes by array, per image sample and per text position;
4. ``student_trainer distill`` of one DPT and one DFT step of the 0.5B student from that cache (the
   trainer's defaults: ZeRO-2, gradient checkpointing auto = on for this LLM), wall time per step and
   peak RSS; with ``--memory-table`` also DFT at micro-batch 1 and 2, with and without checkpointing.

    python bench/real_shapes.py [--device cpu|cuda] [--memory-table] [--workdir DIR]

On a 24 GiB CPU machine run it alone (10-20 GB at its peaks), e.g. under a shared lock
(``flock LOCKFILE python bench/real_shapes.py``); ~18 minutes on 2 cores (6 of them the stored-target
error's two in-process models), +~10 with ``--memory-table``. ``--device cuda`` serves and trains on GPU 0 in bf16. ``--shapes tiny`` is a
one-minute smoke run of this script on the tiny presets (its numbers mean nothing).

``rel_err``: the relation-loss error the cache's stored image target costs (format 2 stores the
autocorrelation as an int8 low-rank factor with its captured share, logit_cache/FORMAT.md §5). After the
fill, with the server stopped, a child (bench/_stored_target_error.py) recomputes the dense R/||R||_F of
every filled image sample with the TA in-process (TeacherRunner autocorr="dense", the oracle the factor is
made from; its visual top-k is checked against the stored one) and compares the relation term
``1 - cos(R_S, R_T)`` from the stored factor with the one from the dense R, through
``ckd_common.kd.relation.relation_loss`` (what the trainer's fused loss calls), for the 0.5B student's own
hidden states on the same image and its lm_head Gram (also a Gaussian H_S: ``rel_err_random``), both
relation variants; ``rel_err`` is the max over samples and variants of |delta (1 - cos)|, ``rel_grad_err``
the max relative error of its gradient (w.r.t. H_S and G). A random-initialised teacher's R is far
simpler than a trained one's (docs/environment.md §4): its factor needs a low rank (a trained teacher's
more columns), while its flat top-k distributions compress worse than a trained teacher's peaked ones,
so neither the image bytes nor the error here are a trained teacher's (bench/cache_io.py measures both
on teacher-like distributions).

Measured 2026-12-01 18:25-18:53 UTC on the shared 2-core / 24 GiB CPU box, alone under the heavy lock
(load average 2.7 at the start, 1.9 at the end: other engineers' light jobs), ``--device cpu --memory-table``
(1,654 s in all):
RESULT image_sample_kib=122.4 text_position_bytes=174.5 rel_err=1.10e-05 prepare_samples_per_s=14.3
fill_s_per_sample=69.71 train_s_per_step=168.8 train_peak_rss_gib=15.74 rel_grad_err=3.38e-01
rel_err_random=1.90e-03
  - prepare_samples_per_s=14.3 in that run is the old fallback (128 samples per split over the whole command,
    start-up included: a progress bar written to a log prints no rate); the builds' own report lines in
    the same run say 711 (captions) and 284 (instructions) records/s, 406 samples/s together (1 worker, 128
    samples: coarse). The script now reads the report line; bench/prepare.py measures preparation properly.
  - image bytes: visual ids 88 + high bits 8 + values 22 KiB, the factor 3-5 KiB (rank 4-7 on this random
    teacher, share >= 0.9999; this run was format 2. Format 3 keeps a teacher-like R in up to 160 column
    units -- int8 columns ~0.7 KiB each, coarse trailing ones ~0.33 KiB -- <= 142 KiB per image sample on
    every profile of bench/cache_io.py; not re-run here, where the random teacher's R is rank 4-7).
  - rel_err: the student's own H_S is nearly aligned with the TA's R (1 - cos <= 1e-3 for two random models
    whose R is dominated by the component all visual tokens share), so its gradient is tiny and the
    *relative* gradient error large (0.1-0.34); a Gaussian H_S (1 - cos ~0.97) gives |d(1-cos)| 1.3-1.9e-3,
    gradient error 0.8-1.0e-2. Every stored share equals the share measured against the dense R to 3e-8 and
    the stored visual top-k ids equal the in-process teacher's.
  - fill: the server's forward is 95 % of it (47 s per caption sample, 92 s per ~1,100-token instruction);
    train_s_per_step: DFT micro-batch 2, checkpointing on (the default); timings vary +-30 % with the
    machine's other load (the memory table's micro-batch 2 without checkpointing ran at 81 s).
  DFT step, one rank, ZeRO-2, fp32 (the memory table; peak RSS of the trainer process):
  | micro-batch | gradient checkpointing | s/step | peak RSS (GiB) |
  |---|---|---|---|
  | 1 | on | 103.8 | 15.74 |
  | 1 | off | 107.4 | 18.01 |
  | 2 | on | 132.5 | 15.84 |
  | 2 | off | 81.3 | 17.28 |

Last line: ``RESULT image_sample_kib=… text_position_bytes=… rel_err=… prepare_samples_per_s=…
fill_s_per_sample=… train_s_per_step=… train_peak_rss_gib=…`` then ``rel_grad_err=… rel_err_random=…``
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy import selftest_pipeline as P  # noqa: E402


def build_models(shapes: str, strategy: str, workdir: Path, env: dict) -> tuple[Path, Path]:
    """(student, teacher) directories; built in a child process (the parent stays small), reused when present."""
    student, teacher = workdir / "models" / f"student-{shapes}-{strategy}", workdir / "models" / f"ta-{shapes}-{strategy}"
    if (student / "config.json").is_file() and (teacher / "config.json").is_file():
        print(f"models: reusing {student} and {teacher}")
        return student, teacher
    if shapes == "real":
        code = ("import sys; from deploy.selftest_models import qwen2_base_tokenizer, build_real_vlm as b; "
                "t = qwen2_base_tokenizer(sys.argv[1]); b('0.5b', sys.argv[2], t, sys.argv[4], seed=0); "
                "b('1.5b', sys.argv[3], t, sys.argv[4], seed=1)")
    else:
        code = ("import sys; from deploy.selftest_models import build_tiny_vlm as b; "
                "b('tiny-student', sys.argv[2], sys.argv[4]); b('tiny-ta', sys.argv[3], sys.argv[4])")
    m = P.run_measured(P.python("-c", code, str(workdir / "models" / "tokenizer"), str(student), str(teacher),
                                strategy), workdir / "logs" / "build-models.log", env).check("building the models")
    print(f"models: built in {m.seconds:.0f}s (peak RSS {m.peak_rss_gib:.1f} GiB): {student}, {teacher}")
    return student, teacher


def stored_target_error(teacher: Path, student: Path, cache: Path, data: dict, log: Path, env: dict) -> dict:
    """The relation-loss error of the cache's stored image targets against the TA's dense R (module
    docstring), measured in a child (bench/_stored_target_error.py): the TA, then the student, in-process."""
    splits = [f"{data[split]}:{data['images']}:{template}" for split, template in (("pretrain", "pretrain"),
                                                                                  ("instruct", "qwen2_base"))]
    m = P.run_measured(P.python(str(Path(__file__).with_name("_stored_target_error.py")), str(teacher), str(student),
                                str(cache), *splits), log, env).check("measuring the stored targets' error")
    rel = json.loads(m.last_line())
    print(f"stored image targets vs the TA's dense R ({rel['samples']} image samples; {m.seconds:.0f}s, peak RSS "
          f"{m.peak_rss_gib:.1f} GiB):")
    print(f"  {'sample':<12} {'rank':>4} {'share stored':>12} {'vs dense R':>10} {'top-k ids =':>11}   "
          f"|d(1-cos)| flat / column, grad err (student's own H_S) | the same, Gaussian H_S")
    for r in rel["rows"]:
        own, rnd = r["own"], r["random"]
        print(f"  {r['key'][:12]:<12} {r['rank']:>4} {r['stored_share']:>12.6f} {r['share_vs_dense']:>10.6f} "
              f"{r['visual_ids_equal']:>11.3f}   {own['flat']['err']:.1e} / {own['column']['err']:.1e}, "
              f"{max(own['flat']['grad_err'], own['column']['grad_err']):.1e} (1-cos {own['flat']['loss_dense']:.3f})"
              f" | {rnd['flat']['err']:.1e} / {rnd['column']['err']:.1e}, "
              f"{max(rnd['flat']['grad_err'], rnd['column']['grad_err']):.1e}")
    print(f"rel_err {rel['rel_err']:.2e} (max |d(1-cos)| over samples and variants, the student's own H_S), gradient "
          f"{rel['rel_grad_err']:.2e}; Gaussian H_S {rel['rel_err_random']:.2e}, gradient {rel['rel_grad_err_random']:.2e}")
    return rel


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when there is one")
    ap.add_argument("--shapes", default="real", choices=["real", "tiny"])
    ap.add_argument("--strategy", default="patch", choices=["patch", "full"], help="patch: 728 visual tokens, full: 729")
    ap.add_argument("--captions", type=int, default=2, help="caption samples filled and trained on (DPT)")
    ap.add_argument("--instructions", type=int, default=2, help="instruction samples filled and trained on (DFT)")
    ap.add_argument("--prepare-samples", type=int, default=512, help="samples per split for the prepare rate")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--memory-table", action="store_true",
                    help="also DFT at micro-batch 1 and 2 with and without gradient checkpointing")
    ap.add_argument("--workdir", default=None, help="keep everything here (models are reused); default: a temp dir")
    a = ap.parse_args(argv)
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no GPU")
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="real-shapes-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    # the trainer sees GPU 0 only (its rank 0); the server is told cuda:0
    env_train, env_serve = P.child_env("cuda:0" if device == "cuda" else "cpu"), P.child_env(device)
    t_all = time.perf_counter()
    print(f"device {device}; shapes {a.shapes}, strategy {a.strategy}; workdir {work}; {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f} (CPU timings scale with the machine's other load)")
    try:
        student, teacher = build_models(a.shapes, a.strategy, work, env_serve)

        # -- data --------------------------------------------------------------------------------
        from deploy.selftest_models import write_llava_data

        run = work / f"run-{int(time.time())}"
        data = write_llava_data(run / "data", a.captions, a.instructions, seed=0)
        big = write_llava_data(run / "data-prepare", a.prepare_samples, a.prepare_samples, n_images=32, seed=1)
        print(f"data: {a.captions} captions + {a.instructions} instructions to fill and train; "
              f"{a.prepare_samples} + {a.prepare_samples} to prepare; JPEG 640x480, mean "
              f"{data['jpeg_bytes_mean'] / 1024:.0f} KiB")

        # -- 1. prepare ----------------------------------------------------------------------------
        times = []
        for split, template in (("pretrain", "pretrain"), ("instruct", "qwen2_base")):
            m, rate = P.prepare(student, big[split], big["images"], template, logs / f"prepare-{split}.log", env_serve)
            if rate is None:  # no report line or rate found: the whole command, start-up included
                rate = a.prepare_samples / m.seconds
                print(f"prepare {split}: no rate printed; {rate:.1f} samples/s including start-up")
            times.append(a.prepare_samples / rate)
            print(f"prepare {split}: {rate:.1f} samples/s (the build, as its report says; {m.seconds:.1f}s for the "
                  f"command, start-up included; peak RSS {m.peak_rss_gib:.1f} GiB)")
        prepare_rate = 2 * a.prepare_samples / sum(times)

        # -- 2. serve + fill -------------------------------------------------------------------------
        cache = run / "cache"
        server = P.start_server(teacher, "cuda:0" if device == "cuda" else "cpu", run, env_serve)
        print(f"teacher server: ready in {server.load_seconds:.0f}s at {server.url}")
        fill_wall = fill_fwd = 0.0
        n_filled = 0
        try:
            for split, template, n in (("pretrain", "pretrain", a.captions), ("instruct", "qwen2_base",
                                                                                 a.instructions)):
                before = server.metric("teacher_batch_seconds_sum")
                m = P.fill([server.url], data[split], data["images"], template, a.k, cache, logs / f"fill-{split}.log",
                           env_serve)
                fwd = server.metric("teacher_batch_seconds_sum") - before
                fill_wall, fill_fwd, n_filled = fill_wall + m.seconds, fill_fwd + fwd, n_filled + n
                print(f"fill {split}: {n} samples in {m.seconds:.1f}s = {m.seconds / n:.1f} s/sample "
                      f"(server forward {fwd / n:.1f}, the rest {(m.seconds - fwd) / n:.1f}: fill start-up, "
                      f"preparation, HTTP, writing)")
        finally:
            server.stop()
        fill_s = fill_wall / n_filled
        print(f"fill: {fill_s:.1f} s/sample over both splits (server forward {fill_fwd / n_filled:.1f}, "
              f"the rest {(fill_wall - fill_fwd) / n_filled:.1f})")

        # -- 2b. the stored image target's relation-loss error (the server is stopped: memory) -------
        rel = stored_target_error(teacher, student, cache, data, logs / "stored-target-error.log", env_serve)

        # -- 3. bytes by array ---------------------------------------------------------------------
        groups = P.cache_bytes(cache, env_serve)
        image_bytes = text_bytes = index_bytes = 0
        image_samples = text_positions = samples = 0
        for g in groups:
            nv_samples = g.image_samples
            image_samples += nv_samples
            text_positions += g.text_positions
            samples += g.samples
            print(f"cache group {g.name}: {g.samples} samples ({nv_samples} with an image), "
                  f"{g.text_positions} text positions, {g.visual_positions} visual positions")
            for arr, b in sorted(g.arrays.items()):
                kind = g.kind(arr)
                per = (f"{b / max(1, nv_samples) / 1024:8.1f} KiB per image sample" if kind == "image" else
                       f"{b / max(1, g.text_positions):8.1f} B per text position, "
                       f"{b / max(1, g.samples) / 1024:.1f} KiB per sample" if kind == "text" else
                       f"{b / max(1, g.samples):8.0f} B per sample")
                print(f"  {arr:<18} {kind:<5} {b:>12,} B  {per}")
                image_bytes += b if kind == "image" else 0
                text_bytes += b if kind == "text" else 0
                index_bytes += b if kind == "index" else 0
        image_kib = image_bytes / max(1, image_samples) / 1024
        text_pos_b = text_bytes / max(1, text_positions)
        print(f"cache: {image_kib:.1f} KiB per image sample (image arrays), {text_pos_b:.1f} B per text position, "
              f"{index_bytes / max(1, samples):.0f} B per sample of keys/offsets; a random teacher's targets "
              f"have a low-rank R (fewer factor columns than a trained teacher's) and flat top-k distributions (less "
              f"compressible ids and values than a trained teacher's)")

        # -- 4. train ----------------------------------------------------------------------------
        results = {}

        def train(step: str, split: str, n: int, mb: int, gc: str | None, tag: str) -> tuple[float, float]:
            extra = () if gc is None else (("--gradient-checkpointing",) if gc == "on" else
                                           ("--no-gradient-checkpointing",))
            out = run / "train" / tag
            m, rec = P.train(step, student, data[split], data["images"], out, logs / f"train-{tag}.log", env_train,
                             cache=cache, global_batch=n, micro_batch=mb, max_steps=1, extra=extra)
            if m.rc != 0:
                why = "killed (out of memory?)" if m.rc in (-9, 137) else f"exit {m.rc}"
                print(f"train {tag}: FAILED ({why}) after {m.seconds:.0f}s, peak RSS {m.peak_rss_gib:.1f} GiB; "
                      f"log {m.log}\n{m.tail(1500)}")
                return float("nan"), m.peak_rss_gib
            banner = next((ln.strip() for ln in m.log.read_text().splitlines() if "gradient checkpointing" in ln), "")
            step_s = rec[-1]["step_time"]
            print(f"train {tag}: {step_s:.1f} s/step (micro-batch {mb} x {n // mb}), peak RSS {m.peak_rss_gib:.2f} GiB, "
                  f"whole command {m.seconds:.0f}s; {banner[banner.find('gradient checkpointing'):]}")
            shutil.rmtree(out, ignore_errors=True)  # GBs of checkpoint
            return step_s, m.peak_rss_gib

        results["dpt"] = train("dpt", "pretrain", a.captions, min(a.micro_batch, a.captions), None, "dpt")
        results["dft"] = train("dft", "instruct", a.instructions, min(a.micro_batch, a.instructions), None, "dft")
        if a.memory_table:
            table = {}
            for mb in (1, 2):
                for gc in ("on", "off"):  # the expected peaks grow in this order
                    table[(mb, gc)] = train("dft", "instruct", mb, mb, gc, f"dft-mb{mb}-gc-{gc}")
            print(f"\nDFT step of the {a.shapes} student, one rank, {device}, ZeRO-2, "
                  f"{'bf16' if device == 'cuda' else 'fp32'}, ~1,100-token instruction samples:")
            print("| micro-batch | gradient checkpointing | s/step | peak RSS (GiB) |\n|---|---|---|---|")
            for (mb, gc), (s, rss) in table.items():
                print(f"| {mb} | {gc} | {s:.1f} | {rss:.2f} |")
        print(f"whole rehearsal: {time.perf_counter() - t_all:.0f}s; load average now {os.getloadavg()[0]:.1f}")
        dft_s, dft_rss = results["dft"]
        print(f"RESULT image_sample_kib={image_kib:.1f} text_position_bytes={text_pos_b:.1f} "
              f"rel_err={rel['rel_err']:.2e} prepare_samples_per_s={prepare_rate:.1f} fill_s_per_sample={fill_s:.2f} "
              f"train_s_per_step={dft_s:.1f} train_peak_rss_gib={dft_rss:.2f} "
              f"rel_grad_err={rel['rel_grad_err']:.2e} rel_err_random={rel['rel_err_random']:.2e}")
        return 0 if dft_s == dft_s else 1
    except P.ProbeError as e:
        print(f"real_shapes: {e}", file=sys.stderr)
        return 1
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
