"""Weight-only quantized inference: GGUF blocks (Q4_0/Q4_1/Q8_0, K-quants via conversion) on native kernels."""

from .kernels import GGML_Q4_0, GGML_Q4_1, GGML_Q8_0, dequantize_blocks, ggml_linear, native_available
from .linear import TYPE_BY_NAME, GGMLEmbedding, GGMLLinear, quantize_blocks, to_ggml_blocks

__all__ = ["GGML_Q4_0", "GGML_Q4_1", "GGML_Q8_0", "TYPE_BY_NAME", "GGMLEmbedding", "GGMLLinear", "dequantize_blocks",
           "ggml_linear", "native_available", "quantize_blocks", "to_ggml_blocks"]
