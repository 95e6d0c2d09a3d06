"""Meta's native layout: model-parallel shards split the way Meta's fairscale layers split them merge back into
the model transformers computes from the HF twin; single-shard round trips; bad pickles fail in one line."""

from __future__ import annotations

import json

import pytest
import torch

from llamaworks.checkpoints import load_checkpoint, load_model, save_meta
from llamaworks.checkpoints.hf_names import config_to_hf, hf_to_ours
from llamaworks.checkpoints.meta import config_to_params, meta_ffn_params, meta_hidden_dim
from llamaworks.config import PRESETS, RopeScaling, get_preset
from llamaworks.errors import FormatError
from llamaworks.model import Transformer

COLUMN = ("wq", "wk", "wv", "w1", "w3", "output")  # ColumnParallelLinear: rows split
ROW = ("wo", "w2")  # RowParallelLinear: columns split


def hf_twin(config):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.AutoConfig.for_model(**config_to_hf(config))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model


def split_like_meta(state: dict[str, torch.Tensor], n: int, vocab_parallel: bool) -> list[dict[str, torch.Tensor]]:
    """What Meta's model-parallel ranks each hold (see llama's model.py: fairscale Column/RowParallelLinear,
    ParallelEmbedding (LLaMA 1/2, embedding dim split) or VocabParallelEmbedding (LLaMA 3, vocab split))."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, t in state.items():
        leaf = name.split(".")[-2]
        if t.ndim == 1:
            parts = [t.clone() for _ in range(n)]
        elif name == "tok_embeddings.weight":
            parts = t.chunk(n, dim=0 if vocab_parallel else 1)
        elif leaf in COLUMN:
            parts = t.chunk(n, dim=0)
        elif leaf in ROW:
            parts = t.chunk(n, dim=1)
        else:
            raise AssertionError(name)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    return shards


def write_meta_dir(directory, config, state, n_shards: int, vocab_parallel: bool, params: dict) -> None:
    directory.mkdir()
    for i, shard in enumerate(split_like_meta(state, n_shards, vocab_parallel)):
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")
    (directory / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize(("label", "config", "vocab_parallel", "params"), [
    # LLaMA 2 style: embedding split on its dim (ParallelEmbedding), hidden 172 from multiple_of 4.
    ("llama2", get_preset("tiny-llama2"), False,
     {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 256, "multiple_of": 4, "norm_eps": 1e-5}),
    # LLaMA 3.1 style: vocab split, GQA, ffn_dim_multiplier, theta 5e5, use_scaled_rope.
    ("llama3", get_preset("tiny-llama3").replace(hidden_dim=224, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0,
                                                                                          8192)), True,
     {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, "multiple_of": 32,
      "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}),
])
def test_two_shard_checkpoint_matches_hf_twin(tmp_path, label, config, vocab_parallel, params):
    assert meta_hidden_dim(64, params["multiple_of"], params.get("ffn_dim_multiplier")) == config.hidden_dim
    hf = hf_twin(config)
    state = hf_to_ours(hf.state_dict(), config)
    write_meta_dir(tmp_path / label, config, state, 2, vocab_parallel, params)
    shard0 = torch.load(tmp_path / label / "consolidated.00.pth", weights_only=True)
    assert shard0["tok_embeddings.weight"].shape == ((128, 64) if vocab_parallel else (256, 32))

    model, _, ckpt = load_model(tmp_path / label)
    assert ckpt.format == "meta"
    got = ckpt.config
    assert (got.dim, got.hidden_dim, got.kv_heads, got.rope_theta, got.rope_scaling) == (
        config.dim, config.hidden_dim, config.kv_heads, config.rope_theta, config.rope_scaling)
    tokens = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama2", "tiny-tied"])
def test_single_shard_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = Transformer(get_preset(name)).eval()
    model.reset_parameters(std=0.2)
    save_meta(tmp_path, model, model.config)
    saved = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    assert "output.weight" in saved  # Meta's files carry the output matrix even for tied models
    loaded, _, ckpt = load_model(tmp_path)
    assert ckpt.config.tie_embeddings == model.config.tie_embeddings
    assert ckpt.config.hidden_dim == model.config.hidden_dim
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_params_json_for_published_shapes():
    """Meta's formula reproduces the published SwiGLU widths from params.json values."""
    assert meta_hidden_dim(4096, 256, None) == 11008  # LLaMA 2 7B
    assert meta_hidden_dim(8192, 4096, 1.3) == 28672  # LLaMA 2 70B
    assert meta_hidden_dim(4096, 1024, 1.3) == 14336  # LLaMA 3 8B
    for name in ("llama-2-7b", "llama-2-13b", "llama-3-8b", "llama-3.1-8b", "tinyllama-1.1b"):
        config = PRESETS[name]
        params = config_to_params(config)
        assert meta_hidden_dim(config.dim, params["multiple_of"], params.get("ffn_dim_multiplier")) == config.hidden_dim
    assert config_to_params(PRESETS["llama-3.1-8b"])["use_scaled_rope"] is True
    assert "rope_theta" not in config_to_params(PRESETS["llama-2-7b"])  # LLaMA 2's ModelArgs has no such field
    assert meta_ffn_params(64, 160)[0] > 1
    with pytest.raises(ValueError, match="sliding window"):
        config_to_params(get_preset("tiny-mistral"))
    with pytest.raises(ValueError, match="rope scaling"):
        config_to_params(get_preset("tiny-llama3"))  # original context 32 is not expressible in params.json


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_pickle_with_custom_class_is_refused(tmp_path):
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny-llama2"))
    save_meta(tmp_path, model, model.config)
    path = tmp_path / "consolidated.00.pth"
    sd = torch.load(path, weights_only=True)
    sd["evil"] = Payload()
    torch.save(sd, path)
    with pytest.raises(FormatError) as e:
        load_checkpoint(tmp_path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "not a plain weights file" in message


def test_bad_params_and_missing_files(tmp_path):
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny-llama2"))
    save_meta(tmp_path, model, model.config)
    params = json.loads((tmp_path / "params.json").read_text())
    del params["n_heads"]
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(FormatError, match="n_heads") as e:
        load_checkpoint(tmp_path)
    assert str(tmp_path / "params.json") in str(e.value)
    params["n_heads"] = 4
    params["multiple_of"] = 256  # hidden 256 != the 172 the weights have
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(FormatError, match="shape"):
        load_checkpoint(tmp_path)
    (tmp_path / "consolidated.00.pth").unlink()
    with pytest.raises(FormatError, match="consolidated"):
        load_checkpoint(tmp_path)


def test_tokenizer_model_is_read(tmp_path, sentencepiece_model):
    torch.manual_seed(0)
    config = get_preset("tiny-llama2").replace(vocab_size=32000)
    model = Transformer(config)
    save_meta(tmp_path, model, config, tokenizer_model=sentencepiece_model)
    _, tokenizer, ckpt = load_model(tmp_path)
    assert tokenizer is not None and tokenizer.vocab_size == 32000
    assert tokenizer.decode(tokenizer.encode("Hello world", add_bos=False)) == "Hello world"
    assert ckpt.generation_config["bos_token_id"] == tokenizer.bos_id


@pytest.mark.parametrize("name", ["tiny-llama2", "tiny-tied", "tiny-12m"])
def test_expected_shapes_match_the_model(name):
    """The readers validate against shapes computed from the config; they must be model.py's."""
    from llamaworks.checkpoints import expected_shapes

    config = get_preset(name).replace(head_dim=24)
    model = Transformer(config)
    assert expected_shapes(config) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
