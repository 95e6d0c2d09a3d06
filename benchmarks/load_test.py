"""Load test for `llamaworks serve`: N concurrent streaming chat clients over loopback for a bounded time.

Starts `llamaworks serve` in a subprocess on a free 127.0.0.1 port (or targets --url), then for each N in
--clients runs N clients that each send streaming chat requests back to back for --duration seconds
(requests in flight at the deadline are finished, not dropped). Reports requests/s, completion tokens/s,
p50/p99 time to first token, and failed/lost requests (a lost request is one whose stream ended without
its finish chunk and `data: [DONE]`).

    python benchmarks/load_test.py --clients 1,4,8,16 --duration 30 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a CPU cache is in two sentences.",
    "Give me three tips for learning a new language.",
    "What is the difference between a list and a tuple in Python?",
    "Describe a sunset to someone who has never seen one.",
    "Summarize the plot of a detective story you invent.",
    "List some healthy breakfast ideas.",
    "Why is the sky blue?",
]


@dataclass
class Result:
    ok: bool
    ttft: float | None = None
    seconds: float = 0.0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class RunStats:
    clients: int
    wall: float
    results: list[Result] = field(default_factory=list)

    def summary(self) -> dict:
        ok = [r for r in self.results if r.ok]
        ttfts = sorted(r.ttft for r in ok if r.ttft is not None)
        tokens = sum(r.completion_tokens for r in ok)

        def pct(q: float) -> float:
            if not ttfts:
                return float("nan")
            return ttfts[min(len(ttfts) - 1, max(0, round(q * (len(ttfts) - 1))))]

        per_stream = [r.completion_tokens / r.seconds for r in ok if r.seconds > 0]
        return {
            "clients": self.clients, "requests": len(self.results), "completed": len(ok),
            "failed": len(self.results) - len(ok), "wall_s": round(self.wall, 2),
            "requests_per_s": round(len(ok) / self.wall, 3), "tokens_per_s": round(tokens / self.wall, 2),
            "ttft_p50_s": round(pct(0.5), 3), "ttft_p99_s": round(pct(0.99), 3),
            "per_stream_tokens_per_s": round(statistics.mean(per_stream), 2) if per_stream else 0.0,
            "errors": sorted({r.error for r in self.results if r.error})[:5],
        }


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      headers: dict) -> Result:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.7, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    finished = done = False
    usage = None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return Result(False, error=f"HTTP {resp.status_code}: {resp.text[:120]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Result(False, error=chunk["error"].get("message"))
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content") and ttft is None:
                        ttft = time.perf_counter() - t0
                    if choice.get("finish_reason"):
                        finished = True
    except httpx.HTTPError as exc:
        return Result(False, error=f"{type(exc).__name__}: {exc}")
    elapsed = time.perf_counter() - t0
    if not (finished and done and usage):
        return Result(False, error="lost: stream ended without finish chunk, usage and [DONE]")
    return Result(True, ttft if ttft is not None else elapsed, elapsed, usage["completion_tokens"])


async def run_clients(url: str, model: str, n: int, duration: float, max_tokens: int, headers: dict) -> RunStats:
    stats = RunStats(n, 0.0)
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        deadline = t0 + duration

        async def worker(i: int) -> None:
            k = i
            while time.perf_counter() < deadline:
                stats.results.append(await one_request(client, url, model, PROMPTS[k % len(PROMPTS)], max_tokens,
                                                       headers))
                k += n

        await asyncio.gather(*(worker(i) for i in range(n)))
        stats.wall = time.perf_counter() - t0
    return stats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = Path(sys.executable).with_name("llamaworks")
    cmd = [str(exe) if exe.exists() else "llamaworks", "serve", "--port", str(port),
           "--max-batch", str(args.max_batch), "--queue-size", str(args.queue_size), "--model-name", "bench"]
    if args.model:
        cmd += ["--model", args.model]
    if args.max_context:
        cmd += ["--max-context", str(args.max_context)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return launch_server(cmd, port)


def launch_server(cmd: list[str], port: int) -> tuple[subprocess.Popen, str]:
    """Start `cmd` (a `llamaworks serve` on `port`) and wait until its /health answers; (process, base URL)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("server did not come up within 300 s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="target a running server instead of starting one")
    ap.add_argument("--model", default=None, help="checkpoint for the started server (default: bundled SmolLM2)")
    ap.add_argument("--model-name", default="bench", help="model id to request (with --url)")
    ap.add_argument("--api-key", default=os.environ.get("LLAMAWORKS_API_KEY"))
    ap.add_argument("--clients", default="1,4,8,16", help="comma-separated concurrency levels")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of new requests per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--queue-size", type=int, default=64)
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    proc = None
    url, model = args.url, args.model_name
    if url is None:
        proc, url = start_server(args)
        model = "bench"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rows = []
    try:
        asyncio.run(run_clients(url, model, 1, 3.0, 8, headers))  # warm-up
        for n in (int(x) for x in args.clients.split(",")):
            row = asyncio.run(run_clients(url, model, n, args.duration, args.max_tokens, headers)).summary()
            row["engine"] = httpx.get(url + "/health").json().get("engine", {})
            rows.append(row)
            print(f"N={n:>3}  requests={row['completed']:>4} failed={row['failed']}  "
                  f"req/s={row['requests_per_s']:.2f}  tok/s={row['tokens_per_s']:.1f}  "
                  f"TTFT p50={row['ttft_p50_s']:.2f}s p99={row['ttft_p99_s']:.2f}s  "
                  f"per-stream tok/s={row['per_stream_tokens_per_s']:.1f}", flush=True)
            for e in row["errors"]:
                print("   error:", e)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print("\n| N | requests | failed | req/s | tokens/s | TTFT p50 | TTFT p99 | tokens/s per stream |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['completed']} | {r['failed']} | {r['requests_per_s']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} s | {r['ttft_p99_s']:.2f} s | "
              f"{r['per_stream_tokens_per_s']:.1f} |")
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=2))
        os.replace(tmp, args.json)
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
