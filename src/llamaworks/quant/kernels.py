"""Native kernels for GGUF block weights, compiled once per machine and cached; pure-torch fallback.

`ggml_linear(x, raw, ggml_type, in_features)` computes x @ W^T where W is given as the file's own blocks
(rows of Q4_0/Q4_1/Q8_0 blocks, `raw` a (out_features, row_bytes) uint8 tensor, possibly memory-mapped).
The C++ source (`_kernels.cpp`) is built with the system C++ compiler the first time it is needed, with
`-march=native`, into ~/.cache/llamaworks/kernels (override with LLAMAWORKS_CACHE); every later process
just loads the shared library. When no compiler is available the same ops run in plain PyTorch (correct,
slower), so nothing else in the package needs to know which one it got.
"""

from __future__ import annotations

import logging
import sys
import sysconfig
from pathlib import Path

import torch
from torch import Tensor

from .build import compile_library, first_error, library_path

log = logging.getLogger(__name__)

GGML_Q4_0, GGML_Q4_1, GGML_Q8_0 = 2, 3, 8
BLOCK_ELEMS = 32
BLOCK_BYTES = {GGML_Q4_0: 18, GGML_Q4_1: 20, GGML_Q8_0: 34}
# Flag on a ggml type code: the rows are regrouped 8 at a time ("x8" layout, see _kernels.cpp and interleave_).
INTERLEAVED = 256
INTERLEAVABLE = (GGML_Q4_0, GGML_Q4_1)
SOURCE = Path(__file__).with_name("_kernels.cpp")
CORE_HEADER = Path(__file__).with_name("_kernels_core.h")  # shared with the torch-free library (_lean.cpp)

_native: bool | None = None  # None: not tried yet
_failure: str | None = None  # why the native kernels are unavailable, once tried


