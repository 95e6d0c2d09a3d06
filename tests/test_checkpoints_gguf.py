"""GGUF reading and writing: the real SmolLM2 Q4_1 file against transformers, our writer's round trips,
every quantized block type the reader accepts, rope-scaling tensors, and one-line errors for bad files."""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch

from llamaworks.checkpoints import (
    Checkpoint,
    GGUFQuantTensor,
    load_checkpoint,
    load_model,
    read_gguf,
    save_gguf,
)
from llamaworks.checkpoints.ggml_types import QUANT_SIZES, GGMLType, GGUFValueType
from llamaworks.checkpoints.gguf import READ_TYPES, _rope_scaling_from_divisors, ours_to_gguf_name
from llamaworks.config import ModelConfig, RopeScaling, get_preset
from llamaworks.errors import FormatError
from llamaworks.model import Transformer

# Token ids only, so these tests need no tokenizer: "<|im_start|>user\nWhat is ...", plain text, digits.
# Equal lengths so that one batched forward covers them (transformers' GGUF model is slow per call on CPU).
PROMPTS = [[1, 9690, 198, 2683, 314, 253, 1789, 282, 4649, 47, 2],
           [504, 3458, 282, 4649, 314, 4649, 30, 216, 28, 29, 30],
           [35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45]]


def random_model(name: str, seed: int = 0, std: float = 0.2) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(get_preset(name)).eval()
    model.reset_parameters(std=std)  # wide enough that a wrong permutation or name shows in the logits
    return model


def logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


def same_shape(a: ModelConfig, b: ModelConfig) -> bool:
    """Equal apart from the name and the spelling of n_kv_heads (None means "= n_heads")."""
    def norm(c: ModelConfig) -> ModelConfig:
        return c.replace(name="", n_kv_heads=c.kv_heads)

    return norm(a) == norm(b)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def one_line(excinfo: pytest.ExceptionInfo, path) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    return message


# -- the real default model ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2(smollm2_ours):
    return smollm2_ours


def test_smollm2_config_and_metadata(smollm2):
    model, _, ckpt = smollm2
    c = ckpt.config
    assert (c.dim, c.n_layers, c.n_heads, c.kv_heads, c.hidden_dim, c.vocab_size) == (576, 30, 9, 3, 1536, 49152)
    assert c.rope_theta == 100000.0 and c.norm_eps == 1e-5 and c.tie_embeddings and model.output is None
    assert ckpt.format == "gguf" and "<|im_start|>" in ckpt.chat_template
    assert ckpt.generation_config["eos_token_id"] == 2
    assert len(ckpt.metadata["tokenizer.ggml.tokens"]) == 49152


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2, smollm2_transformers):
    """Both sides dequantize the same Q4_1/Q8_0 blocks, so only float32 arithmetic order differs."""
    model = smollm2[0]
    tokens = torch.tensor(PROMPTS)
    with torch.no_grad():
        want = smollm2_transformers(tokens).logits
    got = logits(model, tokens)
    torch.testing.assert_close(got, want, atol=5e-4, rtol=1e-4)  # measured max |diff| ~5e-5 (logits up to ~30)
    assert torch.equal(got[:, -1].argmax(-1), want[:, -1].argmax(-1))


def test_smollm2_quantized_tensors_stay_quantized(smollm2_gguf, smollm2):
    ckpt = read_gguf(smollm2_gguf, dequantize=False)
    wq = ckpt.state_dict["layers.0.attention.wq.weight"]
    emb = ckpt.state_dict["tok_embeddings.weight"]
    assert isinstance(wq, GGUFQuantTensor) and wq.ggml_type == gguf.GGMLQuantizationType.Q4_1
    assert wq.shape == (576, 576) and wq.raw.dtype == np.uint8 and wq.raw.shape == (576, 576 // 32 * 20)
    assert isinstance(wq.raw, np.memmap) or isinstance(wq.raw.base, np.memmap)  # not copied into memory
    assert emb.ggml_type == gguf.GGMLQuantizationType.Q8_0 and emb.shape == (49152, 576)
    assert ckpt.state_dict["norm.weight"].dtype == torch.float32  # F32 tensors come back as tensors
    loaded = dict(smollm2[0].state_dict())
    assert torch.equal(wq.dequantize(), loaded["layers.0.attention.wq.weight"])
    assert torch.equal(emb.dequantize(torch.bfloat16), loaded["tok_embeddings.weight"].bfloat16())


def test_smollm2_embedded_tokenizer(smollm2):
    tokenizer = smollm2[1]
    assert tokenizer is not None and tokenizer.vocab_size == 49152
    ids = tokenizer.encode("The capital of France is", add_bos=False)
    assert tokenizer.decode(ids) == "The capital of France is"
    assert 2 in tokenizer.stop_ids


# -- our writer ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-llama2", "tiny-llama3", "tiny-tied", "tiny-mistral"])
def test_f32_round_trip_is_exact(tmp_path, name):
    model = random_model(name)
    config = model.config
    path = save_gguf(tmp_path / "m.gguf", model.state_dict(), config, None, "{{ messages }}", tensor_type="f32")
    loaded, _, ckpt = load_model(path)
    assert same_shape(ckpt.config, config)
    assert ckpt.chat_template == "{{ messages }}"
    tokens = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))  # temp file renamed into place


