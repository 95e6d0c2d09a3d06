"""`llamaworks bench`: prefill and decode speed, time to first token and peak memory of one backend.

backend "native" measures the C++ kernels (engine/native.py: what chat/generate/serve use for GGUF files on the
CPU), "torch" model.py on torch with quantized linears (engine/torch_backend.py); "auto" (default) picks as the
chat does. Both run through the backend contract (`forward(rows, tokens, positions, logits_for)`) on row 0.
Figures (one process, the model loaded once):
- load_s:          checkpoint -> ready model (GGUF blocks read into huge pages or memory-mapped, never expanded).
- ttft_s:          first token of a short chat prompt right after load (includes any first-call cost).
- prefill_tok_s:   `prompt_tokens` tokens through the model in one call, median of `runs`.
- decode_tok_s:    `gen_tokens` greedy one-token steps after that prompt, median of `runs`.
- peak_rss_mib:    the process's peak resident memory (with the torch backend, torch's own ~200 MiB included).
- cpu, cpu_simd, kernel_isa: the machine the figures come from and the SIMD paths the kernels were built with
  (`cpu_target` other than "native" builds the native kernels for another CPU class, e.g. x86-64-v3: AVX2).
- the backend's own facts (`Backend.describe()`): threads, where the weights are, the x8 share, ...
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
              ctx: int = 1024, runs: int = 3, threads: int | None = None, weights: str = "q8_0",
              mmap: bool | None = None, backend: str = "auto", cpu_target: str = "native") -> dict[str, Any]:
    """Measure one backend on one model; returns a JSON-able dict (see the module docstring)."""
    from .api import load_backend
    from .engine.backend import EngineOptions

    if cpu_target != "native":
        if backend == "torch":
            raise ValueError("--cpu-target builds the native kernels for another CPU: use --backend native")
        backend = "native"
    if prompt_tokens + gen_tokens > ctx:
        raise ValueError(f"--prompt-tokens + --gen-tokens ({prompt_tokens + gen_tokens}) exceed --ctx ({ctx})")
    options = EngineOptions.from_environment(max_context=ctx, threads=threads, mmap=mmap, cpu_target=cpu_target)
    rss_before = current_rss_mib()
    t0 = time.perf_counter()
    model = load_backend(model_path, backend=backend, options=options, device="cpu", quantize=weights)
    load_s = time.perf_counter() - t0

    def next_token(ids: list[int], start_pos: int) -> int:
        logits = model.forward([0] * len(ids), ids, range(start_pos, start_pos + len(ids)), [len(ids) - 1])
        return int(np.argmax(logits[0]))

    short = _short_chat_prompt(model.tokenizer, model.config.vocab_size)
    t1 = time.perf_counter()
    next_token([next_token(short, 0)], len(short))  # the first token and the first decode step after load
    ttft_s = time.perf_counter() - t1
    speeds = _speeds(next_token, model.config.vocab_size, prompt_tokens, gen_tokens, runs)
    facts = model.describe()
    cfg = model.config
    return {"engine": "llamaworks", "backend": model.name, **_machine(facts.pop("kernel_isa"), cpu_target),
            "model": str(getattr(model, "path", model_path)), "model_name": cfg.name,
            "params_m": round(cfg.n_params / 1e6, 1), "int8_activations": model.options.int8_activations, **facts,
            "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
            "ctx": ctx, "runs": runs, "load_s": round(load_s, 3), "ttft_s": round(ttft_s, 3), **speeds,
            "peak_rss_mib": round(peak_rss_mib(), 1), "rss_before_load_mib": round(rss_before, 1)}


def _machine(kernel_isa: str, cpu_target: str) -> dict[str, str]:
    from .hardware import cpu_description

    cpu = cpu_description()
    return {"cpu": cpu["model"], "cpu_simd": cpu["simd"], "cpu_target": cpu_target, "kernel_isa": kernel_isa}


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"llamaworks bench — {Path(result['model']).name} ({result['params_m']}M params, "
                        f"{result['backend']} backend, {result['threads']} threads)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    kernels_used = ", ".join([f"{'int8' if result['int8_activations'] else 'float32'} activations",
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
         runs: int = 3, threads: int | None = None, weights: str = "q8_0", as_json: bool = False,
         mmap: bool | None = None, backend: str = "auto", cpu_target: str = "native") -> int:
    result = run_bench(model, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, ctx=ctx, runs=runs,
                       threads=threads, weights=weights, mmap=mmap, backend=backend, cpu_target=cpu_target)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":  # python -m llamaworks.bench [MODEL]
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else None, as_json=True))
