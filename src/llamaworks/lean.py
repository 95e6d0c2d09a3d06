"""The torch-free runtime: a GGUF model on the native kernels alone, in a process that never imports torch.

    model = LeanModel.load()                                   # the bundled SmolLM2, or a GGUF path
    ids = model.tokenizer.encode("The capital of France is")
    logits = model.forward(ids, start_pos=0)                   # numpy (vocab,): the last token's
    for item in generate_stream(model, model.tokenizer, ids, SamplingParams(temperature=0)): ...

Why it exists: `import torch` alone keeps ~220 MiB resident (its libraries and ~1,100 Python modules), more
than the default model's weights (94 MiB), so no process that imports torch can run SmolLM2 in llama.cpp's
memory. This runtime needs numpy, `tokenizers` and the small C++ library in quant/_lean.cpp, built from the
same kernels as the torch runtime (quant/_kernels_core.h): int8 activations with integer dot products (AVX-512
VNNI, AVX2, NEON: whatever this CPU has), x8 rows, a float16 KV cache. Prompts run through the decode kernels
in chunks of 32 tokens (8 with float activations; weights read once per chunk).

`llamaworks chat`, `generate` and `bench` use it for GGUF models on the CPU (`--runtime torch` selects the torch
runtime); `llamaworks.load(path, runtime="lean")` gives an `LLM` on it. Q4_0/Q4_1/Q8_0 blocks are used as they
are; other GGUF types are converted at load as the torch runtime converts them (Q2_K-Q4_K to Q4_1, wider
K-quants and Q5_* to Q8_0), and float matrices (F16, BF16, F32) to Q8_0. What needs torch (CUDA, LoRA,
training, evaluation, the batching server) uses the torch runtime.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoints.ggml_types import KERNEL_TYPES, REQUANT_TARGET, GGMLType
from .checkpoints.gguf import _generation_config, read_gguf_layout
from .config import ModelConfig, rope_inverse_frequencies
from .errors import ConfigError, FormatError
from .hardware import physical_cores
from .quant import lean_kernels
from .quant.lean_kernels import LwLayer, LwModel, call
from .quant.memory import huge_pages_available, lazy_zeros_buffer, read_into_huge_pages
from .sampling import (
    GenerationResult,
    RowState,
    SamplingParams,
    check_prompts,
    context_size,
)

INTERLEAVED = 256  # flag on a type code: rows regrouped 8 at a time (see _kernels_core.h)
_LAYER_MATRICES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                   "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")  # LwLayer.weight order


class LeanUnsupported(FormatError):
    """The file is a valid model the torch-free runtime cannot run (`--runtime auto` then uses the torch one)."""


_pools: dict[tuple[int, int, str], int] = {}  # (process id, threads, CPU target) -> the native thread pool
_pools_lock = threading.Lock()


def _pool(threads: int, cpu_target: str = "native") -> int:
    """The native pool for `threads` in this process and library: made once, shared by every LeanModel (a fork's
    child makes its own: the parent's threads do not exist there)."""
    key = (os.getpid(), threads, cpu_target)
    with _pools_lock:
        if key not in _pools:
            pool = lean_kernels.library(cpu_target).lw_pool_new(threads)
            if not pool:
                raise RuntimeError(f"could not start {threads} threads for the torch-free runtime")
            _pools[key] = pool
        return _pools[key]


def available() -> bool:
    """Whether the torch-free runtime can run here (its native library builds and loads)."""
    try:
        lean_kernels.library()
    except lean_kernels.LeanUnavailable:
        return False
    return True


def _convert(name: str, t: Any, target: GGMLType, source: Path) -> np.ndarray:
    """A GGUF tensor of another type as `target` blocks (rows, row_bytes), for the kernels."""
    import gguf  # numpy reference (de)quantizers; only for files whose types have no kernel

    try:
        values = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType(int(t.qtype)))
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(t.shape)
        return gguf.quants.quantize(values, gguf.GGMLQuantizationType(int(target)))
    except Exception as e:  # a damaged tensor: name it
        raise FormatError(f"{source}: cannot convert tensor {name!r} ({t.qtype.name}) to {target.name}: {e}") from None


