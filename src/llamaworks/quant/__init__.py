"""Weight-only quantized inference: GGUF blocks (Q4_0/Q4_1/Q8_0, K-quants via conversion) on native kernels.

The torch-based names load lazily, so the torch-free parts (`build`, `memory`, `lean_kernels`) import without torch.
"""

from __future__ import annotations

from typing import Any

_LAZY = {"GGML_Q4_0": "kernels", "GGML_Q4_1": "kernels", "GGML_Q8_0": "kernels", "dequantize_blocks": "kernels",
         "ggml_linear": "kernels", "native_available": "kernels", "TYPE_BY_NAME": "linear",
         "GGMLEmbedding": "linear", "GGMLLinear": "linear", "quantize_blocks": "linear", "to_ggml_blocks": "linear"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["GGML_Q4_0", "GGML_Q4_1", "GGML_Q8_0", "TYPE_BY_NAME", "GGMLEmbedding", "GGMLLinear", "dequantize_blocks",
           "ggml_linear", "native_available", "quantize_blocks", "to_ggml_blocks"]
