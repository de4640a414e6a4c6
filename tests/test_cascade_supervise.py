"""The cascade's child processes and signals (deploy.cascade.supervise): Ctrl-C always stops a
cascade and every child it started — also when the command was started with SIGINT ignored (any
background job of a non-interactive shell), also when the signal lands while a child is starting."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from proctree import alive, descendants

from deploy.cascade import supervise
from deploy.cascade.supervise import CascadeError, Children, Stopped, side_by_side

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


@pytest.fixture
def stop_signals_ignored():
    """SIGINT and SIGTERM ignored, as a background job of a non-interactive shell inherits SIGINT: a
    test of the handlers then fails cleanly instead of stopping the test session."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in supervise.STOP_SIGNALS}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def test_stop_signals_interrupt_even_when_the_command_started_with_them_ignored(stop_signals_ignored):
    children = Children()
    for sig in supervise.STOP_SIGNALS:
        with children.stop_on_signals():
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(sig)
        assert children.stop_signal == sig
        assert signal.getsignal(sig) is signal.SIG_IGN  # the previous disposition is back


@pytest.mark.integration
def test_a_signal_while_a_child_starts_is_raised_once_the_child_is_registered(stop_signals_ignored, tmp_path,
                                                                             monkeypatch):
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def popen_then_ctrl_c(*args, **kw):  # Ctrl-C lands after the fork, inside Popen's own frame
        p = real_popen(*args, **kw)
        started.append(p)
        signal.raise_signal(signal.SIGINT)
        return p

    children = Children()
    monkeypatch.setattr(supervise.subprocess, "Popen", popen_then_ctrl_c)
    try:
        with children.stop_on_signals():
            with pytest.raises(KeyboardInterrupt):
                children.popen(SLEEPER, tmp_path / "child.log")
            monkeypatch.undo()
            children.stop(grace=30)
        assert len(started) == 1 and started[0].returncode == -signal.SIGTERM  # stop() reached it
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_no_child_starts_once_stopping_from_any_thread(tmp_path):
    children = Children()
    children.stop()
    with pytest.raises(Stopped):
        children.popen(SLEEPER, tmp_path / "main.log")
    errors: list[BaseException] = []

    def start() -> None:
        try:
            children.run(SLEEPER, tmp_path / "thread.log")
        except BaseException as e:  # noqa: BLE001 - handed to the test
            errors.append(e)

    t = threading.Thread(target=start)
    t.start()
    t.join(60)
    assert len(errors) == 1 and isinstance(errors[0], Stopped)
    assert children.running() == [] and not (tmp_path / "thread.log").exists()


def test_side_by_side_returns_results_in_order():
    assert side_by_side(Children(), [lambda i=i: i * i for i in range(5)], workers=2) == [0, 1, 4, 9, 16]
    assert side_by_side(Children(), [lambda: "one"], workers=1) == ["one"]


@pytest.mark.integration
def test_side_by_side_a_failure_stops_an_earlier_call_still_running(tmp_path):
    """The later call fails while the first still runs a child: the child is stopped at once (not after its
    600 s) and the failure is what is raised."""
    children = Children()
    first_failed: list[BaseException] = []

    def long_running() -> None:
        try:
            children.run(SLEEPER, tmp_path / "sleeper.log", what="sleeper")
        except BaseException as e:  # noqa: BLE001 - handed to the test
            first_failed.append(e)
            raise

    def failing() -> None:
        while not children.running():  # fail only once the other call's child runs
            time.sleep(0.01)
        raise ValueError("point failed")

    with pytest.raises(ValueError, match="point failed"):
        side_by_side(children, [long_running, failing], workers=2)
    assert children.stopping and children.running() == []
    assert len(first_failed) == 1 and isinstance(first_failed[0], CascadeError)


@pytest.mark.integration
def test_a_child_failure_quotes_its_log(tmp_path):
    with pytest.raises(supervise.CascadeError, match=r"(?s)demo step failed \(exit 3\).*boom"):
        Children().run([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "x.log",
                       what="demo step")


SUPERVISOR = """
import sys
from pathlib import Path
from deploy.cascade.supervise import Children

children = Children()
try:
    with children.stop_on_signals():
        try:
            children.run([sys.executable, "-c", "import sys, time; open(sys.argv[1], 'w').write('up'); time.sleep(600)",
                          sys.argv[1]], Path(sys.argv[2]))
        except BaseException:
            children.stop()
            raise
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_a_supervisor_started_with_sigint_ignored_stops_it_and_its_child(tmp_path, sig):
    ready = tmp_path / "child-up"
    repo = Path(__file__).resolve().parents[1]
    p = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(ready), str(tmp_path / "child.log")],
                         env={**os.environ, "PYTHONPATH": str(repo)}, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), p.communicate(timeout=60)[0]
        child = descendants(p.pid)
        assert len(child) == 1
        os.kill(p.pid, sig)
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 130, out
        assert alive(child) == []
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
