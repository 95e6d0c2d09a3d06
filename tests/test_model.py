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


@pytest.mark.parametrize("name", TINY)
def test_kv_cache_decoding_equals_full_forward(name):
    config = get_preset(name)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    model.reset_parameters(std=0.2)
    tokens = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(2, 32)
        prefix = model(tokens[:, :10])
        steps = [model(tokens[:, i : i + 1], start_pos=i) for i in range(10, 24)]
    torch.testing.assert_close(torch.cat([prefix, *steps], 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-mistral"])
def test_chunked_prefill_equals_full_forward(name):
    """Several tokens appended after cached ones (start_pos > 0, T > 1) see the whole cached prefix."""
    config = get_preset(name)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    model.reset_parameters(std=0.2)
    tokens = torch.randint(0, config.vocab_size, (1, 21))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(1, 32)
        chunks = [model(tokens[:, a:b], start_pos=a) for a, b in [(0, 7), (7, 15), (15, 21)]]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_unpadded_rows():
    config = get_preset("tiny-llama3")
    torch.manual_seed(0)
    model = Transformer(config).eval()
    model.reset_parameters(std=0.2)
    short, long = torch.randint(0, 256, (1, 5)), torch.randint(0, 256, (1, 9))
    pad = 4
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[0, :pad] = False
    positions = (key_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        model.setup_cache(2, 16)
        got = model(batch, key_mask=key_mask, positions=positions)
        nxt = torch.randint(0, 256, (2, 1))
        key_mask = torch.cat([key_mask, torch.ones(2, 1, dtype=torch.bool)], 1)
        step = model(nxt, start_pos=9, key_mask=key_mask, positions=positions[:, -1:] + 1)
        model.clear_cache()
        ref_short = model(torch.cat([short, nxt[:1]], 1))
        ref_long = model(torch.cat([long, nxt[1:]], 1))
    torch.testing.assert_close(got[0, pad:], ref_short[0, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref_long[0, :9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[0, 0], ref_short[0, 5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, 0], ref_long[0, 9], atol=1e-5, rtol=1e-5)


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
