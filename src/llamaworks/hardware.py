"""What this machine offers, found without importing torch: the CPU and its SIMD features, physical cores, and
whether a GPU is visible."""

from __future__ import annotations

import os
import platform

# The CPU features the kernels' SIMD paths use (x86 /proc/cpuinfo "flags", aarch64 "Features").
SIMD_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni", "avx2", "fma", "f16c",
              "avx", "sse4_2", "asimd", "asimddp", "fphp", "sve")


def cpu_description() -> dict[str, str]:
    """{"model": the CPU's name, "simd": the SIMD features among SIMD_FLAGS it has}, for every reported figure."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Hardware", "CPU part") and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return {"model": f"{model} ({platform.machine()})", "simd": " ".join(f for f in SIMD_FLAGS if f in flags)}


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topo}/physical_package_id") as f1, open(f"{topo}/core_id") as f2:
                cores.add((f1.read().strip(), f2.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def gpu_visible() -> bool:
    """Whether a CUDA/ROCm device node exists (and CUDA_VISIBLE_DEVICES does not hide it); a cheap check made
    before deciding to import torch, which `--device auto` would then use."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg"))
