"""Quantized linears against float matmuls on random data, and block formats against gguf's reference code.

Tolerances: block (de)quantization must match gguf.quants bit for bit; a quantized linear must equal
x @ dequantize(W)^T up to float32 summation order (|diff| <= 1e-4 * (1 + |ref|), with K <= 512).
The int8 decode path (every build, up to 32 input rows; on by default) quantizes the activations to 32-element
int8 blocks as llama.cpp does: there ||out - ref|| / ||ref|| <= 2e-2 (measured about 6e-3 on random data). The
bf16 prefill path (more rows than the decode kernels take: 8 with float activations; on by default where the CPU
has AVX-512 BF16, available everywhere) rounds the gemm's inputs and outputs to bfloat16:
||out - ref|| / ||ref|| <= 1e-2 (measured about 3e-3). The "native" backend runs both off. Numerics are per module
(`set_numerics`) or per op call (int8=, bf16=): nothing process-wide. Each SIMD path of the
kernels is held to the scalar reference on its own in test_kernel_matrix.py.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llamaworks.quant import (
    GGML_Q4_0,
    GGML_Q4_1,
    GGML_Q8_0,
    GGMLEmbedding,
    GGMLLinear,
    dequantize_blocks,
    kernels,
    quantize_blocks,
    to_ggml_blocks,
)
from llamaworks.quant.kernels import dequantize_blocks_torch
from llamaworks.quant.linear import set_numerics

Q = gguf.GGMLQuantizationType
TYPES = [(GGML_Q4_0, Q.Q4_0), (GGML_Q4_1, Q.Q4_1), (GGML_Q8_0, Q.Q8_0)]


INT8_REL = 2e-2  # int8-activation decode vs the float reference, relative to the output's norm
BF16_REL = 1e-2  # bf16 prefill gemm vs the float reference, relative to the output's norm


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> None:
    if rel in (INT8_REL, BF16_REL):
        err = ((a - b).norm() / b.norm()).item()
    else:
        err = ((a - b).abs() / (1 + b.abs())).max().item()
    assert err <= rel, f"max relative error {err:.2e} > {rel:.0e}"


@pytest.fixture(params=["native", "native-int8", "native-bf16", "torch-fallback"])
def backend(request, monkeypatch):
    if request.param == "torch-fallback":
        monkeypatch.setattr(kernels, "_native", False)
    else:
        assert kernels.native_available(), "the native kernels did not build"
    return request.param


def numerics(backend: str) -> dict[str, bool]:
    """The op arguments of a backend mode (set_numerics takes the same as int8_activations=, bf16_prefill=)."""
    return {"int8": backend == "native-int8", "bf16": backend == "native-bf16"}


def with_numerics(module: torch.nn.Module, backend: str) -> torch.nn.Module:
    n = numerics(backend)
    set_numerics(module, int8_activations=n["int8"], bf16_prefill=n["bf16"])
    return module


def decode_tol(backend: str, m: int) -> float:
    if backend == "native-int8" and m <= 32:
        return INT8_REL
    if backend == "native-bf16" and m > 8:
        return BF16_REL
    return 1e-4


@pytest.mark.parametrize(("ours", "theirs"), TYPES, ids=["q4_0", "q4_1", "q8_0"])
def test_block_formats_match_gguf_reference(ours: int, theirs: Q) -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.rand(48, 1) * 3
    w[0, :32] = 0  # an all-zero block must not divide by zero
    raw = quantize_blocks(w, ours)
    ref_raw = gguf.quants.quantize(w.numpy(), theirs)
    assert np.array_equal(raw.numpy(), ref_raw)
    expected = torch.from_numpy(gguf.quants.dequantize(ref_raw, theirs).copy())
    assert torch.equal(dequantize_blocks_torch(raw, ours, 256), expected)
    assert torch.equal(dequantize_blocks(raw, ours, 256), expected)


@pytest.mark.parametrize("m", [1, 3, 8, 9, 20, 40])
@pytest.mark.parametrize(("ours", "theirs"), TYPES, ids=["q4_0", "q4_1", "q8_0"])
def test_linear_equals_dequantized_matmul(backend: str, ours: int, theirs: Q, m: int) -> None:
    torch.manual_seed(1)
    weight = torch.randn(96, 512) * 0.05
    layer = with_numerics(GGMLLinear.from_float(weight, ours), backend)
    x = torch.randn(2, m, 512)
    ref = x @ layer.dequantize().T
    close(layer(x), ref, decode_tol(backend, 2 * m))
    assert layer(x).shape == (2, m, 96)
    # Quantization error itself stays in the expected range for the format (sanity, not exactness).
    rel = (ref - x @ weight.T).norm() / (x @ weight.T).norm()
    assert rel < (0.01 if ours == GGML_Q8_0 else 0.2)


def _x8(layer: GGMLLinear) -> GGMLLinear:
    """The layer with its rows interleaved: natively where this build can, else by the torch reference."""
    if not layer.interleave_():
        layer.raw = kernels.interleave_rows_torch(layer.raw, layer.ggml_type, layer.in_features)
        layer.kernel_type = layer.ggml_type | kernels.INTERLEAVED
    assert layer.interleaved
    return layer


@pytest.mark.parametrize(("ours", "rows", "cols"), [(GGML_Q4_0, 24, 64), (GGML_Q4_1, 24, 64), (GGML_Q4_0, 96, 512),
                                                     (GGML_Q4_1, 40, 288)])
def test_row_interleaving_is_a_lossless_regrouping(ours: int, rows: int, cols: int) -> None:
    torch.manual_seed(4)
    raw = quantize_blocks(torch.randn(rows, cols), ours)
    x8 = kernels.interleave_rows_torch(raw, ours, cols)
    assert not torch.equal(x8, raw) and x8.shape == raw.shape
    assert torch.equal(kernels.deinterleave_rows_torch(x8, ours, cols), raw)
    # Row 8g + i's scale sits at bytes 2i..2i+1 of its group's first block (Q4_1: minimums follow at 16 + 2i).
    group_block = x8.reshape(-1)[: 8 * raw.shape[1] // (cols // 32)]
    assert torch.equal(group_block[2 * 3:2 * 3 + 2], raw[3, :2])
    dequantized = dequantize_blocks_torch(raw, ours, cols)
    assert torch.equal(dequantize_blocks_torch(x8, ours | kernels.INTERLEAVED, cols), dequantized)
    # The native regrouping (in place) and its dequantizers agree bit for bit (the kernels are built here: see the
    # backend fixture).
    assert kernels.can_interleave(), "the native kernels did not build"
    native = raw.clone()
    assert kernels.interleave_(native, ours, cols) == ours | kernels.INTERLEAVED
    assert torch.equal(native, x8)
    assert torch.equal(dequantize_blocks(native, ours | kernels.INTERLEAVED, cols), dequantized)


@pytest.mark.parametrize("m", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("ours", [GGML_Q4_0, GGML_Q4_1], ids=["q4_0", "q4_1"])
def test_interleaved_linear_equals_dequantized_matmul(backend: str, ours: int, m: int) -> None:
    torch.manual_seed(5)
    # 40 rows = 5 groups of 8: two threads split the rows at 20, inside a group.
    for rows in (96, 40):
        plain = GGMLLinear.from_float(torch.randn(rows, 256) * 0.05, ours)
        ref_weight = plain.dequantize()
        layer = with_numerics(_x8(GGMLLinear(plain.raw.clone(), ours, 256)), backend)
        x = torch.randn(m, 256)
        close(layer(x), x @ ref_weight.T, decode_tol(backend, m))
        assert torch.equal(layer.dequantize(), ref_weight)


@pytest.mark.parametrize("layout", ["plain", "x8"])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_grouped_and_swiglu_kernels(backend: str, m: int, layout: str) -> None:
    """q/k/v and gate/up of mixed types; with "x8" the Q4_* weights are interleaved and Q8_0 ones stay plain
    (wk's 20 rows put wv's groups at a column offset that is not a multiple of 8)."""
    torch.manual_seed(2)
    k = 128
    wq, wk, wv = (GGMLLinear.from_float(torch.randn(n, k), t) for n, t in [(64, GGML_Q4_1), (20, GGML_Q8_0),
                                                                             (32, GGML_Q4_0)])
    gate = GGMLLinear.from_float(torch.randn(80, k), GGML_Q4_1)
    up = GGMLLinear.from_float(torch.randn(80, k), GGML_Q8_0)
    x = torch.randn(m, k)
    want_qkv = torch.cat([x @ w.dequantize().T for w in (wq, wk, wv)], dim=-1)
    want_ffn = torch.nn.functional.silu(x @ gate.dequantize().T) * (x @ up.dequantize().T)
    if layout == "x8":
        _x8(wq), _x8(wv), _x8(gate)
    out = kernels.ggml_linear_group(x, [wq.raw, wk.raw, wv.raw], [wq.kernel_type, wk.kernel_type, wv.kernel_type], k,
                                    **numerics(backend))
    close(out, want_qkv, decode_tol(backend, m))
    got = kernels.ggml_swiglu(x, gate.raw, gate.kernel_type, up.raw, up.kernel_type, k, **numerics(backend))
    close(got, want_ffn, decode_tol(backend, m))


def test_only_owned_q4_weights_are_interleaved() -> None:
    assert kernels.can_interleave()
    assert not GGMLLinear.from_float(torch.randn(64, 64), GGML_Q8_0).interleave_()  # no x8 kernel for Q8_0
    assert not GGMLLinear.from_float(torch.randn(12, 64), GGML_Q4_0).interleave_()  # not whole groups of 8
    emb = GGMLEmbedding(quantize_blocks(torch.randn(64, 64), GGML_Q4_0), GGML_Q4_0, 64)
    assert not emb.as_linear().interleave_()  # tied output: the embedding's row lookups need the plain rows
    raw = quantize_blocks(torch.randn(16, 64), GGML_Q4_1).numpy()
    raw.setflags(write=False)  # like a GGUF tensor mapped read-only from the file
    mapped = GGMLLinear.from_entry(_Entry(Q.Q4_1, (16, 64), raw), owned=True)
    assert not mapped.interleave_() and mapped.kernel_type == GGML_Q4_1
    shared = quantize_blocks(torch.randn(16, 64), GGML_Q4_1).numpy()  # writable, but the caller's
    before = shared.copy()
    assert not GGMLLinear.from_entry(_Entry(Q.Q4_1, (16, 64), shared)).interleave_()
    assert GGMLLinear.from_entry(_Entry(Q.Q4_1, (16, 64), shared), owned=True).interleave_()  # a copy of ours
    assert not np.array_equal(shared, before)  # regrouped in place: why only owned blocks qualify
    with pytest.raises(RuntimeError, match="invalid ggml type code"):
        kernels.ggml_linear(torch.randn(1, 64), quantize_blocks(torch.randn(8, 64), GGML_Q8_0), GGML_Q8_0 | 256, 64)
    owned = GGMLLinear.from_float(torch.randn(16, 64), GGML_Q4_1)
    assert owned.interleave_() and "interleaved" in repr(owned)


def test_embedding_rows_and_tied_output(backend: str) -> None:
    torch.manual_seed(3)
    table = torch.randn(300, 64)
    raw = quantize_blocks(table, GGML_Q8_0)
    emb = GGMLEmbedding(raw, GGML_Q8_0, 64)
    tokens = torch.tensor([[0, 5, 299], [7, 7, 1]])
    deq = dequantize_blocks_torch(raw, GGML_Q8_0, 64)
    assert torch.equal(emb(tokens), deq[tokens])
    head = with_numerics(emb.as_linear(), backend)
    assert head.raw.data_ptr() == emb.raw.data_ptr()  # shared bytes, no copy
    h = torch.randn(4, 64)
    close(head(h), h @ deq.T, decode_tol(backend, 4))


class _Entry:
    """Shaped like checkpoints.gguf.GGUFQuantTensor (ggml_type, shape, raw)."""

    def __init__(self, qtype: Q, shape: tuple[int, int], raw: np.ndarray) -> None:
        self.ggml_type, self.shape, self.raw = qtype, shape, raw


# Where each K-quant block keeps its float16 super-block scale(s): (byte offset, count of float16 values).
_KQUANT_SCALES = {Q.Q2_K: (80, 2), Q.Q3_K: (108, 1), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208, 1)}


def _random_kquant(qtype: Q, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random bytes are valid K-quant blocks once the float16 super-block scales are sane."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    offset, count = _KQUANT_SCALES[qtype]
    for i in range(count):  # d (and dmin)
        scales = (rng.random((rows, cols // block)) * 0.01 + 0.001).astype(np.float16)
        raw[..., offset + 2 * i:offset + 2 * i + 2] = scales.view(np.uint8).reshape(rows, -1, 2)
    return raw.reshape(rows, -1)


def _requant_bound(x: np.ndarray, blocks: np.ndarray, target: int) -> np.ndarray:
    """Per 32-element block, the most a correct requantization of float blocks `x` (n, 32) can be off.

    Q4_1 (d = (max - min) / 15, q = round((x - min) / d) in 0..15, stored d16 and m16 in float16): half a step of
    the target block, d / 2, plus what the float16 rounding of the scale and the minimum moves the furthest level,
    15 |d16 - d| + |m16 - min|. Q8_0 (d = max|x| / 127, q = round(x / d)): d / 2 + 127 |d16 - d|. Plus 8 float32
    ulps of the block's largest value for the float32 arithmetic on both sides.
    """
    x = x.astype(np.float64)
    d16 = blocks[:, 0:2].copy().view(np.float16).astype(np.float64)[:, 0]
    amax = np.abs(x).max(-1)
    if target == GGML_Q4_1:
        lo = x.min(-1)
        d = (x.max(-1) - lo) / 15
        m16 = blocks[:, 2:4].copy().view(np.float16).astype(np.float64)[:, 0]
        bound = d / 2 + 15 * np.abs(d16 - d) + np.abs(m16 - lo)
    else:
        d = amax / 127
        bound = d / 2 + 127 * np.abs(d16 - d)
    return bound + 8 * np.spacing(amax.astype(np.float32)).astype(np.float64)


def _native_convert(qtype: Q, rows: int, cols: int, raw: np.ndarray) -> tuple[np.ndarray, int]:
    """The native backend's conversion at load (`engine.native._convert`) of one tensor, with its target type."""
    from types import SimpleNamespace

    from llamaworks.checkpoints.ggml_types import REQUANT_TARGET, GGMLType
    from llamaworks.engine.native import _convert

    target = REQUANT_TARGET[GGMLType(int(qtype))]
    tensor = SimpleNamespace(data=raw, qtype=GGMLType(int(qtype)), shape=(rows, cols))
    return np.asarray(_convert("w", tensor, target, Path("random.gguf"))).reshape(rows, -1), int(target)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize(("qtype", "target"), [(Q.Q2_K, GGML_Q4_1), (Q.Q3_K, GGML_Q4_1), (Q.Q4_K, GGML_Q4_1),
                                               (Q.Q5_K, GGML_Q8_0), (Q.Q6_K, GGML_Q8_0)])
