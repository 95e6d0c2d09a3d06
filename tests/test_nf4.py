"""NF4 (QLoRA) weights: code values, block layout against a plain reference, error bounds, LoRA on top."""

from __future__ import annotations

import itertools

import pytest
import torch

from llamaworks.config import get_preset
from llamaworks.model import Transformer
from llamaworks.quant.nf4 import (
    NF4_CODE,
    NF4Linear,
    dequantize_nf4,
    quantize_model_nf4,
    quantize_nf4,
)
from llamaworks.train.lora import LoRAConfig, apply_lora, lora_modules, merge_lora, merged_state_dict


def test_code_values_are_the_normal_quantiles_of_the_paper():
    """Rebuild NF4 as the QLoRA paper defines it: 8 positive and 7 negative N(0,1) quantiles plus an exact 0,
    between probabilities 0.5 and offset = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, normalised to [-1, 1]."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    offset = 0.5 * (1 - 1 / 30 + 1 - 1 / 32)
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat((positive, negative, torch.zeros(1, dtype=torch.float64))).sort().values
    values = values / values.max()
    assert len(NF4_CODE) == 16 and NF4_CODE[7] == 0.0 and NF4_CODE[0] == -1.0 and NF4_CODE[15] == 1.0
    torch.testing.assert_close(torch.tensor(NF4_CODE, dtype=torch.float64), values, atol=2e-5, rtol=0)


def reference_indices(w: torch.Tensor, block: int) -> tuple[list[int], list[float]]:
    """The straightforward definition, one value at a time: nearest code value to w/absmax of its block."""
    flat = w.reshape(-1).tolist()
    indices, absmaxes = [], []
    for start in range(0, len(flat), block):
        chunk = flat[start:start + block]
        absmax = max(abs(v) for v in chunk)
        absmaxes.append(absmax)
        for v in chunk:
            x = v / absmax if absmax else 0.0
            indices.append(min(range(16), key=lambda i: abs(NF4_CODE[i] - x)))
    return indices, absmaxes


def test_layout_matches_a_plain_reference():
    torch.manual_seed(0)
    w = torch.randn(12, 32) * torch.linspace(0.1, 3.0, 12)[:, None]  # rows with different scales
    w[3] = 0.0  # an all-zero block must not divide by zero
    parts = quantize_nf4(w, block_size=64)
    ref_idx, ref_absmax = reference_indices(w, 64)
    assert parts["packed"].dtype == torch.uint8 and parts["packed"].numel() == w.numel() // 2
    torch.testing.assert_close(parts["absmax"], torch.tensor(ref_absmax), atol=0, rtol=0)
    packed = parts["packed"].tolist()
    got_idx = [i for b in packed for i in (b >> 4, b & 0xF)]  # first value in the high nibble
    assert got_idx == ref_idx
    deq = dequantize_nf4(parts, tuple(w.shape), 64)
    expected = torch.tensor([NF4_CODE[i] for i in ref_idx]).view(-1, 64) * torch.tensor(ref_absmax)[:, None]
    torch.testing.assert_close(deq, expected.view(w.shape), atol=0, rtol=0)
    assert torch.equal(deq[3], torch.zeros(32))


def test_quantization_error_bounds():
    torch.manual_seed(0)
    w = torch.randn(256, 320) * 0.02
    parts = quantize_nf4(w)
    deq = dequantize_nf4(parts, tuple(w.shape))
    absmax = parts["absmax"].repeat_interleave(64).view(w.shape)
    err = (deq - w).abs()
    # No value is further from its code than half the widest gap between code values (times its absmax).
    widest_gap = max(b - a for a, b in itertools.pairwise(NF4_CODE))
    assert (err <= absmax * widest_gap / 2 + 1e-7).all()
    # Each block's absmax value itself is exact (it maps to +-1).
    blocks_w, blocks_d = w.view(-1, 64), deq.view(-1, 64)
    at_max = blocks_w.abs().argmax(1)
    torch.testing.assert_close(blocks_d.gather(1, at_max[:, None]), blocks_w.gather(1, at_max[:, None]))
    # On normally distributed weights the relative RMS error of 4-bit NF4 with 64-blocks is about 9-10%;
    # bound it loosely so a broken table or layout fails.
    rel = (deq - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()
    assert 0.05 < rel < 0.12, rel
    # Padding: an element count that is not a multiple of the block size round-trips its shape.
    odd = torch.randn(5, 7)
    assert dequantize_nf4(quantize_nf4(odd), (5, 7)).shape == (5, 7)


def test_double_quantization_is_close_to_single_and_smaller():
    torch.manual_seed(0)
    w = torch.randn(512, 384) * 0.05
    single = quantize_nf4(w)
    double = quantize_nf4(w, double_quant=True)
    assert "absmax" not in double and double["absmax_q"].dtype == torch.int8
    deq1 = dequantize_nf4(single, tuple(w.shape))
    deq2 = dequantize_nf4(double, tuple(w.shape))
    err1 = (deq1 - w).pow(2).mean().sqrt()
    err2 = (deq2 - w).pow(2).mean().sqrt()
    assert err2 < err1 * 1.01
    bytes1 = sum(t.numel() * t.element_size() for t in single.values())
    bytes2 = sum(t.numel() * t.element_size() for t in double.values())
    bits1, bits2 = 8 * bytes1 / w.numel(), 8 * bytes2 / w.numel()
    assert abs(bits1 - 4.5) < 0.01 and bits2 < 4.14, (bits1, bits2)


def test_nf4_linear_forward_and_input_gradient():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=False)
    q = NF4Linear.from_linear(lin)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = q(x)
    w = q.dequantize()
    torch.testing.assert_close(y, x @ w.T)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 5, 64) @ w)
    assert not list(q.parameters())


def qlora_model(double_quant: bool = False) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny-llama3")).eval()
    model.reset_parameters(std=0.1)
    quantize_model_nf4(model, double_quant=double_quant)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="q,v,down"))
    return model


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_backward_only_touches_lora_params(double_quant):
    model = qlora_model(double_quant)
    buffers_before = {n: b.clone() for n, b in model.named_buffers()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(5):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None, name
            else:
                assert p.grad is None, name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, b in model.named_buffers():  # the quantized base weights never change
        assert torch.equal(b, buffers_before[n]), n
    # Projections not targeted are NF4 too (the whole base is 4-bit), embeddings and norms stay float.
    assert isinstance(model.layers[0].attention.wk, NF4Linear)
    assert model.tok_embeddings.weight.dtype == torch.float32


def test_qlora_merges_into_a_float_model():
    model = qlora_model()
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(std=0.2)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        plain = Transformer(model.config).eval()
        plain.load_state_dict(merged_state_dict(model), strict=True)
        torch.testing.assert_close(plain(x), expected, atol=1e-4, rtol=1e-4)
        merged = merge_lora(model)
        assert all(type(m) is not NF4Linear for m in merged.modules())
        torch.testing.assert_close(merged(x), expected, atol=1e-4, rtol=1e-4)


def test_nf4_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    cpu = dequantize_nf4(quantize_nf4(w), (64, 96))
    gpu = dequantize_nf4(quantize_nf4(w.cuda()), (64, 96))
    torch.testing.assert_close(gpu.cpu(), cpu)