def _build(target: Path) -> None:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    libdirs = cpp_extension.library_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    compile_library(SOURCE, target, ["-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                                     "-DTORCH_EXTENSION_NAME=llamaworks_kernels", *includes],
                    [*[f"-L{d}" for d in libdirs], *[f"-Wl,-rpath,{d}" for d in libdirs], "-lc10", "-ltorch_cpu",
                     "-ltorch"])


def native_available() -> bool:
    """Load (building on first use) the native kernels; False means the torch fallback is in use."""
    global _native, _failure
    if _native is not None:
        return _native
    _native = False
    if sys.platform == "win32":
        _failure = "not built on Windows"
        return False
    target = library_path("llamaworks_kernels", [SOURCE, CORE_HEADER], torch.__version__)
    try:
        if not target.exists():
            log.info("building native quantized kernels (once per machine) into %s", target.parent)
            _build(target)
        torch.ops.load_library(str(target))
        _native = True
    except (OSError, RuntimeError) as e:  # a CompileError is an OSError
        _failure = first_error(e)
        log.warning("native quantized kernels unavailable, using the slower torch fallback: %s", _failure)
    if _native:
        _register_fakes()
    return _native


def native_failure() -> str | None:
    """Why the native kernels are unavailable (the compiler's first error, ...), or None when they loaded."""
    native_available()
    return _failure


def bf16_native() -> bool:
    """Whether the native kernels were built with AVX-512 BF16 (native bf16 dot products): there the bf16 prefill
    gemm runs ~2.4x the float32 rate, so it is the default of `GGMLLinear.bf16_prefill`; elsewhere torch's bf16 gemm
    is slower than float32 and the default is off."""
    return native_available() and bool(torch.ops.llamaworks.bf16_native())


def can_interleave() -> bool:
    """Whether the native kernels (and so the x8 row-interleaved layout, which every SIMD path reads) are here."""
    return native_available()


def isa() -> str:
    """The SIMD level of each kernel family in the native build (it is built for this CPU), or why there is none."""
    if not native_available():
        return "none (native kernels unavailable: torch fallback)"
    return str(torch.ops.llamaworks.isa())


def interleave_(raw: Tensor, ggml_type: int, in_features: int) -> int:
    """Regroup a Q4_0/Q4_1 weight's rows 8 at a time, in place; returns the type code to pass to the kernels.

    Decode then reads each group of 8 rows as one stream and needs no horizontal sums. `raw` must be writable
    memory (not a read-only file mapping), contiguous, with a multiple of 8 rows. Every op of this module
    accepts the returned code, including the torch fallback.
    """
    if not can_interleave():
        raise RuntimeError("the x8 layout needs the native kernels")
    torch.ops.llamaworks.ggml_interleave_(raw, ggml_type, in_features)
    return ggml_type | INTERLEAVED


def _register_fakes() -> None:
    """Shape-only versions so torch.compile can trace through the native ops."""

    @torch.library.register_fake("llamaworks::ggml_linear")
    def _linear_fake(x: Tensor, raw: Tensor, ggml_type: int, in_features: int, int8: bool, bf16: bool) -> Tensor:
        return x.new_empty((*x.shape[:-1], raw.shape[0]))

    @torch.library.register_fake("llamaworks::ggml_linear_group")
    def _group_fake(x: Tensor, raws: list[Tensor], ggml_types: list[int], in_features: int, int8: bool,
                    bf16: bool) -> Tensor:
        return x.new_empty((*x.shape[:-1], sum(r.shape[0] for r in raws)))

    @torch.library.register_fake("llamaworks::ggml_swiglu")
    def _swiglu_fake(x: Tensor, gate: Tensor, gate_type: int, up: Tensor, up_type: int, in_features: int,
                     int8: bool, bf16: bool) -> Tensor:
        return x.new_empty((*x.shape[:-1], gate.shape[0]))

    @torch.library.register_fake("llamaworks::ggml_dequantize")
    def _dequantize_fake(raw: Tensor, ggml_type: int, in_features: int) -> Tensor:
        return raw.new_empty((raw.shape[0], in_features), dtype=torch.float32)


# -- pure-torch reference / fallback ---------------------------------------------------------------
def _fp16_fields(ggml_type: int) -> int:
    """fp16 values at the start of each block: the scale, and Q4_1's minimum."""
    return 2 if ggml_type == GGML_Q4_1 else 1


def interleave_rows_torch(raw: Tensor, ggml_type: int, in_features: int) -> Tensor:
    """Plain (N, row_bytes) Q4_0/Q4_1 rows -> the x8 layout (the reference for the native interleave_)."""
    n, nb, bb = raw.shape[0], in_features // BLOCK_ELEMS, BLOCK_BYTES[ggml_type]
    fields = _fp16_fields(ggml_type)
    rows = raw.reshape(n // 8, 8, nb, bb)
    scales = rows[..., :2 * fields].reshape(n // 8, 8, nb, fields, 2).permute(0, 2, 3, 1, 4)
    # Plain byte p = 8s + 4h + j of a row: column p in the low nibble, p + 16 in the high one. A group half
    # stores column c of row i at byte 4 * (2i + h) + j (c = 8s + 4h + j; s picks the nibble).
    q = rows[..., 2 * fields:].reshape(n // 8, 8, nb, 2, 2, 4).permute(0, 2, 3, 1, 4, 5)  # g, b, s, i, h, j
    lo, hi = q & 15, q >> 4
    halves = torch.stack([lo[:, :, 0] | (lo[:, :, 1] << 4), hi[:, :, 0] | (hi[:, :, 1] << 4)], dim=2)
    group = torch.cat([scales.reshape(n // 8, nb, -1), halves.reshape(n // 8, nb, -1)], dim=-1)
    return group.reshape(n, nb * bb)


def deinterleave_rows_torch(raw: Tensor, ggml_type: int, in_features: int) -> Tensor:
    """The x8 layout -> plain (N, row_bytes) rows (inverse of interleave_rows_torch)."""
    n, nb, bb = raw.shape[0], in_features // BLOCK_ELEMS, BLOCK_BYTES[ggml_type]
    fields = _fp16_fields(ggml_type)
    group = raw.reshape(n // 8, nb, 8 * bb)
    scales = group[..., :16 * fields].reshape(n // 8, nb, fields, 8, 2).permute(0, 3, 1, 2, 4)
    q = group[..., 16 * fields:].reshape(n // 8, nb, 2, 8, 2, 4)  # g, b, half (columns 0-15 | 16-31), i, h, j
    lo, hi = q & 15, q >> 4
    plain = torch.stack([lo[:, :, 0] | (lo[:, :, 1] << 4), hi[:, :, 0] | (hi[:, :, 1] << 4)], dim=2)
    plain = plain.permute(0, 3, 1, 2, 4, 5).reshape(n // 8, 8, nb, 16)  # g, i, b, (s, h, j)
    rows = torch.cat([scales.reshape(n // 8, 8, nb, 2 * fields), plain], dim=-1)
    return rows.reshape(n, nb * bb)


def dequantize_blocks_torch(raw: Tensor, ggml_type: int, in_features: int) -> Tensor:
    """(N, K) float32 from (N, row_bytes) Q4_0/Q4_1/Q8_0 blocks (plain or x8), in plain torch ops."""
    if ggml_type & INTERLEAVED:
        ggml_type &= ~INTERLEAVED
        raw = deinterleave_rows_torch(raw, ggml_type, in_features)
    n = raw.shape[0]
    nb = in_features // BLOCK_ELEMS
    blocks = raw.reshape(n, nb, BLOCK_BYTES[ggml_type])
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()  # (n, nb, 1)
    if ggml_type == GGML_Q8_0:
        q = blocks[..., 2:].contiguous().view(torch.int8).float()
        return (q * d).reshape(n, in_features)
    if ggml_type == GGML_Q4_1:
        m = blocks[..., 2:4].contiguous().view(torch.float16).float()
        qs = blocks[..., 4:]
    else:
        m = -8.0 * d
        qs = blocks[..., 2:]
    # Low nibbles are elements 0..15 of the block, high nibbles elements 16..31.
    q = torch.cat([qs & 15, qs >> 4], dim=-1).float()
    return (q * d + m).reshape(n, in_features)


def dequantize_blocks(raw: Tensor, ggml_type: int, in_features: int) -> Tensor:
    if raw.device.type == "cpu" and native_available():
        return torch.ops.llamaworks.ggml_dequantize(raw, ggml_type, in_features)
    return dequantize_blocks_torch(raw, ggml_type, in_features)


# int8: int8 activations in the decode kernels (up to 32 rows; integer dot products, as llama.cpp); False keeps
# them float32 (the float reference's numerics up to summation order). bf16: prefill gemms (more rows) in bfloat16.
# The torch fallback ignores both: it is a float32 matmul with the dequantized weights.
def ggml_linear(x: Tensor, raw: Tensor, ggml_type: int, in_features: int, *, int8: bool = True,
                bf16: bool = False) -> Tensor:
    if raw.device.type == "cpu" and native_available():
        return torch.ops.llamaworks.ggml_linear(x, raw, ggml_type, in_features, int8, bf16)
    w = dequantize_blocks_torch(raw, ggml_type, in_features).to(x.dtype)
    return torch.nn.functional.linear(x, w)


def ggml_linear_group(x: Tensor, raws: list[Tensor], ggml_types: list[int], in_features: int, *, int8: bool = True,
                      bf16: bool = False) -> Tensor:
    """torch.cat([x @ W_i^T for each W_i], -1), reading all weights in one pass (fused q/k/v)."""
    if raws[0].device.type == "cpu" and native_available():
        return torch.ops.llamaworks.ggml_linear_group(x, raws, ggml_types, in_features, int8, bf16)
    return torch.cat([ggml_linear(x, r, t, in_features) for r, t in zip(raws, ggml_types)], dim=-1)


def ggml_swiglu(x: Tensor, gate: Tensor, gate_type: int, up: Tensor, up_type: int, in_features: int, *,
                int8: bool = True, bf16: bool = False) -> Tensor:
    """silu(x @ Wgate^T) * (x @ Wup^T), both weights read in one pass (fused gate/up)."""
    if gate.device.type == "cpu" and native_available():
        return torch.ops.llamaworks.ggml_swiglu(x, gate, gate_type, up, up_type, in_features, int8, bf16)
    g = ggml_linear(x, gate, gate_type, in_features)
    return torch.nn.functional.silu(g) * ggml_linear(x, up, up_type, in_features)
