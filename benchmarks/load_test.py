"""Serving load test: `llamaworks serve` and (optionally) llama.cpp's native `llama-server`, side by side.

One run starts both servers on free 127.0.0.1 ports with the same model and --threads, and measures them with
streaming chat clients over loopback, phase by phase, one server at a time within a phase (llamaworks then
llama-server, then the next phase: the idle one costs no CPU, and load that drifts during the run hits both
alike). CPU cores used by the measured server, by this client and by other processes are reported per server,
with a warning when neighbours were busy. Phases:

1. levels (--clients, e.g. 1,8): N clients send streaming chat requests back to back for --duration seconds
   (requests in flight at the deadline are finished, not dropped). Per level: completion tokens/s summed over
   all clients, time to first token (TTFT) p50/p99, inter-token latency (ITL: time between consecutive content
   chunks of one stream, from the SSE chunk arrival times) p50/p99, failed/lost requests (a lost request is
   one whose stream ended without its finish chunk, usage and `data: [DONE]`).
2. long prompt during streams (--long-prompt-tokens N, 0 skips): --max-batch clients stream as in 1; after a
   ramp-up second and a --long-lead window, one more client sends a prompt of about N tokens (repeated natural
   text, calibrated against the server's own usage.prompt_tokens) with --long-max-tokens. Reported: the
   streams' ITL p99 in the window before the send, and during its processing (gaps overlapping the interval
   from its send to its first token), and the ratio during/before.
3. memory: the server process's VmRSS (/proc/PID/status) when idle after warm-up, its peak during phase 2
   (sampled every 20 ms), and after everything finished plus --settle seconds.

Warm-up (before the idle sample) is a 1-client request plus one round at the largest concurrency level, so
"idle" already holds what steady-state batching allocates; "after" within 10% of "idle" then means the long
prompt left nothing behind.

Targets of "one inference engine" (checked for llamaworks; needs --llama-server for the ratios):
  tok/s ratio llamaworks/llama-server >= 1.0 at 1 and 8 streams; TTFT p50 ratio <= 1.0 at 1 and 8 streams;
  long-prompt ITL p99 during/before < 2; RSS after within 10% of idle; no failed/lost requests.
PASS/FAIL is printed per target; the exit status is 0 unless --check is given, then 1 if any target failed.

llama-server is started as `llama-server -m MODEL -t THREADS -np MAX_BATCH -c MAX_BATCH*MAX_CONTEXT`: with -np
slots llama.cpp splits -c evenly across them (n_ctx_slot = c/np, unified KV off), so each slot gets the same
per-sequence context as llamaworks' --max-context. Its prompt cache (prefix reuse across requests) stays on, as
it ships; the long prompt starts with text no earlier request starts with.

    python benchmarks/load_test.py --clients 1,8 --duration 15 --long-prompt-tokens 4000 \\
        --llama-server /path/to/llama.cpp/build/bin/llama-server [--json out.json] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from llamaworks.memory_stats import process_rss_bytes

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

# Natural prose for the long prompt, repeated (paragraph by paragraph) up to the wanted token count.
LONG_HEADER = "Read the following travel notes carefully, then answer with one short sentence about them.\n\n"
LONG_PARAGRAPHS = [
    "The morning train left the coast just after sunrise, and for the first hour the tracks followed the shore so "
    "closely that spray from the larger waves reached the windows. Most passengers were still half asleep, "
    "holding paper cups of coffee and watching the fishing boats return with their nets folded on deck.",
    "By noon the landscape had changed completely. The fields gave way to low hills covered with olive trees, and "
    "small villages appeared on every ridge, each with a church tower and a square where old men played cards in "
    "the shade. The conductor walked through the carriages announcing the names of stations nobody seemed to use.",
    "In the afternoon we reached the old market town, where the streets were narrow and paved with uneven stones. "
    "The market sold everything from copper pots to fresh cheese, and the stall owners called out their prices in "
    "a dialect that even the locals from the next valley claimed they could barely understand.",
    "That evening the weather turned. A cold wind came down from the mountains, the sky darkened within minutes, "
    "and heavy rain drummed on the roof of the small inn where we had taken rooms. The owner lit a fire, served a "
    "thick vegetable soup with bread, and told stories about winters when the pass was closed for weeks.",
]
SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
              "amx_tile", "amx_int8", "amx_bf16")


# -- statistics ----------------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b


@dataclass
class Result:
    ok: bool
    t0: float = 0.0  # perf_counter at send
    ttft: float | None = None
    seconds: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # perf_counter at each content chunk's arrival
    error: str | None = None

    def gaps(self) -> list[tuple[float, float]]:
        """(start, end) of each inter-token gap: consecutive content chunks of this stream."""
        return list(zip(self.chunk_times, self.chunk_times[1:]))


@dataclass
class RunStats:
    clients: int
    wall: float
    results: list[Result] = field(default_factory=list)

    def summary(self) -> dict:
        ok = [r for r in self.results if r.ok]
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        itls = [e - s for r in ok for s, e in r.gaps()]
        tokens = sum(r.completion_tokens for r in ok)
        return {
            "clients": self.clients, "requests": len(self.results), "completed": len(ok),
            "failed": len(self.results) - len(ok), "wall_s": round(self.wall, 2),
            "requests_per_s": round(len(ok) / self.wall, 3), "tokens_per_s": round(tokens / self.wall, 2),
            "ttft_p50_s": round(pct(ttfts, 0.5), 4), "ttft_p99_s": round(pct(ttfts, 0.99), 4),
            "itl_p50_s": round(pct(itls, 0.5), 4), "itl_p99_s": round(pct(itls, 0.99), 4),
            "errors": sorted({r.error for r in self.results if r.error})[:5],
        }


# -- client --------------------------------------------------------------------------------------------------
async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      headers: dict) -> Result:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.7, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    chunk_times: list[float] = []
    finished = done = False
    usage = None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return Result(False, t0, error=f"HTTP {resp.status_code}: {resp.text[:120]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.perf_counter()
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Result(False, t0, error=str(chunk["error"].get("message")))
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        chunk_times.append(now)
                    if choice.get("finish_reason"):
                        finished = True
    except httpx.HTTPError as exc:
        return Result(False, t0, error=f"{type(exc).__name__}: {exc}")
    elapsed = time.perf_counter() - t0
    if not (finished and done and usage):
        return Result(False, t0, error="lost: stream ended without finish chunk, usage and [DONE]")
    ttft = chunk_times[0] - t0 if chunk_times else elapsed
    return Result(True, t0, ttft, elapsed, usage["completion_tokens"], usage.get("prompt_tokens", 0), chunk_times)


def http_client(n: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    return httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits)


async def stream_workers(client: httpx.AsyncClient, url: str, model: str, n: int, max_tokens: int, headers: dict,
                         keep_going, results: list[Result]) -> None:
    """n clients sending requests back to back while keep_going() is true; results appended as they finish."""
    async def worker(i: int) -> None:
        k = i
        while keep_going():
            results.append(await one_request(client, url, model, PROMPTS[k % len(PROMPTS)], max_tokens, headers))
            k += n

    await asyncio.gather(*(worker(i) for i in range(n)))


async def run_clients(url: str, model: str, n: int, duration: float, max_tokens: int, headers: dict) -> RunStats:
    stats = RunStats(n, 0.0)
    async with http_client(n) as client:
        t0 = time.perf_counter()
        deadline = t0 + duration
        await stream_workers(client, url, model, n, max_tokens, headers, lambda: time.perf_counter() < deadline,
                             stats.results)
        stats.wall = time.perf_counter() - t0
    return stats


async def warm_up(url: str, model: str, n: int, headers: dict) -> None:
    async with http_client(n) as client:
        await one_request(client, url, model, PROMPTS[0], 8, headers)
        await asyncio.gather(*(one_request(client, url, model, PROMPTS[i % len(PROMPTS)], 16, headers)
                               for i in range(n)))


# -- long prompt ---------------------------------------------------------------------------------------------
def long_text(paragraphs: int) -> str:
    return LONG_HEADER + "\n\n".join(LONG_PARAGRAPHS[i % len(LONG_PARAGRAPHS)] for i in range(paragraphs))


async def calibrate_long_prompt(url: str, model: str, target_tokens: int, headers: dict) -> tuple[str, dict]:
    """A prompt of about target_tokens prompt tokens: measure one and two rounds of LONG_PARAGRAPHS with the
    server's usage.prompt_tokens (the chat template's overhead cancels), then repeat paragraphs to fit."""
    k = len(LONG_PARAGRAPHS)
    async with http_client(1) as client:
        one = await one_request(client, url, model, "Calibration. " + long_text(k), 1, headers)
        two = await one_request(client, url, model, "Calibration. " + long_text(2 * k), 1, headers)
    if not (one.ok and two.ok):
        raise RuntimeError(f"long-prompt calibration failed: {one.error or two.error}")
    per_paragraph = (two.prompt_tokens - one.prompt_tokens) / k
    base = one.prompt_tokens - k * per_paragraph
    paragraphs = max(1, round((target_tokens - base) / per_paragraph))
    return long_text(paragraphs), {"paragraphs": paragraphs, "tokens_per_paragraph": round(per_paragraph, 1),
                                   "expected_prompt_tokens": round(base + paragraphs * per_paragraph)}


def itl_windows(streams: list[Result], before: tuple[float, float], during: tuple[float, float]) -> dict:
    """ITL p99 of the streams' gaps lying inside `before`, and of those overlapping `during`."""
    gaps = [(s, e) for r in streams if r.ok for s, e in r.gaps()]
    pre = [e - s for s, e in gaps if s >= before[0] and e < before[1]]
    mid = [e - s for s, e in gaps if e > during[0] and s < during[1]]
    p_pre, p_mid = pct(pre, 0.99), pct(mid, 0.99)
    return {"itl_gaps_before": len(pre), "itl_p99_before_s": round(p_pre, 4),
            "itl_gaps_during": len(mid), "itl_p99_during_s": round(p_mid, 4),
            "itl_p99_during_over_before": round(p_mid / p_pre, 3) if p_pre == p_pre and p_pre > 0 else None}


