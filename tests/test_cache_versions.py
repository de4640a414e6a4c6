"""Format versions: a format-1 group written by the format-1 code (tests/fixtures/cache_v1) is still
read sample for sample, verified and opened for training (its segments checked against their
sha256 first); writing into it is refused with a message naming the version and the fix. A format-2
group (format 3 less the per-sample tail trace) reads with the tail unknown and is not written."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from logit_cache import CacheError, CacheReader, FORMAT_VERSION, open_for_training, open_group
from logit_cache.maintenance import compact, info, verify
from logit_cache.synthetic import make_sample

FIXTURE = Path(__file__).parent / "fixtures" / "cache_v1"
GROUP = "qwen2_base__dsformat1fixture"


@pytest.fixture()
def v1_root(tmp_path) -> Path:
    root = tmp_path / "v1"
    shutil.copytree(FIXTURE / "root", root)
    return root


def test_format1_group_reads_exactly_what_the_format1_reader_returned(v1_root):
    assert FORMAT_VERSION == 3
    g = open_group(v1_root, GROUP)
    assert g.meta.format_version == 1
    expected = np.load(FIXTURE / "expected.npz")
    r = CacheReader(g)
    keys = {k.split("/")[0] for k in expected.files}
    assert set(r.keys()) == keys and len(keys) == 9
    for key in keys:
        t = r.get(key)
        for kind in ("text", "visual"):
            p = getattr(t, kind)
            if f"{key}/{kind}_ids" not in expected.files:
                assert p is None
                continue
            np.testing.assert_array_equal(p.ids, expected[f"{key}/{kind}_ids"])
            np.testing.assert_array_equal(p.logprobs, expected[f"{key}/{kind}_lp"])
            np.testing.assert_array_equal(p.tail, expected[f"{key}/{kind}_tail"])
        if f"{key}/autocorr" in expected.files:
            np.testing.assert_array_equal(t.autocorr, expected[f"{key}/autocorr"])  # dense, as format 1 stored it
        else:
            assert t.autocorr is None
    assert verify(g, progress=False)["samples"] == 9
    assert info(g)["format_version"] == 1
    r2 = open_for_training(v1_root, {"dataset_fingerprint": "dsformat1fixture0", "template": "qwen2_base"})
    assert len(r2) == 9


def test_writing_into_a_format1_group_is_refused_with_the_fix(v1_root):
    g = open_group(v1_root, GROUP)
    with pytest.raises(CacheError, match="format 1, which this version reads but does not write.*new root"):
        g.writer()
    with pytest.raises(CacheError, match="format 1"):
        compact(g, target_rows=100, small_rows=100, progress=False)
    assert len(CacheReader(g)) == 9
    meta = g.meta
    meta.format_version = FORMAT_VERSION  # a filler with this version's metadata opens the same group
    assert open_group(v1_root, meta=meta, create=True).meta.format_version == 1
    with pytest.raises(CacheError, match="does not write"):
        open_group(v1_root, meta=meta).writer().add(make_sample(0, 151936, 8, 4))


def test_trainer_checks_format1_segments_before_training(v1_root, capsys):
    """Format-1 chunks have no checksums: open_cache verifies every segment against its manifest, so
    a flipped byte stops the run at the start, naming the segment (format 2 checks on every read)."""
    from student_trainer.data import TrainerError, open_cache

    expected = {"dataset_fingerprint": "dsformat1fixture0", "template": "qwen2_base"}
    assert len(open_cache(str(v1_root), expected)) == 9
    assert "checking 2 segments" in capsys.readouterr().out
    seg = open_group(v1_root, GROUP).committed()[1].segment
    chunk = sorted(p for p in (v1_root / GROUP / "segments" / seg / "text_lp").rglob("*")
                   if p.is_file() and p.name != "zarr.json")[0]
    b = bytearray(chunk.read_bytes())
    b[len(b) // 2] ^= 0x01
    chunk.write_bytes(bytes(b))
    CacheReader(open_group(v1_root, GROUP))  # format 1 cannot notice on read ...
    with pytest.raises(TrainerError, match=f"{seg}/text_lp.*(sha256|corrupted)"):
        open_cache(str(v1_root), expected)  # ... so the trainer checks before it starts


def _as_format2(root: Path, group: str) -> None:
    """Rewrite a format-3 group as the format-2 writer left it: no autocorr_tail array, version 2."""
    import json

    base = root / group
    attrs = json.loads((base / "zarr.json").read_text())
    attrs["attributes"]["logit_cache"]["format_version"] = 2
    (base / "zarr.json").write_text(json.dumps(attrs))
    for seg in (base / "segments").iterdir():
        if seg.is_dir():
            shutil.rmtree(seg / "autocorr_tail")
            meta = json.loads((seg / "zarr.json").read_text())
            meta.get("consolidated_metadata", {}) and meta["consolidated_metadata"]["metadata"].pop("autocorr_tail", None)
            (seg / "zarr.json").write_text(json.dumps(meta))
    for man in (base / "manifests").glob("*.json"):
        m = json.loads(man.read_text())
        m["format_version"] = 2
        m["arrays"].pop("autocorr_tail")
        man.write_text(json.dumps(m))


def test_format2_group_reads_without_tail_and_is_not_written(tmp_path):
    from logit_cache.synthetic import teacher_like_autocorr
    from ckd_common.kd.relation import factor_dense
    from ckd_common.targets import SampleTargets
    from logit_cache import CacheMeta

    rng = np.random.default_rng(0)
    samples = []
    for i in range(4):
        s = make_sample(i, 1000, 8, 24, image=True)
        samples.append(SampleTargets(s.key, s.text, s.visual, factor_dense(teacher_like_autocorr(24, 16, rng), max_rank=6)))
    meta = CacheMeta(teacher_fingerprint="teach", tokenizer_hash="tok", template="qwen2_base",
                     dataset_fingerprint="ds0123456789abcdef", vocab_size=1000, k=8, vision_strategy="full",
                     num_visual_tokens=24, value_encoding="f16")
    g = open_group(tmp_path, meta=meta, create=True)
    with g.writer() as w:
        for s in samples:
            w.add(s)
    assert all(CacheReader(g).get(s.key).autocorr.tail_trace == pytest.approx(s.autocorr.tail_trace, abs=1e-6)
               for s in samples)
    _as_format2(tmp_path, g.name)
    g2 = open_group(tmp_path, g.name)
    assert g2.meta.format_version == 2
    r = CacheReader(g2)
    for s in samples:
        f = r.get(s.key).autocorr
        assert f.tail_trace is None and np.array_equal(f.codes, s.autocorr.codes) and f.share == pytest.approx(s.autocorr.share)
    assert verify(g2, progress=False)["samples"] == 4
    with pytest.raises(CacheError, match="format 2, which this version reads but does not write"):
        g2.writer()
