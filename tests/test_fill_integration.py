"""logit_cache fill (deploy.fill) through real teacher server processes (uvicorn, tiny teacher, CPU):
targets equal the in-process teacher, verify passes, resume, SIGKILL mid-fill, two servers."""
from __future__ import annotations

import time

import numpy as np
import pytest

from test_server_support import ServerProc, assert_targets_close

pytestmark = pytest.mark.integration
K = 8


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    with ServerProc(tiny_models["tiny-teacher"], tmp_path_factory.mktemp("srv"), name="main") as s:
        yield s


def _opts(servers, data, template, out, **kw):
    from deploy.fill import FillConfig

    return FillConfig(servers=list(servers), data=str(data), images=str(data.parent / "images"), template=template,
                       k=K, out=str(out), progress=False, **kw)


def _prepared(tiny_models, data, template):
    from ckd_common.data import prepare_file
    from ckd_common.model import load_vlm, model_info

    model, tok = load_vlm(tiny_models["tiny-teacher"])
    info = model_info(model, tok)
    ds = prepare_file(data, tok, template, info.num_visual_tokens, info.image_token_id, data.parent / "images")
    return model, info, ds


def _read_all(root) -> dict:
    from logit_cache import CacheReader, list_groups, open_group

    groups = list_groups(root)
    assert len(groups) == 1, groups
    reader = CacheReader(open_group(root, next(iter(groups))))
    return {k: reader.get(k) for k in reader.keys()}


def _verify(root) -> dict:
    import io
    import json
    from contextlib import redirect_stdout

    from logit_cache import list_groups
    from logit_cache.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["-q", "verify", str(root), next(iter(list_groups(root)))]) == 0
    return json.loads(buf.getvalue())


def test_fill_equals_in_process_teacher_and_verifies(server, tiny_models, synth_dir, tmp_path):
    from ckd_common.teacher import TeacherInput, TeacherRunner
    from deploy.fill import fill

    data = synth_dir / "instruct.json"
    stats = fill(_opts([server.url], data, "qwen2_base", tmp_path / "cache", segment_rows=7))
    model, info, ds = _prepared(tiny_models, data, "qwen2_base")
    keys = {s.key for s in ds.samples}
    assert stats.written == len(keys) and stats.already_committed == 0 and len(stats.segments) > 1

    cached = _read_all(tmp_path / "cache")
    assert set(cached) == keys
    runner = TeacherRunner(model, vocab_limit=info.common_vocab)
    want = runner.targets([TeacherInput.from_prepared(s, info.image_size, aspect_ratio=info.image_aspect_ratio)
                           for s in ds.samples], K)
    assert any(w.visual is not None for w in want) and any(w.visual is None for w in want)
    for w in want:
        assert_targets_close(cached[w.key], w)
    rep = _verify(tmp_path / "cache")
    assert rep["ok"] and rep["samples"] == len(keys) and rep["duplicates"] == 0

    again = fill(_opts([server.url], data, "qwen2_base", tmp_path / "cache"))  # resume: nothing left
    assert again.written == 0 and again.already_committed == len(keys) and again.requests == 0


def test_fill_and_in_process_writer_record_the_same_metadata(server, tiny_models, synth_dir, tmp_path):
    """Both writers build the group's metadata with CacheMeta.for_dataset: for the same teacher,
    data and encoding they agree on every content field. The fill saves its config in the group."""
    import json

    from cachefill import fill_cache
    from deploy.fill import fill
    from logit_cache import list_groups
    from logit_cache.meta import INFORMATIONAL

    data = synth_dir / "pretrain.json"
    fill(_opts([server.url], data, "pretrain", tmp_path / "served", encoding="q8"))
    fill_cache(tiny_models["tiny-teacher"], data, data.parent / "images", "pretrain", tmp_path / "local", k=K,
               encoding="q8")
    (name, served), = list_groups(tmp_path / "served").items()
    (_, local), = list_groups(tmp_path / "local").items()
    content = [f for f in served.to_dict() if f not in INFORMATIONAL]
    assert {f: getattr(served, f) for f in content} == {f: getattr(local, f) for f in content}
    assert served.value_encoding == "q8" and served.target_kinds == ["text", "visual", "autocorr"]
    saved = json.loads((tmp_path / "served" / name / "fill_config.json").read_text())
    assert saved["config"] == "FillConfig" and saved["servers"] == [server.url] and saved["encoding"] == "q8"


def test_fill_refuses_mismatched_cache_and_bad_k(server, synth_dir, tmp_path):
    from dataclasses import replace

    from deploy.fill import FillError, fill

    opts = _opts([server.url], synth_dir / "pretrain.json", "pretrain", tmp_path / "c")
    fill(opts)
    with pytest.raises(FillError, match="k: expected"):  # same group, another k: the metadata refuses it
        fill(replace(opts, k=K + 1))
    with pytest.raises(FillError, match="out of range"):
        fill(replace(opts, k=10 ** 6))


def test_two_servers_one_fill(server, tiny_models, synth_dir, tmp_path):
    from deploy.fill import fill

    data = synth_dir / "pretrain.json"
    with ServerProc(tiny_models["tiny-teacher"], tmp_path, name="second") as second:
        stats = fill(_opts([server.url, second.url], data, "pretrain", tmp_path / "cache", batch_samples=2))
    _, _, ds = _prepared(tiny_models, data, "pretrain")
    assert all(stats.per_server.get(u, 0) > 0 for u in (server.url, second.url)), stats.per_server
    assert sum(stats.per_server.values()) == len(ds.samples)
    rep = _verify(tmp_path / "cache")
    assert rep["samples"] == rep["unique_keys"] == len({s.key for s in ds.samples}) and rep["duplicates"] == 0


