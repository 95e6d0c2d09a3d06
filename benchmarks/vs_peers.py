"""llamaworks vs llama.cpp vs transformers on the same GGUF, same threads, same token ids, same CPU.

Engines: "llamaworks" is the native backend (engine/native.py: what `llamaworks chat`/`generate`/`serve` run on a
GGUF file), "llamaworks-torch" the torch backend with quantized linears (engine/torch_backend.py), "llama.cpp" the
pip-built llama-cpp-python (a second line: its build flags and Python overhead make it a weaker peer), and
`--llama-bench BIN[=LABEL]` (repeatable) adds llama.cpp's own `llama-bench` built natively from source, e.g. the
source llama-cpp-python's sdist vendors (`cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build
--target llama-bench`; `-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON` for an AVX2 build).
`--cpu-target x86-64-v3` builds llamaworks' kernels for AVX2 machines, so the AVX2 pair can be measured on an
AVX-512 machine. `--baseline REV` (repeatable) adds the native backend of an earlier git revision, run from a
temporary worktree by that revision's own worker, so a change is checked for regressions on the same CPU in the same
run.

    python benchmarks/vs_peers.py [--model FILE.gguf] [--threads 2] [--runs 3] [--json out.json]
        [--llama-bench ~/llama.cpp/build/bin/llama-bench=native] [--cpu-target native] [--baseline REV]

Every measurement runs in a fresh subprocess (so peak RSS belongs to one engine; a worker imports only what its
engine needs: the driver's statistics and subprocess modules are imported where they are used), and the engines
alternate run by run (A B C A B C ...) so drifting machine load hits them alike. Figures per engine: load time, time to
first token of a short chat prompt, prefill tok/s (--prompt-tokens in one batch), decode tok/s (--gen-tokens
greedy steps), peak RSS with a --ctx KV cache. Printed as min / median / max, then ratios of the medians, under
the CPU's name and SIMD features. llama-bench reports prefill and decode speed only (its own prompt of the same
length; peak RSS is its process's). llama-cpp-python and transformers are optional: an engine that is not
installed is reported and skipped. So that a speed figure is never one for different work, the report ends
with the engines' greedy tokens compared (identical, or where they part: int8 and float paths may part at a near
tie).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FIGURES = [("load_s", "load (s)", False), ("ttft_s", "time to first token (s)", False),
           ("prefill_tok_s", "prefill (tok/s)", True), ("decode_tok_s", "decode (tok/s)", True),
           ("peak_rss_mib", "peak RSS (MiB)", False)]
ENGINES = ["llamaworks", "llamaworks-torch", "llama.cpp", "transformers"]
SHORT_CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def _peak_rss_mib() -> float:
    """This process's own peak resident memory (VmHWM). Not getrusage's ru_maxrss: that one survives exec, so a
    worker spawned by a big driver (vfork + exec) would report at least the driver's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _token_ids(model: str, prompt_tokens: int) -> tuple[list[int], list[int]]:
    """(short chat prompt ids, long pseudo-random prompt ids) from llamaworks' tokenizer and bench prompt."""
    from llamaworks.bench import bench_prompt
    from llamaworks.checkpoints.gguf import read_gguf

    ckpt = read_gguf(model, dequantize=False)
    vocab = ckpt.config.vocab_size
    short = ckpt.tokenizer.encode(SHORT_CHAT) if ckpt.tokenizer is not None else bench_prompt(vocab, 24, 1)
    return short, bench_prompt(vocab, prompt_tokens)


# -- workers (one engine, one run, in its own process) -----------------------------------------------------
def _work_backend(a: argparse.Namespace, backend: str, short: list[int], prompt: list[int]) -> dict[str, float]:
    import numpy as np

    from llamaworks.api import load_backend
    from llamaworks.engine.backend import EngineOptions

    options = EngineOptions(max_context=a.ctx, threads=a.threads, cpu_target=a.cpu_target)
    t0 = time.perf_counter()
    model = load_backend(a.model, backend=backend, options=options, device="cpu")
    load_s = time.perf_counter() - t0

    def step(ids: list[int], pos: int) -> int:
        return int(np.argmax(model.forward([0] * len(ids), ids, range(pos, pos + len(ids)), [len(ids) - 1])[0]))

    return _timed(a, step, load_s, short, prompt)


def work_llamaworks(a: argparse.Namespace, short: list[int], prompt: list[int]) -> dict[str, float]:
    return _work_backend(a, "native", short, prompt)