async def long_prompt_phase(url: str, model: str, n: int, prompt: str, args: argparse.Namespace,
                            headers: dict) -> dict:
    streams: list[Result] = []
    stop = False
    async with http_client(n + 1) as client:
        bg = asyncio.create_task(stream_workers(client, url, model, n, args.max_tokens, headers, lambda: not stop,
                                                streams))
        await asyncio.sleep(1.0 + args.long_lead)  # 1 s ramp-up, then the "before" window
        t_send = time.perf_counter()
        long = await one_request(client, url, model, prompt, args.long_max_tokens, headers)
        stop = True
        await bg
    if not long.ok:
        return {"error": long.error, "stream_failures": sum(not r.ok for r in streams)}
    t_first = long.chunk_times[0] if long.chunk_times else long.t0 + long.seconds
    out = {"prompt_tokens": long.prompt_tokens, "long_ttft_s": round(t_first - t_send, 3),
           "stream_requests": len(streams), "stream_failures": sum(not r.ok for r in streams)}
    out.update(itl_windows(streams, (t_send - args.long_lead, t_send), (t_send, t_first)))
    return out


# -- memory --------------------------------------------------------------------------------------------------
def rss_mib(pid: int) -> float | None:
    rss = process_rss_bytes(pid)
    return None if rss is None else rss / 2**20


