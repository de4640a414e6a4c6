"""deploy.fill (``logit_cache fill``) without servers: the /v1/info agreement check, request
chunking, response checks and the CLI's error path."""
from __future__ import annotations

import os
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


# ---------------------------------------------------------------------------------------------
# the command line is derived from FillConfig; the established flags keep working


def _parse(argv):
    import argparse

    from deploy.fill import add_fill_arguments, config_from_args

    return config_from_args(add_fill_arguments(argparse.ArgumentParser()).parse_args(argv))


def test_cli_is_derived_from_the_config_and_keeps_its_flags():
    from ckd_common.config import to_argv
    from deploy.fill import FillConfig

    cfg = _parse(["--server", "http://a:1", "--server", "http://b:2", "--data", "d.json", "--images", "img",
                  "--template", "qwen2_base", "--k", "16", "--out", "cache/x", "--tokenizer", "tok",
                  "--vocab-limit", "400", "--encoding", "f16", "--batch-samples", "4", "--concurrency", "3",
                  "--writers", "3", "--segment-rows", "100", "--segment-mb", "64", "--clevel", "3", "--retries", "2",
                  "--backoff", "0.1", "--max-backoff", "2", "--timeout", "5", "--wait-ready", "7", "--max-length", "99",
                  "--on-error", "skip", "--prepared", "prep/x", "--token-file", "t", "--no-progress"])
    assert cfg == FillConfig(["http://a:1", "http://b:2"], "d.json", "img", "qwen2_base", 16, "cache/x", "tok", 400,
                             "f16", 4, 3, 3, 100, 64, 3, 2, 0.1, 2.0, 5.0, 7.0, 99, "skip", "prep/x", "t", False)
    assert _parse(to_argv(cfg)) == cfg  # a parent (the cascade) can write the command line back
    defaults = _parse(["--server", "http://a", "--data", "d", "--template", "pretrain", "--out", "o"])
    assert defaults == FillConfig(["http://a"], "d", None, "pretrain", out="o")


def test_cli_refuses_a_template_it_does_not_know(capsys):
    with pytest.raises(SystemExit):
        _parse(["--server", "http://a", "--data", "d", "--template", "chat", "--out", "o"])
    assert "invalid choice: 'chat'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the fill lock


@pytest.fixture()
def group(tmp_path):
    from logit_cache import open_group

    return open_group(tmp_path / "cache", meta=_meta(), create=True)


def _dead_pid() -> int:
    """A pid no process has: pids are below the kernel's pid_max."""
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read())


def test_lock_refuses_a_live_holder_and_is_released(group):
    from deploy.fill_lock import LOCK_FILE, FillLock, GroupLocked

    with FillLock(group):
        assert group.storage.exists(group.name, LOCK_FILE)
        with pytest.raises(GroupLocked, match=f"another fill is writing .*: pid {os.getpid()} on "):
            FillLock(group).acquire()
    assert not group.storage.exists(group.name, LOCK_FILE)
    with FillLock(group) as lock:  # free again
        assert lock.note == ""


def test_lock_of_a_dead_process_or_a_silent_host_is_taken_over(group):
    import json
    import socket
    from datetime import datetime, timedelta, timezone

    from deploy.fill_lock import LOCK_FILE, STALE_AFTER_S, FillLock, GroupLocked, holder_gone

    def write(**holder):
        group.storage.write_atomic(json.dumps(holder).encode(), group.name, LOCK_FILE)

    pid = _dead_pid()
    write(host=socket.gethostname(), pid=pid, started_utc="then", heartbeat_utc="then")
    with FillLock(group) as lock:
        assert f"stale lock of pid {pid}" in lock.note and "no longer runs" in lock.note
    now = datetime.now(timezone.utc)
    fresh, old = now.isoformat(), (now - timedelta(seconds=STALE_AFTER_S + 60)).isoformat()
    write(host="elsewhere", pid=1, heartbeat_utc=fresh)  # another host: only its heartbeat tells
    with pytest.raises(GroupLocked, match="pid 1 on elsewhere"):
        FillLock(group).acquire()
    write(host="elsewhere", pid=1, heartbeat_utc=old)
    with FillLock(group) as lock:
        assert "no heartbeat for" in lock.note
    assert holder_gone({"host": socket.gethostname(), "pid": os.getpid(), "proc_start": "1"}) is not None  # reused pid
    group.storage.write_atomic(b"{torn", group.name, LOCK_FILE)
    with FillLock(group) as lock:
        assert "names no heartbeat" in lock.note


# ---------------------------------------------------------------------------------------------
# the null engine (teacher_server --engine null): the teacher's shapes, synthetic targets


def test_null_engine_serves_valid_deterministic_targets_of_the_teachers_shapes(tiny_models, tmp_path):
    import asyncio

    from ckd_common.model import load_vlm, model_info
    from ckd_common.targets import AUTOCORR_MAX_RANK, AutocorrFactor
    from ckd_common.teacher import TeacherInput
    from logit_cache import open_group
    from teacher_server.config import ServerConfig
    from teacher_server.engines import ENGINES, make_engine

    assert "null" in ENGINES
    engine = make_engine(ServerConfig(model_dir=str(tiny_models["tiny-teacher"]), engine="null"))
    desc = engine.load()
    real = model_info(*load_vlm(tiny_models["tiny-teacher"]))
    assert desc.model.fingerprint.startswith("null-") and desc.model.fingerprint != real.fingerprint
    assert {**desc.model.to_dict(), "fingerprint": ""} == {**real.to_dict(), "fingerprint": ""}
    assert engine.needs_pixels is False
    nv, vocab = real.num_visual_tokens, real.common_vocab
    inputs = [TeacherInput(f"{i:032x}", np.zeros(30, np.int64), np.arange(3 + i), 2 if i % 2 else -1,
                           nv if i % 2 else 0) for i in range(6)]
    out = asyncio.run(engine.targets(inputs, 8, vocab))
    again = asyncio.run(engine.targets(inputs, 8, vocab))
    narrow = asyncio.run(engine.targets(inputs, 3, vocab))
    for x, t, u, n in zip(inputs, out, again, narrow):
        assert t.key == x.key and t.text.num_positions == len(x.response_positions) and t.text.k == 8
        assert (t.visual is None) == (not x.num_visual) == (t.autocorr is None)
        if x.num_visual:  # a factor, as a real teacher sends (wire v2, cache format 2), of a teacher's rank
            assert isinstance(t.autocorr, AutocorrFactor) and t.autocorr.num_visual == nv
            assert 1 <= t.autocorr.rank <= min(nv, AUTOCORR_MAX_RANK) and 0.99 <= t.autocorr.share <= 1
        np.testing.assert_array_equal(t.text.ids, u.text.ids)  # the same sample, the same targets
        np.testing.assert_array_equal(n.text.ids, t.text.ids[:, :3])  # top-3 = the first 3 of the top-8
        np.testing.assert_allclose(n.text.tail, 1 - np.exp(t.text.logprobs[:, :3].astype(np.float64)).sum(1),
                                   rtol=1e-6, atol=1e-6)
    meta = _meta(vocab_size=vocab, num_visual_tokens=nv)
    with open_group(tmp_path / "c", meta=meta, create=True).writer() as w:  # the writer's checks accept them
        for t in out:
            w.add(t)
    narrower = asyncio.run(engine.targets(inputs[:1], 4, 100))  # another vocab_limit: its own pool
    assert narrower[0].text.ids.max() < 100
    engine.close()
