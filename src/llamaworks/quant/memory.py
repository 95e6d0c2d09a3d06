"""Where quantized weights live in memory: the file's own page-cache mapping, or a huge-page buffer.

Decode streams every weight once per token, so it runs at memory bandwidth. Mapped file pages are 4 KiB,
and hardware prefetchers stop at every 4 KiB boundary and each page costs a TLB entry: on this project's
machine the 1.1B model decodes 31 tok/s from the mapping and 38 tok/s from 2 MiB transparent huge pages.
So by default (Linux with THP not set to "never") the block tensors are read from the file into one anonymous
buffer advised MADV_HUGEPAGE. The file's pages are never mapped into the process, so resident memory holds
one copy either way. `mmap=True` (CLI `--mmap`) keeps the mapping: it lets the kernel evict weights under
memory pressure, at the cost of speed.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_ALIGN = 64  # each tensor starts on a cache line
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """Transparent huge pages can back an madvise'd anonymous buffer (Linux, THP "always" or "madvise")."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in _THP_SETTING.read_text()
    except OSError:
        return False


def read_into_huge_pages(path: str | os.PathLike[str], spans: Sequence[tuple[int, int]], *,
                         huge: bool = True) -> list[np.ndarray]:
    """Read the byte ranges (offset, nbytes) of `path` into one huge-page-advised buffer; one uint8 array each.

    The buffer is an anonymous private mapping (freed when the last array referring to it goes). huge=False:
    the same without the advice (where transparent huge pages are off).
    """
    starts, total = [], 0
    for _, nbytes in spans:
        starts.append(total)
        total += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
    buffer = mmap.mmap(-1, max(total, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        buffer.madvise(mmap.MADV_HUGEPAGE)  # before the first touch, so faults allocate 2 MiB pages
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        for (offset, nbytes), start in zip(spans, starts):
            f.seek(offset)
            done = 0
            while done < nbytes:
                got = f.readinto(view[start + done:start + nbytes])
                if not got:
                    raise EOFError(f"{path}: file ended while reading {nbytes} bytes at offset {offset}")
                done += got
    whole = np.frombuffer(buffer, dtype=np.uint8)  # keeps `buffer` alive
    return [whole[start:start + nbytes] for (_, nbytes), start in zip(spans, starts)]


def lazy_zeros_buffer(nbytes: int) -> mmap.mmap:
    """nbytes of fresh anonymous memory: the OS supplies zero pages on first write, so a KV cache costs resident
    memory only for the positions used. Not numpy's allocator: numpy advises huge pages for large arrays, and
    then every first write commits a whole 2 MiB page (SmolLM2's 8192-position cache: +160 MiB for a short chat)."""
    return mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


_MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21)  # Linux >= 5.4
TORCH_LIBRARIES = os.sep + os.path.join("torch", "lib") + os.sep  # libtorch_cpu, libtorch_python, libc10


def page_out_library_code(path_part: str = TORCH_LIBRARIES) -> int:
    """Ask the kernel to reclaim, now, the pages of the read-only file mappings whose path contains `path_part`
    (torch's libraries by default: libtorch_cpu, libtorch_python, libc10); returns the bytes of mappings advised.

    `import torch` touches about 57 MiB of libtorch's code and read-only data, nearly all of it one-time
    initialisation (operator registration) that never runs again, and resident memory counts every page.
    Clean file pages are dropped, not swapped, and the ones inference does use come back on first use (from the
    page cache while the file is cached there, else from disk: the kernel may drop them from the cache too).
    Copy-on-write pages of a read-only mapping (a library's relocated data) go to swap where there is swap;
    writable mappings are never touched; a page another process also maps stays. A no-op where madvise or
    MADV_PAGEOUT is missing (non-Linux, kernels before 5.4).
    """
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        maps = Path("/proc/self/maps").read_text().splitlines()
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or path_part not in fields[5] or "w" in fields[1]:
            continue
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if madvise(lo, hi - lo, _MADV_PAGEOUT) == 0:
            advised += hi - lo
    return advised


SHARED_LIBRARIES = ".so"  # every shared library: libpython, numpy's, tokenizers', the C++ runtime, ours
_released_lock = threading.Lock()
_released = False  # a model was loaded in this process (a fork's child inherits the flag with the mappings)


def release_startup_pages(path_part: str) -> bool:
    """page_out_library_code(path_part) at the first model load of the process; at any later load nothing (it
    would push out the code a running model uses). Returns whether this was the first load.

    Both backends call it before the weights arrive, so that the load's peak does not hold them either. The torch
    backend passes TORCH_LIBRARIES; the native backend SHARED_LIBRARIES: in its process the start-up pages of the
    interpreter, numpy, `tokenizers` and the C++ runtime would otherwise stay resident for good. When this returns
    True the native backend pages them out once more at the end of that load (the code that converted and
    regrouped the weights runs once). Data files mapped in the process (an mmap'd model, training data) are not
    libraries and stay."""
    global _released
    with _released_lock:
        if _released:
            return False
        _released = True
    page_out_library_code(path_part)
    return True


def release_freed_memory() -> None:
    """Hand memory that Python and the C heap have freed back to the OS (a collection, then trim_heap), so a load's
    temporary objects do not stay in the resident size."""
    import gc

    gc.collect()
    trim_heap()


LONG_CALL_TOKENS = 64  # a forward call of this many tokens or more trims the heap after it (both backends)


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim; a no-op where the C library has none): a
    long forward call's activations are freed into the heap, which would keep them resident."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