def work_llama_bench(a: argparse.Namespace, binary: str) -> dict[str, float]:
    """llama.cpp's own benchmark (`-p N -n M -r 1`): prefill and decode tok/s; peak RSS of its process."""
    import subprocess

    cmd = [binary, "-m", a.model, "-p", str(a.prompt_tokens), "-n", str(a.gen_tokens), "-t", str(a.threads),
           "-r", "1", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["llama-bench failed"])[-1])
    rows = json.loads(proc.stdout)
    speeds = {("prefill_tok_s" if r["n_prompt"] else "decode_tok_s"): float(r["avg_ts"]) for r in rows}
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"load_s": float("nan"), "ttft_s": float("nan"), **speeds, "peak_rss_mib": peak}


def _timed(a: argparse.Namespace, step: Any, load_s: float, short: list[int], prompt: list[int]) -> dict[str, float]:
    """The figures of one llamaworks run; step(ids, start_pos) -> the greedy next token."""
    t0 = time.perf_counter()
    step([step(short, 0)], len(short))
    ttft_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = [step(prompt, 0)]
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(a.gen_tokens - 1):
        tokens.append(step([tokens[-1]], len(prompt) + i))
    decode = time.perf_counter() - t0
    return {"load_s": load_s, "ttft_s": ttft_s, "prefill_tok_s": len(prompt) / prefill,
            "decode_tok_s": (a.gen_tokens - 1) / decode, "tokens": tokens}


def work_llamaworks_torch(a: argparse.Namespace, short: list[int], prompt: list[int]) -> dict[str, float]:
    return _work_backend(a, "torch", short, prompt)


def work_llamacpp(a: argparse.Namespace, short: list[int], prompt: list[int]) -> dict[str, float]:
    """llama.cpp through llama-cpp-python's C API (the high-level wrapper keeps an n_ctx x vocab scores array,
    which would inflate its memory figure)."""
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=a.model, n_ctx=a.ctx, n_threads=a.threads, n_threads_batch=a.threads,
                n_batch=max(512, len(prompt)), n_ubatch=max(512, len(prompt)), verbose=False)
    load_s = time.perf_counter() - t0
    ctx, n_vocab = llm.ctx, llm.n_vocab()

    def step(ids: list[int]) -> int:
        tokens = (llama_cpp.llama_token * len(ids))(*ids)  # kept alive: the batch only points at it
        batch = llama_cpp.llama_batch_get_one(tokens, len(ids))
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for {len(ids)} tokens")
        logits = llama_cpp.llama_get_logits_ith(ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(n_vocab,))))

    t0 = time.perf_counter()
    step([step(short)])
    ttft_s = time.perf_counter() - t0
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    t0 = time.perf_counter()
    tokens = [step(prompt)]
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(a.gen_tokens - 1):
        tokens.append(step([tokens[-1]]))
    decode = time.perf_counter() - t0
    return {"load_s": load_s, "ttft_s": ttft_s, "prefill_tok_s": len(prompt) / prefill,
            "decode_tok_s": (a.gen_tokens - 1) / decode, "tokens": tokens}


