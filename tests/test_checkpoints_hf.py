"""Hugging Face directories: our writer's output loads in transformers with equal logits, sharded safetensors
and pytorch_model.bin read back exactly, tokenizer/template/generation config travel, bad files fail in one line."""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamaworks.checkpoints import load_checkpoint, load_model, save_hf
from llamaworks.checkpoints.convert import convert
from llamaworks.checkpoints.hf import parse_size
from llamaworks.checkpoints.hf_names import ours_to_hf
from llamaworks.config import get_preset
from llamaworks.errors import FormatError
from llamaworks.model import Transformer

TINY = ["tiny-llama2", "tiny-llama3", "tiny-tied", "tiny-mistral"]


def random_model(name: str, seed: int = 0, **changes) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(get_preset(name).replace(**changes)).eval()
    model.reset_parameters(std=0.2)
    return model


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


def tokens_for(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def one_line(excinfo: pytest.ExceptionInfo, path) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    return message


@pytest.mark.parametrize("name", TINY)
def test_written_directory_loads_in_transformers(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    model = random_model(name)
    save_hf(tmp_path, model, model.config, None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    expected_class = "MistralForCausalLM" if name == "tiny-mistral" else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_class
    tokens = tokens_for(256)
    torch.testing.assert_close(logits(hf, tokens), logits(model, tokens), atol=1e-4, rtol=1e-4)
    # and back: our reader gives the identical state dict
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.format == "hf" and ckpt.config.tie_embeddings == model.config.tie_embeddings
    assert ckpt.config.rope_scaling == model.config.rope_scaling
    assert ckpt.config.sliding_window == model.config.sliding_window
    original = model.state_dict()
    assert ckpt.state_dict.keys() == {k for k in original if k.endswith(".weight")}
    for k, v in ckpt.state_dict.items():
        assert torch.equal(v, original[k]), k
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp files all renamed
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_sharded_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = random_model("tiny-llama3")
    save_hf(tmp_path, model, model.config, None, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    per_shard: dict[str, list[int]] = {}
    hf_sd = ours_to_hf(model.state_dict(), model.config)
    for name, shard in index["weight_map"].items():
        per_shard.setdefault(shard, []).append(hf_sd[name].numel() * 4)
    assert all(sum(s) <= 40_000 or len(s) == 1 for s in per_shard.values())  # a big tensor goes alone
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    loaded = load_model(tmp_path)[0]
    tokens = tokens_for(256)
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(hf, tokens), logits(model, tokens), atol=1e-4, rtol=1e-4)
    # Saving again unsharded removes the old shards and index, so no loader sees stale weights.
    save_hf(tmp_path, model, model.config, None)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("model-*")) and not (tmp_path / "model.safetensors.index.json").exists()


def test_dtype_and_bin_weights(tmp_path):
    model = random_model("tiny-tied")
    save_hf(tmp_path / "bf16", model, model.config, None, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "bf16" / "model.safetensors").values())
    ckpt = load_checkpoint(tmp_path / "bf16")
    assert ckpt.state_dict["norm.weight"].dtype == torch.bfloat16
    loaded = load_model(tmp_path / "bf16", dtype=torch.float32)[0]
    assert loaded.tok_embeddings.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.tok_embeddings.weight, model.tok_embeddings.weight.bfloat16().float())

    # pytorch_model.bin (one file, then an index of two) reads the same as safetensors
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "bf16" / "config.json").read_text())
    hf_sd = ours_to_hf(model.state_dict(), model.config)
    torch.save(hf_sd, bin_dir / "pytorch_model.bin")
    tokens = tokens_for(256)
    assert torch.equal(logits(load_model(bin_dir)[0], tokens), logits(model, tokens))
    (bin_dir / "pytorch_model.bin").unlink()
    names = list(hf_sd)
    parts = {"pytorch_model-00001-of-00002.bin": names[:5], "pytorch_model-00002-of-00002.bin": names[5:]}
    for file, keys in parts.items():
        torch.save({k: hf_sd[k] for k in keys}, bin_dir / file)
    index = {"weight_map": {k: file for file, keys in parts.items() for k in keys}}
    (bin_dir / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert torch.equal(logits(load_model(bin_dir)[0], tokens), logits(model, tokens))


def test_extra_entries_are_ignored_and_missing_ones_reported(tmp_path):
    model = random_model("tiny-tied")
    sd = dict(model.state_dict())
    sd["layers.0.attention.wq.lora_A.weight"] = torch.zeros(4, 64)  # e.g. left over by an adapter
    sd["output.weight"] = sd["tok_embeddings.weight"]  # a tied model's alias
    save_hf(tmp_path / "ok", sd, model.config, None)
    assert torch.equal(logits(load_model(tmp_path / "ok")[0], tokens_for(256)), logits(model, tokens_for(256)))
    del sd["norm.weight"]
    with pytest.raises(FormatError, match=r"norm\.weight"):
        save_hf(tmp_path / "bad", sd, model.config, None)


def test_generation_config_and_chat_template(tmp_path):
    model = random_model("tiny-tied")
    save_hf(tmp_path, model, model.config, None, chat_template="{{ messages[0]['content'] }}",
            generation_config={"temperature": 0.6, "top_p": 0.9, "eos_token_id": [2, 7]})
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen == {"temperature": 0.6, "top_p": 0.9, "eos_token_id": [2, 7], "do_sample": True}
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.chat_template == "{{ messages[0]['content'] }}"
    assert ckpt.generation_config["eos_token_id"] == [2, 7]
    # A named-template list (older transformers) picks "default"; chat_template.jinja (transformers 5) wins.
    tc = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tc))
    assert load_checkpoint(tmp_path).chat_template == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert load_checkpoint(tmp_path).chat_template == "J"