def test_sigkill_server_mid_fill_then_resume(server, tiny_models, tmp_path):
    import threading

    from ckd_common.synth import synthesize
    from logit_cache.cli import main as cache_cli
    from deploy.fill import FillError, fill

    synthesize(tmp_path / "big", seed=1, n_pretrain=0, n_instruct=48, n_eval=0)
    data = tmp_path / "big" / "instruct.json"
    # one sample per request and one request at a time: the same batches in every run, so the
    # interrupted+resumed cache must be bit-identical to the uninterrupted one
    same_batches = dict(batch_samples=1, concurrency=1, segment_rows=2)
    root = tmp_path / "cache"
    victim = ServerProc(tiny_models["tiny-teacher"], tmp_path, name="victim").start()
    try:
        failure: list[BaseException] = []

        def run() -> None:
            try:
                fill(_opts([victim.url], data, "qwen2_base", root, retries=2, **same_batches))
            except BaseException as e:  # noqa: BLE001 - inspected below
                failure.append(e)

        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 120
        while len(list(root.glob("*/manifests/*.json"))) < 2:
            assert t.is_alive() and time.monotonic() < deadline, failure
            time.sleep(0.005)
        victim.kill()
        t.join(120)
        assert len(failure) == 1 and isinstance(failure[0], FillError) and "giving up" in str(failure[0])
        partial = len(_read_all(root))
        victim.start()  # restarted (on a new port); re-run the same fill through the CLI
        rc = cache_cli(["-q", "fill", "--server", victim.url, "--data", str(data), "--images",
                        str(data.parent / "images"), "--template", "qwen2_base", "--k", str(K), "--out", str(root),
                        "--batch-samples", "1", "--concurrency", "1", "--segment-rows", "2"])
        assert rc == 0
    finally:
        victim.kill()
    fill(_opts([server.url], data, "qwen2_base", tmp_path / "ref", **same_batches))
    resumed, ref = _read_all(root), _read_all(tmp_path / "ref")
    assert 0 < partial < len(ref)
    assert set(resumed) == set(ref)
    for key, r in ref.items():
        g = resumed[key]
        for a, b in ((g.text, r.text), (g.visual, r.visual)):
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_array_equal(a.ids, b.ids)
                np.testing.assert_array_equal(a.logprobs, b.logprobs)
                np.testing.assert_array_equal(a.tail, b.tail)
        if r.autocorr is not None:
            np.testing.assert_array_equal(g.autocorr, r.autocorr)
    assert _verify(root)["duplicates"] == 0


def test_ctrl_c_stops_cleanly_and_keeps_committed(server, tmp_path):
    import signal
    import subprocess
    import sys

    from ckd_common.synth import synthesize
    from deploy.fill import fill

    synthesize(tmp_path / "d", seed=2, n_pretrain=40, n_instruct=0, n_eval=0)
    data = tmp_path / "d" / "pretrain.json"
    root = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "logit_cache", "-q", "fill", "--server", server.url, "--data",
                             str(data), "--images", str(data.parent / "images"), "--template", "pretrain",
                             "--k", str(K),
                             "--out", str(root), "--batch-samples", "1", "--concurrency", "1", "--segment-rows", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(root.glob("*/manifests/*.json"))) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err and "Traceback" not in err
    kept = _verify(root)
    assert kept["ok"] and kept["samples"] >= 4 and kept["uncommitted_segments"] == []
    stats = fill(_opts([server.url], data, "pretrain", root))
    assert stats.already_committed == kept["samples"] and stats.written == stats.samples - kept["samples"]


def test_fill_through_a_null_engine_server(tiny_models, synth_dir, tmp_path):
    """``--engine null`` behind the real server and fill, several writer threads: the cache holds
    exactly the synthetic targets the engine serves and says so in its teacher fingerprint."""
    from types import SimpleNamespace

    from ckd_common.teacher import TeacherInput
    from deploy.fill import fill
    from logit_cache import list_groups
    from teacher_server.engines.null import NullEngine

    data = synth_dir / "pretrain.json"
    with ServerProc(tiny_models["tiny-teacher"], tmp_path, "--engine", "null", name="null") as s:
        stats = fill(_opts([s.url], data, "pretrain", tmp_path / "cache", writers=3, segment_rows=5, batch_samples=3))
    _, info, ds = _prepared(tiny_models, data, "pretrain")
    assert stats.written == len({x.key for x in ds.samples}) and len(stats.segments) >= 3
    (meta,) = list_groups(tmp_path / "cache").values()
    assert meta.teacher_fingerprint.startswith("null-")
    engine = NullEngine(SimpleNamespace(model_dir=str(tiny_models["tiny-teacher"]), max_k=256))
    engine.load()
    cached = _read_all(tmp_path / "cache")
    for x in ds.samples:
        want = engine.sample_targets(TeacherInput(x.key, x.input_ids, x.response_positions, x.visual_start,
                                                  x.num_visual), K, info.common_vocab)
        assert_targets_close(cached[x.key], want)
    rep = _verify(tmp_path / "cache")
    assert rep["ok"] and rep["duplicates"] == 0
