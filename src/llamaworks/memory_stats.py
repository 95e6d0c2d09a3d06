"""Resident memory of this process, for bench figures and training metrics.

The peak is the kernel's high-water mark of this process's own address space (VmHWM on Linux). getrusage's
ru_maxrss is not used there: it survives exec, so a process spawned by a large parent (vfork + exec, as
Python's subprocess does) reports at least the parent's size. Elsewhere (macOS) ru_maxrss is all there is.
"""

from __future__ import annotations

import os
import sys


def _status_kib(field: str, pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process in bytes; None where it cannot be read."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def current_rss_bytes() -> int | None:
    """Resident memory of this process now, in bytes; None where it cannot be read."""
    rss = _status_kib("VmRSS")
    if rss is not None:
        return rss * 1024
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def process_rss_bytes(pid: int) -> int | None:
    """Resident memory of another process now (a server under test), in bytes; None where it cannot be read."""
    rss = _status_kib("VmRSS", pid)
    return None if rss is None else rss * 1024
