"""Our Transformer against transformers' LLaMA/Mistral on tiny random configs, and KV-cache decoding."""

from __future__ import annotations

import pytest
import torch

from llamaworks.checkpoints.hf_names import config_to_hf, hf_to_ours, ours_to_hf
from llamaworks.config import PRESETS, get_preset
from llamaworks.model import Transformer

TINY = ["tiny-llama2", "tiny-llama3", "tiny-tied", "tiny-mistral"]


def hf_model(config):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.AutoConfig.for_model(**config_to_hf(config))
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    for p in model.parameters():  # HF's init leaves norms at 1 and is small; widen it so bugs show
        torch.nn.init.normal_(p, std=0.2)
    return model


def ours_from_hf(config, hf):
    model = Transformer(config).eval()
    model.load_state_dict(hf_to_ours(hf.state_dict(), config), strict=True)
    return model


@pytest.mark.parametrize("name", TINY)
def test_logits_match_transformers(name):
    config = get_preset(name)
    hf = hf_model(config)
    ours = ours_from_hf(config, hf)
    tokens = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_state_dict_round_trips_through_hf_names(name):
    config = get_preset(name)
    model = Transformer(config)
    sd = model.state_dict()
    back = hf_to_ours(ours_to_hf(sd, config), config)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def _tiny(name: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(get_preset(name)).eval()
    model.reset_parameters(std=0.2)
    return model


def _run(model: Transformer, tokens: torch.Tensor, start: int, rows: list[int]) -> torch.Tensor:
    """Feed tokens (B, T) at positions start.. of the given cache rows."""
    B, T = tokens.shape
    positions = torch.arange(start, start + T).expand(B, T)
    return model(tokens, positions=positions, cache_rows=torch.tensor(rows))


@pytest.mark.parametrize("name", TINY)
def test_kv_cache_decoding_equals_full_forward(name):
    model = _tiny(name)
    tokens = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(3, 32, torch.float32)
        prefix = _run(model, tokens[:, :10], 0, [2, 0])
        steps = [_run(model, tokens[:, i : i + 1], i, [2, 0]) for i in range(10, 24)]
    torch.testing.assert_close(torch.cat([prefix, *steps], 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-mistral"])
def test_chunked_prefill_equals_full_forward(name):
    """Several tokens appended after cached ones (T > 1 at positions > 0) see the whole cached prefix; on
    tiny-mistral (sliding window 8) chunks cross the window, which the cached forward honours as the full one."""
    model = _tiny(name)
    tokens = torch.randint(0, model.config.vocab_size, (1, 21))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(1, 32, torch.float32)
        chunks = [_run(model, tokens[:, a:b], a, [0]) for a, b in [(0, 7), (7, 15), (15, 21)]]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)


def test_sliding_window_is_honoured_with_and_without_a_cache():
    """tiny-mistral: window 8, 2 layers, so the last of 16 tokens depends on positions 1..15 only (7 back per
    layer); changing token 0 leaves its logits exactly as they were, changing token 12 does not."""
    model = _tiny("tiny-mistral")
    assert model.config.sliding_window == 8 and model.config.n_layers == 2
    tokens = torch.randint(0, 256, (1, 16))
    far, near = tokens.clone(), tokens.clone()
    far[0, 0] = (tokens[0, 0] + 1) % 256
    near[0, 12] = (tokens[0, 12] + 1) % 256
    with torch.no_grad():
        base, out_far, out_near = model(tokens)[0, -1], model(far)[0, -1], model(near)[0, -1]
        model.setup_cache(2, 16, torch.float32)
        cached = _run(model, torch.cat([tokens, far]), 0, [0, 1])[:, -1]
    torch.testing.assert_close(out_far, base, atol=0, rtol=0)
    assert not torch.allclose(out_near, base)
    torch.testing.assert_close(cached[0], base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached[1], base, atol=1e-5, rtol=1e-5)


def test_rows_at_different_positions_equal_each_row_alone():
    """One batched call whose rows sit at different positions of their own cache rows (continuous batching)."""
    model = _tiny("tiny-llama3")
    a, b = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 4))
    nxt = torch.randint(0, 256, (2, 3))
    with torch.no_grad():
        model.setup_cache(4, 16, torch.float32)
        _run(model, a, 0, [3])
        _run(model, b, 0, [1])
        positions = torch.tensor([[9, 10, 11], [4, 5, 6]])
        got = model(nxt, positions=positions, cache_rows=torch.tensor([3, 1]))
        ref_a = model(torch.cat([a, nxt[:1]], 1))[0, 9:]
        ref_b = model(torch.cat([b, nxt[1:]], 1))[0, 4:]
    torch.testing.assert_close(got[0], ref_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref_b, atol=1e-5, rtol=1e-5)


def test_cache_rows_out_of_range_are_refused():
    model = _tiny("tiny-llama3")
    model.setup_cache(2, 8, torch.float16)
    one = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="outside the KV cache"):
        model(one, positions=torch.tensor([[8]]), cache_rows=torch.tensor([0]))
    with pytest.raises(ValueError, match="outside the KV cache"):
        model(one, positions=torch.tensor([[0]]), cache_rows=torch.tensor([2]))
    with pytest.raises(ValueError, match="needs positions"):
        model(one, cache_rows=torch.tensor([0]))


def test_left_padded_batch_equals_unpadded_rows():
    """Without a cache (training batches), key_mask hides left padding and positions start at each row's text."""
    model = _tiny("tiny-llama3")
    short, long = torch.randint(0, 256, (1, 5)), torch.randint(0, 256, (1, 9))
    pad = 4
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[0, :pad] = False
    positions = (key_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(batch, key_mask=key_mask, positions=positions)
        ref_short = model(short)
        ref_long = model(long)
    torch.testing.assert_close(got[0, pad:], ref_short[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref_long[0], atol=1e-5, rtol=1e-5)


def test_segment_ids_isolate_packed_documents():
    config = get_preset("tiny-llama2")
    torch.manual_seed(0)
    model = Transformer(config).eval()
    a, b = torch.randint(0, 256, (1, 6)), torch.randint(0, 256, (1, 7))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[0] * 6 + [1] * 7])
    pos = torch.tensor([list(range(6)) + list(range(7))])
    with torch.no_grad():
        got = model(packed, segment_ids=seg, positions=pos)
        torch.testing.assert_close(got[:, 6:], model(b), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[:, :6], model(a), atol=1e-5, rtol=1e-5)


def test_presets_have_published_parameter_counts():
    # Published sizes, to within the rounding of the model names.
    expect = {"llama-2-7b": 6.74e9, "llama-2-70b": 68.98e9, "llama-3-8b": 8.03e9, "llama-3.2-1b": 1.24e9,
              "mistral-7b": 7.24e9, "tinyllama-1.1b": 1.10e9, "smollm2-135m": 134.5e6, "llama-1-65b": 65.3e9}
    for name, n in expect.items():
        assert abs(PRESETS[name].n_params - n) / n < 0.01, (name, PRESETS[name].n_params)
    tiny = Transformer(get_preset("tiny-tied"))
    assert sum(p.numel() for p in tiny.parameters()) == get_preset("tiny-tied").n_params
