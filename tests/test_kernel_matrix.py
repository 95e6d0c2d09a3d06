"""Every SIMD path of the native kernels against the scalar reference, for every common CPU, on one machine.

tests/native/kernel_check.cpp (the core's kernels, checked against `lwcore::ref`) is compiled for each target of
the matrix and run: on x86-64 hosts the scalar build (x86-64-v2: no AVX), AVX2 + FMA + F16C (x86-64-v3) and the
machine's own CPU (AVX-512 where it has it) run natively; the aarch64 builds (NEON without and with dotprod) are
cross-compiled and run under qemu-user (on aarch64 hosts the other way round). `make test` installs the cross
compiler and qemu (Debian: g++-aarch64-linux-gnu / g++-x86-64-linux-gnu, qemu-user). A missing tool fails the
test: nothing in the matrix is skipped because this machine lacks a SIMD feature another build covers. The one
target no machine here can run is AVX-VNNI without AVX-512 (Intel client CPUs): it is compiled (so it builds) and
run where the CPU has it.

Bounds (in the C++ file): bit-exact for float16 conversions, dequantization, activation quantization and the x8
regrouping; float sums within the worst-case bound of float summation in another order. The reference's exact
outputs hash to one digest, which must be the same on every target.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llamaworks.quant.build import cpu_signature

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "native" / "kernel_check.cpp"
CORE = ROOT / "src" / "llamaworks" / "quant"
FLAGS = ["-O2", "-ffp-contract=off", "-std=c++17", "-pthread", "-static", f"-I{CORE}"]
HOST = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}[platform.machine().lower()]
CPU_FLAGS = set(cpu_signature().split(":", 1)[-1].split())

# (id, architecture, -march, what the build's isa line must say, CPU flags needed to run it natively)
TARGETS = [
    ("x86-scalar", "x86_64", "x86-64-v2", "scalar reference", set()),
    ("x86-avx2", "x86_64", "x86-64-v3", "avx2 (int8 dot: maddubs)", {"avx2", "fma", "f16c"}),
    ("x86-avx2-vnni", "x86_64", "x86-64-v3 -mavxvnni", "avx2+vnni", {"avx2", "fma", "f16c", "avx_vnni"}),
    ("x86-avx512", "x86_64", "x86-64-v4 -mavx512vnni", "avx512-vnni", {"avx512f", "avx512bw", "avx512vl",
                                                                          "avx512dq", "avx512_vnni"}),
    ("arm-neon", "aarch64", "armv8-a", "neon (int8 dot: smull)", {"asimd"}),
    ("arm-neon-dotprod", "aarch64", "armv8.2-a+dotprod", "neon+dotprod", {"asimd", "asimddp"}),
]


def _compiler(arch: str) -> str:
    name = "g++" if arch == HOST else {"aarch64": "aarch64-linux-gnu-g++", "x86_64": "x86_64-linux-gnu-g++"}[arch]
    path = shutil.which(name)
    if path is None:
        package = {"aarch64": "g++-aarch64-linux-gnu", "x86_64": "g++-x86-64-linux-gnu"}[arch]
        pytest.fail(f"{name} not found: install Debian's {package} (make test does, as root) to test the {arch} "
                    f"kernels")
    return path


def _runner(arch: str, needs: set[str]) -> list[str] | None:
    """How to run a binary of `arch` here: natively, under qemu-user, or None (nothing here can run it)."""
    if arch == HOST and needs <= CPU_FLAGS:
        return []
    if arch == "x86_64" and needs & {"avx512f", "avx_vnni"}:
        return None  # qemu emulates x86 up to AVX2
    qemu = shutil.which(f"qemu-{arch}") or shutil.which(f"qemu-{arch}-static")
    if qemu is None:
        pytest.fail(f"qemu-{arch} not found: install Debian's qemu-user (make test does, as root) to run the "
                    f"{arch} kernels")
    return [qemu, "-cpu", "max"]


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kernel_matrix")


def _build(target: tuple, build_dir: Path) -> Path:
    name, arch, march, _, _ = target
    binary = build_dir / name
    flags = [f"-march={march.split()[0]}", *march.split()[1:]]
    built = subprocess.run([_compiler(arch), *FLAGS, *flags, str(SOURCE), "-o", str(binary)], capture_output=True,
                           text=True)
    assert built.returncode == 0, f"{name}: the kernels do not compile:\n{built.stderr[-3000:]}"
    return binary


def _run(target: tuple, binary: Path) -> tuple[str, bool]:
    name, arch, _, isa, needs = target
    runner = _runner(arch, needs)
    if runner is None:
        return "", False
    ran = subprocess.run([*runner, str(binary)], capture_output=True, text=True, timeout=300)
    out = ran.stdout
    failures = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert ran.returncode == 0 and not failures, f"{name}:\n" + "\n".join(failures or [out[-2000:], ran.stderr])
    assert isa in out.splitlines()[0], f"{name}: built without the SIMD path it is for: {out.splitlines()[0]}"
    return out, True


@pytest.mark.slow
def test_every_simd_path_equals_the_scalar_reference(build_dir: Path) -> None:
    digests: dict[str, str] = {}
    ran: list[str] = []
    with ThreadPoolExecutor(os.cpu_count() or 1) as builds:
        binaries = list(builds.map(lambda t: _build(t, build_dir), TARGETS))
    for target, binary in zip(TARGETS, binaries):
        out, did_run = _run(target, binary)
        if not did_run:
            continue
        ran.append(target[0])
        assert re.search(r"^\d+ passed, 0 failed$", out, re.M), out[-500:]
        digests[target[0]] = re.search(r"reference-digest (\w+)", out).group(1)
    # Scalar, AVX2 and both NEON builds run on any x86-64 machine with AVX2 (the rest where the CPU has them).
    assert {"x86-scalar", "arm-neon", "arm-neon-dotprod"} <= set(ran) or HOST == "aarch64", ran
    if HOST == "x86_64" and {"avx2", "fma", "f16c"} <= CPU_FLAGS:
        assert "x86-avx2" in ran
    if {"avx512f", "avx512_vnni", "avx512bw", "avx512vl", "avx512dq"} <= CPU_FLAGS:
        assert "x86-avx512" in ran
    assert len(set(digests.values())) == 1, f"the scalar reference differs between targets: {digests}"