class RssPeak:
    """Samples a process's VmRSS every `every` seconds in a thread while in the `with` block; .peak in MiB."""

    def __init__(self, pid: int | None, every: float = 0.02):
        self.pid, self.every, self.peak = pid, every, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            v = rss_mib(self.pid)
            if v is not None and (self.peak is None or v > self.peak):
                self.peak = v
            self._stop.wait(self.every)

    def __enter__(self) -> RssPeak:
        if self.pid is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class CpuMeter:
    """Average cores used while inside its `with` blocks (summed over all of them) by the server process (with
    its threads and reaped children), by this load-test client, and by everything else on the machine (from
    /proc/stat): on a shared machine a busy neighbour skews the comparison, so every report shows it."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.wall = self.machine = self.server = self.client = 0.0  # seconds, CPU seconds

    @staticmethod
    def _machine_busy() -> int:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(f) - f[3] - f[4]  # all but idle and iowait

    @staticmethod
    def _proc(pid: int | str, children: bool) -> int:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0
        return sum(int(x) for x in f[11:15 if children else 13])  # utime stime [cutime cstime]

    def _snap(self) -> tuple[float, int, int, int]:
        server = self._proc(self.pid, True) if self.pid else 0
        return time.perf_counter(), self._machine_busy(), server, self._proc("self", False)

    def __enter__(self) -> CpuMeter:
        self._start = self._snap()
        return self

    def __exit__(self, *exc) -> None:
        (t0, m0, s0, c0), (t1, m1, s1, c1) = self._start, self._snap()
        tick = os.sysconf("SC_CLK_TCK")
        self.wall += t1 - t0
        self.machine, self.server, self.client = (self.machine + (m1 - m0) / tick, self.server + (s1 - s0) / tick,
                                                  self.client + (c1 - c0) / tick)

    def cores(self) -> dict:
        w = self.wall or float("nan")
        return {"server_cores": round(self.server / w, 2), "client_cores": round(self.client / w, 2),
                "other_cores": round(max(0.0, self.machine - self.server - self.client) / w, 2)}


# -- servers -------------------------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    cmd: list[str]  # empty for a server already running at url
    url: str
    model: str = "bench"  # model id the clients request
    proc: subprocess.Popen | None = None
    log: object = None  # the file its output goes to

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llamaworks_cmd(args: argparse.Namespace, port: int) -> list[str]:
    return [sys.executable, "-m", "llamaworks", "serve", "--model", args.model, "--port", str(port),
            "--threads", str(args.threads), "--max-batch", str(args.max_batch), "--max-context",
            str(args.max_context), "--queue-size", str(args.queue_size), "--model-name", "bench",
            "--cpu-target", args.cpu_target]


def llama_server_cmd(args: argparse.Namespace, port: int) -> list[str]:
    return [args.llama_server, "-m", args.model, "-t", str(args.threads), "-np", str(args.max_batch),
            "-c", str(args.max_batch * args.max_context), "--host", "127.0.0.1", "--port", str(port)]


def make_servers(args: argparse.Namespace) -> list[Server]:
    if args.url:
        servers = [Server("llamaworks", [], args.url.rstrip("/"), args.model_name)]
    else:
        port = free_port()
        servers = [Server("llamaworks", llamaworks_cmd(args, port), f"http://127.0.0.1:{port}")]
    if args.llama_server:
        port = free_port()
        servers.append(Server("llama-server", llama_server_cmd(args, port), f"http://127.0.0.1:{port}"))
    return servers


def launch(server: Server, log) -> None:
    """Start server.cmd, output to the file `log` (a pipe would fill and block a chatty server), and wait until
    its /health answers 200. No-op for a server given by --url."""
    if not server.cmd:
        return
    server.log = log
    server.proc = subprocess.Popen(server.cmd, stdout=server.log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            server.log.seek(0)
            raise RuntimeError(f"{server.name} exited: {server.log.read()[-2000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(server)
    raise RuntimeError(f"{server.name} did not come up within 300 s")


def stop(server: Server) -> None:
    if server.proc is not None and server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


# -- phases, each run for every server in turn -----------------------------------------------------------------
def phase_idle(server: Server, out: dict, levels: list[int], headers: dict) -> None:
    asyncio.run(warm_up(server.url, server.model, max(levels), headers))
    out.update({"cmd": shlex.join(server.cmd) or f"(running server at {server.url})", "pid": server.pid,
                "levels": []})


def phase_level(server: Server, out: dict, n: int, args: argparse.Namespace, headers: dict) -> None:
    row = asyncio.run(run_clients(server.url, server.model, n, args.duration, args.max_tokens, headers)).summary()
    out["levels"].append(row)
    print(f"  [{server.name}] N={n:>2}  requests={row['completed']:>4} failed={row['failed']}  "
          f"tok/s={row['tokens_per_s']:.1f}  TTFT p50={row['ttft_p50_s']:.3f}s p99={row['ttft_p99_s']:.3f}s  "
          f"ITL p50={row['itl_p50_s'] * 1e3:.1f}ms p99={row['itl_p99_s'] * 1e3:.1f}ms", flush=True)
    for e in row["errors"]:
        print("     error:", e)


def phase_long(server: Server, out: dict, prompt: str, args: argparse.Namespace, headers: dict) -> None:
    with RssPeak(server.pid) as peak:
        lp = asyncio.run(long_prompt_phase(server.url, server.model, args.max_batch, prompt, args, headers))
    out["long_prompt"], out["rss_peak_long_mib"] = lp, peak.peak
    print(f"  [{server.name}] long prompt: {json.dumps(lp)}", flush=True)


def measure(servers: list[Server], args: argparse.Namespace, levels: list[int], long_prompt: str | None,
            headers: dict) -> dict:
    """All phases, each phase for every server in turn (A B, A B, ...): both servers stay up (an idle one costs
    no CPU) and load that drifts during the run hits them alike."""
    results: dict = {s.name: {} for s in servers}
    meters = {s.name: CpuMeter(s.pid) for s in servers}
    for s in servers:
        with meters[s.name]:
            phase_idle(s, results[s.name], levels, headers)
    time.sleep(args.settle)
    for s in servers:
        results[s.name]["rss_idle_mib"] = rss_mib(s.pid) if s.pid else None
    for n in levels:
        for s in servers:
            with meters[s.name]:
                phase_level(s, results[s.name], n, args, headers)
    if long_prompt is not None:
        for s in servers:
            with meters[s.name]:
                phase_long(s, results[s.name], long_prompt, args, headers)
    time.sleep(args.settle)
    for s in servers:
        out = results[s.name]
        out["rss_after_mib"] = rss_mib(s.pid) if s.pid else None
        out["cpu"] = meters[s.name].cores()
        print(f"  [{s.name}] RSS MiB idle={fmt(out['rss_idle_mib'], digits=0)} "
              f"peak={fmt(out.get('rss_peak_long_mib'), digits=0)} after={fmt(out['rss_after_mib'], digits=0)}; "
              f"CPU cores used on average: {out['cpu']}", flush=True)
    return results


# -- report --------------------------------------------------------------------------------------------------
def cpu_header() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags_line = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return {"cpu": model, "simd": [f for f in SIMD_FLAGS if f in flags_line], "cores": os.cpu_count()}


def level(res: dict, n: int) -> dict | None:
    return next((r for r in res.get("levels", []) if r["clients"] == n), None)


def targets(results: dict, levels: list[int], args: argparse.Namespace) -> list[dict]:
    """The issue's serving targets, evaluated for llamaworks (ratios against llama-server when it ran)."""
    lw, ls = results.get("llamaworks", {}), results.get("llama-server")
    out = []

    def add(name: str, value: float | None, goal: str, ok: bool | None) -> None:
        out.append({"target": name, "value": None if value is None else round(value, 3), "goal": goal,
                    "pass": ok})

    for n in (1, args.max_batch):
        a, b = level(lw, n), level(ls, n) if ls else None
        if a is None or b is None:
            continue
        r = ratio(a["tokens_per_s"], b["tokens_per_s"])
        add(f"N={n} tok/s llamaworks/llama-server", r, ">= 1.0", None if r is None else r >= 1.0)
        r = ratio(a["ttft_p50_s"], b["ttft_p50_s"])
        add(f"N={n} TTFT p50 llamaworks/llama-server", r, "<= 1.0", None if r is None else r <= 1.0)
    lp = lw.get("long_prompt")
    if lp:
        r = lp.get("itl_p99_during_over_before")
        add("long prompt: streams' ITL p99 during/before", r, "< 2.0", None if r is None else r < 2.0)
    r = ratio(lw.get("rss_after_mib"), lw.get("rss_idle_mib"))
    if r is not None:
        add("RSS after/idle", r, "within 10%", abs(r - 1.0) <= 0.10)
    failed = sum(row["failed"] for row in lw.get("levels", []))
    failed += (lp or {}).get("stream_failures", 0) + (1 if (lp or {}).get("error") else 0)
    add("failed/lost requests", failed, "0", failed == 0)
    return out


