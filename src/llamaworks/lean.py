"""The torch-free runtime: a GGUF model on the native kernels alone, in a process that never imports torch.

    model = LeanModel.load()                                   # the bundled SmolLM2, or a GGUF path
    ids = model.tokenizer.encode("The capital of France is")
    logits = model.forward(ids, start_pos=0)                   # numpy (vocab,): the last token's
    for item in generate_stream(model, model.tokenizer, ids, SamplingParams(temperature=0)): ...

Why it exists: `import torch` alone keeps ~220 MiB resident (its libraries and ~1,100 Python modules), more
than the default model's weights (94 MiB), so no process that imports torch can run SmolLM2 in llama.cpp's
memory. This runtime needs numpy, `tokenizers` and the small C++ library in quant/_lean.cpp, built from the
same kernels as the torch runtime (quant/_kernels_core.h): int8 activations with VNNI dot products, x8 rows,
a float16 KV cache. Prompts run through the decode kernels in chunks of 32 tokens (weights read once per chunk).

`llamaworks chat`, `generate` and `bench` use it for GGUF models on the CPU (`--runtime torch` selects the torch
runtime); `llamaworks.load(path, runtime="lean")` gives an `LLM` on it. Q4_0/Q4_1/Q8_0 blocks are used as they
are; other GGUF types (K-quants, F16, F32) are converted to Q8_0 at load. What needs torch (CUDA, LoRA,
training, evaluation, the batching server) uses the torch runtime.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoints.ggml_types import GGMLType
from .checkpoints.gguf import _generation_config, read_gguf_layout
from .config import ModelConfig, rope_inverse_frequencies
from .errors import FormatError
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

KERNEL_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0)  # used in place; anything else becomes Q8_0
INTERLEAVED = 256  # flag on a type code: rows regrouped 8 at a time (see _kernels_core.h)
_LAYER_MATRICES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                   "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")  # LwLayer.weight order


def available() -> bool:
    """Whether the torch-free runtime can run here (its native library builds and loads)."""
    try:
        lean_kernels.library()
    except lean_kernels.LeanUnavailable:
        return False
    return True


def _to_q8_0(name: str, t: Any, source: Path) -> np.ndarray:
    """A GGUF tensor of any readable type as Q8_0 blocks (rows, row_bytes): what the kernels take."""
    import gguf  # numpy reference (de)quantizers; only for files whose types have no kernel

    try:
        if t.qtype == GGMLType.F32:
            values = np.asarray(t.data).view(np.float32)
        elif t.qtype == GGMLType.F16:
            values = np.asarray(t.data).view(np.float16).astype(np.float32)
        else:
            values = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType(int(t.qtype)))
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(t.shape)
        return gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
    except Exception as e:  # a damaged tensor: name it
        raise FormatError(f"{source}: cannot convert tensor {name!r} ({t.qtype.name}) to Q8_0: {e}") from None


def _vector(name: str, t: Any) -> np.ndarray:
    """A norm weight as a float32 copy."""
    if t.qtype == GGMLType.F16:
        return np.asarray(t.data).view(np.float16).astype(np.float32)
    if t.qtype != GGMLType.F32:
        raise FormatError(f"tensor {name!r}: a norm weight must be F32 or F16, found {t.qtype.name}")
    return np.array(np.asarray(t.data).view(np.float32))


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
    _keep: list[Any] = field(default_factory=list, repr=False)  # arrays the C structures point into
    _model: Any = field(default=None, repr=False)
    _pool: Any = field(default=None, repr=False)
    cached: list[int] = field(default_factory=list)  # tokens whose keys/values fill cache positions 0..n-1

    torch_free = True  # generation loops dispatch on this (sampling.stream_function)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, *, max_context: int | None = None,
             threads: int | None = None, mmap: bool | None = None, interleave: bool | None = None,
             kv_dtype: str = "float16") -> LeanModel:
        """Read a GGUF file (None: the bundled default model). max_context: KV cache positions (default: the
        model's maximum; pages are committed only as positions fill). threads: default physical cores.
        mmap: keep the blocks mapped from the file (default LLAMAWORKS_MMAP) instead of read into huge pages.
        interleave: x8 rows for Q4_0/Q4_1 matrices (default on unless LLAMAWORKS_INTERLEAVE=0; never with mmap).
        kv_dtype: "float16" (half the memory; attention math is float32 either way) or "float32"."""
        lib = lean_kernels.library()
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
            raise FormatError(f"{path}: dimensions must be multiples of 32 for the block kernels")
        if kv_dtype not in ("float16", "float32"):
            raise ValueError(f"kv_dtype {kv_dtype!r}: expected float16 or float32")
        threads = threads or physical_cores()
        if threads < 1:
            raise ValueError(f"threads={threads}: expected a positive number")

        matrices = [n for n in tensors if tensors[n].shape and len(tensors[n].shape) == 2]
        in_place = [n for n in matrices if tensors[n].qtype in KERNEL_TYPES]
        blocks: dict[str, np.ndarray] = {}
        if mmap:
            for n in in_place:
                blocks[n] = np.asarray(tensors[n].data).reshape(tensors[n].shape[0], -1)
        elif in_place:
            arrays = read_into_huge_pages(path, [(tensors[n].offset, tensors[n].nbytes) for n in in_place],
                                          huge=huge_pages_available())
            blocks.update({n: a.reshape(tensors[n].shape[0], -1) for n, a in zip(in_place, arrays)})
        for n in matrices:
            if n not in blocks:
                blocks[n] = _to_q8_0(n, tensors[n], path)
        types = {n: int(tensors[n].qtype) if tensors[n].qtype in KERNEL_TYPES else int(GGMLType.Q8_0)
                 for n in matrices}

        pool = lib.lw_pool_new(threads)
        owned = not mmap  # blocks in memory this process owns may be regrouped in place
        if interleave and owned and lib.lw_can_interleave():
            for n in matrices:
                if (n != "tok_embeddings.weight" and types[n] in (GGMLType.Q4_0, GGMLType.Q4_1)
                        and blocks[n].shape[0] % 8 == 0):
                    a = blocks[n]
                    call(lib.lw_interleave, a.ctypes.data, a.shape[0], types[n], tensors[n].shape[1], pool)
                    types[n] |= INTERLEAVED
        layer_names = [f"layers.{i}.{m}.weight" for i in range(config.n_layers) for m in _LAYER_MATRICES]
        share = sum(bool(types[n] & INTERLEAVED) for n in layer_names) / len(layer_names)

        norms = {n: _vector(n, t) for n, t in tensors.items() if n.endswith("norm.weight")}
        inv_freq = layout.inv_freq if layout.inv_freq is not None else rope_inverse_frequencies(config)
        inv_freq = np.ascontiguousarray(inv_freq, dtype=np.float32)
        cache_shape = (config.n_layers, config.kv_heads, ctx, config.head_size)
        kv_type = np.dtype(kv_dtype)
        nbytes = math.prod(cache_shape) * kv_type.itemsize  # resident only as positions are written
        k_cache, v_cache = (np.frombuffer(lazy_zeros_buffer(nbytes), kv_type).reshape(cache_shape) for _ in "kv")

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

        tokenizer = None
        tok_meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
        if any(k.startswith("tokenizer.ggml.") for k in tok_meta):
            from .tokenizer import Tokenizer

            tokenizer = Tokenizer.from_gguf_metadata(tok_meta, str(path))
        model = cls(config=config.replace(max_seq_len=ctx), tokenizer=tokenizer,
                    chat_template=meta.get("tokenizer.chat_template"), generation_config=_generation_config(meta),
                    path=path, threads=threads, weights_in="mmap" if mmap else "memory", kv_dtype=kv_dtype,
                    interleaved_share=share)
        model._keep = [blocks, norms, inv_freq, k_cache, v_cache, layers]
        model._model, model._pool = native, pool
        return model

    def forward(self, tokens: Sequence[int], start_pos: int, *, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` at positions start_pos.. (their keys/values enter the cache); the last token's logits
        (vocab,) float32, or every token's (n, vocab) with all_logits. Later positions' cache entries are
        simply overwritten by later calls, so rewinding is calling with an earlier start_pos."""
        ids = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        n, vocab = len(ids), self.config.vocab_size
        logits = np.empty((n if all_logits else 1, vocab), np.float32)
        lib = lean_kernels.library()
        call(lib.lw_forward, ctypes.byref(self._model), self._pool, ids.ctypes.data, n, int(start_pos),
             logits.ctypes.data, int(all_logits))
        del self.cached[start_pos:]
        self.cached.extend(int(t) for t in ids)
        return logits if all_logits else logits[0]

    def prefill(self, prompt: Sequence[int]) -> np.ndarray:
        """The last prompt token's logits, reusing the cache for the prefix shared with the previous call (a
        chat's earlier turns are not computed again)."""
        prompt = list(prompt)
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
    """x with entries outside the top_k and outside the top_p probability mass set to -inf (as generate.py's
    filter: a token stays while the mass of the tokens ranked before it is below top_p). Only tokens within
    e^-30 of the best are sorted when the rest cannot reach the nucleus (their whole mass is below 1 - top_p)."""
    V = x.shape[0]
    k = top_k if 0 < top_k < V else V
    candidates = np.arange(V)
    if top_p < 1.0:
        head = np.flatnonzero(x >= x.max() - 30.0)
        tail = np.exp(np.delete(x, head).astype(np.float64) - x.max()).sum()
        total = tail + np.exp(x[head].astype(np.float64) - x.max()).sum()
        if tail / total < 1.0 - top_p and len(head) >= min(k, V):
            candidates = head
    elif k < V:
        candidates = np.argpartition(-x, k - 1)[:k]
    order = candidates[np.argsort(-x[candidates], kind="stable")][:k]
    out = np.full_like(x, -np.inf)
    kept = x[order]
    if top_p < 1.0:
        probs = np.exp(kept.astype(np.float64) - kept[0])
        probs /= probs.sum()
        mass_before = np.cumsum(probs) - probs
        kept = np.where(mass_before < top_p, kept, -np.inf)
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
