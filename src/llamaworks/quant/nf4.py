"""4-bit NormalFloat (NF4) weights for QLoRA, in plain PyTorch (CPU and CUDA, no bitsandbytes).

NF4 (Dettmers et al., 2023, "QLoRA") has 16 code values placed at quantiles of N(0, 1), scaled to [-1, 1],
with an exact zero. A weight is cut into blocks of `block_size` (64) consecutive values of its row-major
flattening; each block stores its absolute maximum (absmax) and, per value, the index of the nearest code
value to value/absmax. Two indices share one byte, the first in the high nibble (bitsandbytes' order).

Double quantization (optional) stores the per-block absmax values themselves in 8 bits: their mean is
subtracted and the remainders are quantized symmetrically to int8 in blocks of 256 with a float32 scale each.
That is 8/64 + 32/(64*256) = 0.127 bits per weight for the scales instead of 32/64 = 0.5. (bitsandbytes uses
its 8-bit dynamic map for this second step; a linear int8 map is simpler and measured here to add < 0.5% to
the absmax error.)

The weight is dequantized on the fly in forward and again in backward, so a training step never holds
more than one dequantized matrix per live autograd node; the base weight gets no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The 16 NF4 values as published (QLoRA paper appendix; bitsandbytes' NF4 table).
NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
DEFAULT_BLOCK_SIZE = 64
ABSMAX_BLOCK_SIZE = 256  # block of the second (double) quantization


def nf4_code(device: torch.device | str | None = None) -> Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def _byte_table(device: torch.device | str | None) -> Tensor:
    """(256, 2) float32: the two code values a packed byte stands for (high nibble first)."""
    code = nf4_code(device)
    b = torch.arange(256, device=device)
    return torch.stack((code[b >> 4], code[b & 0xF]), dim=1)


def quantize_nf4(weight: Tensor, block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = False) -> dict[str, Tensor]:
    """Blockwise NF4 of `weight` (any shape). Returns the tensors `dequantize_nf4` needs.

    Keys: "packed" uint8 (ceil(n/2),); "absmax" float32 (n_blocks,) -- or, with double_quant,
    "absmax_q" int8 (n_blocks,), "absmax_scale" float32 (ceil(n_blocks/256),), "absmax_offset" float32 ().
    The last block is zero-padded when the element count is not a multiple of block_size.
    """
    if block_size < 2 or block_size % 2:
        raise ValueError(f"NF4 block_size must be an even number >= 2, got {block_size}")
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    pad = (-n) % block_size
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    blocks = flat.view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normalized = (blocks / scale[:, None]).clamp_(-1, 1).reshape(-1)
    code = nf4_code(flat.device)
    # Nearest code value: bucketize against the midpoints between neighbouring codes.
    midpoints = (code[1:] + code[:-1]) / 2
    idx = torch.bucketize(normalized, midpoints).to(torch.uint8)
    packed = (idx[0::2] << 4) | idx[1::2]
    out = {"packed": packed}
    if double_quant:
        out.update(_quantize_absmax(absmax))
    else:
        out["absmax"] = absmax
    return out


def _quantize_absmax(absmax: Tensor) -> dict[str, Tensor]:
    offset = absmax.mean()
    centred = absmax - offset
    pad = (-centred.numel()) % ABSMAX_BLOCK_SIZE
    blocks = torch.cat((centred, centred.new_zeros(pad))).view(-1, ABSMAX_BLOCK_SIZE)
    scale = blocks.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(blocks / scale[:, None]).clamp_(-127, 127).to(torch.int8).view(-1)[: absmax.numel()]
    return {"absmax_q": q, "absmax_scale": scale, "absmax_offset": offset}


def dequantize_absmax(parts: dict[str, Tensor]) -> Tensor:
    if "absmax" in parts:
        return parts["absmax"]
    q = parts["absmax_q"]
    scale = parts["absmax_scale"].repeat_interleave(ABSMAX_BLOCK_SIZE)[: q.numel()]
    return q.float() * scale + parts["absmax_offset"]


def dequantize_nf4(parts: dict[str, Tensor], shape: tuple[int, ...], block_size: int = DEFAULT_BLOCK_SIZE,
                   dtype: torch.dtype = torch.float32, table: Tensor | None = None) -> Tensor:
    packed = parts["packed"]
    if table is None:
        table = _byte_table(packed.device)
    values = table[packed.long()].view(-1, block_size)  # (n_blocks, block_size) code values
    values = values * dequantize_absmax(parts)[:, None]
    n = 1
    for s in shape:
        n *= s
    return values.view(-1)[:n].view(shape).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """x @ W.T with W rebuilt from NF4 in forward and in backward: no float copy of W is kept for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: NF4Linear) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantize(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen bias-free linear layer whose weight is stored in NF4 (4.0-4.5 bits per weight)."""

    def __init__(self, in_features: int, out_features: int, parts: dict[str, Tensor], *,
                 block_size: int = DEFAULT_BLOCK_SIZE, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size = block_size
        self.compute_dtype = compute_dtype
        self.double_quant = "absmax_q" in parts
        for name, t in parts.items():
            self.register_buffer(name, t)
        self.register_buffer("byte_table", _byte_table(parts["packed"].device), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = DEFAULT_BLOCK_SIZE,
                    double_quant: bool = False) -> NF4Linear:
        if linear.bias is not None:
            raise ValueError("NF4Linear does not support a bias")
        parts = quantize_nf4(linear.weight, block_size, double_quant)
        return cls(linear.in_features, linear.out_features, parts, block_size=block_size,
                   compute_dtype=linear.weight.dtype)

    def parts(self) -> dict[str, Tensor]:
        names = ("packed", "absmax_q", "absmax_scale", "absmax_offset") if self.double_quant else ("packed", "absmax")
        return {n: getattr(self, n) for n in names}

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_nf4(self.parts(), (self.out_features, self.in_features), self.block_size,
                              dtype or self.compute_dtype, self.byte_table)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (a fresh tensor; for inspection and export, not for training)."""
        return self.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        return _NF4Matmul.apply(x, self)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"double_quant={self.double_quant}")


PROJECTIONS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
               "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def quantize_model_nf4(model: nn.Module, block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = False) -> nn.Module:
    """Replace every layer's seven projections by frozen NF4Linear (in place); embeddings and norms stay float.

    Works layer by layer so peak memory is the float model plus one layer's NF4 copy.
    """
    for layer in model.layers:
        for path in PROJECTIONS:
            parent_path, name = path.split(".")
            parent = getattr(layer, parent_path)
            lin = getattr(parent, name)
            if isinstance(lin, nn.Linear):
                setattr(parent, name, NF4Linear.from_linear(lin, block_size, double_quant))
    return model


__all__ = ["NF4_CODE", "NF4Linear", "dequantize_nf4", "nf4_code", "quantize_model_nf4", "quantize_nf4"]