def test_kquants_are_converted_per_tensor(qtype: Q, target: int, backend: str) -> None:
    """Each K-quant converts to its kernel type within the requantization bound of that type, element by element.

    Both sides come from gguf-py's dequantizers (the outside reference): the K-quant blocks as read, the
    converted Q4_1/Q8_0 blocks as written, by either backend's entry point (both call ggml_types.convert_blocks, so
    they hold the same bytes: checked). This is a requantization, not a
    re-labelling: a 4-bit K-quant sub-block is a Q4_1 block only when its codes reach both 0 and 15 (and Q2_K/Q3_K
    sub-blocks are 16 elements), so the bound is the target's half step plus its float16 rounding.
    """
    rows, cols = 16, 512
    raw = _random_kquant(qtype, rows, cols, seed=4)
    expected = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
    assert np.isfinite(expected).all() and np.abs(expected).max() > 0
    if backend == "torch":
        converted, got_type, shape = to_ggml_blocks(_Entry(qtype, (rows, cols), raw))
        assert shape == (rows, cols)
        blocks = converted.numpy()
        # The project's own dequantizer reads the converted blocks as gguf-py does.
        got = dequantize_blocks_torch(converted, got_type, cols).numpy()
        np.testing.assert_array_equal(got, gguf.quants.dequantize(blocks, Q(target)).reshape(rows, cols))
        assert np.array_equal(blocks, _native_convert(qtype, rows, cols, raw)[0])  # one converter: same bytes
    else:
        blocks, got_type = _native_convert(qtype, rows, cols, raw)
    assert got_type == target
    got = gguf.quants.dequantize(blocks, Q(target)).reshape(rows, cols)
    x = expected.reshape(-1, 32)
    err = np.abs(got.reshape(-1, 32).astype(np.float64) - x).max(-1)
    bound = _requant_bound(x, blocks.reshape(rows * cols // 32, -1), target)
    worst = int(np.argmax(err / bound))
    assert (err <= bound).all(), f"block {worst}: error {err[worst]:.3g} > bound {bound[worst]:.3g}"
    # The bound is attained, not slack: some element lands close to half a step away.
    assert (err / bound).max() > 0.5


def test_gguf_blocks_are_used_in_place(smollm2_gguf) -> None:
    reader = gguf.GGUFReader(smollm2_gguf, "r")
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    entry = _Entry(Q(t.tensor_type), (int(t.shape[1]), int(t.shape[0])), t.data)
    layer = GGMLLinear.from_entry(entry)
    assert layer.ggml_type == GGML_Q4_1 and (layer.out_features, layer.in_features) == (576, 1536)
    assert layer.raw.data_ptr() == t.data.ctypes.data  # memory-mapped, not copied
    expected = torch.from_numpy(gguf.quants.dequantize(t.data, Q.Q4_1).copy())
    assert torch.equal(layer.dequantize(), expected)


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_blocks(torch.randn(4, 40), GGML_Q8_0)
    with pytest.raises(ValueError, match="bytes"):
        GGMLLinear(torch.zeros(4, 10, dtype=torch.uint8), GGML_Q8_0, 64)
