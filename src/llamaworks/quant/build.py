"""Compiling the native libraries once per machine and caching them (no torch import here).

Both libraries are built with the system C++ compiler and `-march=native` into ~/.cache/llamaworks/kernels
(LLAMAWORKS_CACHE overrides the root), under a name that hashes their sources, the compiler flags' inputs and
the CPU's feature flags; every later process just loads the file. A build writes to a temporary file and renames
it, so concurrent processes see either nothing or the whole library.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

# -ffp-contract=off: dequantization must round d*q and +m separately, exactly like ggml's reference.
BASE_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC")


def cache_dir() -> Path:
    root = os.environ.get("LLAMAWORKS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llamaworks")
    return Path(root)


def cpu_signature() -> str:
    """The CPU's feature flags: the libraries are built for this machine (-march=native)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_path(stem: str, sources: Sequence[Path], extra_key: str = "") -> Path:
    """Where the library built from `sources` for this CPU lives in the cache (it may not exist yet)."""
    digest = hashlib.sha256(b"\0".join([*(p.read_bytes() for p in sources), extra_key.encode(),
                                        cpu_signature().encode()])).hexdigest()[:16]
    return cache_dir() / "kernels" / f"{stem}_{digest}.so"


def compile_library(source: Path, target: Path, flags: Sequence[str] = (), libs: Sequence[str] = ()) -> None:
    """c++ BASE_FLAGS flags source -o target libs, atomically; raises CalledProcessError with the compiler's
    output on failure."""
    cxx = os.environ.get("CXX", "c++")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cxx, *BASE_FLAGS, *flags, str(source), "-o", tmp, *libs], check=True, capture_output=True,
                       text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def first_error(e: BaseException) -> str:
    """The compiler's first error line (or the exception's text) for a one-line warning."""
    lines = (getattr(e, "stderr", "") or str(e)).strip().splitlines()
    return next((line for line in lines if "error" in line), lines[-1] if lines else repr(e))
