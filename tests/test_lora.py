"""LoRA adapters: identity at init, merge == unmerged, PEFT layout loads in `peft` and gives our logits."""

from __future__ import annotations

import json

import pytest
import torch

from llamaworks.checkpoints.hf_names import config_to_hf, ours_to_hf
from llamaworks.config import get_preset
from llamaworks.errors import ConfigError, FormatError
from llamaworks.model import Transformer
from llamaworks.train.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_disabled,
    lora_modules,
    merge_lora,
    merged_state_dict,
    parse_targets,
    save_adapter,
    set_merged,
)


def random_model(name: str = "tiny-llama3", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(get_preset(name)).eval()
    model.reset_parameters(std=0.2)
    return model


def randomize_adapters(model: Transformer, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.3)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)


def tokens(config, n: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (n, t), generator=torch.Generator().manual_seed(5))


def test_parse_targets_accepts_short_hf_and_our_names():
    assert parse_targets("q,v") == ("q", "v")
    assert parse_targets(["down_proj", "wq", "gate"]) == ("q", "gate", "down")
    assert parse_targets("all") == ("q", "k", "v", "o", "gate", "up", "down")
    with pytest.raises(ConfigError, match="unknown projection 'qq'"):
        parse_targets("q,qq")


def test_fresh_adapter_equals_base_and_only_lora_trains():
    model = random_model()
    x = tokens(model.config)
    with torch.no_grad():
        expected = model(x)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="q,k,v,o,gate,up,down"))
    assert len(lora_modules(model)) == 7 * model.config.n_layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)

    # One backward: gradients reach B (A's gradient is zero while B is zero), never the base.
    model.train()
    model(x).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif not name.endswith("lora_A"):
            assert p.grad is None, name


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-tied"])
def test_merged_weights_give_the_same_logits(name):
    model = random_model(name)
    apply_lora(model, LoRAConfig(rank=4, alpha=16, targets="q,k,v,o,gate,up,down"))
    randomize_adapters(model)
    x = tokens(model.config)
    with torch.no_grad():
        unmerged = model(x)
        with lora_disabled(model):
            base = model(x)
        assert (unmerged - base).abs().max() > 1e-2  # the adapter really changes the output

        set_merged(model, True)
        torch.testing.assert_close(model(x), unmerged, atol=1e-4, rtol=1e-4)
        with lora_disabled(model):  # disabling a merged adapter subtracts it again
            torch.testing.assert_close(model(x), base, atol=1e-4, rtol=1e-4)
        set_merged(model, False)
        torch.testing.assert_close(model(x), unmerged, atol=1e-4, rtol=1e-4)

        sd = merged_state_dict(model)
        plain = Transformer(model.config).eval()
        plain.load_state_dict(sd, strict=True)
        torch.testing.assert_close(plain(x), unmerged, atol=1e-4, rtol=1e-4)

        merge_lora(model)
        assert not lora_modules(model)
        assert isinstance(model.layers[0].attention.wq, torch.nn.Linear)
        torch.testing.assert_close(model(x), unmerged, atol=1e-4, rtol=1e-4)


def hf_from_ours(model: Transformer):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.AutoConfig.for_model(**config_to_hf(model.config))
    hf_cfg._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    sd = ours_to_hf(merged_state_dict(model) if lora_modules(model) else model.state_dict(), model.config)
    if model.config.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


@pytest.mark.parametrize("name,targets", [("tiny-llama3", "q,k,v,o,gate,up,down"), ("tiny-tied", "q,v,down")])
def test_peft_loads_our_adapter_and_gives_our_logits(tmp_path, name, targets):
    peft = pytest.importorskip("peft")
    base = random_model(name)
    hf = hf_from_ours(base)  # same base weights, HF layout

    model = random_model(name)
    cfg = LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=targets)
    apply_lora(model, cfg)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", base_model="tiny")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["lora_alpha"] == 8

    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys

    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    x = tokens(model.config)
    with torch.no_grad():
        expected = peft_model(input_ids=x).logits
        got = model(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    # And back: our loader puts the same adapter on a fresh base (q/k B rows permuted back).
    fresh = random_model(name)
    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert loaded.targets == cfg.targets and loaded.rank == 4
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), got, atol=1e-5, rtol=1e-5)


