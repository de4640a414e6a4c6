"""Host side of a fill at the paper's shapes: everything but the teacher's forward pass.

A real teacher server process (uvicorn) runs ``--engine null``: the real configs (Qwen2.5-3B text,
SigLIP-so400m-patch14-384 vision, 'patch' strategy = 728 visual tokens, vocabulary 151,936, the
real Qwen2 tokenizer from tests/fixtures) but no weights and no forward: it answers with
precomputed teacher-like targets of the real shapes at once. The fill in front of it is the real
one: prepared LLaVA caption data with 640x480 JPEGs, request encoding (image files read), HTTP,
response decoding, cache writing (Zarr, Blosc/zstd, checksums, segment commits). Measured side by
side in one run against the same server:

  this tree   deploy.fill in-process (its FillStats give the stage breakdown)
  baseline    the fill of another git ref (default ``main``), exported with ``git archive`` and run
              as its own process on the first --baseline-samples samples (it is much slower)

plus, per stage and per image sample, the CPU cost of the plain code path (decode_response +
CacheWriter.add: SampleTargets per sample, each encoded into its record) and of the fast one
(decode_block + CacheWriter.add_encoded: the wire-v2 frame straight into format-2 segment arrays,
all samples of a response at once) on the same response frames, serially in this process.

Rates are wall-clock samples/s of the send phase (first request to last commit; the data is
prepared before). The machine is shared: CPU milliseconds per sample of the fill process and of the
server process are printed too; ``2000 / ms`` is what two idle cores allow (for the fill alone, and
with this null server on the same cores). ``--also-clevel N`` fills again at another Blosc level,
and a table shows where compression time goes per array.

    python bench/fill_host.py [--samples 3072] [--writers 2] [--concurrency 4] [--also-clevel 2]

Last line: ``RESULT fill_host_samples_per_s=... baseline_samples_per_s=... speedup=...
client_cpu_ms_per_sample=... baseline_client_cpu_ms_per_sample=... server_cpu_ms_per_sample=...
fill_alone_two_core_samples_per_s=... with_server_two_core_samples_per_s=... kib_per_sample=...``
(plus ``..._clevelN`` fields for every ``--also-clevel N``).

Measured on the shared 2-core machine (load average 3.8 at the end), cache format 2 / wire v2,
2 writer threads, 4 requests in flight, 16 samples per request, clevel 3; baseline = ``main`` at the
merge of fillx onto it (the plain path: decode_response + CacheWriter.add, one writer, 384 samples)::

    RESULT fill_host_samples_per_s=205.1 baseline_samples_per_s=181.8 speedup=1.13
    client_cpu_ms_per_sample=5.34 baseline_client_cpu_ms_per_sample=10.57 server_cpu_ms_per_sample=0.64
    fill_alone_two_core_samples_per_s=375 with_server_two_core_samples_per_s=335 kib_per_sample=113

(the goal, >= 150 image samples/s, holds with room: the fill needs 5.3 ms of CPU per image sample,
half of the plain fill's). Serially on the same frames, the fast path (decode_block +
add_encoded) costs 0.48 ms per image sample against 0.60 for the plain one (0.08 decode_response
+ 0.52 add): since format 2 the frame carries the factor as it is stored, so the fast path saves
the per-sample records (~20 %), no longer an unpack/pack of a 265k-value triangle. Most of the
CPU now is Blosc/zstd of visual_ids and visual_lp (~1 ms) and Zarr's per-segment work.
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from ckd_common.templates import PRETRAIN  # noqa: E402

# the real configs (Qwen2.5-3B-Instruct's text model, SigLIP-so400m-patch14-384's vision tower)
QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=True)
SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=384, patch_size=14)
WORDS = ("a the small large red blue green old new wooden metal dog cat person car tree house street table "
         "window sky water field city park road bridge boat train sign shop bike group two three some on in "
         "near under beside behind with holding standing sitting walking looking").split()


def teacher_dir(out: Path) -> Path:
    """A llava checkpoint directory without weights (all the null engine reads)."""
    from transformers import AutoTokenizer, Qwen2Config, SiglipVisionConfig

    from ckd_common.model import llava_config
    from ckd_common.tokenizer import IMAGE_TOKEN

    tok_src = out / "tokenizer-src"
    tok_src.mkdir(parents=True)
    for f in (ROOT / "tests" / "fixtures" / "qwen2-tokenizer").iterdir():
        if f.suffix == ".xz":
            (tok_src / f.stem).write_bytes(lzma.decompress(f.read_bytes()))
        elif f.suffix == ".json":
            shutil.copy(f, tok_src / f.name)
    tok = AutoTokenizer.from_pretrained(str(tok_src), local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    model = out / "teacher"
    tok.save_pretrained(str(model))
    cfg = llava_config(SiglipVisionConfig(**SIGLIP_SO400M_384), Qwen2Config(**QWEN25_3B), "patch",
                       tok.convert_tokens_to_ids(IMAGE_TOKEN))
    cfg.save_pretrained(str(model))
    return model


def caption_data(out: Path, n: int, n_images: int = 48, seed: int = 0) -> Path:
    """LLaVA caption records over ``n_images`` distinct 640x480 JPEGs (smooth noise: ~50-100 KB)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True)
    for i in range(n_images):
        small = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((640, 480), Image.BICUBIC)
        noise = rng.integers(-12, 13, size=(480, 640, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        img.save(out / "images" / f"img{i:03d}.jpg", quality=90)
    records = []
    for i in range(n):
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(8, 40)))).capitalize() + "."
        records.append({"id": f"cap-{i:06d}", "image": f"img{i % n_images:03d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": caption}]})
    (out / "captions.json").write_text(json.dumps(records))
    return out / "captions.json"


