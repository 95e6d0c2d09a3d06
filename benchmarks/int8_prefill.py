"""The native backend's prompt and decode speed with int8 activations (the default), one call at a time.

    python benchmarks/int8_prefill.py [--model GGUF] [--tokens 128 512] [--repeats 3] [--cpu-target native|x86-64-v3]

A prompt of m tokens in one row (logits for its last token only) and 20 single-token decode steps, on one thread,
each timed with the calling thread's CPU time (`time.thread_time`), the best of --repeats (decode: of 20): a figure
that other processes on a shared machine change little, unlike wall time with 2 threads. Printed: ms per call and
tokens/s, with the CPU and the kernels' SIMD paths.
"""

from __future__ import annotations

import argparse
import time

from llamaworks.api import load_backend
from llamaworks.engine.backend import EngineOptions
from llamaworks.hardware import cpu_description


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 512], help="prompt lengths")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu-target", default="native", help="the kernels' build target, e.g. x86-64-v3 (AVX2)")
    a = ap.parse_args()
    options = EngineOptions(cpu_target=a.cpu_target, max_rows=1, threads=1, max_context=max(a.tokens) + 32)
    backend = load_backend(a.model, backend="native", options=options, reference=False)
    cpu = cpu_description()
    print(f"CPU: {cpu['model']} [{cpu['simd']}]; kernels: {backend.describe()['kernel_isa']}; 1 thread")
    vocab = backend.config.vocab_size
    for m in a.tokens:
        best = float("inf")
        for r in range(a.repeats):
            tokens = [(17 * i + 5 + r) % vocab for i in range(m)]
            t = time.thread_time()
            backend.forward([0] * m, tokens, range(m), [m - 1])
            best = min(best, time.thread_time() - t)
        print(f"prompt {m:4d} tokens: {best * 1e3:8.1f} ms = {m / best:6.1f} tok/s")
    best = float("inf")
    for r in range(20):
        t = time.thread_time()
        backend.forward([0], [(17 * r + 5) % vocab], [64 + r], [0])
        best = min(best, time.thread_time() - t)
    print(f"decode, 1 token:    {best * 1e3:8.2f} ms = {1 / best:6.1f} tok/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
