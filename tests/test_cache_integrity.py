"""Corruption is detected, never consumed (issue 11, items 8-9): a flipped byte or a missing chunk
stops every reader naming the segment and array; a damaged manifest fails verify, makes readers
refuse the group, and survives gc; a training run stops with a one-line error naming the segment."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from logit_cache import CacheCorruptError, CacheMeta, CacheReader, open_group
from logit_cache.cli import main as cli_main
from logit_cache.maintenance import gc, verify
from logit_cache.synthetic import make_sample

META = dict(teacher_fingerprint="teach", tokenizer_hash="tok", template="qwen2_base",
            dataset_fingerprint="dsintegrity0000", vocab_size=151936, k=8, vision_strategy="full",
            num_visual_tokens=4, value_encoding="q8")


@functools.lru_cache(maxsize=1)
def _samples() -> tuple:
    """The 63 samples every test writes (deterministic; generating them at vocab 151,936 costs seconds)."""
    return tuple(make_sample(i, META["vocab_size"], META["k"], 4) for i in range(63))


def fill(root: Path, n: int = 63, rows: int = 16):
    g = open_group(root, meta=CacheMeta(**META), create=True)
    samples = list(_samples()[:n])
    with g.writer(segment_rows=rows) as w:
        for s in samples:
            w.add(s)
    return g, samples


def chunk_files(root: Path, g, segment: str, array: str) -> list[Path]:
    d = root / g.name / "segments" / segment / array
    return sorted(p for p in d.rglob("*") if p.is_file() and p.name != "zarr.json")


def flip(path: Path, nbytes: int = 8) -> None:
    b = bytearray(path.read_bytes())
    mid = len(b) // 2
    b[mid:mid + nbytes] = bytes(x ^ 0xFF for x in b[mid:mid + nbytes])
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("array", ["text_lp", "visual_ids", "autocorr", "text_offsets"])
def test_flipped_bytes_stop_every_reader_naming_segment_and_array(tmp_path, array):
    g, samples = fill(tmp_path)
    m = g.committed()[1]
    flip(chunk_files(tmp_path, g, m.segment, array)[0])
    in_seg = [s for s in samples if s.key in {s.key for s in samples[16:32]}]
    if array == "text_offsets":  # read when the reader builds its index
        with pytest.raises(CacheCorruptError, match=f"{m.segment}/{array}.*checksum"):
            CacheReader(g)
    else:
        r = CacheReader(g)
        victim = next(s for s in in_seg if (array != "autocorr" and array != "visual_ids") or s.visual is not None)
        with pytest.raises(CacheCorruptError, match=f"{m.segment}/{array}.*checksum"):
            r.get(victim.key)
        with pytest.raises(CacheCorruptError, match=m.segment):
            list(r.iter_samples())
        r.get(samples[0].key)  # other segments stay readable
    with pytest.raises(CacheCorruptError, match=m.segment):
        verify(g, progress=False)


def test_missing_chunk_file_is_damage_not_zeros(tmp_path):
    g, samples = fill(tmp_path, n=20, rows=20)
    seg = g.committed()[0].segment
    files = chunk_files(tmp_path, g, seg, "text_ids_hi")  # all-zero high bits: still a chunk file
    assert files
    files[0].unlink()
    with pytest.raises(CacheCorruptError, match=f"{seg}/text_ids_hi.*missing"):
        CacheReader(g).get(next(s.key for s in samples if s.text.num_positions))


def test_truncated_manifest_fails_verify_and_survives_gc(tmp_path, capsys):
    g, samples = fill(tmp_path)
    assert len(g.committed()) == 4 and verify(g, progress=False)["samples"] == 63
    seg = g.committed()[1].segment
    mf = tmp_path / g.name / "manifests" / f"{seg}.json"
    mf.write_bytes(mf.read_bytes()[:100])  # truncated: written by rename, so this is damage
    assert g.damaged_manifests().keys() == {seg}
    with pytest.raises(CacheCorruptError, match=f"manifests/{seg}.json is damaged"):
        verify(g, progress=False)
    assert cli_main(["-q", "verify", str(tmp_path), g.name]) != 0
    assert f"{seg}.json is damaged" in capsys.readouterr().err
    with pytest.raises(CacheCorruptError, match="gc --remove-damaged"):
        CacheReader(g)  # a trainer must not silently train without (or with) that segment
    with pytest.raises(CacheCorruptError, match=seg):
        g.committed_keys()  # nor a resumed fill take its samples for missing
    rep = gc(g, min_age_s=0)
    assert seg not in rep["removed_uncommitted"] and rep["kept_damaged"] == [seg]
    assert seg not in gc(g, min_age_s=0, dry_run=True)["removed_uncommitted"]
    assert (tmp_path / g.name / "segments" / seg).is_dir() and mf.exists()
    # on request, the damaged segment goes; a resumed fill then redoes its samples
    assert gc(g, remove_damaged=True)["removed_damaged"] == [seg]
    assert not (tmp_path / g.name / "segments" / seg).exists() and not mf.exists()
    assert verify(g, progress=False)["samples"] == 47


def test_manifest_naming_another_segment_is_damage(tmp_path):
    g, _ = fill(tmp_path, n=32)
    a, b = [m.segment for m in g.committed()]
    mf = tmp_path / g.name / "manifests" / f"{a}.json"
    d = json.loads(mf.read_text())
    d["segment"] = b
    mf.write_text(json.dumps(d))
    assert a in g.damaged_manifests()


def _args(model, synth_dir, out, cache):
    return ["distill", "--step", "dft", "--model", str(model), "--data", str(synth_dir / "instruct.json"),
            "--images", str(synth_dir / "images"), "--out", str(out), "--global-batch", "4", "--micro-batch", "2",
            "--no-progress", "--no-tensorboard", "--cache", str(cache), "--max-steps", "2"]


@pytest.mark.integration
@pytest.mark.parametrize("workers", [0, 2])
def test_training_stops_on_a_flipped_byte_naming_the_segment(tiny_models, synth_dir, tmp_path, capsys, workers,
                                                             one_torch_thread):
    from cachefill import fill_cache

    from student_trainer.cli import main

    root = tmp_path / "cache"
    name = fill_cache(tiny_models["tiny-teacher"], synth_dir / "instruct.json", synth_dir / "images", "qwen2_base",
                      root, k=8, encoding="q8")
    g = open_group(root, name)
    seg = g.committed()[0].segment
    flip(chunk_files(root, g, seg, "text_lp")[0])
    rc = main(_args(tiny_models["tiny-student"], synth_dir, tmp_path / "o", root) + ["--num-workers", str(workers)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("student_trainer: error:")]
    assert len(lines) == 1 and seg in lines[0] and "text_lp" in lines[0] and "checksum" in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "o" / "final").exists()