def subset(data: Path, n: int) -> Path:
    out = data.with_name(f"captions-{n}.json")
    out.write_text(json.dumps(json.loads(data.read_text())[:n]))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its waited-for children) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def start_server(model: Path, work: Path) -> tuple[subprocess.Popen, str]:
    from teacher_server.client import TeacherClient

    port_file = work / "server.port"
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "teacher_server", "serve", "--engine", "null", "--model", str(model),
                             "--port", "0", "--port-file", str(port_file), "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 600
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{(work / 'server.log').read_text()[-3000:]}")
        time.sleep(0.2)
    url = f"http://127.0.0.1:{int(port_file.read_text())}"

    def alive() -> None:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{(work / 'server.log').read_text()[-3000:]}")

    with TeacherClient(url) as c:
        c.wait_ready(max(deadline - time.monotonic(), 1), poll_s=0.2, check=alive)
    return proc, url


def export_ref(ref: str, dest: Path) -> Path | None:
    """The tree of a git ref (``git archive``), or None where there is no such ref."""
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "-q", ref + "^{commit}"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def run_baseline(tree: Path, url: str, data: Path, images: Path, out: Path, a) -> tuple[float, float, str]:
    """Another tree's ``logit_cache fill`` as its own process: (samples/s of its send phase, CPU s of
    its send phase, its summary line). The CPU is that of the fill minus that of the same command
    run again with nothing left to send (imports, data preparation, resume check)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "logit_cache", "-q", "fill", "--server", url, "--data", str(data), "--images",
           str(images), "--template", PRETRAIN, "--k", str(a.k), "--out", str(out), "--batch-samples",
           str(a.batch_samples), "--concurrency", "2"]
    cpu = []
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if r.returncode != 0:
            raise SystemExit(f"the baseline fill failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
        cpu.append((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime))
        if len(cpu) == 1:
            line = r.stderr.strip().splitlines()[-1]
    m = re.search(r"([0-9.]+) samples/s", line)
    if not m:
        raise SystemExit(f"no rate in the baseline's summary line: {line!r}")
    return float(m.group(1)), cpu[0] - cpu[1], line


def compression_by_array(block: dict, levels=(3, 6)) -> list[tuple[str, list[tuple[float, float]]]]:
    """(array, [(CPU ms, KiB) per image sample at each Blosc level]) for the arrays of ``block``, in
    the chunks the writer uses: where the compression time goes and what it buys."""
    import numcodecs

    from logit_cache.layout import DEFAULT_CHUNK_ROWS, chunk_shape

    n = len(block["keys"])
    out = []
    for name, arr in block.items():
        if name == "keys" or name.endswith("_offsets") or not arr.size:
            continue
        rows = chunk_shape(name, arr, DEFAULT_CHUNK_ROWS)[0]
        row = []
        for level in levels:
            codec = numcodecs.Blosc(cname="zstd", clevel=level,
                                    shuffle=numcodecs.Blosc.SHUFFLE if arr.dtype.itemsize > 1 else numcodecs.Blosc.NOSHUFFLE)
            t, size = time.thread_time(), 0
            for i in range(0, len(arr), rows):
                size += len(codec.encode(np.ascontiguousarray(arr[i:i + rows])))
            row.append(((time.thread_time() - t) * 1e3 / n, size / 1024 / n))
        out.append((name, row))
    return out


def stage_costs(url: str, data: Path, images: Path, a, work: Path, reps: int = 4):
    """CPU ms per image sample of each stage, baseline code path vs this one, on the same frames."""
    import httpx

    from ckd_common.data import prepare_file
    from ckd_common.wire import CONTENT_TYPE_REQUEST, decode_response
    from deploy.fill_frames import decode_block
    from deploy.fill_pipeline import encode_chunk, make_chunks
    from logit_cache import CacheMeta, open_group
    from teacher_server.client import TeacherClient

    with TeacherClient(url) as c:
        info, tok = c.info(), c.tokenizer()
    ds = prepare_file(subset(data, reps * a.batch_samples), tok, PRETRAIN, info.num_visual_tokens,
                      info.image_token_id, images)
    chunks = make_chunks(ds.samples, a.batch_samples, 1 << 30, 1 << 40)
    bodies = [encode_chunk(ch, a.k, info.common_vocab_size, PRETRAIN) for ch in chunks]
    frames = [httpx.post(url + "/v1/targets", content=b, headers={"Content-Type": CONTENT_TYPE_REQUEST},
                         timeout=600).content for b in bodies]
    meta = CacheMeta.for_dataset(ds, teacher_fingerprint=info.teacher_fingerprint, tokenizer_hash=info.tokenizer_hash,
                                 vocab_size=info.common_vocab_size, k=a.k, vision_strategy=info.vision_strategy,
                                 num_visual_tokens=info.num_visual_tokens, value_encoding="q8",
                                 image_aspect_ratio=info.image_aspect_ratio, target_kinds=info.target_kinds)
    group = open_group(work / "stages", meta=meta, create=True)
    n = sum(len(ch.samples) for ch in chunks)

    def cpu_ms(f) -> float:
        t = time.process_time()
        for i in range(len(chunks)):
            f(i)
        return (time.process_time() - t) * 1e3 / n

    old_targets, new_blocks = {}, {}
    encode = cpu_ms(lambda i: encode_chunk(chunks[i], a.k, info.common_vocab_size, PRETRAIN))
    rows = [("encode request (image files read)", encode, encode)]
    old = cpu_ms(lambda i: old_targets.__setitem__(i, decode_response(frames[i]).targets))
    new = cpu_ms(lambda i: new_blocks.__setitem__(i, decode_block(frames[i], chunks[i].samples, meta, url)))
    rows.append(("decode response (+ checks, encoding: new)", old, new))
    w = group.writer(segment_rows=1 << 30, segment_bytes=1 << 62)  # never flushes: the add path alone
    old = cpu_ms(lambda i: [w.add(t) for t in old_targets[i]])
    w.abort()
    new = cpu_ms(lambda i: w.add_encoded(new_blocks[i]))
    w.abort()
    rows.append(("writer add (checks, encoding: old)", old, new))
    compress = cpu_ms(lambda i: group.write_segment(new_blocks[i], clevel=a.clevel))
    # one small segment per frame: Zarr's fixed costs per segment and array dominate this row (the fill
    # commits segments of thousands of samples: its "write" busy time above is the real cost)
    rows.append((f"commit, a segment per frame (clevel {a.clevel})", compress, compress))
    from logit_cache.layout import concat_blocks

    return rows, compression_by_array(concat_blocks(list(new_blocks.values()), meta))


@dataclass
class Run:
    clevel: int
    rate: float               # samples/s, wall clock of the send phase
    client_ms: float          # CPU ms per sample of the fill process (all threads), send phase
    server_ms: float          # CPU ms per sample of the server process meanwhile
    kib: float                # on disk per sample
    segments: list[int]
    stats: object


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=3072, help="image samples filled by this tree")
    ap.add_argument("--baseline-samples", type=int, default=384, help="image samples filled by the baseline")
    ap.add_argument("--baseline-ref", default="main", help="git ref of the baseline ('' to skip it)")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch-samples", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--clevel", type=int, default=None, help="Blosc level (default: logit_cache's)")
    ap.add_argument("--also-clevel", type=int, action="append", default=[],
                    help="fill again at this Blosc level (repeatable): the price of compression, side by side")
    ap.add_argument("--segment-mb", type=int, default=None, help="(default: the fill's)")
    ap.add_argument("--workdir", default=None, help="keep everything here (default: a temporary directory)")
    a = ap.parse_args()

    from deploy.fill import FillConfig, fill
    from logit_cache.store import DEFAULT_CLEVEL

    a.clevel = DEFAULT_CLEVEL if a.clevel is None else a.clevel
    tmp = tempfile.TemporaryDirectory() if a.workdir is None else None
    work = Path(a.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["CKD_PREPARED_DIR"] = str(work / "prepared")  # the fills' prepared data (both trees): not ~/.cache
    try:
        t = time.perf_counter()
        model = teacher_dir(work)
        data = caption_data(work / "data", a.samples)
        images = data.parent / "images"
        print(f"set-up: real-config teacher dir (no weights) and {a.samples} caption samples with 640x480 JPEGs "
              f"in {time.perf_counter() - t:.1f}s", flush=True)
        t = time.perf_counter()
        proc, url = start_server(model, work)
        print(f"null-engine server ready in {time.perf_counter() - t:.1f}s (precomputed target pool)", flush=True)
        try:
            extra = {} if a.segment_mb is None else {"segment_mb": a.segment_mb}

            def run(n: int, out: str, clevel: int) -> Run:
                d = data if n == a.samples else subset(data, n)
                cfg = FillConfig([url], str(d), str(images), PRETRAIN, a.k, str(work / out), batch_samples=a.batch_samples,
                                 concurrency=a.concurrency, writers=a.writers, clevel=clevel, progress=False, **extra)
                s0 = cpu_seconds(proc.pid)
                st = fill(cfg)
                server = cpu_seconds(proc.pid) - s0
                assert st.written == n, st
                seg = sorted(json.loads(p.read_text())["num_samples"] for p in (work / out).glob("*/manifests/*.json"))
                kib = sum(f.stat().st_size for f in (work / out).rglob("*") if f.is_file()) / 1024 / n
                shutil.rmtree(work / out)  # disk: every run writes about half a GiB per thousand samples
                r = Run(clevel, n / st.send_seconds, st.cpu_seconds * 1e3 / n, server * 1e3 / n, kib, seg, st)
                print(f"  filled {n} samples at clevel {clevel}: {r.rate:.1f} samples/s", flush=True)
                return r

            run(64, "warm", a.clevel)  # imports, connection, the server's first requests
            runs = [run(a.samples, f"cache-{level}", level) for level in [a.clevel, *a.also_clevel]]
            base = None
            if a.baseline_ref:
                tree = export_ref(a.baseline_ref, work / "baseline-tree")
                if tree is None:
                    print(f"baseline: no git ref {a.baseline_ref!r} here; skipped")
                else:
                    s0 = cpu_seconds(proc.pid)
                    base_rate, base_cpu, base_line = run_baseline(tree, url, subset(data, a.baseline_samples), images,
                                                                  work / "baseline-cache", a)
                    base_server_ms = (cpu_seconds(proc.pid) - s0) * 1e3 / a.baseline_samples  # two runs: the 2nd sends nothing
                    base = (base_rate, base_cpu * 1e3 / a.baseline_samples, base_server_ms, base_line)
                    shutil.rmtree(work / "baseline-cache", ignore_errors=True)
            stages, by_array = stage_costs(url, data, images, a, work)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)

        print(f"\nshapes: 728 visual tokens, vocabulary 151,936, k={a.k}, q8 values; {a.batch_samples} samples per "
              f"request, {a.concurrency} requests in flight, {a.writers} writer threads")
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end (shared: wall-clock "
              f"rates depend on what else runs; CPU per sample much less)")
        print("\nthis tree (send phase: first request to last commit):")
        for r in runs:
            st, n = r.stats, r.stats.written
            print(f"  clevel {r.clevel}: {r.rate:.1f} samples/s wall; CPU per sample: fill {r.client_ms:.2f} ms (all "
                  f"threads), server {r.server_ms:.2f} ms; {r.kib:.0f} KiB/sample on disk; segments {r.segments}")
            print(f"    busy ms per sample, summed over concurrent workers: encode {st.encode_seconds / n * 1e3:.2f}, "
                  f"HTTP {st.http_seconds / n * 1e3:.2f} (server + transfer, overlapping), decode "
                  f"{st.decode_seconds / n * 1e3:.2f}, write {st.write_seconds / n * 1e3:.2f}")
            print(f"    two idle cores allow {2000 / r.client_ms:.0f} samples/s for the fill alone, "
                  f"{2000 / (r.client_ms + r.server_ms):.0f} with this null server on the same cores")
        if base is not None:
            print(f"baseline ({a.baseline_ref}, clevel {DEFAULT_CLEVEL}): {a.baseline_samples} samples: {base[3]}")
            print(f"  CPU per sample: fill {base[1]:.2f} ms (send phase: a second, empty run subtracted), "
                  f"server {base[2]:.2f} ms")
        print("\nCPU ms per image sample by stage, serial, same frames (baseline path | this path):")
        for name, old, new in stages:
            print(f"  {name:<48} {old:8.2f} {new:8.2f}")
        print("\nBlosc/zstd per array, per image sample (CPU ms, KiB), by level:")
        for name, row in by_array:
            print(f"  {name:<14} " + "   ".join(f"clevel {lv}: {ms:6.2f} ms {kib:7.1f} KiB"
                                               for lv, (ms, kib) in zip((3, 6), row)))
        r0 = runs[0]
        fields = {"fill_host_samples_per_s": f"{r0.rate:.1f}",
                  "baseline_samples_per_s": f"{base[0]:.1f}" if base else "nan",
                  "speedup": f"{r0.rate / base[0]:.2f}" if base else "nan",
                  "client_cpu_ms_per_sample": f"{r0.client_ms:.2f}",
                  "baseline_client_cpu_ms_per_sample": f"{base[1]:.2f}" if base else "nan",
                  "server_cpu_ms_per_sample": f"{r0.server_ms:.2f}",
                  "fill_alone_two_core_samples_per_s": f"{2000 / r0.client_ms:.0f}",
                  "with_server_two_core_samples_per_s": f"{2000 / (r0.client_ms + r0.server_ms):.0f}"}
        for r in runs[1:]:
            fields[f"fill_host_samples_per_s_clevel{r.clevel}"] = f"{r.rate:.1f}"
            fields[f"client_cpu_ms_per_sample_clevel{r.clevel}"] = f"{r.client_ms:.2f}"
            fields[f"kib_per_sample_clevel{r.clevel}"] = f"{r.kib:.0f}"
        fields["kib_per_sample"] = f"{r0.kib:.0f}"
        print("RESULT " + " ".join(f"{k}={v}" for k, v in fields.items()))
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
