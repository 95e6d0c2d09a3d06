"""Which GGUF type each tensor gets for a quantization choice ("q4_k_m", "q8_0", ...): llama.cpp's per-tensor mix.

These are the facts of llama.cpp's `llama-quantize` (src/llama-quant.cpp, llama architecture, no importance matrix)
so a file we write holds the same types as the one users get from llama.cpp for the same name:
- 1-D tensors (norms) stay F32.
- The output matrix, and the token embeddings when they are tied to it, get Q6_K for every mix but Q8_0 (which
  keeps Q8_0); Q8_0 instead when its rows do not fill 256-value blocks.
- Q4_K_M and Q5_K_M give attn_v and ffn_down Q6_K in "more bits" layers: the first and last eighth of the
  layers and every third layer between (use_more_bits); a 70B-class model (80 layers with grouped-query
  attention) gets Q5_K for the other attn_v of Q4_K_M.
- Everything else gets the mix's base type (Q4_K_M: Q4_K, Q5_K_M: Q5_K, Q6_K: Q6_K, Q8_0: Q8_0, ...).
- A row that does not fill the type's block falls back: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and to F16
  when even 32-value blocks do not fit. (SmolLM2-135M's 576-wide rows are why its Q4_K_M is mostly Q5_0.)
"""

from __future__ import annotations

from ..config import ModelConfig
from .ggml_types import QUANT_SIZES, GGMLType

# name -> (base type, GGUF general.file_type: llama.cpp's LLAMA_FTYPE_MOSTLY_* code)
MIXES: dict[str, tuple[GGMLType, int]] = {
    "q8_0": (GGMLType.Q8_0, 7), "q6_k": (GGMLType.Q6_K, 18), "q5_k_m": (GGMLType.Q5_K, 17),
    "q4_k_m": (GGMLType.Q4_K, 15), "q5_0": (GGMLType.Q5_0, 8), "q5_1": (GGMLType.Q5_1, 9),
    "q4_0": (GGMLType.Q4_0, 2), "q4_1": (GGMLType.Q4_1, 3),
}
_FALLBACK = {GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0}


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fit(qtype: GGMLType, cols: int) -> GGMLType:
    """llama.cpp's fallback for rows that do not fill the type's blocks."""
    if cols % QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    return qtype if cols % QUANT_SIZES[qtype][0] == 0 else GGMLType.F16


def tensor_type(name: str, shape: tuple[int, ...], config: ModelConfig, mix: str, pure: bool = False) -> GGMLType:
    """The GGUF type of model.py's parameter `name` (shape (rows, cols)) under `mix` (a key of MIXES); pure: the
    mix's base type for every matrix (llama-quantize --pure), no wider output or "more bits" layers."""
    base = MIXES[mix][0]
    if len(shape) < 2:
        return GGMLType.F32
    cols = shape[-1]
    if pure:
        return _fit(base, cols)
    kind = name.split(".")[-2] if name.startswith("layers.") else name.removesuffix(".weight")
    if kind == "output" or (kind == "tok_embeddings" and config.tie_embeddings):
        wide = GGMLType.Q8_0 if cols % QUANT_SIZES[base][0] or base == GGMLType.Q8_0 else GGMLType.Q6_K
        return _fit(wide, cols)
    qtype = base
    if kind in ("wv", "w2") and mix in ("q4_k_m", "q5_k_m"):  # attn_v, ffn_down
        layer = int(name.split(".")[1])
        if _more_bits(layer, config.n_layers):
            qtype = GGMLType.Q6_K
        elif kind == "wv" and mix == "q4_k_m" and config.n_layers == 80 and config.kv_heads != config.n_heads:
            qtype = GGMLType.Q5_K  # llama.cpp's 70B rule: attn_v is 8x smaller there, so it gets more bits
    return _fit(qtype, cols)


__all__ = ["MIXES", "tensor_type"]
