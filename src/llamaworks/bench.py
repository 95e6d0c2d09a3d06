"""`llamaworks bench`: prefill and decode speed, time to first token and peak memory of the fast CPU path.

runtime "lean" measures the torch-free runtime (lean.py: what `llamaworks chat`/`generate` use for GGUF files on
the CPU), "torch" the quantized torch runtime (runtime.py: the server, the Python API); "auto" (default) picks
as the chat does. Figures (one process, the model loaded once):
- load_s:          checkpoint -> ready model (GGUF blocks read into huge pages or memory-mapped, never expanded).
- ttft_s:          first token of a short chat prompt right after load (includes any first-call cost).
- prefill_tok_s:   `prompt_tokens` tokens through the model in one call, median of `runs`.
- decode_tok_s:    `gen_tokens` greedy one-token steps after that prompt, median of `runs`.
- peak_rss_mib:    the process's peak resident memory (with the torch runtime, torch's own ~200 MiB included).
- cpu, cpu_simd, kernel_isa: the machine the figures come from and the SIMD paths the kernels were built with
  (`cpu_target` other than "native" builds the torch-free kernels for another CPU class, e.g. x86-64-v3: AVX2).
Prompts are fixed pseudo-random token ids (seeded), so other engines can be fed exactly the same tokens.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .memory_stats import current_rss_bytes, peak_rss_bytes


def peak_rss_mib() -> float:
    peak = peak_rss_bytes()
    return float("nan") if peak is None else peak / 2**20


def current_rss_mib() -> float:
    rss = current_rss_bytes()
    return float("nan") if rss is None else rss / 2**20


def bench_prompt(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    """Deterministic pseudo-random token ids (avoiding the first 100 ids, where special tokens live)."""
    return np.random.default_rng(seed).integers(100, vocab_size, n).tolist()


def _prefill_decode(next_token: Any, prompt: list[int], gen_tokens: int) -> tuple[float, float, list[int]]:
    """Seconds for the prompt and for gen_tokens - 1 greedy steps; next_token(ids, start_pos) -> argmax id."""
    t0 = time.perf_counter()
    out = [next_token(prompt, 0)]
    prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    for i in range(gen_tokens - 1):
        out.append(next_token([out[-1]], len(prompt) + i))
    decode = time.perf_counter() - t1
    return prefill, decode, out


def _speeds(next_token: Any, vocab_size: int, prompt_tokens: int, gen_tokens: int, runs: int) -> dict[str, Any]:
    prompt = bench_prompt(vocab_size, prompt_tokens)
    prefills, decodes = [], []
    for _ in range(runs):
        prefill, decode, _ = _prefill_decode(next_token, prompt, gen_tokens)
        prefills.append(prompt_tokens / prefill)
        decodes.append((gen_tokens - 1) / decode if gen_tokens > 1 else float("nan"))
    return {"prefill_tok_s": round(statistics.median(prefills), 1),
            "prefill_tok_s_all": [round(v, 1) for v in prefills],
            "decode_tok_s": round(statistics.median(decodes), 1),
            "decode_tok_s_all": [round(v, 1) for v in decodes]}


def _short_chat_prompt(tokenizer: Any, vocab_size: int) -> list[int]:
    if tokenizer is not None:
        return tokenizer.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    return bench_prompt(vocab_size, 24, seed=1)


def run_bench(model_path: str | os.PathLike[str] | None = None, *, prompt_tokens: int = 512, gen_tokens: int = 128,
              ctx: int = 1024, runs: int = 3, threads: int | None = None, compile: bool = False,
              weights: str = "q8_0", mmap: bool | None = None, runtime: str = "auto",
              cpu_target: str = "native") -> dict[str, Any]:
    """Measure the fast path on one model; returns a JSON-able dict (see the module docstring)."""
    from . import choose_runtime

    if cpu_target != "native":
        if runtime == "torch":
            raise ValueError("--cpu-target builds the torch-free kernels for another CPU: use --runtime lean")
        runtime = "lean"
    if prompt_tokens + gen_tokens > ctx:
        raise ValueError(f"--prompt-tokens + --gen-tokens ({prompt_tokens + gen_tokens}) exceed --ctx ({ctx})")
    if compile and runtime == "auto":
        runtime = "torch"  # torch.compile is the torch runtime's
    if choose_runtime(runtime, model_path, "cpu") == "lean":
        from .engine.native import NativeUnsupported

        try:
            return _run_lean(model_path, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, ctx=ctx, runs=runs,
                             threads=threads, mmap=mmap, cpu_target=cpu_target)
        except NativeUnsupported:
            if runtime != "auto":
                raise
    return _run_torch(model_path, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, ctx=ctx, runs=runs,
                      threads=threads, compile=compile, weights=weights, mmap=mmap)


def _machine(kernel_isa: str, cpu_target: str) -> dict[str, str]:
    from .hardware import cpu_description

    cpu = cpu_description()
    return {"cpu": cpu["model"], "cpu_simd": cpu["simd"], "cpu_target": cpu_target, "kernel_isa": kernel_isa}


def _run_lean(model_path: str | os.PathLike[str] | None, *, prompt_tokens: int, gen_tokens: int, ctx: int,
              runs: int, threads: int | None, mmap: bool | None, cpu_target: str = "native") -> dict[str, Any]:
    from .engine.backend import EngineOptions
    from .engine.native import NativeBackend
    from .lean import run
    from .quant.lean_kernels import isa

    rss_before = current_rss_mib()
    t0 = time.perf_counter()
    model = NativeBackend.load(model_path, EngineOptions.from_environment(max_context=ctx, threads=threads, mmap=mmap,
                                                                          cpu_target=cpu_target))
    load_s = time.perf_counter() - t0

    def next_token(ids: list[int], start_pos: int) -> int:
        return int(np.argmax(run(model, ids, start_pos)))

    short = _short_chat_prompt(model.tokenizer, model.config.vocab_size)
    t1 = time.perf_counter()
    next_token([next_token(short, 0)], len(short))  # the first token and the first decode step after load
    ttft_s = time.perf_counter() - t1
    speeds = _speeds(next_token, model.config.vocab_size, prompt_tokens, gen_tokens, runs)
    int8 = model.options.int8_activations
    return {"engine": "llamaworks", "runtime": "lean", **_machine(isa(cpu_target), cpu_target),
            "model": str(model.path), "model_name": model.config.name,
            "params_m": round(model.config.n_params / 1e6, 1), "threads": model.threads, "native_kernels": True,
            "int8_decode": int8, "bf16_prefill": False, "prefill_kernels": "int8 decode kernels, 32-token chunks"
            if int8 else "float decode kernels, 8-token chunks", "weights_in": model.weights_in,
            "interleaved_linears": round(model.interleaved_share, 3), "kv_dtype": model.options.kv_dtype,
            "compile": False,
            "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "ctx": ctx, "runs": runs,
            "load_s": round(load_s, 3), "ttft_s": round(ttft_s, 3), **speeds,
            "peak_rss_mib": round(peak_rss_mib(), 1), "rss_before_load_mib": round(rss_before, 1)}


def _run_torch(model_path: str | os.PathLike[str] | None, *, prompt_tokens: int, gen_tokens: int, ctx: int,
               runs: int, threads: int | None, compile: bool, weights: str, mmap: bool | None) -> dict[str, Any]:
    import torch

    from .quant import kernels
    from .quant.linear import GGMLLinear
    from .runtime import load_quantized_model, set_threads

    threads = set_threads(threads) if threads else torch.get_num_threads()
    rss_before = current_rss_mib()
    t0 = time.perf_counter()
    model, tokenizer, checkpoint = load_quantized_model(model_path, weights=weights, compile=compile, mmap=mmap)
    load_s = time.perf_counter() - t0
    model.setup_cache(1, ctx)

    @torch.inference_mode()
    def next_token(ids: list[int], start_pos: int) -> int:
        return int(model(torch.tensor([ids]), start_pos=start_pos, last_only=True)[0, -1].argmax())

    # Time to first token: a short chat turn, the first call after load (and the first decode step: it compiles
    # when asked).
    short = _short_chat_prompt(tokenizer, model.config.vocab_size)
    t1 = time.perf_counter()
    next_token([next_token(short, 0)], len(short))
    ttft_s = time.perf_counter() - t1
    speeds = _speeds(next_token, model.config.vocab_size, prompt_tokens, gen_tokens, runs)
    cfg = model.config
    linear = next((m for m in model.modules() if isinstance(m, GGMLLinear)), None)  # the numerics of its kernels
    int8, bf16 = linear is not None and linear.int8_activations, linear is not None and linear.bf16_prefill
    return {
        "engine": "llamaworks",
        "runtime": "torch",
        **_machine(kernels.isa(), "native"),
        "model": str(getattr(checkpoint, "path", model_path)),
        "model_name": cfg.name,
        "params_m": round(cfg.n_params / 1e6, 1),
        "threads": threads,
        "native_kernels": kernels.native_available(),
        "int8_decode": int8,
        "bf16_prefill": bf16,
        "prefill_kernels": "bf16 gemm" if bf16 else "float32 gemm",
        "weights_in": "mmap" if _is_file_mapped(model) else "memory",
        "interleaved_linears": _interleaved_share(model),
        "kv_dtype": str(model.kv_cache_dtype()).removeprefix("torch."),
        "compile": compile,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "ctx": ctx,
        "runs": runs,
        "load_s": round(load_s, 3),
        "ttft_s": round(ttft_s, 3),
        **speeds,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "rss_before_load_mib": round(rss_before, 1),
    }


def _interleaved_share(model: Any) -> float:
    """Fraction of the quantized linears whose rows are regrouped for the x8 decode kernel."""
    from .quant import GGMLLinear

    linears = [m for m in model.modules() if isinstance(m, GGMLLinear)]
    return round(sum(m.interleaved for m in linears) / len(linears), 3) if linears else 0.0


def _is_file_mapped(model: Any) -> bool:
    """Whether the first block tensor lies in a file mapping (else anonymous memory: huge pages or a copy)."""
    raws = [b for n, b in model.named_buffers() if n.endswith("raw")]
    if not raws:
        return False
    address = raws[0].data_ptr()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                span, _, _, _, inode, *_ = [*line.split(), ""]
                lo, hi = (int(v, 16) for v in span.split("-"))
                if lo <= address < hi:
                    return inode not in ("0", "")
    except OSError:
        pass
    return False


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"llamaworks bench — {Path(result['model']).name} ({result['params_m']}M params, "
                        f"{result['runtime']} runtime, {result['threads']} threads)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    kernels_used = ", ".join([f"{'int8' if result['int8_decode'] else 'float32'} decode activations",
                              f"prefill: {result['prefill_kernels']}",
                              f"{result['kv_dtype']} KV cache",
                              "weights memory-mapped" if result["weights_in"] == "mmap" else "weights in memory",
                              f"{result['interleaved_linears']:.0%} of linears in x8 rows"])
    rows = [
        ("CPU", f"{result['cpu']}; SIMD: {result['cpu_simd'] or 'none found'}"),
        ("kernel paths", f"{result['kernel_isa']} (built for {result['cpu_target']})"),
        ("kernels", kernels_used),
        ("load", f"{result['load_s']:.2f} s"),
        ("time to first token (short chat prompt)", f"{result['ttft_s']:.3f} s"),
        (f"prefill ({result['prompt_tokens']} tokens), median", f"{result['prefill_tok_s']:.1f} tok/s"),
        (f"decode ({result['gen_tokens']} tokens), median", f"{result['decode_tok_s']:.1f} tok/s"),
        (f"peak RSS (ctx {result['ctx']})", f"{result['peak_rss_mib']:.0f} MiB"),
        ("RSS before loading", f"{result['rss_before_load_mib']:.0f} MiB"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


def main(model: str | None = None, *, prompt_tokens: int = 512, gen_tokens: int = 128, ctx: int = 1024,
         runs: int = 3, threads: int | None = None, compile: bool = False, weights: str = "q8_0",
         as_json: bool = False, mmap: bool | None = None, runtime: str = "auto", cpu_target: str = "native") -> int:
    result = run_bench(model, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, ctx=ctx, runs=runs,
                       threads=threads, compile=compile, weights=weights, mmap=mmap, runtime=runtime,
                       cpu_target=cpu_target)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":  # python -m llamaworks.bench [MODEL]
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else None, as_json=True))