def fmt(v: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if v is None or v != v else f"{v * scale:.{digits}f}"


def table(results: dict, levels: list[int]) -> list[str]:
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + (" | llamaworks/llama-server |" if len(names) > 1 else " |"),
             "|---" * (len(names) + 1 + (len(names) > 1)) + "|"]

    def row(label: str, values: list[float | None], scale: float = 1.0, digits: int = 3) -> None:
        cells = [fmt(v, scale, digits) for v in values]
        if len(values) > 1:
            cells.append(fmt(ratio(values[0], values[1]), 1.0, 2))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for n in levels:
        rows = [level(results[s], n) or {} for s in names]
        row(f"N={n} completion tok/s", [r.get("tokens_per_s") for r in rows], digits=1)
        row(f"N={n} TTFT p50 (ms)", [r.get("ttft_p50_s") for r in rows], 1e3, 0)
        row(f"N={n} TTFT p99 (ms)", [r.get("ttft_p99_s") for r in rows], 1e3, 0)
        row(f"N={n} ITL p50 (ms)", [r.get("itl_p50_s") for r in rows], 1e3, 1)
        row(f"N={n} ITL p99 (ms)", [r.get("itl_p99_s") for r in rows], 1e3, 1)
        lines.append(f"| N={n} requests ok / failed | "
                     + " | ".join(f"{r.get('completed')} / {r.get('failed')}" for r in rows)
                     + (" | |" if len(rows) > 1 else " |"))
    lps = [results[s].get("long_prompt") or {} for s in names]
    if any(lps):
        row("long: prompt tokens", [lp.get("prompt_tokens") for lp in lps], digits=0)
        row("long: its TTFT (s)", [lp.get("long_ttft_s") for lp in lps], digits=2)
        row("long: streams' ITL p99 before (ms)", [lp.get("itl_p99_before_s") for lp in lps], 1e3, 1)
        row("long: streams' ITL p99 during (ms)", [lp.get("itl_p99_during_s") for lp in lps], 1e3, 1)
        row("long: ITL p99 during/before", [lp.get("itl_p99_during_over_before") for lp in lps], digits=2)
    row("RSS idle (MiB)", [results[s].get("rss_idle_mib") for s in names], digits=0)
    row("RSS peak during long prompt (MiB)", [results[s].get("rss_peak_long_mib") for s in names], digits=0)
    row("RSS after + settle (MiB)", [results[s].get("rss_after_mib") for s in names], digits=0)
    row("RSS after/idle", [ratio(results[s].get("rss_after_mib"), results[s].get("rss_idle_mib")) for s in names],
        digits=3)
    for key, label in (("server_cores", "server"), ("client_cores", "load-test client"),
                       ("other_cores", "other processes")):
        row(f"CPU cores used by {label} (avg)", [results[s].get("cpu", {}).get(key) for s in names], digits=2)
    return lines


