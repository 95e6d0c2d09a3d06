"""Decode speed with 1 and N threads while other processes keep the cores busy (oversubscription).

A thread pool that spins while it waits can make N threads far slower than 1 when other processes want the same
cores (each spinning worker takes a time slice the others needed). llamaworks' pool hands out tasks to whoever is
running and yields the core while it spins, so N threads should never lose to 1. This script measures it: for
each number of busy processes (pure-Python loops, one per core by default), `llamaworks bench` runs once per
thread count, in alternation, and the medians are printed with the CPU.

    python benchmarks/busy_cores.py [--model M] [--busy 0,2] [--threads 1,2] [--runs 3] [--cpu-target native]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time


def _spin(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def _bench(a: argparse.Namespace, threads: int) -> dict:
    cmd = [sys.executable, "-m", "llamaworks", "bench", "--json", "--runs", "1", "--threads", str(threads),
           "--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens), "--ctx",
           str(a.prompt_tokens + a.gen_tokens), "--cpu-target", a.cpu_target, "--backend", "native"]
    if a.model:
        cmd += ["--model", a.model]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--busy", default=f"0,{os.cpu_count()}", help="numbers of busy processes to measure under")
    p.add_argument("--threads", default=f"1,{os.cpu_count()}")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--cpu-target", default="native")
    a = p.parse_args()
    from llamaworks.hardware import cpu_description

    cpu = cpu_description()
    print(f"CPU: {cpu['model']}, SIMD: {cpu['simd']}, {os.cpu_count()} logical CPUs; kernels built for "
          f"{a.cpu_target}")
    threads = [int(t) for t in a.threads.split(",")]
    print("| busy processes | " + " | ".join(f"decode tok/s, {t} thread(s)" for t in threads) +
          " | prefill tok/s (" + ", ".join(str(t) for t in threads) + ") |")
    print("|---|" + "---|" * (len(threads) + 1))
    for busy in (int(b) for b in a.busy.split(",")):
        procs = [multiprocessing.Process(target=_spin, args=(time.time() + 3600,), daemon=True) for _ in range(busy)]
        for proc in procs:
            proc.start()
        try:
            decode: dict[int, list[float]] = {t: [] for t in threads}
            prefill: dict[int, list[float]] = {t: [] for t in threads}
            for _ in range(a.runs):
                for t in threads:
                    r = _bench(a, t)
                    decode[t].append(r["decode_tok_s"])
                    prefill[t].append(r["prefill_tok_s"])
        finally:
            for proc in procs:
                proc.terminate()
        print(f"| {busy} | " + " | ".join(f"{statistics.median(decode[t]):.1f}" for t in threads) + " | " +
              ", ".join(f"{statistics.median(prefill[t]):.0f}" for t in threads) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
