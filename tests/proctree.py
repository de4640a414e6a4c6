"""Test helper, not a test: the processes descended from one pid, read from /proc — never by
matching command names, since other users of the machine run the same commands."""
from __future__ import annotations

from pathlib import Path


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of ``pid``, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return rest[0], int(rest[1]), int(rest[19])


def descendants(pid: int) -> dict[int, int]:
    """{pid: start time} of every living process below ``pid`` (children, grandchildren, ...)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None and st[0] != "Z":
            children.setdefault(st[1], []).append((int(d.name), st[2]))
    out, todo = {}, [pid]
    while todo:
        for child, start in children.get(todo.pop(), []):
            out[child] = start
            todo.append(child)
    return out


def alive(procs: dict[int, int]) -> list[int]:
    """Those of ``procs`` ({pid: start time}) still running (the start time tells a reused pid apart)."""
    out = []
    for pid, start in procs.items():
        st = _stat(pid)
        if st is not None and st[2] == start and st[0] != "Z":
            out.append(pid)
    return out
