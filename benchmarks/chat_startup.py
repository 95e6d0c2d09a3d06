"""Time from launching `llamaworks chat` to its first answer text, and the process's peak memory.

Each run starts `python -m llamaworks chat` in a fresh subprocess with one question on stdin (piped, so the chat
prints only the answer on stdout), and measures from just before the launch to the first byte of answer text on
stdout: interpreter start, imports, loading the model, the chat template, prefill and the first token. The run
then finishes its answer (greedy, --max-tokens) and exits at the end of input; its peak resident memory is the
kernel's count for the child (`wait4` rusage, ru_maxrss). One uncounted warm-up run fills the page cache first.
The medians are printed with the CPU they came from.

    python benchmarks/chat_startup.py [--model M] [--backend auto|native|torch] [--runs 5] [--threads N]
                                      [--question TEXT] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from llamaworks.hardware import cpu_description


def one_run(a: argparse.Namespace) -> dict:
    """{"first_s", "total_s", "peak_rss_mib", "answer"} of one launch."""
    cmd = [sys.executable, "-m", "llamaworks"] + (["--threads", str(a.threads)] if a.threads else []) + [
        "chat", "--backend", a.backend, "--temperature", "0", "--max-tokens", str(a.max_tokens)]
    if a.model:
        cmd += ["--model", a.model]
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, bufsize=0)
        proc.stdin.write(a.question.encode() + b"\n")
        proc.stdin.close()  # end of input: the chat answers this one turn, then exits
        first, chunks = None, []
        while chunk := os.read(proc.stdout.fileno(), 65536):
            if first is None and chunk.strip():
                first = time.perf_counter() - t0
            chunks.append(chunk)
        _, status, usage = os.wait4(proc.pid, 0)
        total = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0 or first is None:
            err.seek(0)
            raise SystemExit(f"`{' '.join(cmd)}` exited with {proc.returncode} and "
                             f"{'no answer' if first is None else 'an answer'}:\n{err.read().decode()[-3000:]}")
    return {"first_s": first, "total_s": total, "peak_rss_mib": usage.ru_maxrss / 1024,  # ru_maxrss: KiB on Linux
            "answer": b"".join(chunks).decode(errors="replace").strip()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct Q4_1 GGUF")
    ap.add_argument("--backend", default="auto", choices=["auto", "native", "torch"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="uncounted runs first (page cache)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--question", default="What is the capital of France?")
    ap.add_argument("--max-tokens", type=int, default=16)
    a = ap.parse_args()
    if sys.platform != "linux":
        raise SystemExit("chat_startup.py reads peak RSS from wait4's ru_maxrss in KiB, as Linux reports it")
    cpu = cpu_description()
    print(f"CPU: {cpu['model']}; SIMD: {cpu['simd'] or 'none'}; os.cpu_count() {os.cpu_count()}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for _ in range(a.warmup):
        one_run(a)
    runs = []
    for i in range(a.runs):
        r = one_run(a)
        runs.append(r)
        print(f"run {i + 1}: first answer text {r['first_s']:.2f} s, answer done and exited {r['total_s']:.2f} s, "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    print(f"answer: {runs[-1]['answer'][:200]!r}")
    med = lambda key: statistics.median(r[key] for r in runs)
    print(f"median of {a.runs} (`llamaworks chat --backend {a.backend}`, {a.max_tokens} greedy tokens): "
          f"first answer text {med('first_s'):.2f} s after launch, peak RSS {med('peak_rss_mib'):.0f} MiB, "
          f"done {med('total_s'):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
