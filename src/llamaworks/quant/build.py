"""Compiling the native libraries once per machine and caching them (no torch import here).

Both libraries are built with the system C++ compiler for a CPU target, by default `-march=native` (the SIMD
paths of _kernels_core.h are chosen at compile time: AVX-512, AVX2, NEON or the scalar reference), into
~/.cache/llamaworks/kernels (LLAMAWORKS_CACHE overrides the root), under a name that hashes their sources, the
target and, for "native", the CPU's feature flags; every later process just loads the file. Another target
(`x86-64-v3`: AVX2 + FMA + F16C, `x86-64-v2`: no AVX, `armv8.2-a+dotprod`, ...) builds the torch-free library as
a machine of that kind would run it: `llamaworks bench --cpu-target x86-64-v3` measures the AVX2 kernels on an
AVX-512 machine. A build writes to a temporary file and renames it, so concurrent processes see either nothing or
the whole library.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path

try:  # the built-in module: importing hashlib maps all of OpenSSL's libcrypto for this one digest
    from _blake2 import blake2b
except ImportError:  # an interpreter without it
    from hashlib import blake2b

# -ffp-contract=off: dequantization must round d*q and +m separately, exactly like ggml's reference.
BASE_FLAGS = ("-O3", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC")
TARGET_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}")


def target_flags(target: str = "native") -> list[str]:
    """The compiler flags that select a CPU target: "native" (this machine) or a `-march` value."""
    if not TARGET_PATTERN.fullmatch(target):
        raise ValueError(f"CPU target {target!r}: expected 'native' or a -march value such as x86-64-v3")
    return [f"-march={target}"]


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


def library_path(stem: str, sources: Sequence[Path], extra_key: str = "", cpu_target: str = "native") -> Path:
    """Where the library built from `sources` for `cpu_target` lives in the cache (it may not exist yet)."""
    machine = cpu_signature() if cpu_target == "native" else cpu_target
    digest = blake2b(b"\0".join([*(p.read_bytes() for p in sources), extra_key.encode(), machine.encode()]),
                     digest_size=8).hexdigest()
    name = stem if cpu_target == "native" else f"{stem}_{cpu_target.replace('+', '_')}"
    return cache_dir() / "kernels" / f"{name}_{digest}.so"


class CompileError(OSError):
    """The compiler failed on a native library; `stderr` is its output."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


def compile_library(source: Path, target: Path, flags: Sequence[str] = (), libs: Sequence[str] = (),
                    cpu_target: str = "native") -> None:
    """c++ BASE_FLAGS -march=cpu_target flags source -o target libs, atomically; raises CompileError with the
    compiler's output on failure."""
    import subprocess  # here, not at the top: a process that loads an already built library never needs these
    import tempfile

    cxx = os.environ.get("CXX", "c++")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cxx, *BASE_FLAGS, *target_flags(cpu_target), *flags, str(source), "-o", tmp, *libs],
                       check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as e:
        raise CompileError(f"{cxx} failed on {source.name} (exit {e.returncode})", e.stderr or "") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def first_error(e: BaseException) -> str:
    """The compiler's first error line (or the exception's text) for a one-line warning."""
    lines = (getattr(e, "stderr", "") or str(e)).strip().splitlines()
    return next((line for line in lines if "error" in line), lines[-1] if lines else repr(e))
