"""The native backend: a GGUF llama model on the C++ kernels (quant/_lean.cpp), in a process that never imports
torch.

    backend = NativeBackend.load(None, EngineOptions(max_rows=8))     # the bundled SmolLM2, or a GGUF path
    ids = backend.tokenizer.encode("The capital of France is")
    logits = backend.forward([0] * len(ids), ids, range(len(ids)), [len(ids) - 1])   # (1, vocab)

Why it exists: `import torch` alone keeps ~220 MiB resident (its libraries and ~1,100 Python modules), more
than the default model's weights (94 MiB), so no process that imports torch can run SmolLM2 in llama.cpp's
memory. This backend needs numpy, `tokenizers` and the small C++ library in quant/_lean.cpp, built from the
same kernels as the torch backend (quant/_kernels_core.h): int8 activations with integer dot products (AVX-512
VNNI, AVX2, NEON: whatever this CPU has; `EngineOptions.int8_activations=False` keeps them float32), x8 rows, a
float16 KV cache. A forward call's tokens (any rows, any positions) run through the kernels in chunks of 128
tokens: every token of a chunk shares each weight read (float activations: each weight group dequantized once per
chunk; int8 on AVX-512: 16 tokens per vector, one per lane), so one row's prompt and eight rows' decode steps take
the same path.

Q4_0/Q4_1/Q8_0 blocks are used as they are; other GGUF types are converted at load as the torch backend converts
them (Q2_K-Q4_K to Q4_1, wider K-quants and Q5_* to Q8_0), and float matrices (F16, BF16, F32) to Q8_0.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoints.ggml_types import KERNEL_TYPES, REQUANT_TARGET, GGMLType, convert_blocks
from ..checkpoints.gguf import VOCABULARY_KEYS, _generation_config, read_gguf_layout
from ..config import ModelConfig, rope_inverse_frequencies
from ..errors import ConfigError, FormatError
from ..hardware import physical_cores
from ..quant import lean_kernels, memory
from ..quant.lean_kernels import LwLayer, LwModel, call
from ..quant.memory import (
    LONG_CALL_TOKENS,
    SHARED_LIBRARIES,
    huge_pages_available,
    lazy_zeros_buffer,
    read_into_huge_pages,
    release_freed_memory,
    release_startup_pages,
    trim_heap,
)
from ..sampling import context_size
from ..tokenizer import Tokenizer, read_gguf_tokenizer_metadata  # imported before any file is parsed (_tokenizer)
from .backend import EngineOptions

INTERLEAVED = 256  # flag on a type code: rows regrouped 8 at a time (see _kernels_core.h)
_LAYER_MATRICES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                   "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")  # LwLayer.weight order


DEFAULT_OPTIONS = EngineOptions()  # frozen: safe to share as a default


class NativeUnsupported(FormatError):
    """The file is a valid model the native backend cannot run (`--backend auto` then uses the torch one)."""


_pools: dict[tuple[int, int, str], int] = {}  # (process id, threads, CPU target) -> the native thread pool
_pools_lock = threading.Lock()


def _pool(threads: int, cpu_target: str = "native") -> int:
    """The native pool for `threads` in this process and library: made once, shared by every backend (a fork's
    child makes its own: the parent's threads do not exist there)."""
    key = (os.getpid(), threads, cpu_target)
    with _pools_lock:
        if key not in _pools:
            pool = lean_kernels.library(cpu_target).lw_pool_new(threads)
            if not pool:
                raise RuntimeError(f"could not start {threads} threads for the native backend")
            _pools[key] = pool
        return _pools[key]


def available() -> bool:
    """Whether the native backend can run here (its library builds and loads)."""
    try:
        lean_kernels.library()
    except lean_kernels.LeanUnavailable:
        return False
    return True


def _convert(name: str, t: Any, target: GGMLType, source: Path) -> np.ndarray:
    """A GGUF tensor of another type as `target` blocks (rows, row_bytes), for the kernels (ggml_types.convert_blocks:
    the same bytes as the torch backend's)."""
    try:
        return convert_blocks(t.data, int(t.qtype), tuple(t.shape), int(target))[0]
    except Exception as e:  # a damaged tensor: name it
        raise FormatError(f"{source}: cannot convert tensor {name!r} ({t.qtype.name}) to {target.name}: {e}") from None


def _tokenizer(vocabulary: dict[str, Any], path: Path) -> Any:
    """The GGUF's own tokenizer from its `tokenizer.*` metadata, or None when it carries none."""
    if not any(k.startswith("tokenizer.ggml.") for k in vocabulary):
        return None
    return Tokenizer.from_gguf_metadata(vocabulary, str(path))


def _vector(name: str, t: Any, source: Path) -> np.ndarray:
    """A norm weight as a float32 copy."""
    data = np.asarray(t.data)
    if t.qtype == GGMLType.F32:
        return np.array(data.view(np.float32))
    if t.qtype == GGMLType.F16:
        return data.view(np.float16).astype(np.float32)
    if t.qtype == GGMLType.BF16:
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise NativeUnsupported(f"{source}: norm weight {name!r} is {t.qtype.name}; the native backend reads F32, F16 "
                            f"or BF16 norms (use --backend torch)")


class NativeBackend:
    """A GGUF llama model on the native kernels with a KV cache of `max_rows` rows (see backend.Backend).

    The cache is (max_rows, n_layers, n_kv_heads, context, head_dim) for keys and for values, one row contiguous,
    in anonymous memory that the OS commits page by page as positions are first written; `release` gives a row's
    pages back. One lock serialises the native calls of a backend (they share the cache and the thread pool).
    """

    name = "native"

    def __init__(self, *, config: ModelConfig, options: EngineOptions, tokenizer: Any, chat_template: str | None,
                 generation_config: dict[str, Any], path: Path, threads: int, weights_in: str,
                 interleaved_share: float, native: LwModel, keep: list[Any]) -> None:
        self.config = config  # max_seq_len: the positions of one row
        self.options = options
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.generation_config = generation_config
        self.path = path
        self.threads = threads
        self.weights_in = weights_in  # "memory" or "mmap"
        self.interleaved_share = interleaved_share  # fraction of the layers' matrices in x8 rows
        self.cpu_target = options.cpu_target  # the kernels' build target: "native" (this CPU) or a -march value
        self._native = native
        self._keep = keep  # the arrays the C structures point into
        self._lock = threading.Lock()
        # Per row: positions below this may have been written (the high-water mark, lowered by release).
        self._filled = np.zeros(options.max_rows, np.int64)
        elem = np.dtype(options.kv_dtype or "float16").itemsize
        self._position_bytes = config.head_size * elem
        self._span_bytes = config.max_seq_len * self._position_bytes  # one (layer, kv head) span of a row
        self._spans = config.n_layers * config.kv_heads

    @property
    def max_rows(self) -> int:
        return self.options.max_rows

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, options: EngineOptions = DEFAULT_OPTIONS
             ) -> NativeBackend:
        """Read a GGUF file (None: the bundled default model) with `options` (threads, max_rows, max_context,
        kv_dtype, int8_activations, mmap, interleave, cpu_target; bf16_prefill is the torch backend's).
        cpu_target "x86-64-v3" (AVX2) or "x86-64-v2" (the scalar reference) runs another CPU's kernels here."""
        lib = lean_kernels.library(options.cpu_target)
        if path is None:
            from ..assets import default_model_path

            path = default_model_path()
        path = Path(path)
        if not path.is_file():
            raise FormatError(f"{path}: no such GGUF file (the native backend reads GGUF files only)")
        mmap = options.mmap
        # The header is checked first (its errors come before any tokenizer error, as with every loader). Then the
        # tokenizer, from a parse of its own, and the layout again: the vocabulary's tens of thousands of objects
        # are made and freed while nothing that lives on is made (memory freed among live objects stays
        # resident), and building the tokenizer, which briefly takes a few times their size, is over before the
        # weights arrive.
        read_gguf_layout(path, skip=VOCABULARY_KEYS)
        vocabulary = read_gguf_tokenizer_metadata(path)
        tokenizer = _tokenizer(vocabulary, path)
        del vocabulary
        release_freed_memory()
        layout = read_gguf_layout(path, skip=VOCABULARY_KEYS)
        config, meta, tensors = layout.config, layout.metadata, layout.tensors
        ctx = context_size(config, options.max_context)
        if config.dim % 32 or config.hidden_dim % 32 or config.n_heads * config.head_size % 32:
            raise NativeUnsupported(f"{path}: the native backend needs dimensions that are multiples of 32 "
                                    f"(dim {config.dim}, hidden {config.hidden_dim}); use --backend torch")
        threads = options.threads or physical_cores()
        first_load = release_startup_pages(SHARED_LIBRARIES)  # every library's start-up code, before the weights
        matrices = [n for n in tensors if tensors[n].shape and len(tensors[n].shape) == 2]
        in_place = [n for n in matrices if tensors[n].qtype in KERNEL_TYPES]
        blocks: dict[str, np.ndarray] = {}
        if mmap:
            for n in in_place:
                blocks[n] = np.asarray(tensors[n].data).reshape(tensors[n].shape[0], -1)
        elif in_place:
            spans = [(tensors[n].offset, tensors[n].nbytes) for n in in_place]
            arrays = read_into_huge_pages(path, spans, huge=huge_pages_available())
            blocks.update({n: a.reshape(tensors[n].shape[0], -1) for n, a in zip(in_place, arrays)})
        types = {n: int(tensors[n].qtype) for n in in_place}
        for n in matrices:
            if n not in blocks:
                target = REQUANT_TARGET.get(tensors[n].qtype, GGMLType.Q8_0)
                blocks[n], types[n] = _convert(n, tensors[n], target, path), int(target)

        pool = _pool(threads, options.cpu_target)
        if options.interleave and not mmap:  # blocks in memory this process owns may be regrouped in place
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
        cache_shape = (options.max_rows, config.n_layers, config.kv_heads, ctx, config.head_size)
        kv_type = np.dtype(options.kv_dtype or "float16")
        nbytes = math.prod(cache_shape) * kv_type.itemsize  # resident only as positions are written
        try:
            k_cache, v_cache = (np.frombuffer(lazy_zeros_buffer(nbytes), kv_type).reshape(cache_shape) for _ in "kv")
        except (OSError, MemoryError, ValueError):
            raise ConfigError(f"{path}: cannot reserve {2 * nbytes:,} bytes of KV cache for {options.max_rows} "
                              f"rows of {ctx:,} positions; pass a smaller --max-context") from None

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
                         window=config.sliding_window or 0, max_rows=options.max_rows, eps=config.norm_eps,
                         inv_freq=inv_freq.ctypes.data, embedding=blocks["tok_embeddings.weight"].ctypes.data,
                         embedding_type=types["tok_embeddings.weight"], output=blocks[output].ctypes.data,
                         output_type=types[output], output_norm=norms["norm.weight"].ctypes.data,
                         layers=ctypes.cast(layers, ctypes.POINTER(LwLayer)),
                         k_cache=k_cache.ctypes.data, v_cache=v_cache.ctypes.data,
                         kv_float32=int(options.kv_dtype == "float32"),
                         int8_activations=int(options.int8_activations))
        chat_template, generation_config = meta.get("tokenizer.chat_template"), _generation_config(meta)
        del layout, meta, tensors
        release_freed_memory()
        if first_load:  # and the load's own code (conversion, regrouping): no model of this process runs yet
            memory.page_out_library_code(SHARED_LIBRARIES)
        return cls(config=config.replace(max_seq_len=ctx), options=options.with_(threads=threads),
                   tokenizer=tokenizer, chat_template=chat_template,
                   generation_config=generation_config, path=path, threads=threads,
                   weights_in="mmap" if mmap else "memory", interleaved_share=share, native=native,
                   keep=[blocks, norms, inv_freq, k_cache, v_cache, layers])

    def _call(self, name: str, *args: object) -> None:
        lib = lean_kernels.library(self.cpu_target)
        call(getattr(lib, name), ctypes.byref(self._native), *args)

    def forward(self, rows: Sequence[int], tokens: Sequence[int], positions: Sequence[int],
                logits_for: Sequence[int]) -> np.ndarray:
        """See backend.Backend.forward: float32 logits (len(logits_for), vocab); ValueError for a row, position,
        token id or logits_for index out of range (one line naming the value)."""
        ids = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        row_ids = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
        pos = np.ascontiguousarray(positions, dtype=np.int64).reshape(-1)
        wanted = np.ascontiguousarray(logits_for, dtype=np.int64).reshape(-1)
        if not len(ids) == len(row_ids) == len(pos):
            raise ValueError(f"{len(ids)} tokens, {len(row_ids)} rows and {len(pos)} positions: expected one each")
        logits = np.empty((len(wanted), self.config.vocab_size), np.float32)
        with self._lock:
            self._call("lw_forward_batch", _pool(self.threads, self.cpu_target), ids.ctypes.data, row_ids.ctypes.data,
                       pos.ctypes.data, len(ids), wanted.ctypes.data, len(wanted), logits.ctypes.data)
            np.maximum.at(self._filled, row_ids, pos + 1)
        if len(ids) >= LONG_CALL_TOKENS:
            trim_heap()  # a prompt's activations went back to the C heap, which would keep them resident
        return logits

    def copy(self, src: int, dst: int, length: int) -> None:
        """Copy positions [0, length) of row src into row dst (a shared prompt prefix is not computed again)."""
        with self._lock:
            self._call("lw_copy_rows", int(src), int(dst), int(length))
            if src != dst:
                self._filled[dst] = max(self._filled[dst], length)

    def release(self, row: int, keep: int = 0) -> None:
        """Positions >= keep of `row` are no longer needed: their whole pages go back to the operating system."""
        with self._lock:
            self._call("lw_release", int(row), int(keep))
            self._filled[row] = min(self._filled[row], keep)

    def cache_bytes(self) -> int:
        """Resident bytes of the KV cache as this backend accounts them: for each row, the pages (of the OS's size)
        that its positions below the high-water mark touch in each (layer, kv head) span, keys and values. Pages
        never written cost nothing (the cache is anonymous memory committed on first write) and `release` returns
        them, so this follows the process's resident memory up to the page rounding."""
        page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        with self._lock:
            filled = self._filled.copy()
        row_bytes = self._spans * self._span_bytes
        total = 0
        spans = np.arange(self._spans, dtype=np.int64) * self._span_bytes
        for row in np.flatnonzero(filled):
            starts = row * row_bytes + spans
            ends = starts + int(filled[row]) * self._position_bytes
            total += int((-(-ends // page) - starts // page).sum())
        return 2 * total * page

    def describe(self) -> dict[str, Any]:
        """Facts for benchmark reports (see backend.Backend.describe)."""
        return {"kernel_isa": lean_kernels.isa(self.cpu_target), "threads": self.threads,
                "weights_in": self.weights_in, "interleaved_linears": round(self.interleaved_share, 3),
                "bf16_prefill": False, "kv_dtype": self.options.kv_dtype or "float16"}

    def __repr__(self) -> str:
        return (f"NativeBackend({self.config.name}, {self.max_rows} rows x {self.config.max_seq_len} positions, "
                f"{self.threads} threads, {self.cpu_target})")


__all__ = ["NativeBackend", "NativeUnsupported", "available"]
