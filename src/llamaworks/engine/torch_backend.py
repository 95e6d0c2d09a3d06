"""`TorchBackend`: the backend contract (engine/backend.py) on model.py's Transformer and torch.

    backend = TorchBackend.load("model.gguf", EngineOptions(max_rows=8))   # GGUF blocks stay quantized on the CPU
    backend = TorchBackend.load(path, reference=True)                    # the float reference
    backend = TorchBackend.from_model(model, tokenizer)                  # an in-memory model (training, tests)
    logits = backend.forward(rows, tokens, positions, logits_for)        # numpy float32 (len(logits_for), vocab)

Loading a GGUF on the CPU in float32 swaps `nn.Linear`/`nn.Embedding` for `quant.GGMLLinear`/`GGMLEmbedding` on
the file's own blocks (read into huge pages, or memory-mapped with options.mmap; other types converted per
tensor); elsewhere (CUDA, other dtypes, HF/Meta checkpoints, reference=True) the float model is loaded, and
`quantize=` block-quantizes its linears. The model's forward is never replaced: every call is
`Transformer.forward` with `positions` and `cache_rows` on its static per-row KV cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..hardware import physical_cores
from ..model import Transformer, lazily_committed, rope_frequencies
from ..quant import kernels
from ..quant.linear import KERNEL_TYPES, TYPE_BY_NAME, GGMLEmbedding, GGMLLinear
from ..quant.memory import (
    LONG_CALL_TOKENS,
    TORCH_LIBRARIES,
    huge_pages_available,
    read_into_huge_pages,
    release_startup_pages,
    trim_heap,
)
from .backend import EngineOptions

log = logging.getLogger(__name__)

_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def set_threads(threads: int | None = None) -> int:
    """Intra-op threads for CPU inference: physical cores by default (hyper-threads only add contention)."""
    n = threads or physical_cores()
    torch.set_num_threads(n)
    return n


# -- building and quantizing ----------------------------------------------------------------------------
def _is_quant_entry(v: Any) -> bool:
    return hasattr(v, "ggml_type") and hasattr(v, "raw")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: Transformer, state: dict[str, Any] | None = None, *,
                   weights: str | None = None) -> Transformer:
    """Swap the model's linears and embedding for block-quantized modules, in place.

    state:   a state dict whose quantized entries (GGUFQuantTensor-like: ggml_type, shape, raw) are used as they
             are; K-quants and other types are converted per tensor; float entries are left to `weights`.
    weights: "q8_0" | "q4_0" | "q4_1" (aliases "int8" = q8_0, "int4" = q4_1) quantizes the remaining float
             linears (and embedding) from the model itself; None keeps them float.
    """
    target = None
    if weights is not None:
        if weights.lower() not in TYPE_BY_NAME:
            raise ValueError(f"unknown weight format {weights!r}; choose one of {', '.join(TYPE_BY_NAME)}")
        target = TYPE_BY_NAME[weights.lower()]
    state = state or {}
    device = model.norm.weight.device

    def source(name: str, module: nn.Module) -> Any:
        entry = state.get(f"{name}.weight")
        if entry is not None and _is_quant_entry(entry):
            return entry
        if target is not None and isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[1] % 32 == 0:
            return module.weight.detach()  # rows that do not fill whole 32-blocks stay float
        return None

    names = [f"layers.{i}.{n}" for i in range(len(model.layers)) for n in _LINEARS]
    if model.output is not None:
        names.append("output")
    for name in names:
        module = model.get_submodule(name)
        entry = source(name, module)
        if entry is not None and not isinstance(module, GGMLLinear):
            _set_module(model, name, GGMLLinear.from_entry(entry, target or kernels.GGML_Q8_0).to(device))
    emb = model.tok_embeddings
    entry = source("tok_embeddings", emb)
    if entry is not None and not isinstance(emb, GGMLEmbedding) and model.config.dim % 32 == 0:
        model.tok_embeddings = GGMLEmbedding.from_entry(entry, target or kernels.GGML_Q8_0).to(device)
    if model.output is None and isinstance(model.tok_embeddings, GGMLEmbedding):
        # Tied logits read the same bytes as the embedding: no second copy.
        model.output = model.tok_embeddings.as_linear()
    return model


@contextlib.contextmanager
def _meta_init_is_free() -> Any:
    """Skip `nn.init.normal_` on meta tensors (nn.Embedding's init) while building the skeleton.

    A meta tensor has no values, but its first `normal_` imports torch's decomposition tables (about 830
    modules, +70 MiB of resident memory). Other tensors are initialised as usual.
    """
    original = nn.init.normal_

    def normal_(tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return tensor if tensor.is_meta else original(tensor, *args, **kwargs)

    nn.init.normal_ = normal_
    try:
        yield
    finally:
        nn.init.normal_ = original


def _blocks_in_huge_pages(checkpoint: Any, state: dict[str, Any]) -> dict[str, Any]:
    """`state` with the GGUF blocks used in place read into a huge-page buffer instead of mapped (quant/memory.py)."""
    names = [name for name, entry in state.items()
             if _is_quant_entry(entry) and int(entry.ggml_type) in KERNEL_TYPES
             and getattr(entry, "file_offset", None) is not None]
    path = getattr(checkpoint, "path", None)
    if not names or path is None or not Path(path).is_file() or not huge_pages_available():
        return state
    spans = [(state[n].file_offset, state[n].raw.nbytes) for n in names]
    arrays = read_into_huge_pages(path, spans)
    state = dict(state)
    for name, array in zip(names, arrays):
        state[name] = dataclasses.replace(state[name], raw=array.reshape(state[name].raw.shape))
    return state


def build_quantized_model(checkpoint: Any, *, device: torch.device | str | None = None,
                          weights: str | None = "q8_0", mmap: bool = False) -> Transformer:
    """A Transformer whose quantized checkpoint entries stay quantized (never expanded to float as a whole).

    checkpoint: a `checkpoints.Checkpoint` read with dequantize=False (GGUF). Float linears in it are
    block-quantized to `weights` (None keeps them float32); norms stay float32.
    mmap: keep the blocks memory-mapped from the file; by default (on the CPU, where transparent huge pages
    exist) they are read into a huge-page buffer, which decodes faster (see quant/memory.py).
    """
    config, state = checkpoint.config, checkpoint.state_dict
    device = torch.device(device) if device is not None else torch.device("cpu")
    owned = False
    if device.type == "cpu" and not mmap:
        copied = _blocks_in_huge_pages(checkpoint, state)
        owned, state = copied is not state, copied
    with torch.device("meta"), _meta_init_is_free():
        model = Transformer(config)
    target = TYPE_BY_NAME[weights.lower()] if weights else None
    floats: dict[str, Tensor] = {}
    for name, entry in state.items():
        module_name = name.rsplit(".", 1)[0]
        if _is_quant_entry(entry) or (target is not None and entry.ndim == 2 and entry.shape[1] % 32 == 0):
            if module_name == "tok_embeddings":
                module = GGMLEmbedding.from_entry(entry, target or kernels.GGML_Q8_0)
            else:  # blocks read into our huge-page buffer are this model's own: they may be regrouped
                module = GGMLLinear.from_entry(entry, target or kernels.GGML_Q8_0, owned=owned)
            _set_module(model, module_name, module.to(device))
        else:
            floats[name] = entry.float().to(device) if entry.dtype.is_floating_point else entry.to(device)
    for name, tensor in floats.items():
        module_name, _, pname = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, pname, nn.Parameter(tensor, requires_grad=False))
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        from ..errors import FormatError

        raise FormatError(f"{getattr(checkpoint, 'path', 'checkpoint')}: missing tensors: {', '.join(leftover[:3])}")
    inv_freq = (getattr(checkpoint, "metadata", None) or {}).get("rope_inv_freq")
    inv_freq = rope_frequencies(config) if inv_freq is None else torch.as_tensor(inv_freq)
    model.register_buffer("inv_freq", inv_freq.float().to(device), persistent=False)
    if model.output is None and isinstance(model.tok_embeddings, GGMLEmbedding):
        model.output = model.tok_embeddings.as_linear()
    return model.eval().requires_grad_(False)


_KV_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class TorchBackend:
    """The backend contract on a `Transformer` (see engine/backend.py for what each method promises).

    The KV cache is the model's own (`Transformer.setup_cache`): `options.max_rows` rows of `config.max_seq_len`
    positions in `options.kv_dtype`, lazily committed on the CPU. One backend per model: a second one replaces
    the first one's cache.
    """

    name = "torch"

    def __init__(self, model: Transformer, *, tokenizer: Any = None, options: EngineOptions | None = None,
                 checkpoint: Any = None) -> None:
        options = options or EngineOptions()
        self.model = model
        self.options = options
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.chat_template: str | None = getattr(checkpoint, "chat_template", None)
        self.generation_config: dict[str, Any] = dict(getattr(checkpoint, "generation_config", None) or {})
        context = min(model.config.max_seq_len, options.max_context or model.config.max_seq_len)
        self.config: ModelConfig = model.config.replace(max_seq_len=context)
        self.device = model.norm.weight.device
        from ..quant import linear

        linear.set_numerics(model, int8_activations=options.int8_activations, bf16_prefill=options.bf16_prefill)
        activations = model.norm.weight.dtype if model.norm.weight.dtype.is_floating_point else torch.float32
        self.kv_dtype = _KV_DTYPES[options.kv_dtype] if options.kv_dtype else activations
        model.setup_cache(options.max_rows, context, self.kv_dtype)
        self._filled = [0] * options.max_rows  # per row: positions [0, n) may have been written

    # -- loading ------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str] | None, options: EngineOptions | None = None, *,
             device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
             quantize: str | None = None, reference: bool = False) -> TorchBackend:
        """Load a checkpoint (None: the bundled default model).

        A GGUF on the CPU in float32 keeps its quantized blocks as they are (float tensors of the file stay
        float unless `quantize` names a block format); reference=True, another device or dtype, and HF/Meta
        checkpoints load the float model, whose linears `quantize` ("q8_0", "q4_0", "q4_1") block-quantizes.
        device: default CUDA when available, else the CPU.
        """
        from .. import resolve_device, resolve_dtype
        from ..assets import default_model_path, resolve_model_path
        from ..checkpoints import is_gguf_file, load_checkpoint, load_model

        options = options or EngineOptions()
        resolved = default_model_path() if path is None else resolve_model_path(path)
        device_, dtype_ = resolve_device(device), resolve_dtype(dtype)
        blocks = (not reference and device_.type == "cpu" and dtype_ in (None, torch.float32)
                  and is_gguf_file(resolved))
        if blocks:
            release_startup_pages(TORCH_LIBRARIES)  # torch's one-time start-up code, before the weights arrive
            checkpoint = load_checkpoint(resolved, dequantize=False)
            model = build_quantized_model(checkpoint, weights=quantize, mmap=options.mmap)
            checkpoint.state_dict = {}  # the model holds the tensors now
            if checkpoint.tokenizer is not None and checkpoint.metadata:
                # The tokenizer has been built; the vocabulary/merges lists (tens of MiB of Python objects) are
                # not needed by inference.
                checkpoint.metadata = {k: v for k, v in checkpoint.metadata.items()
                                       if not (k.startswith("tokenizer.ggml.") and isinstance(v, list))}
        else:
            model, _, checkpoint = load_model(resolved, dtype=dtype_, device=device_)
            if quantize is not None:
                quantize_model(model, weights=quantize)
        model.eval().requires_grad_(False)
        if device_.type == "cpu":
            set_threads(options.threads)
        if options.interleave:
            for module in model.modules():
                if isinstance(module, GGMLLinear):
                    module.interleave_()
        return cls(model, tokenizer=checkpoint.tokenizer, options=options, checkpoint=checkpoint)

    @classmethod
    def from_model(cls, model: Transformer, tokenizer: Any = None,
                   options: EngineOptions | None = None) -> TorchBackend:
        """Wrap an in-memory model (training-time evaluation, tests): its KV cache is set up here, and the numerics
        of any quantized modules follow `options`; its weights are used as they are. The process's torch threads
        change only when options.threads says so (a training run keeps its own setting)."""
        if options is not None and options.threads is not None and model.norm.weight.device.type == "cpu":
            set_threads(options.threads)
        return cls(model, tokenizer=tokenizer, options=options)

    # -- the contract -------------------------------------------------------------------------------------
    @property
    def max_rows(self) -> int:
        return self.options.max_rows

    @torch.inference_mode()
    def forward(self, rows: Sequence[int], tokens: Sequence[int], positions: Sequence[int],
                logits_for: Sequence[int]) -> np.ndarray:
        rows_, tokens_, positions_ = (np.asarray(a, dtype=np.int64).reshape(-1) for a in (rows, tokens, positions))
        wanted = np.asarray(logits_for, dtype=np.int64).reshape(-1)
        by_row = self._check(rows_, tokens_, positions_, wanted)
        # Rows with as many tokens as each other run as one (B, T) batch; each row's tokens are consecutive.
        by_length: dict[int, list[int]] = {}
        for row, index in by_row.items():
            by_length.setdefault(len(index), []).append(row)
        unique, inverse = np.unique(wanted, return_inverse=True)
        slot = np.full(len(tokens_), -1)
        slot[unique] = np.arange(len(unique))
        picked = torch.empty(len(unique), self.config.dim, device=self.device)
        tokens_t, positions_t = torch.from_numpy(tokens_), torch.from_numpy(positions_)
        model, training = self.model, self.model.training
        model.eval()  # (an in-memory model may be mid-training: no activation checkpointing here)
        try:
            for length_rows in by_length.values():
                index = np.stack([by_row[r] for r in length_rows])  # (B, T) token indices
                hidden = model(tokens_t[index].to(self.device), positions=positions_t[index].to(self.device),
                               cache_rows=torch.tensor(length_rows, device=self.device), return_hidden=True)
                flat, keep = index.reshape(-1), slot[index.reshape(-1)] >= 0
                if keep.any():
                    picked[torch.from_numpy(slot[flat[keep]])] = hidden.reshape(len(flat), -1)[
                        torch.from_numpy(keep).to(self.device)].to(picked.dtype)
                del hidden
        finally:
            model.train(training)
        for row, index in by_row.items():
            self._filled[row] = max(self._filled[row], int(positions_[index[-1]]) + 1)
        if len(tokens_) >= LONG_CALL_TOKENS and self.device.type == "cpu":
            trim_heap()  # a prompt's activations went back to the C heap, which would keep them resident
        if not len(unique):
            return np.zeros((0, self.config.vocab_size), dtype=np.float32)
        logits = model.lm_head(picked.to(model.norm.weight.dtype)).float()
        return logits[torch.from_numpy(inverse).to(self.device)].cpu().numpy()

    def _check(self, rows: np.ndarray, tokens: np.ndarray, positions: np.ndarray,
               wanted: np.ndarray) -> dict[int, np.ndarray]:
        """Each row's token indices, in call order, after checking the call against the contract."""
        n = len(tokens)
        if len(rows) != n or len(positions) != n:
            raise ValueError(f"rows, tokens and positions differ in length ({len(rows)}, {n}, {len(positions)})")
        _in_range("rows", rows, self.max_rows)
        _in_range("positions", positions, self.config.max_seq_len)
        _in_range("token ids", tokens, self.config.vocab_size)
        _in_range("logits_for", wanted, n)
        by_row: dict[int, np.ndarray] = {}
        for row in dict.fromkeys(rows.tolist()):
            index = np.flatnonzero(rows == row)
            if np.any(np.diff(positions[index]) != 1):
                raise ValueError(f"row {row}: a call's tokens of one row need consecutive increasing positions")
            by_row[row] = index
        return by_row

    def copy(self, src: int, dst: int, length: int) -> None:
        for row in (src, dst):
            if not 0 <= row < self.max_rows:
                raise ValueError(f"row {row} is outside 0..{self.max_rows - 1}")
        if not 0 <= length <= self.config.max_seq_len:
            raise ValueError(f"length {length} is outside 0..{self.config.max_seq_len}")
        if src == dst or not length:
            return
        with torch.inference_mode():
            for cache in self.model.caches:
                cache.k[dst, :, :length] = cache.k[src, :, :length]
                cache.v[dst, :, :length] = cache.v[src, :, :length]
        self._filled[dst] = max(self._filled[dst], length)

    def release(self, row: int, keep: int = 0) -> None:
        """Forget positions >= keep of `row`. Where the cache is lazily committed (the CPU), their whole pages go
        back to the OS (madvise MADV_DONTNEED: they read as zeros and cost nothing until written again); a CUDA
        cache keeps its memory, allocated once."""
        if not 0 <= row < self.max_rows:
            raise ValueError(f"row {row} is outside 0..{self.max_rows - 1}")
        keep = max(0, keep)
        if keep >= self._filled[row]:
            return
        if self._lazy():
            for cache in self.model.caches:
                for t in (cache.k, cache.v):
                    _dontneed_positions(t, row, keep, self._filled[row])
        self._filled[row] = keep

    def cache_bytes(self) -> int:
        """On the CPU (lazily committed), the pages holding positions written and not released, per row, layer,
        key/value and head; elsewhere the whole cache, allocated up front."""
        caches = self.model.caches
        total = sum(c.k.nbytes + c.v.nbytes for c in caches)
        if not self._lazy():
            return total
        _, heads, _, head_dim = caches[0].k.shape
        page = mmap.PAGESIZE
        per_position = head_dim * caches[0].k.element_size()
        pages = sum(-(-n * per_position // page) for n in self._filled)  # (per head; ignores page straddling)
        return pages * page * heads * 2 * len(caches)

    def describe(self) -> dict[str, Any]:
        """Facts for benchmark reports (see backend.Backend.describe)."""
        from ..quant import GGMLLinear, kernels

        linears = [m for m in self.model.modules() if isinstance(m, GGMLLinear)]
        return {"kernel_isa": kernels.isa(), "threads": torch.get_num_threads(),
                "weights_in": "mmap" if _is_file_mapped(self.model) else "memory",
                "interleaved_linears": round(sum(m.interleaved for m in linears) / len(linears), 3) if linears else 0.0,
                "bf16_prefill": any(m.bf16_prefill for m in linears),
                "kv_dtype": str(self.kv_dtype).removeprefix("torch.")}

    def _lazy(self) -> bool:
        k = self.model.caches[0].k
        return lazily_committed(k.nbytes, k.device)


def _is_file_mapped(model: nn.Module) -> bool:
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


def _in_range(name: str, values: np.ndarray, limit: int) -> None:
    if len(values) and (values.min() < 0 or values.max() >= limit):
        raise ValueError(f"{name} must be in 0..{limit - 1}, got {values.min()}..{values.max()}")


def _dontneed_positions(cache: Tensor, row: int, start: int, stop: int) -> None:
    """madvise(MADV_DONTNEED) the whole pages of cache[row, h, start:stop] for every head h (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _, heads, length, head_dim = cache.shape
    size, page = cache.element_size(), mmap.PAGESIZE
    base = cache.data_ptr()
    for h in range(heads):
        head = base + ((row * heads + h) * length) * head_dim * size
        lo = -(-(head + start * head_dim * size) // page) * page  # whole pages only: neighbours stay intact
        hi = (head + stop * head_dim * size) // page * page
        if hi > lo:
            madvise(lo, hi - lo, mmap.MADV_DONTNEED)


__all__ = ["TorchBackend", "build_quantized_model", "quantize_model", "set_threads"]
