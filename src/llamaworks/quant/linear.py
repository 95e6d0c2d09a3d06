"""Weight-only quantized modules that keep GGUF/ggml blocks as they are (Q4_0, Q4_1, Q8_0).

`GGMLLinear` and `GGMLEmbedding` hold a (rows, row_bytes) uint8 tensor of blocks — memory-mapped from the GGUF
file when loaded from one — and run the kernels of `kernels.py` on it. Other GGUF types (K-quants, Q5_*) and
float weights are converted once, per tensor, by `to_ggml_blocks`: K-quants whose 32-element sub-blocks are
4-bit or less become Q4_1, wider ones Q8_0, so no model is ever expanded to float32 as a whole.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..checkpoints.ggml_types import REQUANT_TARGET, convert_blocks
from ..checkpoints.ggml_types import GGMLType as QType
from . import kernels
from .kernels import BLOCK_BYTES, BLOCK_ELEMS, GGML_Q4_0, GGML_Q4_1, GGML_Q8_0

KERNEL_TYPES = {GGML_Q4_0: "q4_0", GGML_Q4_1: "q4_1", GGML_Q8_0: "q8_0"}
TYPE_BY_NAME = {"q4_0": GGML_Q4_0, "q4_1": GGML_Q4_1, "q8_0": GGML_Q8_0, "int8": GGML_Q8_0, "int4": GGML_Q4_1}


def quantize_blocks(w: Tensor, ggml_type: int) -> Tensor:
    """Float (N, K) -> (N, K/32 * block_bytes) uint8 blocks, rounding as llama.cpp's reference quantizers do."""
    if w.ndim != 2 or w.shape[1] % BLOCK_ELEMS:
        raise ValueError(f"can only block-quantize 2-D weights with a multiple of 32 columns, got {tuple(w.shape)}")
    n, k = w.shape
    x = w.detach().float().reshape(n, k // BLOCK_ELEMS, BLOCK_ELEMS)
    if ggml_type == GGML_Q8_0:
        amax = x.abs().amax(-1, keepdim=True)
        d = amax / 127
        q = torch.where(d > 0, torch.round(x / d.clamp_min(1e-30)), 0).clamp(-128, 127).to(torch.int8)
        parts = [d.half().view(torch.uint8), q.view(torch.uint8)]
    elif ggml_type == GGML_Q4_0:
        # Symmetric: the signed extreme maps to -8 so the full 16 levels are used.
        idx = x.abs().argmax(-1, keepdim=True)
        extreme = x.gather(-1, idx)
        d = extreme / -8
        inv = torch.where(d != 0, 1 / d, 0)
        q = torch.clamp(torch.floor(x * inv + 8.5), 0, 15).to(torch.uint8)
        parts = [d.half().view(torch.uint8), q[..., :16] | (q[..., 16:] << 4)]
    elif ggml_type == GGML_Q4_1:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        inv = torch.where(d != 0, 1 / d, 0)
        q = torch.clamp(torch.floor((x - lo) * inv + 0.5), 0, 15).to(torch.uint8)
        parts = [d.half().view(torch.uint8), lo.half().view(torch.uint8), q[..., :16] | (q[..., 16:] << 4)]
    else:
        raise ValueError(f"no block quantizer for ggml type {ggml_type}")
    return torch.cat(parts, dim=-1).reshape(n, -1).contiguous()


def _raw_tensor(array: np.ndarray) -> Tensor:
    """A torch view of (possibly read-only, memory-mapped) block bytes without copying them."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only memmap: we never write to it
        return torch.from_numpy(array)


def to_ggml_blocks(entry: Any, default_type: int = GGML_Q8_0) -> tuple[Tensor, int, tuple[int, int]]:
    """(raw blocks, ggml type, (rows, cols)) for a GGUFQuantTensor-like entry or a float tensor.

    Kernel types are used in place (zero copy); other GGUF types and float tensors are converted per tensor.
    """
    if isinstance(entry, Tensor):
        return quantize_blocks(entry, default_type), default_type, (int(entry.shape[0]), int(entry.shape[1]))
    qtype = QType(int(entry.ggml_type))
    rows, cols = (int(s) for s in entry.shape)
    if int(qtype) in KERNEL_TYPES:
        raw = _raw_tensor(np.asarray(entry.raw)).reshape(rows, -1)
        return raw, int(qtype), (rows, cols)
    # THE converter of other GGUF types (the native backend's too): the same bytes on either backend.
    blocks, target = convert_blocks(entry.raw, int(qtype), (rows, cols), REQUANT_TARGET.get(qtype, default_type))
    return torch.from_numpy(blocks), int(target), (rows, cols)


def _used_in_place(entry: Any) -> bool:
    """Whether a checkpoint entry's blocks become the module's tensor as they are (not converted to fresh memory)."""
    return not isinstance(entry, Tensor) and int(QType(int(entry.ggml_type))) in KERNEL_TYPES


class GGMLLinear(nn.Module):
    """y = x @ W^T with W kept as Q4_0/Q4_1/Q8_0 blocks (no bias: LLaMA linears have none).

    `ggml_type` is the blocks' type; `kernel_type` what the kernels are told, which also says whether the rows
    have been regrouped for decode by `interleave_()`. layout_fixed: the bytes must stay as they are (a
    read-only file mapping, or shared with the embedding table).

    Numerics, per module (`set_numerics` sets a whole model's): `int8_activations` quantizes the decode kernels'
    activations to int8 blocks (as llama.cpp; False: float32, the float reference's numerics up to summation
    order); `bf16_prefill` runs prefill gemms in bfloat16 (default where the CPU has native bf16 dot products).
    """

    int8_activations: bool
    bf16_prefill: bool

    def __init__(self, raw: Tensor, ggml_type: int, in_features: int, *, layout_fixed: bool = False) -> None:
        super().__init__()
        if ggml_type not in KERNEL_TYPES:
            raise ValueError(f"GGMLLinear supports ggml types {sorted(KERNEL_TYPES)}, got {ggml_type}")
        if raw.dtype != torch.uint8 or raw.ndim != 2:
            raise ValueError("GGMLLinear expects a 2-D uint8 tensor of blocks")
        expected = in_features // BLOCK_ELEMS * BLOCK_BYTES[ggml_type]
        if in_features % BLOCK_ELEMS or raw.shape[1] != expected:
            raise ValueError(f"rows of {raw.shape[1]} bytes do not hold {in_features} {KERNEL_TYPES[ggml_type]} "
                             f"values (expected {expected} bytes)")
        # Not part of state_dict(): these bytes are not the float `weight` other code expects there.
        self.register_buffer("raw", raw, persistent=False)
        self.ggml_type = int(ggml_type)
        self.kernel_type = int(ggml_type)
        self.in_features = int(in_features)
        self.out_features = int(raw.shape[0])
        self.layout_fixed = layout_fixed
        self.int8_activations = True
        self.bf16_prefill = kernels.bf16_native()

    @property
    def interleaved(self) -> bool:
        return bool(self.kernel_type & kernels.INTERLEAVED)

    def interleave_(self) -> bool:
        """Regroup the rows in place for the faster decode kernel where possible (see kernels.interleave_).

        Only CPU Q4_0/Q4_1 weights whose layout is not fixed, with a multiple of 8 rows, qualify; returns whether the
        layout is interleaved afterwards. The weight's values, and every op on it, are unchanged. Call it before
        `optimize_for_inference` (which does it for every linear): the fused decode step records each weight's
        kernel type when it is installed.
        """
        if self.interleaved:
            return True
        if (self.layout_fixed or self.ggml_type not in kernels.INTERLEAVABLE or self.out_features % 8
                or self.raw.device.type != "cpu" or not self.raw.is_contiguous() or not kernels.can_interleave()):
            return False
        self.kernel_type = kernels.interleave_(self.raw, self.ggml_type, self.in_features)
        return True

    @classmethod
    def from_float(cls, linear: nn.Linear | Tensor, ggml_type: int = GGML_Q8_0) -> GGMLLinear:
        w = linear.weight if isinstance(linear, nn.Linear) else linear
        return cls(quantize_blocks(w, ggml_type).to(w.device), ggml_type, int(w.shape[1]))

    @classmethod
    def from_entry(cls, entry: Any, default_type: int = GGML_Q8_0, *, owned: bool = False) -> GGMLLinear:
        """owned: the entry's blocks are the caller's to rearrange (a copy made for this model), so interleave_()
        may regroup them; otherwise blocks used in place keep their layout (a read-only file mapping, or
        memory someone else still reads)."""
        raw, qtype, (_, cols) = to_ggml_blocks(entry, default_type)
        fixed = _used_in_place(entry) and (not owned or not np.asarray(entry.raw).flags.writeable)
        return cls(raw, qtype, cols, layout_fixed=fixed)

    def forward(self, x: Tensor) -> Tensor:
        return kernels.ggml_linear(x, self.raw, self.kernel_type, self.in_features, int8=self.int8_activations,
                                   bf16=self.bf16_prefill)

    def dequantize(self) -> Tensor:
        return kernels.dequantize_blocks(self.raw, self.kernel_type, self.in_features)

    def extra_repr(self) -> str:
        layout = ", rows interleaved x8" if self.interleaved else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{KERNEL_TYPES[self.ggml_type]}{layout}")


class GGMLEmbedding(nn.Module):
    """Token embedding table kept as blocks; looked-up rows are dequantized on the fly."""

    def __init__(self, raw: Tensor, ggml_type: int, embedding_dim: int) -> None:
        super().__init__()
        self.register_buffer("raw", raw, persistent=False)
        self.ggml_type = int(ggml_type)
        self.embedding_dim = int(embedding_dim)
        self.num_embeddings = int(raw.shape[0])

    @classmethod
    def from_entry(cls, entry: Any, default_type: int = GGML_Q8_0) -> GGMLEmbedding:
        raw, qtype, (_, cols) = to_ggml_blocks(entry, default_type)
        return cls(raw, qtype, cols)

    def forward(self, tokens: Tensor) -> Tensor:
        rows = self.raw.index_select(0, tokens.reshape(-1))
        out = kernels.dequantize_blocks(rows, self.ggml_type, self.embedding_dim)
        return out.view(*tokens.shape, self.embedding_dim)

    def as_linear(self) -> GGMLLinear:
        """The tied output projection: the same bytes, read as a linear layer (never interleaved: the
        embedding's row lookups need the plain layout)."""
        return GGMLLinear(self.raw, self.ggml_type, self.embedding_dim, layout_fixed=True)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {KERNEL_TYPES[self.ggml_type]}"


def set_numerics(module_tree: nn.Module, *, int8_activations: bool | None = None,
                 bf16_prefill: bool | None = None) -> None:
    """Set the numerics of every GGMLLinear in `module_tree` (None leaves that one as it is). The embedding only
    dequantizes rows, so it has none."""
    for module in module_tree.modules():
        if isinstance(module, GGMLLinear):
            if int8_activations is not None:
                module.int8_activations = bool(int8_activations)
            if bf16_prefill is not None:
                module.bf16_prefill = bool(bf16_prefill)
