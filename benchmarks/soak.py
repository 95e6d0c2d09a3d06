"""Soak test for `llamaworks serve`: N clients for a set time, hostile traffic mixed in, nothing may be lost.

Starts `llamaworks serve` on a free 127.0.0.1 port (or targets --url; pass --pid to sample its memory), then runs
--clients clients for --duration seconds. Each client draws its next request at random:

- streaming chat that must end with a finish chunk, usage and `data: [DONE]`   (else: lost)
- streaming chat the client drops after a few chunks (a random disconnect; the slot must come back)
- non-streaming completion that must come back with its choices
- a body over the server's --max-body-bytes: must be 413 in OpenAI's error shape
- a malformed request (bad JSON, strict-type violations, lone surrogates, seed past 64 bits, n x prompts over the
  queue, an unknown model): must be its exact 4xx in OpenAI's error shape

Meanwhile /health is probed every --health-interval seconds (its latency under load is reported) and the server's
resident memory is sampled. At the end the engine must be idle (no slot or queue entry left behind).

    python benchmarks/soak.py --clients 16 --duration 120

Exit status 0 only with 0 failed, 0 lost and an idle engine at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from llamaworks.memory_stats import process_rss_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import Server, free_port, launch

from llamaworks.hardware import cpu_description

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a CPU cache is in two sentences.",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
    "안녕하세요! 한국의 수도는 어디인가요?",
    "List some healthy breakfast ideas.",
]
MAX_BODY = 256 * 1024  # the started server's --max-body-bytes


def malformed(model: str, queue_size: int) -> list[tuple[str, bytes, int]]:
    """(route, raw body, expected status) for requests the server must refuse cleanly."""
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    def j(obj: dict) -> bytes:
        return json.dumps(obj).encode()

    return [
        ("/v1/chat/completions", b"{not json", 400),
        ("/v1/chat/completions", b"", 400),
        ("/v1/chat/completions", j({**chat, "max_tokens": "10"}), 400),
        ("/v1/chat/completions", j({**chat, "stream": "yes"}), 400),
        ("/v1/chat/completions", j({**chat, "temperature": 9}), 400),
        ("/v1/chat/completions", j({**chat, "messages": []}), 400),
        ("/v1/chat/completions", j({**chat, "seed": 2**64}), 400),
        ("/v1/chat/completions", j({**chat, "model": "no-such-model"}), 404),
        ("/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}'
         % model.encode(), 400),
        ("/v1/completions", j({"model": model, "prompt": [True, False]}), 400),
        ("/v1/completions", b'{"model": "%s", "prompt": "x\\udfff"}' % model.encode(), 400),
        ("/v1/completions", j({"model": model, "prompt": ["a"] * (queue_size // 16 + 1), "n": 16}), 400),
        ("/v1/completions", j({"model": model, "prompt": [10**9]}), 400),
        ("/v1/completions", j({"model": model, "prompt": "x", "echo": True}), 400),
    ]


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)  # kind -> count of requests that behaved
    failed: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    completion_tokens: int = 0

    def fail(self, kind: str, why: str) -> None:
        self.failed.append(f"{kind}: {why}")


def _is_error_shape(resp: httpx.Response) -> bool:
    try:
        err = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} and bool(err["message"])


async def stream_chat(client: httpx.AsyncClient, url: str, model: str, tally: Tally, rng: random.Random,
                      drop_after: int | None) -> None:
    kind = "stream" if drop_after is None else "disconnect"
    body = {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": rng.randint(8, 48), "temperature": 0.8, "stream": True,
            "stream_options": {"include_usage": True}}
    finished = done = False
    usage = None
    chunks = 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return tally.fail(kind, f"HTTP {resp.status_code}: {resp.text[:120]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                chunks += 1
                if drop_after is not None and chunks >= drop_after:
                    tally.outcomes[kind] += 1  # leaving the block closes the connection mid-stream
                    return None
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return tally.fail(kind, f"error event: {chunk['error'].get('message')}")
                usage = chunk.get("usage") or usage
                finished = finished or any(c.get("finish_reason") for c in chunk.get("choices", []))
    except httpx.HTTPError as exc:
        return tally.lost.append(f"{kind}: {type(exc).__name__}: {exc}")
    if drop_after is not None:  # the stream ended before the client meant to drop it: a normal end
        finished = finished and done
    if not (finished and done and usage):
        return tally.lost.append(f"{kind}: ended without finish chunk, usage and [DONE]")
    tally.completion_tokens += usage["completion_tokens"]
    tally.outcomes[kind] += 1
    return None


async def completion(client: httpx.AsyncClient, url: str, model: str, tally: Tally, rng: random.Random) -> None:
    body = {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(4, 24), "temperature": 0.8}
    try:
        resp = await client.post(url + "/v1/completions", json=body)
    except httpx.HTTPError as exc:
        return tally.lost.append(f"completion: {type(exc).__name__}: {exc}")
    if resp.status_code != 200:
        return tally.fail("completion", f"HTTP {resp.status_code}: {resp.text[:120]}")
    out = resp.json()
    if not out.get("choices") or out["choices"][0].get("finish_reason") not in ("stop", "length"):
        return tally.lost.append(f"completion: no finished choice in {str(out)[:120]}")
    tally.completion_tokens += out["usage"]["completion_tokens"]
    tally.outcomes["completion"] += 1
    return None


async def refused(client: httpx.AsyncClient, url: str, kind: str, route: str, raw: bytes, status: int,
                  tally: Tally) -> None:
    try:
        resp = await client.post(url + route, content=raw, headers={"Content-Type": "application/json"})
    except httpx.HTTPError as exc:
        return tally.lost.append(f"{kind}: {type(exc).__name__}: {exc}")
    if resp.status_code != status or not _is_error_shape(resp):
        return tally.fail(kind, f"{route} {raw[:60]!r}: expected {status} in OpenAI's shape, got "
                                f"{resp.status_code}: {resp.text[:120]}")
    tally.outcomes[kind] += 1
    return None


async def client_loop(i: int, client: httpx.AsyncClient, url: str, model: str, deadline: float, tally: Tally,
                      bad: list[tuple[str, bytes, int]], oversized: bytes, seed: int) -> None:
    rng = random.Random(seed * 1000 + i)
    while time.monotonic() < deadline:
        r = rng.random()
        if r < 0.55:
            await stream_chat(client, url, model, tally, rng, None)
        elif r < 0.70:
            await stream_chat(client, url, model, tally, rng, rng.randint(1, 6))
        elif r < 0.82:
            await completion(client, url, model, tally, rng)
        elif r < 0.88:
            await refused(client, url, "oversized", "/v1/chat/completions", oversized, 413, tally)
        else:
            route, raw, status = rng.choice(bad)
            await refused(client, url, "malformed", route, raw, status, tally)


async def probe_health(client: httpx.AsyncClient, url: str, deadline: float, interval: float,
                       latencies: list[float], errors: list[str]) -> None:
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            resp = await client.get(url + "/health")
            if resp.status_code != 200:
                errors.append(f"/health HTTP {resp.status_code}")
        except httpx.HTTPError as exc:
            errors.append(f"/health {type(exc).__name__}")
        latencies.append(time.perf_counter() - t0)
        await asyncio.sleep(interval)


def rss_mib(pid: int) -> float | None:
    rss = process_rss_bytes(pid)
    return None if rss is None else rss / 2**20


async def sample_rss(pid: int | None, deadline: float, every: float, samples: list[tuple[float, float]]) -> None:
    t0 = time.monotonic()
    while pid is not None and time.monotonic() < deadline:
        value = rss_mib(pid)
        if value is not None:
            samples.append((round(time.monotonic() - t0, 1), round(value, 1)))
        await asyncio.sleep(every)


async def soak(url: str, model: str, clients: int, duration: float, pid: int | None, headers: dict,
               health_interval: float, queue_size: int, seed: int) -> dict:
    tally = Tally()
    latencies: list[float] = []
    health_errors: list[str] = []
    rss: list[tuple[float, float]] = []
    oversized = json.dumps({"model": model, "messages": [{"role": "user", "content": "x" * (2 * MAX_BODY)}]}).encode()
    bad = malformed(model, queue_size)
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits, headers=headers) as client, \
            httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as prober:
        t0 = time.monotonic()
        deadline = t0 + duration
        tasks = [client_loop(i, client, url, model, deadline, tally, bad, oversized, seed) for i in range(clients)]
        await asyncio.gather(probe_health(prober, url, deadline, health_interval, latencies, health_errors),
                             sample_rss(pid, deadline, max(1.0, duration / 24), rss), *tasks)
        wall = time.monotonic() - t0
        # Every dropped stream must have given its slot back: the engine ends idle.
        idle, engine = False, {}
        for _ in range(100):
            engine = (await prober.get(url + "/health")).json().get("engine", {})
            if engine.get("active") == 0 and engine.get("waiting") == 0:
                idle = True
                break
            await asyncio.sleep(0.1)
    if pid is not None and (value := rss_mib(pid)) is not None:
        rss.append((round(wall, 1), round(value, 1)))
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, round(q * (len(lat) - 1)))] if lat else float("nan")

    requests = sum(tally.outcomes.values()) + len(tally.failed) + len(tally.lost)
    return {
        "clients": clients, "duration_s": round(wall, 1), "requests": requests, "outcomes": dict(tally.outcomes),
        "failed": len(tally.failed), "lost": len(tally.lost), "completion_tokens": tally.completion_tokens,
        "health": {"probes": len(lat), "errors": len(health_errors), "p50_ms": round(pct(0.5) * 1000, 1),
                   "p99_ms": round(pct(0.99) * 1000, 1), "max_ms": round(lat[-1] * 1000, 1) if lat else None,
                   "mean_ms": round(statistics.mean(lat) * 1000, 1) if lat else None},
        "rss_mib": rss, "engine_idle_at_end": idle, "engine": engine,
        "failures": (tally.failed + tally.lost + health_errors)[:10],
    }


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "llamaworks", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(args.max_batch), "--queue-size", str(args.queue_size), "--model-name", "soak",
           "--max-context", str(args.max_context), "--max-body-bytes", str(MAX_BODY)]
    if args.model:
        cmd += ["--model", args.model]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    server = Server("llamaworks", cmd, f"http://127.0.0.1:{port}", "soak")
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (open as long as the server runs; a pipe would fill and block it)
    launch(server, log)
    return server.proc, server.url


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="target a running server instead of starting one")
    ap.add_argument("--pid", type=int, default=None, help="with --url: the server's process id, to sample its RSS")
    ap.add_argument("--model", default=None, help="checkpoint for the started server (default: bundled SmolLM2)")
    ap.add_argument("--model-name", default="soak", help="model id to request (with --url)")
    ap.add_argument("--api-key", default=os.environ.get("LLAMAWORKS_API_KEY"))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of traffic")
    ap.add_argument("--health-interval", type=float, default=0.1, help="seconds between /health probes")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--queue-size", type=int, default=64, help="the started server's --queue-size (and, with "
                    "--url, what the malformed 'n x prompts over the queue' request is sized against)")
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    proc = None
    url, model, pid = args.url, args.model_name, args.pid
    if url is None:
        proc, url = start_server(args)
        model, pid = "soak", proc.pid
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        asyncio.run(soak(url, model, 1, 3.0, None, headers, 0.5, args.queue_size, args.seed))  # warm-up
        result = asyncio.run(soak(url, model, args.clients, args.duration, pid, headers, args.health_interval,
                                  args.queue_size, args.seed))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    result["cpu"] = cpu_description()["model"]
    rss = result["rss_mib"]
    print(f"CPU: {result['cpu']}")
    print(f"clients={result['clients']} duration={result['duration_s']} s requests={result['requests']} "
          f"failed={result['failed']} lost={result['lost']} completion tokens={result['completion_tokens']}")
    print("outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(result["outcomes"].items())))
    h = result["health"]
    print(f"/health under load: {h['probes']} probes, p50 {h['p50_ms']} ms, p99 {h['p99_ms']} ms, "
          f"max {h['max_ms']} ms, errors {h['errors']}")
    if rss:
        print(f"server RSS (MiB): start {rss[0][1]}, end {rss[-1][1]}, max {max(v for _, v in rss)}; "
              "samples " + " ".join(f"{t:g}s:{v:g}" for t, v in rss))
    print(f"engine idle at the end: {result['engine_idle_at_end']} ({result['engine'].get('cancelled')} cancelled, "
          f"{result['engine'].get('finished')} finished)")
    for f in result["failures"]:
        print("   ", f)
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False))
        os.replace(tmp, args.json)
    ok = result["failed"] == 0 and result["lost"] == 0 and result["engine_idle_at_end"] and h["errors"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
