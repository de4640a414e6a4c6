"""Process memory from /proc, shared by the bench scripts (Linux only).

Peak RSS is read as VmHWM after resetting it through /proc/self/clear_refs ("5"), so one process can
measure several phases; where the reset is refused, callers fall back to getrusage's lifetime peak."""
from __future__ import annotations


def status_kib(field: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM, ...) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
