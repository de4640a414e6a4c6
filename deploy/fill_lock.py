"""One fill per cache group at a time: an advisory lock file ``<group>/fill.lock``.

Two fills of the same (dataset, template) into one root would each send every missing sample to
the teachers and store it twice (readers keep the first copy: nothing breaks, the work is done
twice). So a fill takes the group's lock before it reads what is committed, and refuses to start
while another fill holds it, naming that fill (host, pid, since when). The lock is advisory: only
fills take it; readers, ``verify``, ``compact`` and ``gc`` ignore it (logit_cache FORMAT.md §4).

The file holds ``{"host", "pid", "proc_start", "started_utc", "heartbeat_utc", "token"}``; the
holder rewrites it every ``HEARTBEAT_S`` seconds. A lock is stale, and is taken over with a note,
when its holder is gone: on this host, when no process has its pid and start time; on another
host (a shared filesystem or object store), when its heartbeat is older than ``STALE_AFTER_S``.
Locally the lock is created by link(2) (fails if it exists) and a stale one is moved aside by rename, so two fills
starting together cannot both win; on object stores (no create-if-absent in fsspec) it is a
best-effort check.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = "fill.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


class GroupLocked(RuntimeError):
    """Another live fill holds the group's lock; the message names it and what to do."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def holder_gone(holder: dict, now: float | None = None) -> str | None:
    """Why the lock's holder is gone (stale lock), or None while it may still be writing."""
    host, pid = holder.get("host"), holder.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):
        if not _pid_alive(pid):
            return f"process {pid} no longer runs"
        start = _proc_start(pid)
        if holder.get("proc_start") and start and start != holder["proc_start"]:
            return f"pid {pid} now belongs to another process"
        return None
    try:
        beat = datetime.fromisoformat(holder["heartbeat_utc"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return "the lock file names no heartbeat"
    age = (time.time() if now is None else now) - beat
    return f"no heartbeat for {age:.0f}s (> {STALE_AFTER_S:.0f}s)" if age > STALE_AFTER_S else None


class FillLock:
    """``with FillLock(group): ...`` — or acquire()/release(). ``note`` says whether a stale lock
    was taken over."""

    def __init__(self, group) -> None:
        self.group, self.st = group, group.storage
        self.where = f"{group.url}/{LOCK_FILE}"
        self.note = ""
        self._record = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
                        "started_utc": _now(), "heartbeat_utc": _now(), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the file -------------------------------------------------------------------------------------
    def _path(self) -> str:
        return self.st.fpath(self.group.name, LOCK_FILE)

    def _read(self) -> dict | None:
        try:
            return json.loads(self.st.read_bytes(self.group.name, LOCK_FILE))
        except FileNotFoundError:
            return None
        except ValueError:  # torn or foreign content: treat as a lock without a heartbeat
            return {}

    def _create(self) -> bool:
        """Create the lock file if absent; False when another one exists."""
        data = json.dumps(self._record, indent=1).encode()
        if not self.st.local:
            if self.st.exists(self.group.name, LOCK_FILE):
                return False
            self.st.write_atomic(data, self.group.name, LOCK_FILE)
            return True
        tmp = f"{self._path()}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, self._path())  # create-if-absent with the whole content at once
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def _move_aside(self) -> None:
        """Remove a stale lock so that exactly one taker wins the following create."""
        if not self.st.local:
            self.st.rm(self.group.name, LOCK_FILE)
            return
        aside = f"{self._path()}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self._path(), aside)  # atomic: of two takers, only one moves it
        except FileNotFoundError:
            return
        os.unlink(aside)

    # -- acquire / release --------------------------------------------------------------------------
    def acquire(self) -> "FillLock":
        for _ in range(3):  # create, or move a stale lock aside and create; a racing taker may win
            if self._create():
                self._start_heartbeat()
                return self
            holder = self._read()
            if holder is None:
                continue  # released meanwhile
            gone = holder_gone(holder)
            if gone is None:
                raise GroupLocked(
                    f"another fill is writing {self.group.url}: pid {holder.get('pid')} on {holder.get('host')}, "
                    f"started {holder.get('started_utc')} (last heartbeat {holder.get('heartbeat_utc')}); two fills "
                    f"of one group would do all the work twice. Wait for it to finish (then re-run to fill what is "
                    f"missing); if it is gone, remove {self.where}")
            self.note = (f"took over a stale lock of pid {holder.get('pid')} on {holder.get('host')} "
                         f"(started {holder.get('started_utc')}): {gone}")
            self._move_aside()
        raise GroupLocked(f"could not take the fill lock {self.where}: other fills keep taking it")

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                self._record["heartbeat_utc"] = _now()
                try:
                    if (self._read() or {}).get("token") == self._record["token"]:
                        self.st.write_atomic(json.dumps(self._record, indent=1).encode(), self.group.name, LOCK_FILE)
                except OSError:
                    pass  # e.g. a full disk: the fill itself reports it
        self._thread = threading.Thread(target=beat, name="fill-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            if (self._read() or {}).get("token") == self._record["token"]:
                self.st.rm(self.group.name, LOCK_FILE)
        except OSError:
            pass  # a lock left behind names a dead pid: the next fill takes it over

    def __enter__(self) -> "FillLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