def work_transformers(a: argparse.Namespace, short: list[int], prompt: list[int]) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    path = Path(a.model)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0

    @torch.inference_mode()
    def run(ids: list[int], n_new: int) -> tuple[float, float, list[int]]:
        t0 = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True)
        tok = out.logits[0, -1].argmax()
        first = time.perf_counter() - t0
        past, tokens = out.past_key_values, [int(tok)]
        t0 = time.perf_counter()
        for _ in range(n_new - 1):
            out = model(tok.view(1, 1), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[0, -1].argmax()
            tokens.append(int(tok))
        return first, time.perf_counter() - t0, tokens

    t0 = time.perf_counter()
    run(short, 2)
    ttft_s = time.perf_counter() - t0
    prefill, decode, tokens = run(prompt, a.gen_tokens)
    return {"load_s": load_s, "ttft_s": ttft_s, "prefill_tok_s": len(prompt) / prefill,
            "decode_tok_s": (a.gen_tokens - 1) / decode, "tokens": tokens}


WORKERS = {"llamaworks": work_llamaworks, "llamaworks-torch": work_llamaworks_torch, "llama.cpp": work_llamacpp,
           "transformers": work_transformers}
MODULES = {"llamaworks": "llamaworks", "llamaworks-torch": "llamaworks", "llama.cpp": "llama_cpp",
           "transformers": "transformers"}


# -- the memory roofline of decode ----------------------------------------------------------------------------------
# Decoding one token reads every weight matrix once (the embedding table only for its one row, unless it is also the
# output matrix), so tok/s x those bytes is the read bandwidth a decoder achieves; the machine's own read bandwidth
# caps it. The probe reads a buffer as large as the model's weights (huge-page advised, as llamaworks keeps its
# weights) with the benchmark's thread count, each thread one contiguous slice.
_PROBE = r"""
#include <sys/mman.h>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
extern "C" double read_gb_per_s(int64_t bytes, int threads, int repeats) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return -1;
  madvise(p, bytes, MADV_HUGEPAGE);
  std::memset(p, 1, bytes);
  const int64_t words = bytes / 8, part = words / threads;
  std::vector<uint64_t> sink(threads * 8);
  double best = 0;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> team;
    for (int t = 0; t < threads; ++t)
      team.emplace_back([&, t] {
        const uint64_t* w = static_cast<const uint64_t*>(p) + t * part;
        uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
        for (int64_t i = 0; i + 8 <= part; i += 8) {
          a0 += w[i]; a1 += w[i + 1]; a2 += w[i + 2]; a3 += w[i + 3];
          a4 += w[i + 4]; a5 += w[i + 5]; a6 += w[i + 6]; a7 += w[i + 7];
        }
        sink[t * 8] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
      });
    for (auto& th : team) th.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (bytes / s / 1e9 > best) best = bytes / s / 1e9;
  }
  munmap(p, bytes);
  return best;
}
"""


def decode_bytes_per_token(model: str) -> int:
    """Bytes of weights one decode step reads: every 2-D tensor, the embedding table only if it is also the output."""
    from llamaworks.checkpoints.gguf import read_gguf_layout

    tensors = read_gguf_layout(model).tensors
    tied = "output.weight" not in tensors
    return sum(t.nbytes for n, t in tensors.items()
               if len(t.shape) == 2 and (n != "tok_embeddings.weight" or tied))


def read_bandwidth(nbytes: int, threads: int, repeats: int = 5) -> float:
    """This machine's read bandwidth in GB/s over `nbytes` with `threads` threads (best of `repeats`)."""
    import ctypes
    import tempfile

    from llamaworks.quant.build import compile_library

    with tempfile.TemporaryDirectory() as d:
        src, lib = Path(d) / "probe.cpp", Path(d) / "probe.so"
        src.write_text(_PROBE)
        compile_library(src, lib, flags=["-pthread"])
        fn = ctypes.CDLL(str(lib)).read_gb_per_s
        fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_int64, ctypes.c_int, ctypes.c_int]
        return fn(nbytes, threads, repeats)


def print_roofline(a: argparse.Namespace, table: dict[str, Any]) -> None:
    per_token = decode_bytes_per_token(a.model)
    bandwidth = read_bandwidth(max(per_token, 256 << 20), a.threads)
    ceiling = bandwidth * 1e9 / per_token
    print(f"\ndecode roofline: {per_token / 2**20:.1f} MiB of weights read per token; this machine reads "
          f"{bandwidth:.1f} GB/s with {a.threads} threads (best of 5), so decode cannot pass {ceiling:.1f} tok/s")
    for engine, row in table.items():
        tok_s = row["decode_tok_s"]["median"]
        print(f"  {engine:34s} {tok_s:7.1f} tok/s = {tok_s * per_token / 1e9:5.1f} GB/s, {tok_s / ceiling:4.0%} of it")


# -- driver --------------------------------------------------------------------------------------------------
def resolve_revisions(revs: list[str]) -> dict[str, str]:
    """{"llamaworks@SHORT": full commit id} for each --baseline REV of this checkout's repository (duplicates
    once); exits with git's message for a REV that is not a commit."""
    import subprocess

    resolved: dict[str, str] = {}
    for rev in revs:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--end-of-options", f"{rev}^{{commit}}"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"--baseline {rev}: not a commit of {REPO} ({out.stderr.strip() or 'git failed'})")
        full = out.stdout.strip()
        resolved[f"llamaworks@{full[:7]}"] = full
    return resolved


