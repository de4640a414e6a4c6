"""Cache-fill overhead: ``logit_cache fill`` through a real teacher server process versus the bare
in-process teacher forward (ckd_common.teacher.TeacherRunner) on the same samples in the same
batches, measured side by side in one run (tiny teacher on CPU; no GPU here).

fill time   = first request -> last segment committed (HTTP, wire encoding, image decoding on the
              server, dynamic batching, response decoding, Zarr writes), data prepared beforehand
bare time   = TeacherRunner.targets over the same request-sized batches, images preprocessed
              beforehand (the forward + top-k + autocorrelation + host transfer only)

The server's --max-batch-tokens is set so one request is one engine batch (same batch sizes).
Repeats alternate bare and fill and keep the best of each (the machine is shared and noisy).

    python bench/fill.py [--samples 256] [--batch-samples 32] [--k 64] [--repeats 3]

Last line: ``RESULT fill_overhead_ratio=<fill / bare>`` (target <= 1.10 on a GPU teacher).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckd_common.templates import PRETRAIN, TEMPLATE_NAMES  # noqa: E402


def start_server(model_dir: Path, workdir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    from teacher_server.client import TeacherClient

    port_file = workdir / "server.port"
    log = open(workdir / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "teacher_server", "serve", "--model", str(model_dir), "--port", "0",
                             "--port-file", str(port_file), "--log-level", "warning", *extra],
                            stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])

    def alive() -> None:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early:\n{(workdir / 'server.log').read_text()[-3000:]}")

    deadline = time.monotonic() + 180
    while not port_file.exists():
        alive()
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("server wrote no port file in 180 s")
        time.sleep(0.2)
    url = f"http://127.0.0.1:{int(port_file.read_text())}"
    with TeacherClient(url) as server:
        server.wait_ready(max(deadline - time.monotonic(), 0), poll_s=0.2, check=alive)
    return proc, url


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--batch-samples", type=int, default=32)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=2, help="requests in flight (logit_cache fill --concurrency)")
    ap.add_argument("--segment-rows", type=int, default=256,
                    help="samples per committed segment (a quarter of the data: earlier segments are written "
                         "while the teacher works, as in a long fill; the last one is a serial tail)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for the bare forward AND the server (2 shared cores: more threads "
                         "than free cores makes OpenMP spin-waits dominate, ruining both measurements)")
    ap.add_argument("--template", default=PRETRAIN, choices=TEMPLATE_NAMES)
    a = ap.parse_args()

    import torch

    from ckd_common.data import prepare_file
    from ckd_common.model import init_preset, load_vlm, model_info
    from ckd_common.synth import synthesize
    from ckd_common.teacher import TeacherInput, TeacherRunner
    from deploy.fill import FillConfig, fill
    from deploy.fill_pipeline import make_chunks
    from teacher_server.client import TeacherClient

    torch.set_num_threads(a.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = init_preset("tiny-teacher", tmp / "teacher")
        n_pt, n_it = (a.samples, 0) if a.template == PRETRAIN else (0, a.samples)
        synthesize(tmp / "data", seed=0, n_pretrain=n_pt, n_instruct=n_it, n_eval=0)
        data = tmp / "data" / ("pretrain.json" if a.template == PRETRAIN else "instruct.json")
        model, tok = load_vlm(model_dir)
        info = model_info(model, tok)
        ds = prepare_file(data, tok, a.template, info.num_visual_tokens, info.image_token_id, data.parent / "images")
        unique = list({s.key: s for s in ds.samples}.values())
        chunks = make_chunks(unique, a.batch_samples, 1 << 30, 1 << 40)
        longest_batch = max(len(c.samples) * max(s.length for s in c.samples) for c in chunks)
        tokens = sum(s.length for s in unique)

        runner = TeacherRunner(model, vocab_limit=info.common_vocab)
        batches = [[TeacherInput.from_prepared(s, info.image_size, aspect_ratio=info.image_aspect_ratio)
                    for s in c.samples] for c in chunks]
        runner.targets(batches[0], a.k)  # warm-up

        def bare() -> float:
            t0 = time.perf_counter()
            for b in batches:
                runner.targets(b, a.k)
            return time.perf_counter() - t0

        proc, url = start_server(model_dir, tmp, "--max-batch-tokens", str(longest_batch),
                                 "--max-request-tokens", str(1 << 24),
                                 "--torch-threads", str(a.threads))
        server = TeacherClient(url)
        try:
            # warm-up request through the whole path
            fill(FillConfig([url], str(data), str(data.parent / "images"), a.template, a.k, str(tmp / "warm"),
                            batch_samples=a.batch_samples, progress=False))
            bare_times, fill_times, engine_times, writer_times = [], [], [], []
            for r in range(a.repeats):
                bare_times.append(bare())
                before = server.metrics()
                st = fill(FillConfig([url], str(data), str(data.parent / "images"), a.template, a.k,
                                     str(tmp / f"cache{r}"), batch_samples=a.batch_samples,
                                     segment_rows=a.segment_rows, concurrency=a.concurrency, progress=False))
                after = server.metrics()
                assert st.written == len(unique), st
                fill_times.append(st.send_seconds)
                n_b = metric(after, "teacher_batch_samples_count") - metric(before, "teacher_batch_samples_count")
                eng = metric(after, "teacher_batch_seconds_sum") - metric(before, "teacher_batch_seconds_sum")
                engine_times.append(eng)
                writer_times.append(st.write_seconds)
                print(f"repeat {r}: bare {bare_times[-1]:.3f}s  fill {st.send_seconds:.3f}s  "
                      f"(server: {int(n_b)} batches, {eng:.3f}s in the engine; client: {st.requests} requests, "
                      f"{st.write_seconds:.3f}s in the cache writer)")
        finally:
            server.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)

        b, f = min(bare_times), min(fill_times)
        print(f"device: cpu ({torch.get_num_threads()} torch threads; no GPU in this session)")
        print(f"samples {len(unique)}, tokens {tokens}, k {a.k}, batches of {a.batch_samples} samples "
              f"({len(chunks)} batches, padded budget {longest_batch} tokens)")
        print(f"bare in-process forward: {b:.3f}s ({len(unique) / b:.1f} samples/s, {tokens / b:,.0f} tokens/s)")
        print(f"fill through the server: {f:.3f}s ({len(unique) / f:.1f} samples/s, {tokens / f:,.0f} tokens/s)")
        best = fill_times.index(f)
        print(f"in the best fill run: the server's engine was busy {engine_times[best]:.3f}s "
              f"({engine_times[best] / b:.2f}x the bare forward: CPU shared with the client, the server's image "
              f"decoding and other users of this machine) and the cache writer {writer_times[best]:.3f}s")
        print(f"RESULT fill_overhead_ratio={f / b:.3f}")


if __name__ == "__main__":
    main()
