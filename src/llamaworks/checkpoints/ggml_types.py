"""GGUF's type codes and block sizes (facts of the GGUF specification), without importing the `gguf` package.

Importing `gguf` pulls in yaml, sentencepiece and mistral_common: about 110 ms and 6 MiB in every process,
while loading and running a model needs only these tables. Code that converts blocks with gguf's reference
(de)quantizers or writes files imports `gguf` where it does so. tests/test_gguf_io.py checks these tables
against the installed gguf.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import numpy as np


class GGMLType(IntEnum):
    """ggml tensor types (same names and codes as gguf.GGMLQuantizationType)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


# (elements per block, bytes per block)
QUANT_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20),
    GGMLType.Q5_0: (32, 22), GGMLType.Q5_1: (32, 24), GGMLType.Q8_0: (32, 34), GGMLType.Q8_1: (32, 40),
    GGMLType.Q2_K: (256, 84), GGMLType.Q3_K: (256, 110), GGMLType.Q4_K: (256, 144), GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210), GGMLType.Q8_K: (256, 292), GGMLType.IQ2_XXS: (256, 66), GGMLType.IQ2_XS: (256, 74),
    GGMLType.IQ3_XXS: (256, 98), GGMLType.IQ1_S: (256, 50), GGMLType.IQ4_NL: (32, 18), GGMLType.IQ3_S: (256, 110),
    GGMLType.IQ2_S: (256, 82), GGMLType.IQ4_XS: (256, 136), GGMLType.I8: (1, 1), GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4), GGMLType.I64: (1, 8), GGMLType.F64: (1, 8), GGMLType.IQ1_M: (256, 56),
    GGMLType.BF16: (1, 2), GGMLType.TQ1_0: (256, 54), GGMLType.TQ2_0: (256, 66), GGMLType.MXFP4: (32, 17),
}

# The block types the native kernels run (Q4_0, Q4_1, Q8_0), and where each other quantized GGUF type is
# converted at load (both runtimes): dequantized and requantized, low-bit types to Q4_1, wider ones to Q8_0. Each
# element ends within half a step of its target block plus the float16 rounding of that block's scale and minimum
# (tests/test_quant.py::test_kquants_are_converted_per_tensor); a 4-bit K-quant sub-block is a Q4_1 block only
# when its codes reach both 0 and 15.
KERNEL_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0)
REQUANT_TARGET: dict[GGMLType, GGMLType] = {
    GGMLType.Q2_K: GGMLType.Q4_1, GGMLType.Q3_K: GGMLType.Q4_1, GGMLType.Q4_K: GGMLType.Q4_1,
    GGMLType.Q5_0: GGMLType.Q8_0, GGMLType.Q5_1: GGMLType.Q8_0, GGMLType.Q5_K: GGMLType.Q8_0,
    GGMLType.Q6_K: GGMLType.Q8_0}


def convert_blocks(data: Any, qtype: int, shape: tuple[int, int],
                   target: int | None = None) -> tuple[np.ndarray, GGMLType]:
    """THE conversion of a GGUF tensor of a type the kernels lack (both backends call it, so both hold the same
    bytes): gguf-py's reference dequantizer, then its quantizer for `target` (default REQUANT_TARGET, else Q8_0).
    Returns (blocks (rows, row_bytes) uint8, target type)."""
    import gguf  # numpy reference (de)quantizers; only for files whose types have no kernel

    target = GGMLType(target if target is not None else REQUANT_TARGET.get(GGMLType(int(qtype)), GGMLType.Q8_0))
    values = gguf.quants.dequantize(np.asarray(data), gguf.GGMLQuantizationType(int(qtype)))
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
    blocks = gguf.quants.quantize(values, gguf.GGMLQuantizationType(int(target)))
    return np.ascontiguousarray(blocks).reshape(shape[0], -1), target


class GGUFValueType(IntEnum):
    """Metadata value types of the GGUF header."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12
