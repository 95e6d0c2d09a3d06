"""`llamaworks bench`: prefill and decode speed, time to first token and peak memory of the fast CPU path.

Figures (one process, the model loaded once):
- load_s:          checkpoint -> ready model (GGUF blocks read into huge pages or memory-mapped, never expanded).
- ttft_s:          first token of a short chat prompt right after load (includes any first-call cost).
- prefill_tok_s:   `prompt_tokens` tokens through the model in one call, median of `runs`.
- decode_tok_s:    `gen_tokens` greedy one-token steps after that prompt, median of `runs`.
- peak_rss_mib:    the process's peak resident memory (torch's own libraries included: ~200 MiB of it).
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

import torch

from .memory_stats import current_rss_bytes, peak_rss_bytes
from .quant import kernels


def peak_rss_mib() -> float:
    peak = peak_rss_bytes()
    return float("nan") if peak is None else peak / 2**20


def current_rss_mib() -> float:
    rss = current_rss_bytes()
    return float("nan") if rss is None else rss / 2**20


def bench_prompt(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    """Deterministic pseudo-random token ids (avoiding the first 100 ids, where special tokens live)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab_size, (n,), generator=g).tolist()


@torch.inference_mode()
def _prefill_decode(model: Any, prompt: list[int], gen_tokens: int) -> tuple[float, float, list[int]]:
    tokens = torch.tensor([prompt])
    t0 = time.perf_counter()
    logits = model(tokens, start_pos=0, last_only=True)[:, -1]
    prefill = time.perf_counter() - t0
    out = [int(logits.argmax(-1))]
    t1 = time.perf_counter()
    for i in range(gen_tokens - 1):
        logits = model(torch.tensor([[out[-1]]]), start_pos=len(prompt) + i, last_only=True)[:, -1]
        out.append(int(logits.argmax(-1)))
    decode = time.perf_counter() - t1
    return prefill, decode, out


def run_bench(model_path: str | os.PathLike[str] | None = None, *, prompt_tokens: int = 512, gen_tokens: int = 128,
              ctx: int = 1024, runs: int = 3, threads: int | None = None, compile: bool = False,
              weights: str = "q8_0", mmap: bool | None = None) -> dict[str, Any]:
    """Measure the fast path on one model; returns a JSON-able dict (see the module docstring)."""
    from .runtime import load_quantized_model, set_threads

    if prompt_tokens + gen_tokens > ctx:
        raise ValueError(f"--prompt-tokens + --gen-tokens ({prompt_tokens + gen_tokens}) exceed --ctx ({ctx})")
    threads = set_threads(threads) if threads else torch.get_num_threads()
    rss_before = current_rss_mib()
    t0 = time.perf_counter()
    model, tokenizer, checkpoint = load_quantized_model(model_path, weights=weights, compile=compile, mmap=mmap)
    load_s = time.perf_counter() - t0
    model.setup_cache(1, ctx)

    # Time to first token: a short chat turn, the first call after load.
    short = [tokenizer.bos_id] if tokenizer is not None and getattr(tokenizer, "bos_id", None) is not None else []
    if tokenizer is not None:
        short = tokenizer.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    short = short or bench_prompt(model.config.vocab_size, 24, seed=1)
    t1 = time.perf_counter()
    with torch.inference_mode():
        first = model(torch.tensor([short]), start_pos=0, last_only=True)[:, -1].argmax(-1)
        model(first.view(1, 1), start_pos=len(short), last_only=True)  # the first decode step (compiles if asked)
    ttft_s = time.perf_counter() - t1

    prompt = bench_prompt(model.config.vocab_size, prompt_tokens)
    prefills, decodes = [], []
    for _ in range(runs):
        prefill, decode, _ = _prefill_decode(model, prompt, gen_tokens)
        prefills.append(prompt_tokens / prefill)
        decodes.append((gen_tokens - 1) / decode if gen_tokens > 1 else float("nan"))
    cfg = model.config
    return {
        "engine": "llamaworks",
        "model": str(getattr(checkpoint, "path", model_path)),
        "model_name": cfg.name,
        "params_m": round(cfg.n_params / 1e6, 1),
        "threads": threads,
        "native_kernels": kernels.native_available(),
        "int8_decode": kernels.int8_decode(),
        "bf16_prefill": kernels.bf16_prefill(),
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
        "prefill_tok_s": round(statistics.median(prefills), 1),
        "prefill_tok_s_all": [round(v, 1) for v in prefills],
        "decode_tok_s": round(statistics.median(decodes), 1),
        "decode_tok_s_all": [round(v, 1) for v in decodes],
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "rss_before_load_mib": round(rss_before, 1),
    }


def _interleaved_share(model: torch.nn.Module) -> float:
    """Fraction of the quantized linears whose rows are regrouped for the x8 decode kernel."""
    from .quant import GGMLLinear

    linears = [m for m in model.modules() if isinstance(m, GGMLLinear)]
    return round(sum(m.interleaved for m in linears) / len(linears), 3) if linears else 0.0


def _is_file_mapped(model: torch.nn.Module) -> bool:
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
                        f"{result['threads']} threads)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    kernels_used = ", ".join([f"{'int8' if result['int8_decode'] else 'float32'} decode activations",
                              f"{'bf16' if result['bf16_prefill'] else 'float32'} prefill",
                              f"{result['kv_dtype']} KV cache",
                              "weights memory-mapped" if result["weights_in"] == "mmap" else "weights in memory",
                              f"{result['interleaved_linears']:.0%} of linears in x8 rows"])
    rows = [
        ("kernels", kernels_used),
        ("load", f"{result['load_s']:.2f} s"),
        ("time to first token (short chat prompt)", f"{result['ttft_s']:.3f} s"),
        (f"prefill ({result['prompt_tokens']} tokens), median", f"{result['prefill_tok_s']:.1f} tok/s"),
        (f"decode ({result['gen_tokens']} tokens), median", f"{result['decode_tok_s']:.1f} tok/s"),
        (f"peak RSS (ctx {result['ctx']})", f"{result['peak_rss_mib']:.0f} MiB"),
        ("RSS before loading (python + torch)", f"{result['rss_before_load_mib']:.0f} MiB"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


def main(model: str | None = None, *, prompt_tokens: int = 512, gen_tokens: int = 128, ctx: int = 1024,
         runs: int = 3, threads: int | None = None, compile: bool = False, weights: str = "q8_0",
         as_json: bool = False, mmap: bool | None = None) -> int:
    result = run_bench(model, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, ctx=ctx, runs=runs,
                       threads=threads, compile=compile, weights=weights, mmap=mmap)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":  # python -m llamaworks.bench [MODEL]
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else None, as_json=True))
