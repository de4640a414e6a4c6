"""The cascade's child processes, and how Ctrl-C / SIGTERM stop them all.

Children (servers, fills, trainer ranks, eval) run in their own sessions, so a terminal's Ctrl-C
reaches only the cascade, which then stops every child itself: SIGTERM to each child's process
group, SIGKILL after a grace period. A child also dies if the cascade dies (PR_SET_PDEATHSIG), so
none outlives the command, even after ``kill -9``.

Why the signal handling is explicit (issue 11): a process started with SIGINT *ignored* — any
background job of a non-interactive shell (``make test &``, CI runners, ``sh -c '... &'``) — keeps
it ignored, and Python then installs no KeyboardInterrupt handler. Relying on Python's default, a
``kill -INT`` of such a cascade was silently dropped and it ran to the end, exiting 0.
:meth:`Children.stop_on_signals` installs handlers for SIGINT and SIGTERM whatever the inherited
disposition. A signal that arrives while a child is being started is held until the child is
registered (else Popen's own frame could lose the child, which then escapes :meth:`Children.stop`),
and once stopping has begun no new child starts, from any thread.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1
try:  # loaded once here: the child between fork and exec must not dlopen (another thread may hold the lock)
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not glibc
    _LIBC = None


class CascadeError(RuntimeError):
    """A step of the cascade failed (the message names it and where its log is)."""


class Stopped(CascadeError):
    """The cascade is stopping: no new child is started."""


def _child_setup(parent: int):
    def setup() -> None:  # runs in the child, between fork and exec
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the cascade died before prctl took effect: nobody would signal us
            os._exit(1)
        for sig in STOP_SIGNALS:  # children start with default dispositions, whatever the cascade inherited
            signal.signal(sig, signal.SIG_DFL)

    return setup


class Children:
    """Every child process this command started; :meth:`stop` ends them all."""

    def __init__(self):
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self._holding = 0              # main thread only: > 0 while signals are held (a child is starting)
        self._held: int | None = None  # a signal that arrived meanwhile
        self.stop_signal: int | None = None  # the signal that asked the command to stop, if any

    # -- signals -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        """While active, SIGINT and SIGTERM raise KeyboardInterrupt in the main thread (which then
        stops the children), whatever disposition the process inherited. A no-op off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame) -> None:  # Python runs it in the main thread
        self.stop_signal = signum
        if self._holding:
            self._held = signum
            return
        self._held = None
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def _signals_held(self) -> Iterator[None]:
        """A stop signal arriving inside is raised when the block ends (main thread; elsewhere a no-op)."""
        main = threading.current_thread() is threading.main_thread()
        if main:
            self._holding += 1
        try:
            yield
        finally:
            if main:
                self._holding -= 1
                if not self._holding and self._held is not None:
                    self._held = None
                    raise KeyboardInterrupt  # the user asked to stop: that wins over an error of the block

    # -- children ------------------------------------------------------------------------------

    def popen(self, cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        """Start ``cmd`` in its own session, output appended to ``log``; registered before any stop
        signal can interrupt, so :meth:`stop` always reaches it."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with self._signals_held(), self._lock:
            if self._stopping:
                raise Stopped(f"not starting {' '.join(cmd[:3])}: the cascade is stopping")
            with open(log, "ab") as f:
                f.write(f"\n$ {' '.join(cmd)}\n".encode())
                f.flush()
                p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})}, start_new_session=True,
                                     preexec_fn=_child_setup(os.getpid()))
            self._procs.add(p)
        return p

    def forget(self, p: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(p)

    def run(self, cmd: list[str], log: Path, env: dict | None = None, what: str = "") -> None:
        """Run ``cmd`` to completion; a non-zero exit is a CascadeError quoting the end of its log."""
        p = self.popen(cmd, log, env)
        rc = p.wait()  # interrupted, the child stays registered: stop() must still end it
        self.forget(p)
        if rc != 0:
            if self._stopping:
                raise Stopped(f"{what or cmd[2]} was stopped")
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise CascadeError(f"{what or cmd[2]} failed (exit {rc}); last lines of {log}:\n    " + "\n    ".join(tail))

    def running(self) -> list[subprocess.Popen]:
        with self._lock:
            return [p for p in self._procs if p.poll() is None]

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` has begun: no new child starts."""
        return self._stopping

    def stop(self, grace: float = 10.0) -> None:
        """Stop every child (SIGTERM to its process group, SIGKILL after ``grace`` s) and start no new one."""
        with self._signals_held():
            with self._lock:
                self._stopping = True
                procs = list(self._procs)
            for p in procs:
                if p.poll() is None:
                    _killpg(p, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for p in procs:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _killpg(p, signal.SIGKILL)
                    p.wait()
                # what the child started (a trainer's loader workers) shares its process group
                while _group_alive(p.pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                _killpg(p, signal.SIGKILL)
            self._held = None  # a second Ctrl-C while stopping: we are stopping already


def side_by_side(children: Children, calls: list[Callable[[], T]], workers: int, name: str = "worker") -> list[T]:
    """Run ``calls`` ``workers`` at a time (threads; each call's processes are its own, registered in
    ``children``) and return their results in order. The first failure (or Ctrl-C in the main thread) stops
    every child, so the other calls fail fast instead of running to the end, and is raised."""
    if workers <= 1:
        return [call() for call in calls]
    pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    futures = [pool.submit(call) for call in calls]
    try:
        # not f.result() in order: a call that fails while an earlier one still runs must stop it now
        cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
        for f in futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                raise f.exception()
        return [f.result() for f in futures]
    except BaseException:
        children.stop()  # no new child starts, the running ones are stopped
        for f in futures:
            f.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - the group holds a process we may not signal
        return True
    return True


def _killpg(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def stop_gracefully(children: Children, procs: list[subprocess.Popen], timeout: float = 30.0) -> None:
    """SIGINT to each process group (a server finishes its in-flight batches), SIGKILL after ``timeout``."""
    for p in procs:
        if p.poll() is None:
            _killpg(p, signal.SIGINT)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            _killpg(p, signal.SIGKILL)
            p.wait()
        children.forget(p)
