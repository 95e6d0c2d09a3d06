"""Long-running checkpoint fuzzer (issue 13): counts inputs, clean errors, tracebacks, hangs and memory blow-ups.

    python benchmarks/fuzz_checkpoints.py --minutes 10            # as long as you like; Ctrl-C stops cleanly
    python benchmarks/fuzz_checkpoints.py --inputs 1000000 --seed 7

Inputs are mutations of small valid GGUF files (bit flips, truncations, huge counts/lengths/offsets written over
header fields, changed type ids, inserted/removed bytes), HF safetensors headers, config.json, Meta params.json
and .pth files (see tests/fuzz_support.py). Each runs in a worker process with its address space capped
(`--mem-mb` over the worker's start) and a per-input timeout; any input that is not "loaded" or "clean error"
is kept under --work for replay. Plain random mutation with fixed seeds: no extra dependency.
Prints a JSON line every --every inputs and a final summary with the CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fuzz_support import KINDS, run_fuzz
from llamaworks.hardware import cpu_description


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=None, help="stop after this many inputs (default: no limit)")
    ap.add_argument("--minutes", type=float, default=None, help="stop after this long (default: 10 if no --inputs)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per input before it counts as a hang")
    ap.add_argument("--mem-mb", type=int, default=1024, help="address space a worker may add while loading one")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"subset of {','.join(KINDS)}")
    ap.add_argument("--work", type=Path, default=None, help="folder for seeds, inputs and kept failures")
    ap.add_argument("--every", type=int, default=1000, help="print progress every N inputs")
    args = ap.parse_args()
    if args.inputs is None and args.minutes is None:
        args.minutes = 10.0
    work = args.work or Path(tempfile.mkdtemp(prefix="llamaworks-fuzz-"))
    kinds = tuple(k for k in args.kinds.split(",") if k)
    try:
        stats = run_fuzz(args.inputs, args.seed, work, seconds=args.minutes * 60 if args.minutes else None,
                         timeout=args.timeout, mem_limit_mb=args.mem_mb, kinds=kinds, progress_every=args.every,
                         log=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    summary = {**stats.summary(), "seed": args.seed, "cpu": cpu_description()["model"],
               "python": platform.python_version(), "work": str(work)}
    print(json.dumps(summary, indent=2))
    for line in stats.failures[:50]:
        print(line)
    return 0 if stats.tracebacks == stats.hangs == stats.blowups == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