def test_tokenizer_travels_and_transformers_reads_it(tmp_path, sentencepiece_model):
    transformers = pytest.importorskip("transformers")
    from llamaworks.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(sentencepiece_model)
    model = random_model("tiny-llama2", vocab_size=tokenizer.vocab_size)
    template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    save_hf(tmp_path, model, model.config, tokenizer, chat_template=template)
    _, tok2, ckpt = load_model(tmp_path)
    text = "Hello world, numbers 12345 and émoji 🦙"
    assert tok2.encode(text) == tokenizer.encode(text)
    assert ckpt.chat_template == template and tok2.chat_template == template
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["bos_token_id"] == tokenizer.bos_id and tokenizer.eos_id in [gen["eos_token_id"]]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok.encode(text) == tokenizer.encode(text)
    assert hf_tok.chat_template == template


def test_convert_between_formats(tmp_path):
    model = random_model("tiny-llama2")
    save_hf(tmp_path / "hf", model, model.config, None, chat_template="TPL")
    tokens = tokens_for(256)
    want = logits(model, tokens)
    gguf_path = convert(tmp_path / "hf", tmp_path / "m.gguf", to="gguf", dtype="f32", progress=False)
    got_gguf = load_model(gguf_path)
    assert torch.equal(logits(got_gguf[0], tokens), want) and got_gguf[2].chat_template == "TPL"
    back = convert(gguf_path, tmp_path / "hf2", to="hf", progress=False)
    assert torch.equal(logits(load_model(back)[0], tokens), want)
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "float32"
    meta = convert(back, tmp_path / "meta", to="meta", dtype="bf16", progress=False)
    assert (meta / "params.json").exists()
    torch.testing.assert_close(logits(load_model(meta)[0], tokens), want, atol=0.5, rtol=0.1)
    with pytest.raises(ValueError, match="only for --to gguf"):
        convert(tmp_path / "hf", tmp_path / "x", to="hf", quant="q8_0")
    with pytest.raises(ValueError, match="--to"):
        convert(tmp_path / "hf", tmp_path / "x", to="onnx")


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000 and parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size(1234) == 1234 and parse_size("500kb") == 500_000
    with pytest.raises(ValueError):
        parse_size("big")


# -- bad input --------------------------------------------------------------------------------------------
@pytest.fixture
def hf_dir(tmp_path):
    model = random_model("tiny-tied")
    return save_hf(tmp_path / "model", model, model.config, None)


def test_corrupt_safetensors_header(hf_dir):
    path = hf_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"{garbage"
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError) as e:
        load_checkpoint(hf_dir)
    assert "safetensors" in one_line(e, path)


def test_missing_tensor(hf_dir):
    path = hf_dir / "model.safetensors"
    sd = load_file(path)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(FormatError) as e:
        load_model(hf_dir)
    assert "layers.1.feed_forward.w3.weight" in one_line(e, hf_dir)


def test_shape_mismatch(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] = 128
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError) as e:
        load_checkpoint(hf_dir)
    assert "shape" in one_line(e, hf_dir)


def test_bad_config_json(hf_dir):
    (hf_dir / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(FormatError) as e:
        load_checkpoint(hf_dir)
    assert "gpt2" in one_line(e, hf_dir / "config.json")
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(FormatError) as e:
        load_checkpoint(hf_dir)
    one_line(e, hf_dir / "config.json")


class Payload:
    """Stands in for anything that is not a tensor: weights_only unpickling must refuse it."""

    def __reduce__(self):
        return (print, ("this would run on load",))


def test_bin_that_is_not_plain_weights(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    path = hf_dir / "pytorch_model.bin"
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": Payload()}, path)
    with pytest.raises(FormatError) as e:
        load_checkpoint(hf_dir)
    assert "not a plain weights file" in one_line(e, path)
    # a pickle written without torch.save (no zip container) is refused too
    path.write_bytes(pickle.dumps({"a": 1}))
    assert not zipfile.is_zipfile(path)
    with pytest.raises(FormatError) as e:
        load_checkpoint(hf_dir)
    one_line(e, path)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                                      "num_hidden_layers": 1, "num_attention_heads": 4,
                                                      "vocab_size": 256, "intermediate_size": 128}))
    with pytest.raises(FormatError) as e:
        load_checkpoint(tmp_path)
    assert "no weights" in one_line(e, tmp_path)
    with pytest.raises(FormatError) as e:
        load_checkpoint(tmp_path / "config.json")  # a file inside an HF directory means the directory
    assert "no weights" in one_line(e, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FormatError) as e:
        load_checkpoint(empty)
    assert "not a checkpoint directory" in one_line(e, empty)