def print_report(summary: dict) -> None:
    h = summary["header"]
    print("\n## Serving load test\n")
    print(f"- CPU: {h['cpu']} ({h['cores']} logical cores); SIMD: {' '.join(h['simd']) or 'none of these'}")
    print(f"- threads: {h['threads']}; model: {h['model']}")
    print(f"- levels: {h['levels']}, {h['duration_s']} s each, max_tokens {h['max_tokens']}; long prompt "
          f"{h['long_prompt_tokens']} tokens (max_tokens {h['long_max_tokens']}, lead window {h['long_lead_s']} s); "
          f"settle {h['settle_s']} s")
    for name, res in summary["servers"].items():
        print(f"- {name}: `{res['cmd']}`")
    busy = {name: res["cpu"]["other_cores"] for name, res in summary["servers"].items()
            if res.get("cpu", {}).get("other_cores", 0) > 0.25}
    if busy:
        print(f"- WARNING: other processes kept {busy} cores busy during the runs: figures are skewed "
              "(spin-waiting thread pools such as llama.cpp's suffer most); rerun on a quiet machine")
    print()
    print("\n".join(table(summary["servers"], h["levels"])))
    print("\n| target (llamaworks) | value | goal | result |\n|---|---|---|---|")
    for t in summary["targets"]:
        verdict = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        print(f"| {t['target']} | {fmt(t['value'])} | {t['goal']} | {verdict} |")


