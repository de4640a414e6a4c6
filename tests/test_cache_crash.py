"""logit_cache: SIGKILL mid-segment, concurrent writer processes, resumption, corruption detection, gc."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from logit_cache import CacheCorruptError, CacheMeta, CacheReader, open_group
from logit_cache.maintenance import gc, verify
from logit_cache.synthetic import make_sample

REPO = Path(__file__).resolve().parents[1]
META = dict(teacher_fingerprint="teach", tokenizer_hash="tok", template="qwen2_base",
            dataset_fingerprint="dsconcurrent", vocab_size=1000, k=8, vision_strategy="full",
            num_visual_tokens=4, value_encoding="q8")

# A filler: fills samples [lo, hi) that are not committed yet. With HANG_AT_SEGMENT=n it announces
# "HANG" and sleeps after writing some arrays of its n-th segment (before the manifest).
WORKER = r"""
import os, sys, time, zarr
from logit_cache import CacheMeta, open_group
from logit_cache.synthetic import make_sample
root, lo, hi, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
hang = int(os.environ.get("HANG_AT_SEGMENT", "0"))
meta = CacheMeta(**eval(os.environ["META"]))
g = open_group(root, meta=meta, create=True)
if hang:
    orig, state = zarr.Group.create_array, {"arrays": 0}
    def create_array(self, name, **kw):
        a = orig(self, name, **kw)
        if name == "keys":
            state["seg"] = state.get("seg", 0) + 1
        if state.get("seg") == hang and name == "text_lp":
            print("HANG", flush=True)
            time.sleep(600)
        return a
    zarr.Group.create_array = create_array
done = g.committed_keys()
n = 0
with g.writer(segment_rows=rows) as w:
    for i in range(lo, hi):
        s = make_sample(i)
        if s.key not in done:
            w.add(s); n += 1
print("DONE", n, flush=True)
"""


def run_worker(root, lo, hi, rows, hang=0):
    env = dict(os.environ, PYTHONPATH=str(REPO), META=repr(META), HANG_AT_SEGMENT=str(hang))
    return subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(lo), str(hi), str(rows)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def keys(lo, hi):
    return {make_sample(i).key for i in range(lo, hi)}


@pytest.mark.integration
def test_sigkill_mid_segment_then_resume(tmp_path):
    root = tmp_path / "cache"
    p = run_worker(root, 0, 30, 10, hang=3)  # segments 1, 2 commit; killed while writing the 3rd
    line = p.stdout.readline()
    assert line.strip() == "HANG", p.stderr.read()
    p.send_signal(signal.SIGKILL)
    p.wait()
    g = open_group(root, CacheMeta(**META).group_name)
    assert g.committed_keys() == keys(0, 20)
    assert len(g.uncommitted_segments()) == 1
    rep = verify(g, progress=False)
    assert rep["samples"] == 20 and rep["duplicates"] == 0
    # resumed fill completes the set without duplicates
    p = run_worker(root, 0, 30, 10)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "DONE 10" in out
    r = CacheReader(g)
    assert len(r) == 30 and r.duplicates == 0 and set(r.keys()) == keys(0, 30)
    # gc removes the dead writer's segment (same host, pid gone), never committed ones
    assert len(gc(g)["removed_uncommitted"]) == 1
    assert g.uncommitted_segments() == [] and verify(g, progress=False)["samples"] == 30


@pytest.mark.integration
def test_gc_keeps_live_writer_segment(tmp_path):
    root = tmp_path / "cache"
    p = run_worker(root, 0, 20, 10, hang=1)
    try:
        assert p.stdout.readline().strip() == "HANG", p.stderr.read()
        g = open_group(root, CacheMeta(**META).group_name)
        assert gc(g)["removed_uncommitted"] == [] and len(g.uncommitted_segments()) == 1
        assert len(CacheReader(g)) == 0
    finally:
        p.kill()
        p.wait()


@pytest.mark.integration
def test_concurrent_writers_lose_nothing(tmp_path):
    root = tmp_path / "cache"
    procs = [run_worker(root, j * 25, (j + 1) * 25, 6) for j in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    g = open_group(root, CacheMeta(**META).group_name)
    r = CacheReader(g)
    assert len(r) == 100 and r.duplicates == 0 and set(r.keys()) == keys(0, 100)
    assert len(g.committed()) == 4 * 5  # ceil(25 / 6) segments per writer
    rep = verify(g, progress=False)
    assert rep["samples"] == 100 and rep["duplicates"] == 0
    s = make_sample(57)
    np.testing.assert_array_equal(r.get(s.key).text.ids, s.text.ids)


@pytest.mark.parametrize("target", ["text_lp", "keys", "manifest_sha"])
def test_verify_detects_corruption(tmp_path, target):
    g = open_group(tmp_path, meta=CacheMeta(**META), create=True)
    with g.writer() as w:
        for i in range(40):
            w.add(make_sample(i))
    assert verify(g, progress=False)["ok"]
    seg = g.committed()[0].segment
    segdir = tmp_path / g.name / "segments" / seg
    if target == "manifest_sha":
        mf = tmp_path / g.name / "manifests" / f"{seg}.json"
        mf.write_text(mf.read_text().replace('"sha256": "', '"sha256": "0', 1))
    else:
        chunk = sorted(p for p in (segdir / target).rglob("*") if p.is_file() and p.name != "zarr.json")[0]
        b = bytearray(chunk.read_bytes())
        mid = len(b) // 2
        b[mid:mid + 4] = bytes(x ^ 0x5A for x in b[mid:mid + 4])
        chunk.write_bytes(bytes(b))
    with pytest.raises(CacheCorruptError) as ei:
        verify(g, progress=False)
    assert seg in str(ei.value)


def test_racing_fillers_duplicates_resolved(tmp_path):
    """Two fillers that both wrote the same keys: readers see each key once (first segment wins),
    verify reports the duplicates, compact removes them."""
    from logit_cache.maintenance import compact
    g = open_group(tmp_path, meta=CacheMeta(**META), create=True)
    for lo, hi in ((0, 12), (6, 18)):
        with g.writer() as w:
            for i in range(lo, hi):
                w.add(make_sample(i))
    r = CacheReader(g)
    assert len(r) == 18 and r.duplicates == 6
    assert r.locate(make_sample(8).key)[0] == g.committed()[0].segment
    rep = verify(g, progress=False)
    assert rep["duplicates"] == 6 and rep["unique_keys"] == 18
    compact(g, target_rows=100, progress=False)
    r = CacheReader(g)
    assert len(r) == 18 and r.duplicates == 0 and len(g.committed()) == 1
    assert verify(g, progress=False)["duplicates"] == 0
