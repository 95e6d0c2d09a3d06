"""Fast inference: quantized weights that stay quantized, fused projections, a static decode step.

    model = optimize_for_inference(model, quantized_state=checkpoint.state_dict)   # or quantize="q8_0"
    logits = model(tokens, start_pos=..., key_mask=..., positions=..., last_only=True)   # unchanged call

What `optimize_for_inference` does to a `Transformer` (in place, returning it):
- swaps `nn.Linear`/`nn.Embedding` modules for `quant.GGMLLinear`/`GGMLEmbedding` (GGUF blocks used in place,
  memory-mapped; other weights block-quantized per tensor), keeping wq/wk/wv/w1/w3 as separate modules;
- routes one-token decode steps with a KV cache through `_decode_step`: q/k/v and gate/up are each computed in
  one pass over their weights (no concatenated copies), grouped-query attention reads the shared key/value heads
  by reshaping the queries (no repeat_interleave), and the cache is written at a tensor index over the whole
  preallocated cache with a mask, so every step has the same shapes;
- optionally wraps that step in torch.compile (compile cost is paid once: the inductor cache lives in
  ~/.cache/llamaworks/inductor and is reused by later processes).
Prefill (several tokens) runs the model's own forward on the swapped modules: it is gemm-bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hardware import physical_cores
from .model import KVCache, Transformer, apply_rope, rope_frequencies
from .quant import kernels
from .quant.build import cache_dir
from .quant.linear import KERNEL_TYPES, TYPE_BY_NAME, GGMLEmbedding, GGMLLinear
from .quant.memory import huge_pages_available, page_out_library_code, read_into_huge_pages

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
        from .errors import FormatError

        raise FormatError(f"{getattr(checkpoint, 'path', 'checkpoint')}: missing tensors: {', '.join(leftover[:3])}")
    inv_freq = (getattr(checkpoint, "metadata", None) or {}).get("rope_inv_freq")
    inv_freq = rope_frequencies(config) if inv_freq is None else torch.as_tensor(inv_freq)
    model.register_buffer("inv_freq", inv_freq.float().to(device), persistent=False)
    if model.output is None and isinstance(model.tok_embeddings, GGMLEmbedding):
        model.output = model.tok_embeddings.as_linear()
    return model.eval().requires_grad_(False)


_torch_pages_released = False


def load_quantized_model(path: str | os.PathLike[str] | None = None, *, weights: str | None = "q8_0",
                         compile: bool = False, threads: int | None = None,
                         mmap: bool | None = None) -> tuple[Transformer, Any, Any]:
    """(optimized model, tokenizer, checkpoint) with GGUF blocks kept as blocks; None = the default model.

    HF/Meta float checkpoints are loaded and block-quantized to `weights` per tensor. mmap: keep the GGUF's
    blocks memory-mapped instead of reading them into huge pages (default: LLAMAWORKS_MMAP=1, else False).
    """
    if mmap is None:
        mmap = os.environ.get("LLAMAWORKS_MMAP", "0") not in ("", "0")
    global _torch_pages_released
    if not _torch_pages_released and os.environ.get("LLAMAWORKS_PAGE_OUT_TORCH", "1") not in ("", "0"):
        # Torch's one-time start-up code leaves memory before the weights arrive; once per process, so a
        # second load does not push out the code a running model uses.
        page_out_library_code()
        _torch_pages_released = True
    from .checkpoints import load_checkpoint

    if path is None:
        from .assets import default_model_path

        path = default_model_path()
    checkpoint = load_checkpoint(path, dequantize=False)
    model = build_quantized_model(checkpoint, weights=weights, mmap=mmap)
    checkpoint.state_dict = {}  # the model holds the tensors now
    if checkpoint.tokenizer is not None and checkpoint.metadata:
        # The tokenizer has been built; the vocabulary/merges lists (tens of MiB of Python objects) are not
        # needed by inference. `load_checkpoint` still returns them for conversion.
        checkpoint.metadata = {k: v for k, v in checkpoint.metadata.items()
                               if not (k.startswith("tokenizer.ggml.") and isinstance(v, list))}
    optimize_for_inference(model, compile=compile, threads=threads)
    return model, checkpoint.tokenizer, checkpoint


# -- the decode step ----------------------------------------------------------------------------------------
def _qkv(attention: nn.Module, h: Tensor) -> Tensor:
    wq, wk, wv = attention.wq, attention.wk, attention.wv
    if isinstance(wq, GGMLLinear) and isinstance(wk, GGMLLinear) and isinstance(wv, GGMLLinear):
        return kernels.ggml_linear_group(h, [wq.raw, wk.raw, wv.raw], [wq.kernel_type, wk.kernel_type, wv.kernel_type],
                                         wq.in_features, int8=wq.int8_activations, bf16=wq.bf16_prefill)
    return torch.cat([wq(h), wk(h), wv(h)], dim=-1)


def _swiglu(ff: nn.Module, h: Tensor) -> Tensor:
    w1, w3 = ff.w1, ff.w3
    if isinstance(w1, GGMLLinear) and isinstance(w3, GGMLLinear):
        return kernels.ggml_swiglu(h, w1.raw, w1.kernel_type, w3.raw, w3.kernel_type, w1.in_features,
                                   int8=w1.int8_activations, bf16=w1.bf16_prefill)
    return F.silu(w1(h)) * w3(h)


def _decode_step(model: Transformer, tokens: Tensor, slot: Tensor, positions: Tensor, key_mask: Tensor | None,
                 caches: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Logits (B, 1, V) for one new token per row, written to cache slot `slot` (a 1-element long tensor).

    Every shape depends only on the batch size and the cache length, so a compiled version is reused at every
    position. key_mask: (B, S) bool over all cache slots, or None.
    """
    B = tokens.shape[0]
    cfg = model.config
    S = caches[0][0].shape[2]
    angles = positions.unsqueeze(-1).float() * model.inv_freq  # (B, 1, D/2)
    cos, sin = angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)
    k_pos = torch.arange(S, device=tokens.device)
    visible = k_pos <= slot  # slots at or before this one: written by earlier steps
    if cfg.sliding_window is not None:
        visible = visible & (slot - k_pos < cfg.sliding_window)
    visible = visible.view(1, 1, 1, S)
    if key_mask is not None:
        visible = (visible & key_mask.view(B, 1, 1, S)) | (k_pos == slot).view(1, 1, 1, S)

    x = model.tok_embeddings(tokens)
    for layer, (k_cache, v_cache) in zip(model.layers, caches):
        att = layer.attention
        H, Hk, D = att.n_heads, att.n_kv_heads, att.head_dim
        qkv = _qkv(att, layer.attention_norm(x))
        q, k, v = qkv.split([H * D, Hk * D, Hk * D], dim=-1)
        q = apply_rope(q.view(B, 1, H, D).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, 1, Hk, D).transpose(1, 2), cos, sin)
        k_cache.index_copy_(2, slot, k.to(k_cache.dtype))
        v_cache.index_copy_(2, slot, v.view(B, 1, Hk, D).transpose(1, 2).to(v_cache.dtype))
        # GQA without copies: the G query heads sharing a key/value head become G query rows of that head.
        qg = q.reshape(B, Hk, H // Hk, D).to(k_cache.dtype)
        scores = (qg @ k_cache.transpose(-1, -2)).float() * (1.0 / math.sqrt(D))  # (B, Hk, G, S)
        scores = scores.masked_fill(~visible, float("-inf"))
        y = torch.softmax(scores, dim=-1).to(v_cache.dtype) @ v_cache  # (B, Hk, G, D)
        x = x + att.wo(y.reshape(B, 1, H * D).to(x.dtype))
        x = x + layer.feed_forward.w2(_swiglu(layer.feed_forward, layer.ffn_norm(x)))
    return model.lm_head(model.norm(x))


class FastForward:
    """Stands in for `Transformer.forward`: one-token cached steps take the static decode path.

    The step is `_decode_step` in torch ops (GGML weights through the native kernels), compiled with torch.compile
    when `compile` is set.
    """

    def __init__(self, model: Transformer, compile: bool) -> None:
        self.model = model
        # Long prompts go through the KV cache in chunks of this many tokens (see `chunked_prefill`). Each chunk
        # dequantizes every weight once, so bigger models amortize that over longer chunks: a 1.1B model
        # prefills ~20% faster with 256 than with 128, while SmolLM2 keeps 128 (16 MiB less peak memory).
        self.prefill_chunk = 256 if model.config.n_params > 500e6 else 128
        self.compiled = compile
        self.step = _decode_step
        if self.compiled:
            configure_compile_cache()
            self.step = torch.compile(_decode_step, dynamic=False)

    def __call__(self, tokens: Tensor, start_pos: int = 0, *, key_mask: Tensor | None = None,
                 positions: Tensor | None = None, segment_ids: Tensor | None = None, last_only: bool = False,
                 return_hidden: bool = False) -> Tensor:
        model = self.model
        B, T = tokens.shape
        general = T != 1 or not model.has_cache or segment_ids is not None or return_hidden or model.training
        if not general and type(model.layers[0].attention.cache) is not KVCache:
            general = True  # a stand-in cache (the server's per-slot cache): the general path
        if general:
            if tokens.shape[1] > self.prefill_chunk and model.has_cache and segment_ids is None and not model.training:
                return chunked_prefill(model, self.prefill_chunk, tokens, start_pos, key_mask=key_mask,
                                       positions=positions, last_only=last_only, return_hidden=return_hidden)
            return Transformer.forward(model, tokens, start_pos, key_mask=key_mask, positions=positions,
                                       segment_ids=segment_ids, last_only=last_only, return_hidden=return_hidden)
        caches = [(layer.attention.cache.k, layer.attention.cache.v) for layer in model.layers]
        S = caches[0][0].shape[2]
        if start_pos >= S:
            raise ValueError(f"KV cache holds {S} positions, {start_pos + 1} requested")
        device = tokens.device
        slot = torch.tensor([start_pos], device=device)
        if positions is None:
            positions = slot.view(1, 1).expand(B, 1)
        full_mask = None
        if key_mask is not None:
            full_mask = torch.zeros(key_mask.shape[0], S, dtype=torch.bool, device=device)
            full_mask[:, : key_mask.shape[1]] = key_mask.bool()
        return self.step(model, tokens, slot, positions, full_mask, caches)


def chunked_prefill(model: Transformer, chunk: int, tokens: Tensor, start_pos: int = 0, *,
                    key_mask: Tensor | None = None, positions: Tensor | None = None, last_only: bool = False,
                    return_hidden: bool = False) -> Tensor:
    """`Transformer.forward` over `tokens` in cached chunks of `chunk` tokens; equal to one call up to float
    summation order.

    Activations scale with the chunk, not the prompt: a 512-token SmolLM2 prefill in one piece peaks 16 MiB
    higher than in 128-token chunks (12 MiB with 256), and the gemms stay large enough to run near full rate
    (SmolLM2 prefills as fast; the 1.1B model ~10% slower than with 256, within this machine's noise). Chunks
    before the last compute no logits when only the last position's are wanted.
    """
    T = tokens.shape[1]
    outs = []
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        final = e == T
        out = Transformer.forward(model, tokens[:, s:e], start_pos + s,
                                  key_mask=None if key_mask is None else key_mask[:, : start_pos + e],
                                  positions=None if positions is None else positions[:, s:e],
                                  last_only=last_only, return_hidden=return_hidden or (last_only and not final))
        if final or not last_only:
            outs.append(out)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def configure_compile_cache(directory: str | os.PathLike[str] | None = None) -> Path:
    """Point inductor's on-disk caches at ~/.cache/llamaworks/inductor so compiled code survives the process."""
    path = Path(directory) if directory else cache_dir() / "inductor"
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path))
    try:
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
    except ImportError:  # pragma: no cover - torch without inductor
        pass
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def optimize_for_inference(model: Transformer, *, quantized_state: dict[str, Any] | None = None,
                           quantize: str | None = None, compile: bool = True,
                           threads: int | None = None, kv_dtype: torch.dtype | str | None = "auto",
                           interleave: bool | None = None) -> Transformer:
    """Make `model` fast for generation, in place; the call signature `model(tokens, start_pos=...)` is kept.

    quantized_state: state dict with GGUF quantized entries to use as the model's weights (kept as blocks).
    quantize:        also block-quantize the remaining float linears: "q8_0" | "q4_0" | "q4_1" | "int8" | "int4".
    compile:         torch.compile the decode step (first call compiles; later processes hit the disk cache).
    threads:         intra-op threads on the CPU (default: leave torch's setting; the CLI sets physical cores).
    kv_dtype:        element type of caches made by `setup_cache` afterwards. "auto": float16 where the native
                     decode layer runs (half the memory, as llama.cpp; the attention math stays float32),
                     else the activation dtype. None leaves the model's setting.
    interleave:      regroup Q4_0/Q4_1 weight rows 8 at a time for the faster decode kernel, in place, where
                     the blocks are the model's own CPU memory (not a file mapping, not a caller's state dict:
                     GGMLLinear.interleave_). Default: LLAMAWORKS_INTERLEAVE ("0" turns it off), else on.
    """
    model.eval().requires_grad_(False)
    if quantized_state is not None or quantize is not None:
        quantize_model(model, quantized_state, weights=quantize)
    if threads is not None and model.norm.weight.device.type == "cpu":
        set_threads(threads)
    if interleave is None:
        interleave = os.environ.get("LLAMAWORKS_INTERLEAVE", "1") not in ("", "0")
    if interleave:
        for module in model.modules():
            if isinstance(module, GGMLLinear):
                module.interleave_()
    model.forward = FastForward(model, compile)  # instance attribute: nn.Module.__call__ finds it first
    if kv_dtype == "auto":
        model.kv_dtype = None  # float16 was for the removed fused C++ layer (float32 attention math over it)
    elif kv_dtype is not None:
        model.kv_dtype = kv_dtype
    return model


__all__ = ["FastForward", "build_quantized_model", "chunked_prefill", "configure_compile_cache", "load_quantized_model",
           "optimize_for_inference", "physical_cores", "quantize_model", "set_threads"]
