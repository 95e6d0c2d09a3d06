"""A broken native build must not pass silently.

Without the native kernels the torch runtime falls back to plain torch ops and `--runtime auto` to the torch
runtime, both correct and slower; tests that take their expectation from `native_available()` would then pass on
the fallback. So on a machine with a C++ compiler, the kernels building is itself a test (issue: a build failure
must fail the suite), and a failed build reports the compiler's error instead of only a log line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from llamaworks.quant import kernels, lean_kernels

CXX = os.environ.get("CXX", "c++")


@pytest.mark.skipif(shutil.which(CXX) is None, reason="no C++ compiler: the torch fallback is the design here")
def test_native_libraries_build_where_a_compiler_exists() -> None:
    assert kernels.native_available(), f"the torch kernels did not build: {kernels.native_failure()}"
    assert kernels.native_failure() is None
    lean_kernels.library()  # raises LeanUnavailable with the compiler's first error
    assert lean_kernels.isa() and kernels.isa() == lean_kernels.isa()  # one kernel source, one target


def test_a_failed_build_says_why(tmp_path) -> None:
    """A compiler that fails: both libraries report the failure (one line naming it), nothing is cached."""
    code = ("from llamaworks.quant import kernels, lean_kernels\n"
            "print('torch:', kernels.native_available(), kernels.native_failure())\n"
            "try:\n    lean_kernels.library()\nexcept lean_kernels.LeanUnavailable as e:\n    print('lean:', e)\n")
    fake = tmp_path / "broken-c++"
    fake.write_text("#!/bin/sh\necho 'broken-c++: error: no such compiler feature' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {**os.environ, "CXX": str(fake), "LLAMAWORKS_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert "torch: False broken-c++: error: no such compiler feature" in out
    assert "lean: the torch-free native library for native could not be built or loaded: broken-c++: error" in out
    assert not list((tmp_path / "cache").rglob("*.so"))