# Relative logit error bounds; measured ~4e-4, 3.5e-3, 1.2e-2, 0.17 (std 0.05 weights, 2 layers).
@pytest.mark.parametrize(("tensor_type", "tolerance"), [("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 3e-2),
                                                        ("q4_0", 0.35)])
@pytest.mark.parametrize("name", ["tiny-llama2", "tiny-tied"])
def test_lossy_round_trips_stay_close(tmp_path, name, tensor_type, tolerance):
    model = random_model(name, std=0.05)
    path = save_gguf(tmp_path / "m.gguf", model, model.config, None, tensor_type=tensor_type)
    tokens = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(2))
    loaded = load_model(path)[0]
    assert rel_error(logits(loaded, tokens), logits(model, tokens)) < tolerance

    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == tensor_type.upper()
    if name == "tiny-llama2" and tensor_type.startswith("q"):
        assert types["blk.0.ffn_down.weight"] == "F16"  # 172 columns do not fill 32-value blocks
    assert ("output.weight" in types) == (name != "tiny-tied")
    file_type = reader.fields["general.file_type"].contents()
    assert file_type == {"f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[tensor_type]


def test_q8_0_and_q4_0_blocks_match_the_reference_layout(tmp_path):
    """Decode the written bytes by hand: Q8_0 = f16 scale + 32 int8; Q4_0 = f16 scale + 16 bytes of (q+8) nibbles,
    low nibbles holding values 0..15 and high nibbles 16..31."""
    model = random_model("tiny-tied")
    w = model.state_dict()["layers.0.attention.wq.weight"]
    for qtype in ("q8_0", "q4_0"):
        path = save_gguf(tmp_path / f"{qtype}.gguf", model, model.config, None, tensor_type=qtype)
        t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
        blocks = np.asarray(t.data).reshape(-1, 34 if qtype == "q8_0" else 18)
        scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        if qtype == "q8_0":
            q = blocks[:, 2:].view(np.int8).astype(np.float32)
        else:
            packed = blocks[:, 2:]
            q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32) - 8
        decoded = torch.from_numpy(scale * q).reshape(w.shape)
        step = w.abs().reshape(-1, 32).amax(1, keepdim=True) / (127 if qtype == "q8_0" else 8)
        # Q8_0 rounds to the nearest step; Q4_0 maps the largest magnitude to -8, so +max clips to 7 (one step).
        bound = step * (0.51 if qtype == "q8_0" else 1.01) + 1e-3
        assert ((decoded - w).reshape(-1, 32).abs() <= bound).all()
        assert (decoded - w).abs().mean() < step.mean() / 2  # most values round, not clip


def test_written_gguf_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    for name in ("tiny-llama2", "tiny-tied"):
        model = random_model(name)
        path = save_gguf(tmp_path / f"{name}.gguf", model, model.config, None, tensor_type="f32")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
        tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            torch.testing.assert_close(hf(tokens).logits, logits(model, tokens), atol=1e-4, rtol=1e-4)
    # Quantized blocks too: transformers and we dequantize the same Q8_0 bytes.
    model = random_model("tiny-tied", std=0.05)
    path = save_gguf(tmp_path / "q8.gguf", model, model.config, None, tensor_type="q8_0")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, logits(load_model(path)[0], tokens), atol=1e-4, rtol=1e-4)