def add_worktrees(commits: dict[str, str], trees: dict[str, Path]) -> None:
    """A detached worktree in a new temporary directory for each commit, entered into `trees` as soon as it exists
    (so that the caller's cleanup removes every one made, whatever stops this)."""
    import subprocess
    import tempfile

    for name, full in commits.items():
        tree = Path(tempfile.mkdtemp(prefix=f"vs_peers-{full[:7]}-"))
        trees[name] = tree
        made = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(tree), full],
                              capture_output=True, text=True)
        if made.returncode != 0:
            sys.exit(f"--baseline {full[:7]}: git worktree add failed ({made.stderr.strip()})")
        if not (tree / "benchmarks" / "vs_peers.py").is_file():
            sys.exit(f"--baseline {full[:7]}: that revision has no benchmarks/vs_peers.py")


def remove_worktrees(trees: dict[str, Path]) -> None:
    import shutil
    import subprocess

    for tree in trees.values():
        gone = subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                              capture_output=True, text=True)
        shutil.rmtree(tree, ignore_errors=True)  # a directory git never registered
        if gone.returncode != 0 and "is not a working tree" not in gone.stderr:
            print(f"could not remove the worktree {tree}: {gone.stderr.strip()}", file=sys.stderr)
    if trees:
        subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], capture_output=True)


