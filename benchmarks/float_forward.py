"""The native backend's forward with float32 activations (what `llamaworks eval` runs), one call at a time.

    python benchmarks/float_forward.py [--model GGUF] [--threads 1] [--repeats 10] [--cpu-target native|x86-64-v3]

Each case is a forward call of m tokens (in one row, or spread over 4 rows) with logits for L of them, timed with
the calling thread's CPU time (`time.thread_time`; with --threads 1 the kernels run on that thread only), the best
of --repeats: a figure that other processes on the machine change little. Printed: ms per call and tokens/s, with
the CPU and the kernels' SIMD paths.
"""

from __future__ import annotations

import argparse
import time

from llamaworks.api import load_backend
from llamaworks.engine.backend import EngineOptions
from llamaworks.hardware import cpu_description

CASES = [(24, 1, 1), (24, 24, 1), (32, 0, 1), (96, 4, 4), (128, 80, 4)]  # tokens, logits, rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=1, help="1 (default): thread CPU time is the call's whole cost")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--cpu-target", default="native", help="the kernels' build target, e.g. x86-64-v3 (AVX2)")
    a = ap.parse_args()
    options = EngineOptions(cpu_target=a.cpu_target, max_rows=4, kv_dtype="float32", int8_activations=False,
                            bf16_prefill=False, threads=a.threads)
    backend = load_backend(a.model, backend="native", options=options, reference=False)
    cpu = cpu_description()
    print(f"CPU: {cpu['model']} [{cpu['simd']}]; kernels: {backend.describe()['kernel_isa']}; "
          f"{a.threads} thread(s)")
    for m, n_logits, rows in CASES:
        tokens = [(17 * i + 5) % backend.config.vocab_size for i in range(m)]
        best = float("inf")
        for _ in range(a.repeats):
            t = time.thread_time()
            backend.forward([i % rows for i in range(m)], tokens, [i // rows for i in range(m)],
                            range(m - n_logits, m))
            best = min(best, time.thread_time() - t)
        print(f"{m:4d} tokens in {rows} row(s), {n_logits:3d} logits: {best * 1e3:7.1f} ms = {m / best:6.0f} tok/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
