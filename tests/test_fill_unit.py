"""deploy.fill (``logit_cache fill``) without servers: the /v1/info agreement check, request
chunking, response checks and the CLI's error path."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ckd_common.protocol import Info
from ckd_common.targets import SampleTargets, SparseTopK
from deploy.fill import check_infos
from deploy.fill_pipeline import FillError, make_chunks

INFO = Info(teacher_fingerprint="f1", tokenizer_hash="t1", vocab_size=512, tokenizer_vocab_size=496,
            num_visual_tokens=16, vision_strategy="full", image_size=56, image_token_id=3,
            supported_templates=["pretrain", "qwen2_base"], max_k=64, engine="hf", common_vocab_size=496,
            hidden_size=64, dtype="fp32", device="cpu", max_batch_tokens=1024, max_request_samples=8,
            max_request_tokens=4096, max_body_bytes=1 << 20, target_kinds=["text", "visual", "autocorr"],
            wire_version=1)


def _other(**changes) -> Info:
    return INFO.model_copy(update=changes)


def test_servers_must_run_the_same_teacher():
    assert check_infos({"a": INFO, "b": _other()}, "pretrain", 8) == INFO
    with pytest.raises(FillError, match="teacher_fingerprint: a has 'f1', b has 'f2'"):
        check_infos({"a": INFO, "b": _other(teacher_fingerprint="f2")}, "pretrain", 8)
    with pytest.raises(FillError, match="num_visual_tokens"):
        check_infos({"a": INFO, "b": _other(num_visual_tokens=15)}, "pretrain", 8)
    with pytest.raises(FillError, match="does not support template 'other'"):
        check_infos({"a": INFO}, "other", 8)
    with pytest.raises(FillError, match="--k 65 is out of range"):
        check_infos({"a": INFO}, "pretrain", 65)


def _meta(**kw):
    from logit_cache import CacheMeta

    base = dict(teacher_fingerprint="t", tokenizer_hash="h", template="pretrain", dataset_fingerprint="d",
                vision_strategy="full", num_visual_tokens=4, vocab_size=1000, k=8, value_encoding="q8")
    return CacheMeta(**{**base, **kw})


def _sample(i, length):
    return SimpleNamespace(key=f"{i:032x}", length=length, image_path=None, id=str(i), has_image=False,
                           num_visual=0, response_positions=np.arange(2))


def test_chunks_sorted_by_length_and_capped():
    samples = [_sample(i, n) for i, n in enumerate([50, 10, 30, 20, 40, 60, 70])]
    chunks = make_chunks(samples, batch_samples=3, max_tokens=100, max_bytes=1 << 20)
    lengths = [[s.length for s in c.samples] for c in chunks]
    assert sum(lengths, []) == sorted(s.length for s in samples)
    assert all(len(c) <= 3 and sum(c) <= 100 for c in lengths)
    assert lengths[0] == [10, 20, 30]


def test_response_must_answer_the_request():
    from ckd_common.wire import TargetsResponse, encode_response
    from deploy.fill_frames import FrameError, decode_block

    s = _sample(1, 10)
    text = SparseTopK(np.zeros((2, 4), np.int64), np.zeros((2, 4), np.float32), np.zeros(2, np.float32))
    ok = SampleTargets(s.key, text)
    meta = _meta(k=4)
    assert decode_block(encode_response(TargetsResponse([ok], 4, 100)), [s], meta, "u")["keys"].shape == (1, 16)
    wrong = SampleTargets("f" * 32, ok.text)
    with pytest.raises(FrameError, match="inconsistently"):
        decode_block(encode_response(TargetsResponse([wrong], 4, 100)), [s], meta, "u")
    with pytest.raises(FrameError, match="undecodable"):
        decode_block(b"nonsense", [s], meta, "u")


def test_cli_reports_unreachable_server(tmp_path, capsys, synth_dir):
    from logit_cache.cli import main

    rc = main(["-q", "fill", "--server", "http://127.0.0.1:9", "--data", str(synth_dir / "pretrain.json"),
               "--images", str(synth_dir / "images"), "--template", "pretrain", "--out", str(tmp_path / "c"),
               "--wait-ready", "0.5"])
    err = capsys.readouterr().err
    assert rc == 1 and "http://127.0.0.1:9 is not ready" in err and "Traceback" not in err


def test_config_reports_every_problem_at_once(tmp_path):
    from ckd_common.config import ConfigError
    from deploy.fill import FillConfig

    cfg = FillConfig(["http://a", "http://a/", "ftp://b"], str(tmp_path / "none.json"), None, "chat", 0, "",
                     encoding="f8", token_file=str(tmp_path / "token"))
    with pytest.raises(ConfigError) as ei:
        cfg.validate()
    msg = str(ei.value)
    for part in ("lists a URL twice", "--server ftp://b", "none.json does not exist", "--template 'chat'",
                 "--out is required", "--encoding 'f8'", "--k must be at least 1", "--token-file"):
        assert part in msg, part


def test_ckd_fill_is_the_same_command(tmp_path, capsys, synth_dir):
    from deploy.cli import main

    rc = main(["fill", "--server", "http://127.0.0.1:9", "--data", str(synth_dir / "pretrain.json"),
               "--images", str(synth_dir / "images"), "--template", "pretrain", "--out", str(tmp_path / "c"),
               "--wait-ready", "0.5", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "ckd fill: server http://127.0.0.1:9 is not ready" in err and "Traceback" not in err
    assert "FillConfig:" in err and "wait_ready_s" in err  # the resolved config is printed at start
