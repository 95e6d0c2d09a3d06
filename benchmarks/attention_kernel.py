"""The native attention kernel alone (`attend_queries` in quant/_kernels_core.h), microseconds per call.

    python benchmarks/attention_kernel.py [--keys 600] [--queries 1 3 8 24] [--cpu-target native] [--baseline REV]

A call is nq queries sharing one key/value head over --keys float16 keys and values (head size 64), as the backend
makes them: a decoding token's query heads of one group (3 on SmolLM2, 8 on TinyLlama) or a prompt chunk's tokens
times those (24). One thread, the keys hot in cache (the kernel's own cost, not the memory's), the best of 5 batches.
`--baseline REV` builds the same harness on that git revision's kernel header as well and runs the two alternately,
so a kernel change is measured side by side on this CPU.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
from pathlib import Path

from llamaworks.hardware import cpu_description
from llamaworks.quant.build import compile_library

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "src" / "llamaworks" / "quant" / "_kernels_core.h"

HARNESS = r"""
#include "_kernels_core.h"
#include <chrono>
using namespace lwcore;
extern "C" double attend_us(int64_t nq, int64_t n_keys, int64_t D, int64_t calls) {
  std::vector<float> qf(nq * D), kf(n_keys * D), vf(n_keys * D);
  uint32_t state = 12345;
  const auto next = [&] { state = state * 1664525u + 1013904223u; return float(state >> 8) / float(1 << 24) - 0.5f; };
  for (auto& v : qf) v = next();
  for (auto& v : kf) v = next();
  for (auto& v : vf) v = next();
  std::vector<Half> keys(n_keys * D), vals(n_keys * D);
  store_row(keys.data(), kf.data(), n_keys * D);
  store_row(vals.data(), vf.data(), n_keys * D);
  std::vector<const float*> q(nq);
  std::vector<float> out(nq * D), work;
  std::vector<float*> o(nq);
  std::vector<int64_t> first(nq, 0), limit(nq, n_keys);
  for (int64_t i = 0; i < nq; ++i) q[i] = qf.data() + i * D, o[i] = out.data() + i * D;
  double best = 1e30;
  for (int batch = 0; batch < 5; ++batch) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t c = 0; c < calls; ++c)
      attend_queries(nq, q.data(), o.data(), first.data(), limit.data(), keys.data(), vals.data(), D, 0.125f, work);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / calls);
  }
  volatile float sink = out[0];  // the outputs are used
  (void)sink;
  return best * 1e6;
}
"""


def build(header: Path, where: Path, cpu_target: str) -> ctypes.CDLL:
    """The harness compiled against `header` (copied into `where` as _kernels_core.h)."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "_kernels_core.h").write_bytes(header.read_bytes())
    (where / "harness.cpp").write_text(HARNESS)
    compile_library(where / "harness.cpp", where / "harness.so", flags=[f"-I{where}", "-pthread"],
                    cpu_target=cpu_target)
    lib = ctypes.CDLL(str(where / "harness.so"))
    lib.attend_us.restype = ctypes.c_double
    lib.attend_us.argtypes = [ctypes.c_int64] * 4
    return lib


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=600, help="keys (and values) each query attends to")
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 3, 8, 24],
                    help="queries per call to measure (3: a SmolLM2 decoding token; 24: a prompt chunk)")
    ap.add_argument("--head-size", type=int, default=64, help="floats per key, value and query")
    ap.add_argument("--cpu-target", default="native", help="the kernels' build target, e.g. x86-64-v3 (AVX2)")
    ap.add_argument("--baseline", default=None, metavar="REV", help="also measure this git revision's kernel")
    a = ap.parse_args()
    cpu = cpu_description()
    print(f"CPU: {cpu['model']} [{cpu['simd']}]; kernels built for {a.cpu_target}; 1 thread, {a.keys} keys, "
          f"head size {a.head_size}, float16 keys and values")
    with tempfile.TemporaryDirectory() as d:
        libs = {"this tree": build(HEADER, Path(d) / "current", a.cpu_target)}
        if a.baseline:
            rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--end-of-options",
                                  f"{a.baseline}^{{commit}}"], capture_output=True, text=True)
            if rev.returncode != 0:
                raise SystemExit(f"--baseline {a.baseline}: not a commit ({rev.stderr.strip() or 'git failed'})")
            shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev.stdout.strip()}:{HEADER.relative_to(ROOT)}"],
                                   capture_output=True)
            if shown.returncode != 0:
                raise SystemExit(f"--baseline {a.baseline}: {shown.stderr.decode(errors='replace').strip()}")
            (Path(d) / "base.h").write_bytes(shown.stdout)
            libs[a.baseline] = build(Path(d) / "base.h", Path(d) / "baseline", a.cpu_target)
        calls = max(10, 2_000_000 // max(1, a.keys * a.head_size))
        for nq in a.queries:
            times = {name: float("inf") for name in libs}
            for _ in range(3):  # rounds alternate between the builds
                for name, lib in libs.items():
                    times[name] = min(times[name], lib.attend_us(nq, a.keys, a.head_size, calls))
            cells = ", ".join(f"{name} {us:7.2f} us" for name, us in times.items())
            ratio = f"; speed {times[a.baseline] / times['this tree']:.2f}x the baseline's" if a.baseline else ""
            print(f"{nq:3d} queries: {cells}{ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