def default_model() -> str:
    from llamaworks.assets import default_model_path

    return str(default_model_path())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="target a running llamaworks server instead of starting one "
                                                "(no RSS figures)")
    ap.add_argument("--model", default=None, help="GGUF for both servers (default: bundled SmolLM2-135M Q4_1)")
    ap.add_argument("--model-name", default="bench", help="model id to request (with --url)")
    ap.add_argument("--api-key", default=os.environ.get("LLAMAWORKS_API_KEY"))
    ap.add_argument("--llama-server", default=None, metavar="BIN", help="also measure llama.cpp's llama-server")
    ap.add_argument("--clients", default="1,8", help="comma-separated concurrency levels")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of new requests per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8, help="llamaworks --max-batch and llama-server -np; also "
                                                              "the number of streams in the long-prompt phase")
    ap.add_argument("--queue-size", type=int, default=64)
    ap.add_argument("--max-context", type=int, default=8192, help="per-sequence context (llama-server gets "
                                                                  "-c MAX_BATCH*MAX_CONTEXT)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-target", default="native",
                    help="build llamaworks' kernels for another CPU class (x86-64-v3: AVX2), to pair with a llama.cpp "
                         "built for it (-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)")
    ap.add_argument("--long-prompt-tokens", type=int, default=4000, help="long prompt's length; 0 skips it")
    ap.add_argument("--long-max-tokens", type=int, default=8)
    ap.add_argument("--long-lead", type=float, default=3.0, help="seconds of the 'before' ITL window")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds idle before the idle and after RSS samples")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target fails")
    ap.add_argument("--json", default=None, help="also write the summary to this JSON file")
    args = ap.parse_args()
    args.model = args.model or default_model()
    levels = [int(x) for x in args.clients.split(",")]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    servers = make_servers(args)
    header = {**cpu_header(), "threads": args.threads, "cpu_target": args.cpu_target, "model": args.model,
              "levels": levels,
              "duration_s": args.duration, "max_tokens": args.max_tokens,
              "long_prompt_tokens": args.long_prompt_tokens, "long_max_tokens": args.long_max_tokens,
              "long_lead_s": args.long_lead, "settle_s": args.settle}
    print(f"CPU: {header['cpu']}; SIMD: {' '.join(header['simd'])}; threads {args.threads}; model {args.model}")
    for s in servers:
        print(f"{s.name}: {shlex.join(s.cmd) or s.url}", flush=True)

    with contextlib.ExitStack() as stack:
        for s in servers:
            log = stack.enter_context(tempfile.TemporaryFile(mode="w+"))
            stack.callback(stop, s)
            launch(s, log)
        long_prompt = None
        if args.long_prompt_tokens > 0:  # calibrated once on the first server: the same text for all
            long_prompt, header["long_prompt_calibration"] = asyncio.run(
                calibrate_long_prompt(servers[0].url, servers[0].model, args.long_prompt_tokens, headers))
        results = measure(servers, args, levels, long_prompt, headers)

    summary = {"header": header, "servers": results, "targets": targets(results, levels, args)}
    print_report(summary)
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, args.json)
    failed = any(t["pass"] is False for t in summary["targets"])
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