def byte_level_vocab() -> dict:
    """A 256-token byte-level BPE vocabulary in GGUF keys: 254 byte symbols (GPT-2's byte-to-unicode map), one
    merge ("a b" -> "ab") and an end-of-text control token."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    tokens = [*chars[:254], "ab", "<|end|>"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * 255 + [3], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.bos_token_id": 255, "tokenizer.ggml.eos_token_id": 255,
            "tokenizer.ggml.add_bos_token": False}


def test_convert_quantizes_and_keeps_tokenizer_metadata(tmp_path):
    """GGUF -> GGUF re-encodes the tensors and copies tokenizer.* and the chat template."""
    from llamaworks.checkpoints.convert import convert

    meta = byte_level_vocab()
    model = random_model("tiny-tied", std=0.05)
    src = save_gguf(tmp_path / "src.gguf", model, model.config, None, "TEMPLATE", tensor_type="f32",
                    tokenizer_metadata=meta)
    dst = convert(src, tmp_path / "out", to="gguf", quant="q8_0", progress=False)
    assert dst == tmp_path / "out" / "src.gguf"
    reader = gguf.GGUFReader(dst)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["tokenizer.ggml.tokens"] == meta["tokenizer.ggml.tokens"]
    assert reader.fields["tokenizer.ggml.bos_token_id"].types == [gguf.GGUFValueType.UINT32]  # llama.cpp needs u32
    assert reader.fields["tokenizer.ggml.token_type"].types[-1] == gguf.GGUFValueType.INT32
    assert fields["tokenizer.chat_template"] == "TEMPLATE" and fields["general.file_type"] == 7
    tokens = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(4))
    loaded, tokenizer, _ = load_model(dst)
    assert rel_error(logits(loaded, tokens), logits(model, tokens)) < 3e-2
    assert tokenizer.encode("abc") == [254, tokenizer.encode("c")[0]] and 255 in tokenizer.stop_ids


# -- every block type the reader accepts ----------------------------------------------------------------------
def write_raw_gguf(path, config: ModelConfig, tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]],
                   arch: str = "llama", extra: dict | None = None) -> None:
    """A GGUF written directly with gguf.GGUFWriter (no llamaworks code), for inputs our writer never makes."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.dim)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.hidden_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.kv_heads)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_vocab_size(config.vocab_size)
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=None if qtype in (gguf.GGMLQuantizationType.F32,
                                                              gguf.GGMLQuantizationType.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def float_tensors(config: ModelConfig, seed: int = 0) -> dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]:
    torch.manual_seed(seed)
    model = Transformer(config)
    model.reset_parameters(std=0.2)
    return {ours_to_gguf_name(k): (v.numpy(), gguf.GGMLQuantizationType.F32) for k, v in model.state_dict().items()}


