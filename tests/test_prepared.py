"""The prepared dataset on disk (ckd_common.prepared): the same samples as the in-memory preparation,
made once and reopened, rebuilt when stale, refused when named explicitly but made for other inputs,
never half-written; and the light model reader `ckd data prepare` uses."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ckd_common.data import DataError, collate, prepare_file
from ckd_common.model import data_contract
from ckd_common.prepared import (MANIFEST, PreparedData, PreparedDataError, PrepareSpec, keys_digest, obtain,
                                 sample_keys, use_prepared)


@pytest.fixture(scope="module")
def student_dir(tiny_models):
    return tiny_models["tiny-student"]


@pytest.fixture(scope="module")
def contract(student_dir):
    return data_contract(student_dir)


@pytest.fixture
def data(synth_dir, tmp_path):
    """A private copy of the synthetic data (tests change its files)."""
    shutil.copytree(synth_dir, tmp_path / "data")
    return tmp_path / "data"


class Log(list):
    def __call__(self, msg: str) -> None:
        self.append(msg)

    def built(self) -> int:
        return sum(m.startswith("building ") for m in self)


def _obtain(data_dir, contract, root, template="qwen2_base", file="instruct.json", log=None, **kw):
    info, tok = contract
    spec = PrepareSpec.of(data_dir / file, data_dir / "images", template, info, kw.pop("max_length", 2048))
    return obtain(spec, tok, root=root, log=log, **kw), spec


def _assert_same_samples(disk, mem):
    assert len(disk) == len(mem) and disk.fingerprint == mem.fingerprint and disk.template == mem.template
    assert sample_keys(disk.samples) == [s.key for s in mem.samples]
    assert keys_digest(disk.samples) == keys_digest(mem.samples)
    assert list(disk.lengths) == [s.length for s in mem.samples]
    for d, m in zip(disk.samples, mem.samples):
        assert (d.id, d.key, d.visual_start, d.num_visual, d.image_sha, d.length) == \
               (m.id, m.key, m.visual_start, m.num_visual, m.image_sha, m.length)
        assert d.input_ids.dtype == np.int64 and np.array_equal(d.input_ids, m.input_ids)
        assert np.array_equal(d.labels, m.labels) and np.array_equal(d.response_positions, m.response_positions)
        assert (d.image_path is None) == (m.image_path is None)
        if d.image_path:
            assert Path(d.image_path).resolve() == Path(m.image_path).resolve()


@pytest.mark.parametrize("template,file", [("qwen2_base", "instruct.json"), ("pretrain", "pretrain.json")])
def test_on_disk_equals_in_memory(template, file, synth_dir, contract, tmp_path):
    info, tok = contract
    mem = prepare_file(synth_dir / file, tok, template, info.num_visual_tokens, info.image_token_id,
                       synth_dir / "images")
    disk, _ = _obtain(synth_dir, contract, tmp_path, template, file, chunk_records=5, workers=1)
    assert disk.manifest["workers"] == 1 and disk.has_images
    _assert_same_samples(disk, mem)
    # a subset view stays a view and still reads the right samples
    sub = disk.samples.select([3, 0, 7])
    assert [s.key for s in sub] == [mem.samples[i].key for i in (3, 0, 7)]
    assert list(sub.lengths) == [mem.samples[i].length for i in (3, 0, 7)]
    assert disk.max_token_id == max(int(s.input_ids.max()) for s in mem.samples)


@pytest.mark.integration  # spawns preparation workers
def test_two_workers_give_the_same_dataset_as_one(synth_dir, contract, tmp_path):
    one, _ = _obtain(synth_dir, contract, tmp_path / "one", workers=1, chunk_records=5)
    two, _ = _obtain(synth_dir, contract, tmp_path / "two", workers=2, chunk_records=5)
    assert two.manifest["workers"] == 2 and one.manifest["workers"] == 1
    _assert_same_samples(two, one)
    for name in one.manifest["arrays"]:  # byte for byte
        assert one.manifest["arrays"][name]["sha256"] == two.manifest["arrays"][name]["sha256"], name


def test_made_once_then_opened(data, contract, tmp_path):
    log = Log()
    a, spec = _obtain(data, contract, tmp_path, log=log)
    b, _ = _obtain(data, contract, tmp_path, log=log)
    assert log.built() == 1 and log[-1].startswith("opened ")
    assert a.path == b.path == tmp_path / spec.dirname and a.fingerprint == b.fingerprint
    # touching the files without changing their bytes is no change
    os.utime(data / "instruct.json")
    for img in (data / "images").iterdir():
        os.utime(img)
    _obtain(data, contract, tmp_path, log=log)
    assert log.built() == 1


def _change_data_bytes(data: Path) -> None:
    recs = json.loads((data / "instruct.json").read_text())
    recs[0]["conversations"][1]["value"] += " indeed"
    (data / "instruct.json").write_text(json.dumps(recs))


def _first_image(data: Path) -> Path:
    return data / "images" / json.loads((data / "instruct.json").read_text())[0]["image"]


def _change_image_bytes(data: Path) -> None:
    Image.new("RGB", (112, 112), (1, 2, 3)).save(_first_image(data))


def _remove_image(data: Path) -> None:
    _first_image(data).unlink()


@pytest.mark.parametrize("change,why", [(_change_data_bytes, "data file .* changed"),
                                        (_change_image_bytes, "1 image\\(s\\) changed"),
                                        (_remove_image, "1 image\\(s\\) are gone")])
def test_a_stale_dataset_is_rebuilt_by_obtain_and_refused_by_use_prepared(change, why, data, contract, tmp_path):
    log = Log()
    before, spec = _obtain(data, contract, tmp_path, log=log, on_error="skip")
    change(data)
    with pytest.raises(PreparedDataError, match="is stale: .*" + why):
        use_prepared(before.path, spec, log=None)
    after, _ = _obtain(data, contract, tmp_path, log=log, on_error="skip")
    assert log.built() == 2 and any("stale" in m for m in log)
    assert after.path == before.path and after.fingerprint != before.fingerprint
    # and the rebuilt one is what preparing in memory gives now
    info, tok = contract
    mem = prepare_file(data / "instruct.json", tok, "qwen2_base", info.num_visual_tokens, info.image_token_id,
                       data / "images", on_error="skip")
    _assert_same_samples(after, mem)


def test_an_image_of_a_left_out_sample_appearing_makes_it_stale(data, contract, tmp_path):
    img = _first_image(data)
    saved = img.read_bytes()
    img.unlink()
    log = Log()
    before, spec = _obtain(data, contract, tmp_path, log=log, on_error="skip")
    assert before.skipped == {"image not found": 1}
    img.write_bytes(saved)
    with pytest.raises(PreparedDataError, match="image\\(s\\) of left-out samples appeared"):
        use_prepared(before.path, spec, log=None, on_error="skip")
    after, _ = _obtain(data, contract, tmp_path, log=log, on_error="skip")
    assert log.built() == 2 and len(after) == len(before) + 1 and not after.skipped


def _other_tokenizer(tmp_path):
    from ckd_common.tokenizer import save_tiny_tokenizer, tokenizer_hash

    tok = save_tiny_tokenizer(tmp_path / "other-tok", ["a completely different corpus of words"], vocab_size=300)
    return tok, tokenizer_hash(tok)


@pytest.mark.parametrize("field", ["tokenizer_hash", "template", "max_length", "num_visual_tokens",
                                   "image_aspect_ratio", "images"])
def test_any_other_input_gives_another_dataset_and_an_explicit_one_is_refused(field, data, contract, tmp_path):
    """A changed tokenizer / template / max_length / visual-token count / preprocessing / image set is
    never served the dataset of the old inputs: by spec it is another directory (built anew); named
    explicitly (--prepared) the old one is refused, naming the field."""
    info, tok = contract
    log = Log()
    first, spec = _obtain(data, contract, tmp_path, file="pretrain.json", log=log)
    if field == "images":
        shutil.copytree(data / "images", tmp_path / "other-images")
        changed = {"images": str((tmp_path / "other-images").resolve())}
    elif field == "tokenizer_hash":
        tok, h = _other_tokenizer(tmp_path)
        changed = {"tokenizer_hash": h}
    else:
        changed = {"template": "pretrain" if spec.template != "pretrain" else "qwen2_base",
                   "max_length": int(first.lengths.max()) - 1,  # truncates the longest caption
                   "num_visual_tokens": 3, "image_aspect_ratio": "pad"}
        changed = {field: changed[field]}
    other = dataclasses.replace(spec, **changed)
    with pytest.raises(PreparedDataError, match=f"other inputs.*\n  {field}: prepared for"):
        use_prepared(first.path, other, log=None)
    second = obtain(other, tok, root=tmp_path, log=log, on_error="skip")
    assert log.built() == 2 and second.path != first.path and first.path.is_dir()
    if field not in ("image_aspect_ratio", "images"):  # these change the pixels, not the tokens
        assert second.fingerprint != first.fingerprint


def test_damaged_or_unfinished_datasets_are_never_opened(data, contract, tmp_path):
    log = Log()
    ds, spec = _obtain(data, contract, tmp_path, log=log)
    tokens = ds.path / "tokens.npy"
    # a flipped byte: found by verify (a check of the recorded checksums)
    raw = bytearray(tokens.read_bytes())
    raw[-1] ^= 0xFF
    tokens.write_bytes(bytes(raw))
    assert PreparedData(ds.path).verify() == ["tokens"]
    # a truncated array: refused on open, rebuilt by obtain
    tokens.write_bytes(bytes(raw[:-3]))
    with pytest.raises(PreparedDataError, match="array tokens is truncated"):
        PreparedData(ds.path)
    ds, _ = _obtain(data, contract, tmp_path, log=log)
    assert log.built() == 2 and PreparedData(ds.path).verify() == []
    # no manifest = never committed
    (ds.path / MANIFEST).unlink()
    with pytest.raises(PreparedDataError, match="is not a prepared dataset"):
        use_prepared(ds.path, spec, log=None)
    _obtain(data, contract, tmp_path, log=log)
    assert log.built() == 3


def test_an_interrupted_build_leaves_nothing_behind(data, contract, tmp_path, monkeypatch):
    from ckd_common.prepared import builder as prepare_build

    calls = []

    def add_then_interrupt(self, r):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, r)

    original = prepare_build._Writer.add
    monkeypatch.setattr(prepare_build._Writer, "add", add_then_interrupt)
    root = tmp_path / "root"
    with pytest.raises(KeyboardInterrupt):
        _obtain(data, contract, root, chunk_records=4, workers=1)
    assert len(calls) == 2 and [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    ds, _ = _obtain(data, contract, root)
    assert len(ds) == 24


def test_bad_records_are_kept_out_and_the_policy_applies_on_open(data, contract, tmp_path):
    recs = json.loads((data / "instruct.json").read_text())
    recs[2]["image"] = "missing.png"
    recs[5] = "not a record"
    (data / "instruct.json").write_text(json.dumps(recs))
    log = Log()
    with pytest.raises(DataError) as e:
        _obtain(data, contract, tmp_path, log=log)
    msg = str(e.value)
    assert "instruct.json: record 2 (id " in msg and "missing.png not found" in msg and "(and 1 more" in msg
    assert "\n" not in msg and "--on-error skip" in msg
    ds, _ = _obtain(data, contract, tmp_path, log=log, on_error="skip")  # the same dataset: not prepared again
    assert log.built() == 1 and len(ds) == 22
    assert ds.skipped == {"image not found": 1, "record is not a JSON object": 1}


def test_collate_refuses_an_image_changed_since_preparation(data, contract, tmp_path):
    ds, _ = _obtain(data, contract, tmp_path)
    info, tok = contract
    s = ds.samples[0]
    assert collate([s], tok.pad_token_id, info.image_size, aspect_ratio="square")["pixel_values"].shape[0] == 1
    Image.new("RGB", (112, 112), (9, 9, 9)).save(s.image_path)
    with pytest.raises(DataError, match="changed since the data was prepared"):
        collate([s], tok.pad_token_id, info.image_size, aspect_ratio="square")


def test_data_contract_reads_no_weights(student_dir, tmp_path):
    from ckd_common.model import load_vlm, model_info

    light = tmp_path / "no-weights"
    shutil.copytree(student_dir, light)
    for f in light.glob("*.safetensors"):
        f.unlink()
    contract, tok = data_contract(light)
    full = model_info(*load_vlm(student_dir))
    for f in dataclasses.fields(contract):
        assert getattr(contract, f.name) == getattr(full, f.name), f.name


def test_ckd_data_prepare_reports_and_reuses(data, student_dir, tmp_path, capsys):
    """`ckd data prepare` reads the model's config and tokenizer only (here: a copy without weights)."""
    from ckd_common.cli import main

    light = tmp_path / "no-weights"
    shutil.copytree(student_dir, light, ignore=shutil.ignore_patterns("*.safetensors"))
    argv = ["data", "prepare", "--model", str(light), "--data", str(data / "instruct.json"), "--images",
            str(data / "images"), "--template", "qwen2_base", "--root", str(tmp_path / "root"), "--no-progress"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "24 samples" in out and "prepared dataset: " + str(tmp_path / "root") in out and "building" in err
    assert main(argv) == 0
    out2, err2 = capsys.readouterr()
    assert "building" not in err2 and "opened" in err2 and out2.splitlines()[0] == out.splitlines()[0]
    assert main(argv + ["--rebuild"]) == 0
    assert "building" in capsys.readouterr().err


def test_a_root_that_cannot_be_written_is_one_error(data, contract, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(PreparedDataError, match="under .*file/root failed: .*prepare elsewhere"):
        _obtain(data, contract, tmp_path / "file" / "root")


def test_a_full_disk_leaves_nothing_behind(data, contract, tmp_path, monkeypatch):
    import errno

    from ckd_common.prepared import builder

    def no_space(self, arr):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(builder._ArrayFile, "append", no_space)
    with pytest.raises(PreparedDataError, match="No space left on device"):
        _obtain(data, contract, tmp_path / "root")
    assert [p.name for p in (tmp_path / "root").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.integration  # the trainer initialises torch.distributed (DeepSpeed) before it reads data
def test_the_trainer_refuses_a_prepared_dataset_of_other_inputs(data, contract, student_dir, tmp_path, capsys):
    """`student_trainer --prepared DIR` with a directory made for another template: one error naming the
    field, before any training; `--step all` (two data files) does not take one directory at all."""
    from student_trainer.cli import main

    captions, _ = _obtain(data, contract, tmp_path / "root", template="pretrain", file="pretrain.json")
    common = ["--model", str(student_dir), "--images", str(data / "images"), "--no-progress", "--no-tensorboard",
              "--prepared", str(captions.path)]
    rc = main(["train", "--step", "ft", "--data", str(data / "pretrain.json"), "--out", str(tmp_path / "ft"), *common])
    err = capsys.readouterr().err
    assert rc == 2 and "was made for other inputs" in err and "template: prepared for 'pretrain', this run has " \
                                                                  "'qwen2_base'" in err, err
    assert not (tmp_path / "ft" / "final").exists()
    rc = main(["distill", "--step", "all", "--cache", str(tmp_path), "--pretrain-data", str(data / "pretrain.json"),
               "--instruct-data", str(data / "instruct.json"), "--out", str(tmp_path / "all"), *common])
    assert rc == 2 and "--prepared names one prepared dataset" in capsys.readouterr().err