def test_peft_saved_adapter_loads_into_ours(tmp_path):
    """The other direction: an adapter written by peft itself gives its logits in our model."""
    peft = pytest.importorskip("peft")
    base = random_model("tiny-llama3")
    hf = hf_from_ours(base)
    lcfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "k_proj", "up_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(hf, lcfg).eval()
    peft_model.save_pretrained(str(tmp_path / "from_peft"))
    x = tokens(base.config)
    with torch.no_grad():
        expected = peft_model(input_ids=x).logits
        load_adapter(base, tmp_path / "from_peft")
        torch.testing.assert_close(base(x), expected, atol=1e-4, rtol=1e-4)


def test_bad_adapter_files_give_one_line_errors(tmp_path):
    model = random_model()
    with pytest.raises(FormatError, match=r"adapter_config\.json: not found"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "lora_alpha": 8}')
    with pytest.raises(FormatError, match="missing field 'target_modules'"):
        load_adapter(model, tmp_path)
    other = random_model()
    apply_lora(other, LoRAConfig(rank=2, targets="q"))
    save_adapter(other, tmp_path / "ok")
    wrong_rank = random_model()
    apply_lora(wrong_rank, LoRAConfig(rank=3, targets="q"))
    with pytest.raises(FormatError, match="has shape"):
        load_adapter(wrong_rank, tmp_path / "ok")


def test_lora_linear_dropout_only_in_training():
    lin = torch.nn.Linear(16, 8, bias=False)
    m = LoRALinear(lin, rank=2, alpha=4, dropout=0.5)
    torch.nn.init.normal_(m.lora_B)
    x = torch.randn(3, 16)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, m(x))


@pytest.mark.parametrize("name", ["tiny-tied", "tiny-llama3"])
def test_embeddings_saved_beside_the_adapter_load_in_peft_and_back(tmp_path, name):
    """LoRA plus trained embeddings (PEFT's modules_to_save; tied: embed_tokens, untied: and lm_head): peft puts
    our adapter on the transformers base and gives our logits; our loader reads it back, and reads peft's own."""
    peft = pytest.importorskip("peft")
    from llamaworks.train.lora import embedding_modules

    model = random_model(name)
    hf = hf_from_ours(random_model(name))
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="q,v,down", modules_to_save=embedding_modules(model)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "tok_embeddings.weight" in trainable and ("output.weight" in trainable) == (name == "tiny-llama3")
    randomize_adapters(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for w in [model.tok_embeddings.weight] + ([model.output.weight] if model.output is not None else []):
            w.add_(torch.randn(w.shape, generator=g) * 0.1)  # as training would move them
    save_adapter(model, tmp_path / "adapter", base_model="tiny")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == list(embedding_modules(model))
    x = tokens(model.config)
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = model(x)
        expected = peft_model(input_ids=x).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        fresh = random_model(name)
        assert load_adapter(fresh, tmp_path / "adapter").modules_to_save == embedding_modules(model)
        torch.testing.assert_close(fresh.eval()(x), got, atol=1e-5, rtol=1e-5)
        merge_lora(fresh)  # merged: a plain model with the trained embeddings
        torch.testing.assert_close(fresh(x), got, atol=1e-4, rtol=1e-4)

    # peft's own adapter with modules_to_save (what `save_pretrained` writes) loads into ours.
    tied = name == "tiny-tied"
    lcfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False,
                           modules_to_save=["embed_tokens"] if tied else ["embed_tokens", "lm_head"],
                           ensure_weight_tying=tied)
    torch.manual_seed(4)
    theirs = peft.get_peft_model(hf_from_ours(random_model(name)), lcfg).eval()
    with torch.no_grad():
        for module in theirs.modules():
            if type(module).__name__ == "ModulesToSaveWrapper":
                module.modules_to_save["default"].weight.mul_(1.5)
        theirs.save_pretrained(str(tmp_path / "from_peft"))
        expected = theirs(input_ids=x).logits
        ours = random_model(name).eval()
        load_adapter(ours, tmp_path / "from_peft")
        torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=1e-4)


def test_unsupported_modules_to_save_is_a_one_line_error(tmp_path):
    model = random_model()
    apply_lora(model, LoRAConfig(rank=2, targets="q"))
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["score"]}))
    with pytest.raises(FormatError, match="modules_to_save 'score' is not supported"):
        load_adapter(random_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["embed_tokens"]}))
    with pytest.raises(FormatError, match=r"missing tensor base_model\.model\.model\.embed_tokens\.weight"):
        load_adapter(random_model(), tmp_path)
