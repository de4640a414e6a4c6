"""logit_cache: metadata checks, named mismatch errors, unknown versions, group lookup, CLI."""
from __future__ import annotations

import json

import pytest
import zarr

from logit_cache import (CacheMeta, CacheMismatchError, CacheReader, GroupNotFoundError, UnknownFormatVersion,
                         find_group, group_name, open_for_training, open_group)
from logit_cache.cli import main as cli_main
from logit_cache.synthetic import make_sample


def meta(**kw):
    d = dict(teacher_fingerprint="f" * 32, tokenizer_hash="tok",
             template="qwen2_base", dataset_fingerprint="ds0123456789abcdef", vocab_size=1000, k=8,
             vision_strategy="full", num_visual_tokens=4)
    d.update(kw)
    return CacheMeta(**d)


def make(root, n=5, **kw):
    g = open_group(root, meta=meta(**kw), create=True)
    with g.writer() as w:
        for i in range(n):
            w.add(make_sample(i))
    return g


def test_group_name_deterministic():
    assert group_name("ds0123456789abcdefXYZ", "qwen2_base") == "qwen2_base__ds0123456789abcd"
    assert group_name("a/b c", "my template") == "my-template__a-b-c"
    assert meta().group_name == group_name("ds0123456789abcdef", "qwen2_base")


def test_mismatch_names_every_field(tmp_path):
    make(tmp_path)
    exp = meta(tokenizer_hash="other-tok", k=16, vocab_size=151936).to_dict()
    with pytest.raises(CacheMismatchError) as ei:
        open_for_training(tmp_path, exp)
    msg = str(ei.value)
    for field, want, have in [("tokenizer_hash", "other-tok", "tok"), ("k", 16, 8), ("vocab_size", 151936, 1000)]:
        assert field in msg and repr(want) in msg and repr(have) in msg
    assert {d[0] for d in ei.value.differences} == {"tokenizer_hash", "k", "vocab_size"}
    # a partial dict checks only what it names; provenance never matters
    r = open_for_training(tmp_path, {"dataset_fingerprint": "ds0123456789abcdef", "template": "qwen2_base",
                                     "k": 8, "target_kinds": ["text"], "producer_version": "x"})
    assert len(r) == 5
    with pytest.raises(ValueError, match="unknown field"):
        meta().check_compatible({"kk": 3})


def test_writer_reopen_with_different_meta_refused(tmp_path):
    make(tmp_path)
    with pytest.raises(CacheMismatchError, match="teacher_fingerprint"):
        open_group(tmp_path, meta=meta(teacher_fingerprint="another"), create=True)


def test_unknown_format_version(tmp_path):
    g = make(tmp_path)
    zg = zarr.open_group(f"{tmp_path}/{g.name}", mode="a")
    attrs = dict(zg.attrs["logit_cache"])
    attrs["format_version"] = 99
    zg.attrs["logit_cache"] = attrs
    with pytest.raises(UnknownFormatVersion, match="99") as ei:
        open_group(tmp_path, g.name)
    assert "upgrade" in str(ei.value)
    with pytest.raises(UnknownFormatVersion):
        open_for_training(tmp_path, {"dataset_fingerprint": "ds0123456789abcdef", "template": "qwen2_base"})


def test_unknown_manifest_version(tmp_path):
    g = make(tmp_path)
    mdir = tmp_path / g.name / "manifests"
    f = next(mdir.glob("*.json"))
    d = json.loads(f.read_text())
    d["format_version"] = 7
    f.write_text(json.dumps(d))
    with pytest.raises(UnknownFormatVersion, match="7"):
        CacheReader(g)


def test_find_group_lists_root(tmp_path):
    make(tmp_path)
    make(tmp_path, template="pretrain", dataset_fingerprint="captions99")
    assert find_group(tmp_path, "captions99", "pretrain") == "pretrain__captions99"
    with pytest.raises(GroupNotFoundError) as ei:
        find_group(tmp_path, "nope", "qwen2_base")
    msg = str(ei.value)
    assert "pretrain__captions99" in msg and "qwen2_base__ds0123456789abcd" in msg and "captions99" in msg
    with pytest.raises(GroupNotFoundError):
        open_group(tmp_path, "missing")


def test_cli_ls_info_verify_gc_compact(tmp_path, capsys):
    g = make(tmp_path, n=9)
    with g.writer() as w:
        w.add(make_sample(100))
    assert cli_main(["ls", str(tmp_path)]) == 0
    assert "samples=10" in capsys.readouterr().out
    assert cli_main(["ls", str(tmp_path), g.name]) == 0
    assert capsys.readouterr().out.count("committed") == 2
    assert cli_main(["info", str(tmp_path), g.name]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["samples"] == 10 and rep["bytes_per_position"] > 0 and rep["compression_ratio_vs_float32"] > 0
    assert cli_main(["-q", "verify", str(tmp_path), g.name]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 10
    assert cli_main(["-q", "compact", str(tmp_path), g.name, "--target-rows", "100"]) == 0
    assert len(json.loads(capsys.readouterr().out)["new_segments"]) == 1
    assert cli_main(["gc", str(tmp_path), g.name]) == 0
    assert cli_main(["info", str(tmp_path), "nothere"]) == 2
    assert "GroupNotFoundError" in capsys.readouterr().err


def test_factories_are_the_one_rule_for_writers_and_trainers():
    from types import SimpleNamespace

    def dataset(fingerprint, *has_image):
        return SimpleNamespace(fingerprint=fingerprint, template="qwen2_base",
                               samples=[SimpleNamespace(has_image=h) for h in has_image])

    images, text_only = dataset("ds0123456789abcdef", False, True), dataset("captions99", False)
    teacher = dict(teacher_fingerprint="f" * 32, tokenizer_hash="tok", vocab_size=1000, k=8, vision_strategy="full",
                   num_visual_tokens=4, value_encoding="q8", target_kinds=["autocorr", "text", "not-a-kind"])
    m = CacheMeta.for_dataset(images, **teacher)
    assert (m.dataset_fingerprint, m.template, m.vision_strategy, m.num_visual_tokens) == \
        ("ds0123456789abcdef", "qwen2_base", "full", 4)
    assert m.value_encoding == "q8" and m.target_kinds == ["text", "autocorr"]  # stored order, unknown kinds dropped
    t = CacheMeta.for_dataset(text_only, **teacher)
    assert (t.vision_strategy, t.num_visual_tokens) == ("none", 0)  # text-only data records no vision fields

    student = dict(tokenizer_hash="tok", vocab_size=1000, vision_strategy="full", num_visual_tokens=4)
    exp = CacheMeta.expected_for(images, **student)
    assert exp == {"dataset_fingerprint": "ds0123456789abcdef", "template": "qwen2_base", "tokenizer_hash": "tok",
                   "vocab_size": 1000, "vision_strategy": "full", "num_visual_tokens": 4,
                   "image_aspect_ratio": "square"}
    assert m.differences(exp) == []
    pad = CacheMeta.for_dataset(images, **teacher, image_aspect_ratio="pad")  # a pad teacher's group
    assert pad.differences(exp) == [("image_aspect_ratio", "square", "pad")]
    exp_text = CacheMeta.expected_for(text_only, **student, teacher_fingerprint="other")
    assert "vision_strategy" not in exp_text and "image_aspect_ratio" not in exp_text
    assert t.differences(exp_text) == [("teacher_fingerprint", "other", "f" * 32)]