def _tokenizer(meta: dict[str, Any], path: Path) -> Any:
    """The GGUF's own tokenizer, or None when it carries none."""
    tok_meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    if not any(k.startswith("tokenizer.ggml.") for k in tok_meta):
        return None
    from .tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(tok_meta, str(path))


def _vector(name: str, t: Any, source: Path) -> np.ndarray:
    """A norm weight as a float32 copy."""
    data = np.asarray(t.data)
    if t.qtype == GGMLType.F32:
        return np.array(data.view(np.float32))
    if t.qtype == GGMLType.F16:
        return data.view(np.float16).astype(np.float32)
    if t.qtype == GGMLType.BF16:
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise LeanUnsupported(f"{source}: norm weight {name!r} is {t.qtype.name}; the torch-free runtime reads F32, F16 "
                          f"or BF16 norms (use --runtime torch)")


@dataclass
class LeanModel:
    """A GGUF llama model ready for the native forward pass, with its tokenizer and KV cache."""

    config: ModelConfig  # max_seq_len is the KV cache's size (`max_context`)
    tokenizer: Any
    chat_template: str | None
    generation_config: dict[str, Any]
    path: Path
    threads: int
    weights_in: str  # "memory" or "mmap"
    kv_dtype: str  # "float16" (default, as llama.cpp) or "float32"
    interleaved_share: float  # fraction of the layers' matrices in x8 rows
    cpu_target: str  # the kernels' build target: "native" (this CPU) or a -march value
    _keep: list[Any] = field(default_factory=list, repr=False)  # arrays the C structures point into
    _model: Any = field(default=None, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)  # one forward at a time: one KV cache
    cached: list[int] = field(default_factory=list)  # tokens whose keys/values fill cache positions 0..n-1

    torch_free = True  # generation loops dispatch on this (sampling.stream_function)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, *, max_context: int | None = None,
             threads: int | None = None, mmap: bool | None = None, interleave: bool | None = None,
             kv_dtype: str = "float16", cpu_target: str = "native") -> LeanModel:
        """Read a GGUF file (None: the bundled default model). max_context: KV cache positions (default: the
        model's maximum; pages are committed only as positions fill). threads: default physical cores.
        mmap: keep the blocks mapped from the file (default LLAMAWORKS_MMAP) instead of read into huge pages.
        interleave: x8 rows for Q4_0/Q4_1 matrices (default on unless LLAMAWORKS_INTERLEAVE=0; never with mmap).
        kv_dtype: "float16" (half the memory; attention math is float32 either way) or "float32".
        cpu_target: the kernels' build target, "native" (this CPU's SIMD paths) or a -march value such as
        "x86-64-v3" (AVX2) or "x86-64-v2" (the scalar reference), to measure or test another CPU's paths here."""
        lib = lean_kernels.library(cpu_target)
        if path is None:
            from .assets import default_model_path

            path = default_model_path()
        path = Path(path)
        if not path.is_file():
            raise FormatError(f"{path}: no such GGUF file (the torch-free runtime reads GGUF files only)")
        if mmap is None:
            mmap = os.environ.get("LLAMAWORKS_MMAP", "0") not in ("", "0")
        if interleave is None:
            interleave = os.environ.get("LLAMAWORKS_INTERLEAVE", "1") not in ("", "0")
        layout = read_gguf_layout(path)
        config, meta, tensors = layout.config, layout.metadata, layout.tensors
        ctx = context_size(config, max_context)
        if config.dim % 32 or config.hidden_dim % 32 or config.n_heads * config.head_size % 32:
            raise LeanUnsupported(f"{path}: the torch-free runtime needs dimensions that are multiples of 32 "
                                  f"(dim {config.dim}, hidden {config.hidden_dim}); use --runtime torch")
        if kv_dtype not in ("float16", "float32"):
            raise ValueError(f"kv_dtype {kv_dtype!r}: expected float16 or float32")
        threads = threads or physical_cores()
        if threads < 1:
            raise ValueError(f"threads={threads}: expected a positive number")

        tokenizer: Any = False  # not built yet
        matrices = [n for n in tensors if tensors[n].shape and len(tensors[n].shape) == 2]
        in_place = [n for n in matrices if tensors[n].qtype in KERNEL_TYPES]
        blocks: dict[str, np.ndarray] = {}
        if mmap:
            for n in in_place:
                blocks[n] = np.asarray(tensors[n].data).reshape(tensors[n].shape[0], -1)
        elif in_place:
            # Read the blocks on another thread while this one builds the tokenizer (file reads release the
            # GIL): SmolLM2 loads in ~0.35 s instead of ~0.55.
            with ThreadPoolExecutor(1) as reader:
                spans = [(tensors[n].offset, tensors[n].nbytes) for n in in_place]
                arrays = reader.submit(read_into_huge_pages, path, spans, huge=huge_pages_available())
                tokenizer = _tokenizer(meta, path)
                blocks.update({n: a.reshape(tensors[n].shape[0], -1) for n, a in zip(in_place, arrays.result())})
        if tokenizer is False:
            tokenizer = _tokenizer(meta, path)
        types = {n: int(tensors[n].qtype) for n in in_place}
        for n in matrices:
            if n not in blocks:
                target = REQUANT_TARGET.get(tensors[n].qtype, GGMLType.Q8_0)
                blocks[n], types[n] = _convert(n, tensors[n], target, path), int(target)

        pool = _pool(threads, cpu_target)
        owned = not mmap  # blocks in memory this process owns may be regrouped in place
        if interleave and owned:
            for n in matrices:
                if (n != "tok_embeddings.weight" and types[n] in (GGMLType.Q4_0, GGMLType.Q4_1)
                        and blocks[n].shape[0] % 8 == 0):
                    a = blocks[n]
                    call(lib.lw_interleave, a.ctypes.data, a.shape[0], types[n], tensors[n].shape[1], pool)
                    types[n] |= INTERLEAVED
        layer_names = [f"layers.{i}.{m}.weight" for i in range(config.n_layers) for m in _LAYER_MATRICES]
        share = sum(bool(types[n] & INTERLEAVED) for n in layer_names) / max(1, len(layer_names))

        norms = {n: _vector(n, t, path) for n, t in tensors.items() if n.endswith("norm.weight")}
        inv_freq = layout.inv_freq if layout.inv_freq is not None else rope_inverse_frequencies(config)
        inv_freq = np.ascontiguousarray(inv_freq, dtype=np.float32)
        cache_shape = (config.n_layers, config.kv_heads, ctx, config.head_size)
        kv_type = np.dtype(kv_dtype)
        nbytes = math.prod(cache_shape) * kv_type.itemsize  # resident only as positions are written
        try:
            k_cache, v_cache = (np.frombuffer(lazy_zeros_buffer(nbytes), kv_type).reshape(cache_shape) for _ in "kv")
        except (OSError, MemoryError, ValueError):
            raise ConfigError(f"{path}: cannot reserve {2 * nbytes:,} bytes of KV cache for a context of {ctx:,} "
                              f"positions; pass a smaller --max-context") from None

        layers = (LwLayer * config.n_layers)()
        for i in range(config.n_layers):
            p = f"layers.{i}."
            layers[i].attn_norm = norms[p + "attention_norm.weight"].ctypes.data
            layers[i].ffn_norm = norms[p + "ffn_norm.weight"].ctypes.data
            for j, m in enumerate(_LAYER_MATRICES):
                layers[i].weight[j] = blocks[f"{p}{m}.weight"].ctypes.data
                layers[i].type[j] = types[f"{p}{m}.weight"]
        output = "output.weight" if "output.weight" in blocks else "tok_embeddings.weight"
        native = LwModel(dim=config.dim, hidden=config.hidden_dim, n_layers=config.n_layers, n_heads=config.n_heads,
                         n_kv_heads=config.kv_heads, head_dim=config.head_size, vocab=config.vocab_size, ctx=ctx,
                         window=config.sliding_window or 0, eps=config.norm_eps, inv_freq=inv_freq.ctypes.data,
                         embedding=blocks["tok_embeddings.weight"].ctypes.data,
                         embedding_type=types["tok_embeddings.weight"], output=blocks[output].ctypes.data,
                         output_type=types[output], output_norm=norms["norm.weight"].ctypes.data,
                         layers=ctypes.cast(layers, ctypes.POINTER(LwLayer)),
                         k_cache=k_cache.ctypes.data, v_cache=v_cache.ctypes.data,
                         kv_float32=int(kv_dtype == "float32"))

        model = cls(config=config.replace(max_seq_len=ctx), tokenizer=tokenizer,
                    chat_template=meta.get("tokenizer.chat_template"), generation_config=_generation_config(meta),
                    path=path, threads=threads, weights_in="mmap" if mmap else "memory", kv_dtype=kv_dtype,
                    interleaved_share=share, cpu_target=cpu_target)
        model._keep = [blocks, norms, inv_freq, k_cache, v_cache, layers]
        model._model = native
        return model

    def forward(self, tokens: Sequence[int], start_pos: int, *, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` at positions start_pos.. (their keys/values enter the cache); the last token's logits
        (vocab,) float32, or every token's (n, vocab) with all_logits. Later positions' cache entries are
        simply overwritten by later calls, so rewinding is calling with an earlier start_pos."""
        ids = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        n, vocab = len(ids), self.config.vocab_size
        logits = np.empty((n if all_logits else 1, vocab), np.float32)
        lib = lean_kernels.library(self.cpu_target)
        with self._lock:
            # Positions from start_pos on are about to change: forget them first (a failed call may have written
            # some); beyond the known prefix nothing is known.
            if start_pos > len(self.cached):
                self.cached.clear()
            del self.cached[start_pos:]
            call(lib.lw_forward, ctypes.byref(self._model), _pool(self.threads, self.cpu_target), ids.ctypes.data, n,
                 int(start_pos), logits.ctypes.data, int(all_logits))
            if start_pos == len(self.cached):
                self.cached.extend(int(t) for t in ids)
        return logits if all_logits else logits[0]

    def prefill(self, prompt: Sequence[int]) -> np.ndarray:
        """The last prompt token's logits, reusing the cache for the prefix shared with the previous call (a
        chat's earlier turns are not computed again)."""
        prompt = list(prompt)
        if not prompt:
            raise ValueError("prefill needs at least one token")
        shared = 0
        limit = min(len(self.cached), len(prompt) - 1)  # at least one token runs, for its logits
        while shared < limit and self.cached[shared] == prompt[shared]:
            shared += 1
        return self.forward(prompt[shared:], shared)

    def reset(self) -> None:
        """Forget the cached prefix (the cache's contents are overwritten by the next prompt)."""
        self.cached = []

    def n_params(self) -> int:
        return self.config.n_params


# -- sampling ------------------------------------------------------------------------------------------------
def _penalized(logits: np.ndarray, params: SamplingParams, history: Sequence[int]) -> np.ndarray:
    x = np.array(logits, dtype=np.float32)
    if history and params.has_penalties:
        seen, counts = np.unique(np.asarray(history, dtype=np.int64), return_counts=True)
        values = x[seen]
        if params.repetition_penalty != 1.0:
            values = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
        x[seen] = values - params.presence_penalty - params.frequency_penalty * counts.astype(np.float32)
    return x


def _nucleus(x: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """x with entries outside the top_k and outside the top_p probability mass set to -inf, as generate.py's
    filter: after top-k, probabilities are renormalised over the kept tokens and a token stays while the mass of
    those ranked before it is below top_p. Without top-k only tokens within e^-30 of the best are sorted when the
    others cannot reach the nucleus (their whole mass is below 1 - top_p: each has all the sorted ones before it)."""
    V = x.shape[0]
    k = top_k if 0 < top_k < V else V
    best = float(x.max())
    if k < V:
        candidates = np.argpartition(-x, k - 1)[:k]
    else:
        candidates = np.arange(V)
    outside = 0.0  # probability mass (relative to the best token's) of tokens left unsorted
    if top_p < 1.0 and k == V:
        head = np.flatnonzero(x >= best - 30.0)
        tail = float(np.exp(np.delete(x, head).astype(np.float64) - best).sum())
        total = tail + float(np.exp(x[head].astype(np.float64) - best).sum())
        if tail < (1.0 - top_p) * total:
            candidates, outside = head, tail
    order = candidates[np.argsort(-x[candidates], kind="stable")]
    kept = x[order]
    if top_p < 1.0:
        weights = np.exp(kept.astype(np.float64) - best)
        probs = weights / (weights.sum() + outside)
        kept = np.where(np.cumsum(probs) - probs < top_p, kept, -np.inf)
    out = np.full_like(x, -np.inf)
    out[order] = kept
    return out


def sample_token(logits: np.ndarray, params: SamplingParams, history: Sequence[int],
                 rng: np.random.Generator) -> int:
    """The next token from one row of logits: penalties, then greedy argmax or temperature, top-k, top-p, min-p
    and an inverse-CDF draw (the same rules as generate.sample_next)."""
    x = _penalized(logits, params, history)
    if params.greedy:
        return int(np.argmax(x))
    x = x / np.float32(params.temperature)
    if (0 < params.top_k < x.shape[0]) or params.top_p < 1.0:
        x = _nucleus(x, params.top_k, params.top_p)
    best = x.max()
    weights = np.exp(x.astype(np.float64) - best)
    if params.min_p > 0:
        weights[weights < params.min_p] = 0.0  # p_i / p_max = exp(x_i - x_max)
    cdf = np.cumsum(weights)
    total = cdf[-1]
    if not math.isfinite(total) or total <= 0:
        raise ValueError("sampling: probabilities must be finite and not all zero")
    index = int(np.searchsorted(cdf, rng.random() * total, side="right"))
    return index if index < len(cdf) else int(np.flatnonzero(weights)[-1])


# -- generation ----------------------------------------------------------------------------------------------
def generate_stream(model: LeanModel, tokenizer: Any, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                    *, max_context: int | None = None) -> Iterator[str | GenerationResult]:
    """generate.generate_stream for a LeanModel: text chunks as they become final, then one GenerationResult."""
    params = params or SamplingParams()
    context = context_size(model, max_context)
    prompt = list(prompt_ids)
    check_prompts([prompt], context)
    rng = np.random.default_rng(params.seed)
    row = RowState(tokenizer, prompt, params, min(params.max_new_tokens, context - len(prompt)), rng)
    t0 = time.perf_counter()
    logits = model.prefill(prompt)
    token = sample_token(logits, params, row.history, rng)
    prefill_seconds, decode_seconds = time.perf_counter() - t0, 0.0
    while True:
        chunk = row.accept(token)
        if chunk:
            yield chunk
        if row.finish_reason is not None:
            break
        t1 = time.perf_counter()
        logits = model.forward([token], len(prompt) + len(row.generated) - 1)
        token = sample_token(logits, params, row.history, rng)
        decode_seconds += time.perf_counter() - t1
    yield GenerationResult(text=row.text.text, token_ids=row.generated, finish_reason=row.finish_reason,
                           prompt_tokens=len(prompt), completion_tokens=len(row.generated),
                           prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                           stop_sequence=row.stop_sequence)


def generate(model: LeanModel, tokenizer: Any, prompt_ids: Sequence[int], params: SamplingParams | None = None,
             *, max_context: int | None = None) -> GenerationResult:
    """One completion without streaming."""
    result = None
    for item in generate_stream(model, tokenizer, prompt_ids, params, max_context=max_context):
        if isinstance(item, GenerationResult):
            result = item
    assert result is not None
    return result


__all__ = ["LeanModel", "available", "generate", "generate_stream", "sample_token"]
