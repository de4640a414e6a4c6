"""Faults around a fill (issue 11 item 10), with real servers (uvicorn), real Zarr and real fill
processes: a full disk, a server that dies between /readyz and the tokenizer download, and two
fills of one group. Each ends in one line that says what happened and what was kept."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_server_support import ServerProc

pytestmark = pytest.mark.integration
K = 8


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    with ServerProc(tiny_models["tiny-teacher"], tmp_path_factory.mktemp("srv"), name="faults") as s:
        yield s


def _argv(url, data, out, *extra) -> list[str]:
    return ["fill", "--server", url, "--data", str(data), "--images", str(data.parent / "images"),
            "--template", "pretrain", "--k", str(K), "--out", str(out), *extra]


def _cli(argv, capsys) -> tuple[int, str]:
    from logit_cache.cli import main

    rc = main(["-q", *argv])
    return rc, capsys.readouterr().err


def _group(root):
    from logit_cache import list_groups, open_group

    (name,) = list_groups(root)
    return open_group(root, name)


def _verify(group) -> dict:
    from logit_cache.maintenance import verify

    return verify(group, progress=False)


def _error_line(err: str, prog: str = "logit_cache fill") -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith(prog + ":")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# disk full


class FullDisk:
    """Every write into the cache fails with ENOSPC once ``after`` segments are committed: chunk
    files (zarr's LocalStore) and manifests alike, as on a real full disk."""

    def __init__(self, monkeypatch, after: int) -> None:
        import zarr.storage._local as local

        from logit_cache.store import Storage

        self.after, self.committed, self.failures = after, 0, 0
        real_put, real_write_atomic = local._put, Storage.write_atomic

        def put(path, value, exclusive=False):
            self.check(str(path))
            return real_put(path, value, exclusive)

        def write_atomic(storage, data, *parts):
            self.check("/".join(parts))
            real_write_atomic(storage, data, *parts)
            self.committed += "manifests" in parts

        monkeypatch.setattr(local, "_put", put)
        monkeypatch.setattr(Storage, "write_atomic", write_atomic)

    def check(self, path: str) -> None:
        if self.committed >= self.after:
            self.failures += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def test_disk_full_one_line_nothing_lost_then_resume(server, synth_dir, tmp_path, capsys, monkeypatch):
    data, root = synth_dir / "pretrain.json", tmp_path / "cache"
    small = ["--batch-samples", "2", "--concurrency", "1", "--segment-rows", "2", "--writers", "2"]
    disk = FullDisk(monkeypatch, after=2)
    rc, err = _cli(_argv(server.url, data, root, *small), capsys)
    line = _error_line(err)
    group = _group(root)
    committed = group.num_samples()
    assert rc == 1 and disk.failures > 0
    assert line.startswith(f"logit_cache fill: disk full at {group.url} (No space left on device); "
                           f"{committed} of ") and "free space and re-run" in line, line
    assert 0 < committed < 24 and f"({committed} by this run)" in line
    monkeypatch.undo()  # space freed

    rep = _verify(group)  # what was committed is intact; the failed segment's files are gone
    assert rep["ok"] and rep["samples"] == committed and rep["uncommitted_segments"] == []
    rc, err = _cli(_argv(server.url, data, root, *small), capsys)
    assert rc == 0, err
    rep = _verify(group)
    assert rep["ok"] and rep["samples"] == rep["unique_keys"] == 24 and rep["duplicates"] == 0


def test_disk_full_before_anything_is_written(server, synth_dir, tmp_path, capsys, monkeypatch):
    """The group's own files cannot be written: the same one line, nothing half-made is used."""
    FullDisk(monkeypatch, after=0)
    rc, err = _cli(_argv(server.url, synth_dir / "pretrain.json", tmp_path / "cache"), capsys)
    line = _error_line(err)
    assert rc == 1 and "the disk is full; free space and re-run" in line, line


# ---------------------------------------------------------------------------------------------
# a server that dies between /readyz and the tokenizer download


def test_server_dies_before_tokenizer_download(tiny_models, synth_dir, tmp_path, capsys, monkeypatch):
    import deploy.fill as fill_module

    victim = ServerProc(tiny_models["tiny-teacher"], tmp_path, name="dies").start()
    real_check = fill_module.check_infos

    def check_then_die(*args, **kw):  # /readyz and /v1/info were answered; now it dies
        victim.kill()
        return real_check(*args, **kw)

    monkeypatch.setattr(fill_module, "check_infos", check_then_die)
    try:
        rc, err = _cli(_argv(victim.url, synth_dir / "pretrain.json", tmp_path / "cache"), capsys)
    finally:
        victim.kill()
    line = _error_line(err)
    assert rc == 1 and f"server {victim.url} stopped answering while its tokenizer was downloaded" in line, line
    assert not (tmp_path / "cache").exists()  # nothing was created


# ---------------------------------------------------------------------------------------------
# two fills of one group


def _fill_proc(url, data, root, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "logit_cache", "-q", *_argv(url, data, root, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_manifests(root, proc, n: int = 1) -> None:
    deadline = time.monotonic() + 120
    while len(list(root.glob("*/manifests/*.json"))) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture()
def slow_data(tmp_path):
    from ckd_common.synth import synthesize

    synthesize(tmp_path / "d", seed=5, n_pretrain=30, n_instruct=0, n_eval=0)
    return tmp_path / "d" / "pretrain.json"


ONE_BY_ONE = ("--batch-samples", "1", "--concurrency", "1", "--segment-rows", "1", "--writers", "1")


def test_second_fill_of_a_group_is_refused_while_the_first_runs(server, slow_data, tmp_path):
    root = tmp_path / "cache"
    first = _fill_proc(server.url, slow_data, root, *ONE_BY_ONE)
    try:
        _wait_for_manifests(root, first)
        first.send_signal(signal.SIGSTOP)  # alive and holding the lock, however fast the machine
        second = _fill_proc(server.url, slow_data, root, *ONE_BY_ONE)
        out, err = second.communicate(timeout=120)
        line = _error_line(err)
        assert second.returncode == 1, err
        assert f"another fill is writing {_group(root).url}: pid {first.pid}" in line and "fill.lock" in line, line
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert not list(root.glob("*/fill.lock"))  # released
    again = _fill_proc(server.url, slow_data, root)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and "0 written, 30 already committed" in err, err
    rep = _verify(_group(root))
    assert rep["ok"] and rep["samples"] == 30 and rep["duplicates"] == 0


def test_lock_of_a_killed_fill_is_taken_over(server, slow_data, tmp_path):
    root = tmp_path / "cache"
    first = _fill_proc(server.url, slow_data, root, *ONE_BY_ONE)
    _wait_for_manifests(root, first)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    (lock,) = root.glob("*/fill.lock")
    assert json.loads(lock.read_text())["pid"] == first.pid
    second = _fill_proc(server.url, slow_data, root)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    assert f"took over a stale lock of pid {first.pid}" in err and "no longer runs" in err, err
    rep = _verify(_group(root))
    assert rep["ok"] and rep["samples"] == rep["unique_keys"] == 30 and rep["duplicates"] == 0


def test_an_image_gone_since_preparation_stops_the_fill_with_one_line(server, tmp_path, capsys, monkeypatch):
    import deploy.fill_pipeline as pipeline
    from ckd_common.synth import synthesize

    synthesize(tmp_path / "d", seed=6, n_pretrain=6, n_instruct=0, n_eval=0)
    data = tmp_path / "d" / "pretrain.json"
    real_encode = pipeline.encode_chunk

    def encode_after_deletion(chunk, *args):  # the data was prepared; now the files go away
        for s in chunk.samples:
            if s.image_path:
                Path(s.image_path).unlink(missing_ok=True)
        return real_encode(chunk, *args)

    monkeypatch.setattr(pipeline, "encode_chunk", encode_after_deletion)
    rc, err = _cli(_argv(server.url, data, tmp_path / "cache", "--batch-samples", "2"), capsys)
    line = _error_line(err)
    assert rc == 1 and "a request failed: FileNotFoundError" in line and "re-run the same command" in line, line