def test_every_supported_block_type_dequantizes(tmp_path):
    # dim and hidden_dim of 256 so that K-quant super-blocks (256 values) fit every row.
    config = ModelConfig(256, 2, 4, 256, 256, max_seq_len=64)
    tensors = float_tensors(config)
    quant_types = sorted((t for t in READ_TYPES if t not in (gguf.GGMLQuantizationType.F32,)), key=int)
    rng = np.random.default_rng(0)
    two_d = [name for name, (data, _) in tensors.items() if data.ndim == 2]
    assert len(two_d) >= len(quant_types)
    for name, qtype in zip(two_d, quant_types):
        rows, cols = tensors[name][0].shape
        if qtype == gguf.GGMLQuantizationType.F16:
            tensors[name] = (tensors[name][0].astype(np.float16), qtype)
            continue
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
        tensors[name] = (raw, qtype)
    path = tmp_path / "all.gguf"
    write_raw_gguf(path, config, tensors)
    dense = read_gguf(path).state_dict
    quantized = read_gguf(path, dequantize=False).state_dict
    seen = set()
    for ours, t in quantized.items():
        gname = ours_to_gguf_name(ours)
        data, qtype = tensors[gname]
        seen.add(qtype)
        assert tuple(dense[ours].shape) == (*data.shape[:-1], dense[ours].shape[-1])
        if isinstance(t, GGUFQuantTensor):
            assert t.ggml_type == qtype and t.shape == tuple(dense[ours].shape)
            expected = torch.from_numpy(gguf.quants.dequantize(data, qtype))
            torch.testing.assert_close(t.dequantize(), expected, equal_nan=True, atol=0, rtol=0)
            torch.testing.assert_close(dense[ours], expected, equal_nan=True, atol=0, rtol=0)
        else:  # F32, F16 and BF16 come back as tensors of that dtype
            Q = gguf.GGMLQuantizationType
            assert t.dtype == {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[qtype]
            expected = torch.from_numpy(gguf.quants.dequantize(data, qtype))
            torch.testing.assert_close(t.float(), expected, equal_nan=True, atol=0, rtol=0)
    assert seen >= set(quant_types)


# -- LLaMA 3.1 rope scaling as llama.cpp stores it ----------------------------------------------------------
def transformers_llama3_divisors(config: ModelConfig, scaling: RopeScaling) -> np.ndarray:
    """What llama.cpp's converter stores as rope_freqs: the unscaled inverse frequencies over the scaled ones,
    here with the scaled ones from transformers' own LLaMA 3.1 implementation (ROPE_INIT_FUNCTIONS["llama3"])."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(hidden_size=config.dim, num_attention_heads=config.n_heads, head_dim=config.head_size,
                     max_position_embeddings=config.max_seq_len,
                     rope_parameters={"rope_type": "llama3", "rope_theta": config.rope_theta, "factor": scaling.factor,
                                      "low_freq_factor": scaling.low_freq_factor,
                                      "high_freq_factor": scaling.high_freq_factor,
                                      "original_max_position_embeddings": scaling.original_max_seq_len})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf)
    base = 1.0 / (config.rope_theta ** (np.arange(0, config.head_size, 2, dtype=np.float64) / config.head_size))
    return (base / inv_freq.double().numpy()).astype(np.float32)


# Meta's published rope_scaling of Llama 3.1 8B / 3.2 1B (their config.json files).
META_LLAMA3 = {"llama-3.1-8b": RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
               "llama-3.2-1b": RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)}


@pytest.mark.parametrize("name", sorted(META_LLAMA3))
def test_rope_scaling_recovered_from_llama_cpp_rope_freqs(name):
    """Real Llama 3.1/3.2 frequencies (theta 5e5, head 128/64) computed by transformers: the divisors llama.cpp
    stores give back Meta's published parameters, and our frequencies are transformers' frequencies."""
    from llamaworks.model import rope_frequencies

    config = get_preset(name)
    assert config.rope_scaling == META_LLAMA3[name]
    divisors = transformers_llama3_divisors(config, META_LLAMA3[name])
    assert math.isclose(divisors.min(), 1.0, rel_tol=1e-6) and math.isclose(divisors.max(), META_LLAMA3[name].factor,
                                                                         rel_tol=1e-6)  # (float32 noise)
    fitted = _rope_scaling_from_divisors(divisors, config.replace(rope_scaling=None))
    assert fitted == META_LLAMA3[name]
    base = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_size, 2, dtype=torch.float64) / config.head_size))
    torch.testing.assert_close(rope_frequencies(config), base / torch.from_numpy(divisors).double(), rtol=1e-6, atol=0)


def test_rope_freqs_without_our_key_and_arbitrary_freqs(tmp_path):
    """A GGUF from llama.cpp has only the rope_freqs tensor: the scaling is fitted; divisors no curve explains
    are applied as explicit frequencies."""
    config = get_preset("tiny-llama3").replace(rope_scaling=None, rope_theta=10000.0)
    model = random_model("tiny-llama3")
    tokens = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(5))
    tensors = {ours_to_gguf_name(k): (v.numpy(), gguf.GGMLQuantizationType.F32) for k, v in model.state_dict().items()}
    scaling = RopeScaling("llama3", 4.0, 1.0, 4.0, 64)
    scaled = config.replace(rope_scaling=scaling)
    tensors["rope_freqs.weight"] = (transformers_llama3_divisors(config, scaling), gguf.GGMLQuantizationType.F32)
    write_raw_gguf(tmp_path / "fit.gguf", config, tensors)
    ckpt = read_gguf(tmp_path / "fit.gguf")
    from llamaworks.model import rope_frequencies

    torch.testing.assert_close(rope_frequencies(ckpt.config), rope_frequencies(scaled), rtol=1e-6, atol=0)

    odd = np.linspace(1.0, 3.0, config.head_size // 2).astype(np.float32) ** 2  # not a llama3 curve
    tensors["rope_freqs.weight"] = (odd, gguf.GGMLQuantizationType.F32)
    write_raw_gguf(tmp_path / "odd.gguf", config, tensors)
    loaded, _, ckpt = load_model(tmp_path / "odd.gguf")
    assert ckpt.config.rope_scaling is None and "rope_inv_freq" in ckpt.metadata
    base = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    torch.testing.assert_close(loaded.inv_freq, (base / torch.from_numpy(odd).double()).float())
    reference = Transformer(config).eval()
    reference.load_state_dict(model.state_dict())
    reference.inv_freq = loaded.inv_freq.clone()
    assert torch.equal(logits(loaded, tokens), logits(reference, tokens))
    unscaled = Transformer(config).eval()
    unscaled.load_state_dict(model.state_dict())
    assert rel_error(logits(unscaled, tokens), logits(loaded, tokens)) > 1e-3  # the frequencies mattered


# -- bad input: one line naming the file ----------------------------------------------------------------------
@pytest.fixture
def good_gguf(tmp_path):
    model = random_model("tiny-tied")
    return save_gguf(tmp_path / "good.gguf", model, model.config, None, tensor_type="f16")


def test_truncated_file(good_gguf):
    data = good_gguf.read_bytes()
    for cut in (len(data) - 100, 40, 10):
        bad = good_gguf.with_name(f"cut{cut}.gguf")
        bad.write_bytes(data[:cut])
        with pytest.raises(FormatError) as e:
            load_checkpoint(bad)
        assert "truncated" in one_line(e, bad) or "not a readable GGUF" in str(e.value)


def test_wrong_magic(good_gguf):
    bad = good_gguf.with_name("bad.gguf")
    bad.write_bytes(b"GGML" + good_gguf.read_bytes()[4:])
    with pytest.raises(FormatError) as e:
        load_checkpoint(bad)
    assert "magic" in one_line(e, bad)


def test_unsupported_architecture(tmp_path):
    config = get_preset("tiny-tied")
    path = tmp_path / "gpt2.gguf"
    write_raw_gguf(path, config, float_tensors(config), arch="gpt2")
    with pytest.raises(FormatError) as e:
        load_checkpoint(path)
    assert "'gpt2'" in one_line(e, path)


def test_missing_tensor(tmp_path):
    config = get_preset("tiny-tied")
    tensors = float_tensors(config)
    del tensors["blk.1.ffn_up.weight"]
    path = tmp_path / "missing.gguf"
    write_raw_gguf(path, config, tensors)
    with pytest.raises(FormatError) as e:
        load_checkpoint(path)
    assert "layers.1.feed_forward.w3.weight" in one_line(e, path)


def test_shape_mismatch(tmp_path):
    config = get_preset("tiny-tied")
    tensors = float_tensors(config.replace(hidden_dim=128))  # the metadata will still say 160
    path = tmp_path / "shape.gguf"
    write_raw_gguf(path, config, tensors)
    with pytest.raises(FormatError) as e:
        load_model(path)
    assert "shape" in one_line(e, path)


def test_missing_path_and_wrong_arguments(tmp_path):
    with pytest.raises(FormatError) as e:
        load_model(tmp_path / "nope.gguf")
    assert "no such file" in one_line(e, tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope")
    model = random_model("tiny-tied")
    with pytest.raises(ValueError, match="q3_k"):
        save_gguf(tmp_path / "x.gguf", model, model.config, None, tensor_type="q3_k")
    assert isinstance(load_checkpoint(save_gguf(tmp_path / "y.gguf", model, model.config, None, tensor_type="f32")),
                      Checkpoint)


@pytest.mark.slow
def test_tokenizer_and_template_round_trip(tmp_path, smollm2):
    _, tokenizer, ckpt = smollm2
    model = random_model("tiny-tied")
    config = model.config.replace(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    big = Transformer(config)
    path = save_gguf(tmp_path / "tok.gguf", big, config, tokenizer, ckpt.chat_template, tensor_type="q8_0")
    back = load_checkpoint(path)
    text = "Hello <|im_start|>world 1234"
    assert back.tokenizer.encode(text) == tokenizer.encode(text)
    assert back.chat_template == ckpt.chat_template
    fields = gguf.GGUFReader(path).fields
    assert json.dumps(fields["tokenizer.ggml.tokens"].contents()[:5]) == json.dumps(
        ckpt.metadata["tokenizer.ggml.tokens"][:5])


def test_type_tables_match_the_gguf_package() -> None:
    """ggml_types.py restates gguf's type codes and block sizes so that loading a model never imports gguf."""
    for ours in GGMLType:
        theirs = gguf.GGMLQuantizationType[ours.name]
        assert int(theirs) == int(ours) and gguf.GGML_QUANT_SIZES[theirs] == QUANT_SIZES[ours]
    assert set(QUANT_SIZES) == set(GGMLType)
    assert {m.name: int(m) for m in GGUFValueType} == {m.name: int(m) for m in gguf.GGUFValueType}
    assert set(GGMLType) >= READ_TYPES


def test_loading_a_model_does_not_import_gguf() -> None:
    import subprocess
    import sys

    code = ("import sys; from llamaworks.engine.torch_backend import TorchBackend; TorchBackend.load(None); "
            "print(sorted(m for m in ('gguf', 'yaml', 'sentencepiece') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