def _run_worker(a: argparse.Namespace, engine: str, baselines: dict[str, Path]) -> dict[str, float] | str:
    """One run of `engine` in a fresh process; a baseline runs its own checkout's worker on its own sources."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    script, worker, options = __file__, engine, ["--cpu-target", a.cpu_target,
                                                 *[arg for spec in a.llama_bench for arg in ("--llama-bench", spec)]]
    if engine in baselines:
        # Older checkouts know only the options every version has had (and --cpu-target only when it is asked for).
        script, worker = str(baselines[engine] / "benchmarks" / "vs_peers.py"), "llamaworks"
        options = ["--cpu-target", a.cpu_target] if a.cpu_target != "native" else []
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(baselines[engine] / "src"), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, script, "--worker", worker, "--model", a.model, "--threads", str(a.threads),
           "--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens), "--ctx", str(a.ctx),
           "--ids-file", a.ids_file, *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(results: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    import statistics

    table: dict[str, Any] = {}
    for engine, runs in results.items():
        if runs:
            table[engine] = {key: {"min": min(r[key] for r in runs), "median": statistics.median(r[key] for r in runs),
                                   "max": max(r[key] for r in runs)} for key, _, _ in FIGURES}
    return table


def print_report(a: argparse.Namespace, table: dict[str, Any], errors: dict[str, str]) -> None:
    from llamaworks.hardware import cpu_description
    from llamaworks.quant.lean_kernels import isa

    cpu = cpu_description()
    print(f"\nCPU: {cpu['model']}, SIMD: {cpu['simd']}\nllamaworks kernels: built for {a.cpu_target}: "
          f"{isa(a.cpu_target)}")
    print(f"model: {a.model}\nthreads: {a.threads}, prompt {a.prompt_tokens} tokens, decode {a.gen_tokens} tokens, "
          f"ctx {a.ctx}, {a.runs} alternating runs per engine after {a.warmup} warm-up\n")
    engines = list(table)
    print("| figure | " + " | ".join(f"{e} (min / median / max)" for e in engines) + " |")
    print("|---|" + "---|" * len(engines))
    for key, label, _ in FIGURES:
        cells = ["—" if math.isnan(table[e][key]["median"]) else
                 f"{table[e][key]['min']:.3g} / **{table[e][key]['median']:.4g}** / {table[e][key]['max']:.3g}"
                 for e in engines]
        print(f"| {label} | " + " | ".join(cells) + " |")
    ours = [e for e in engines if e.startswith("llamaworks")]
    current = [e for e in ours if "@" not in e]  # "llamaworks@REV" is a --baseline: a peer of the current code
    for mine in ours:
        for peer in [e for e in engines if e not in ours or (mine in current and e not in current)]:
            print(f"\n{mine} / {peer} (medians; >1 is better for llamaworks on speed, <1 on time and memory):")
            for key, label, _ in FIGURES:
                ratio = table[mine][key]["median"] / table[peer][key]["median"]
                if not math.isnan(ratio):
                    print(f"  {label:26s} {ratio:6.2f}x")
    for engine, message in errors.items():
        print(f"\n{engine}: skipped ({message})")


def print_agreement(results: dict[str, list[dict[str, Any]]]) -> None:
    """Whether the engines did the same work: their greedy tokens after the same prompt (first run of each)."""
    tokens = {e: runs[0]["tokens"] for e, runs in results.items() if runs and "tokens" in runs[0]}
    names = list(tokens)
    if len(names) < 2:
        return
    print("\ngreedy tokens after the benchmark prompt (first run of each engine):")
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            same = next((k for k, (p, q) in enumerate(zip(tokens[x], tokens[y])) if p != q), None)
            n = min(len(tokens[x]), len(tokens[y]))
            verdict = f"identical for all {n}" if same is None else f"identical for {same}, then part at token {same}"
            print(f"  {x} vs {y}: {verdict}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1,
                   help="unreported runs of each engine first (the first process after a large file read can "
                        "meet the kernel still compacting memory for huge pages, or a cold page cache)")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker run")
    p.add_argument("--json", default=None, help="also write the raw runs and the summary here")
    p.add_argument("--llama-bench", action="append", default=[], metavar="BIN[=LABEL]",
                   help="a natively built llama-bench binary to compare with (repeatable)")
    p.add_argument("--cpu-target", default="native",
                   help="build llamaworks' torch-free kernels for this -march (x86-64-v3: AVX2) instead of native")
    p.add_argument("--roofline", action="store_true",
                   help="also measure the machine's read bandwidth and print each engine's decode against it")
    p.add_argument("--baseline", action="append", default=[], metavar="REV",
                   help="also run the native backend of this git revision (a temporary worktree), alternating with "
                        "the others: whether a change regressed, side by side on this CPU (repeatable)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ids-file", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.model is None:
        from llamaworks.assets import default_model_path

        a.model = str(default_model_path())
    if a.worker == "ids":
        short, prompt = _token_ids(a.model, a.prompt_tokens)
        print(json.dumps({"short": short, "prompt": prompt}))
        return 0
    benches = {f"llama-bench:{spec.partition('=')[2] or Path(spec).parent.parent.name}": spec.partition("=")[0]
               for spec in a.llama_bench}
    if a.worker in benches:
        print(json.dumps(work_llama_bench(a, benches[a.worker])))
        return 0
    if a.worker:
        # Token ids come from the driver, so no worker imports llamaworks/torch unless it is that engine.
        if a.ids_file:
            ids = json.loads(Path(a.ids_file).read_text())
            short, prompt = ids["short"], ids["prompt"]
        else:
            short, prompt = _token_ids(a.model, a.prompt_tokens)
        result = WORKERS[a.worker](a, short, prompt)
        result["peak_rss_mib"] = _peak_rss_mib()
        print(json.dumps(result))
        return 0

    import importlib.util
    import subprocess

    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    errors = {e: f"{MODULES[e]} is not installed" for e in engines if importlib.util.find_spec(MODULES[e]) is None}
    engines += list(benches)
    engines = [e for e in engines if e not in errors]
    commits = resolve_revisions(a.baseline)
    engines += list(commits)
    baselines: dict[str, Path] = {}
    try:
        add_worktrees(commits, baselines)
        results: dict[str, list[dict[str, float]]] = {e: [] for e in engines}
        import tempfile

        # The ids come from a subprocess too: the driver never maps torch's or llama.cpp's libraries, whose pages
        # a worker would then share (a shared page counts in both processes' RSS and cannot be paged out by one).
        ids = subprocess.run([sys.executable, __file__, "--worker", "ids", "--model", a.model,
                              "--prompt-tokens", str(a.prompt_tokens)], capture_output=True, text=True)
        if ids.returncode != 0:
            sys.exit(f"could not tokenize the prompts: {(ids.stderr.strip().splitlines() or ['?'])[-1]}")
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            f.write(ids.stdout.strip().splitlines()[-1])
        a.ids_file = f.name
        for r in range(-a.warmup, a.runs):
            for engine in engines:
                if engine in errors:
                    continue
                out = _run_worker(a, engine, baselines)
                if isinstance(out, str):
                    errors[engine] = out
                    continue
                label = f"run {r + 1}" if r >= 0 else "warm-up (not counted)"
                print(f"{label} {engine}: " + ", ".join(f"{k}={v:.4g}" for k, v in out.items() if k != "tokens"),
                      file=sys.stderr)
                if r >= 0:
                    results[engine].append(out)
        table = summarize(results)
        print_report(a, table, errors)
        print_agreement(results)
        if a.roofline and table:
            print_roofline(a, table)
    finally:
        remove_worktrees(baselines)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "runs": results, "summary": table, "errors": errors},
                                           indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
