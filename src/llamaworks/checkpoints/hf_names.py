"""Hugging Face LLaMA parameter names <-> ours, including the rotary row permutation of q/k.

HF checkpoints rotate each head's first half against its second half; ours (and Meta's, and GGUF's)
rotate adjacent pairs. The two are the same model after permuting the rows of wq and wk.
"""

from __future__ import annotations

import re

from torch import Tensor

from ..config import ModelConfig, config_from_fields, typed_field
from ..errors import FormatError

_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_NAMES = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight)$")


def hf_to_ours_name(name: str) -> str | None:
    """Our parameter name for an HF one; None for names we do not keep (e.g. rotary buffers)."""
    if m := _LAYER_RE.match(name):
        inner = _LAYER_NAMES.get(m.group(2))
        return f"layers.{m.group(1)}.{inner}.weight" if inner else None
    base = name.removesuffix(".weight")
    return f"{_TOP_NAMES[base]}.weight" if base in _TOP_NAMES and name.endswith(".weight") else None


def ours_to_hf_name(name: str) -> str:
    if name.startswith("layers."):
        _, idx, rest = name.split(".", 2)
        inner = rest.removesuffix(".weight")
        for hf, ours in _LAYER_NAMES.items():
            if ours == inner:
                return f"model.layers.{idx}.{hf}.weight"
        raise KeyError(name)
    base = name.removesuffix(".weight")
    for hf, ours in _TOP_NAMES.items():
        if ours == base:
            return f"{hf}.weight"
    raise KeyError(name)


def rotary_pairs_from_halves(w: Tensor, n_heads: int) -> Tensor:
    """HF (half-split) q/k rows -> adjacent-pair rows. Works on (out, in) weights or LoRA B (out, r)."""
    out = w.shape[0]
    head_dim = out // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rotary_halves_from_pairs(w: Tensor, n_heads: int) -> Tensor:
    out = w.shape[0]
    head_dim = out // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_to_ours(state_dict: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, t in state_dict.items():
        ours = hf_to_ours_name(name)
        if ours is None:
            continue
        if ours.endswith("attention.wq.weight"):
            t = rotary_pairs_from_halves(t, config.n_heads)
        elif ours.endswith("attention.wk.weight"):
            t = rotary_pairs_from_halves(t, config.kv_heads)
        out[ours] = t
    if config.tie_embeddings:
        out.pop("output.weight", None)
    return out


def ours_to_hf(state_dict: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, t in state_dict.items():
        if name.endswith("attention.wq.weight"):
            t = rotary_halves_from_pairs(t, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = rotary_halves_from_pairs(t, config.kv_heads)
        out[ours_to_hf_name(name)] = t
    return out


def config_to_hf(config: ModelConfig, **extra: object) -> dict:
    """A transformers `config.json` for a LlamaForCausalLM (MistralForCausalLM with a sliding window)."""
    mistral = config.sliding_window is not None
    d: dict = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    if mistral:
        d["sliding_window"] = config.sliding_window
    s = config.rope_scaling
    if s is not None:
        d["rope_scaling"] = (
            {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
             "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_seq_len}
            if s.kind == "llama3" else {"rope_type": "linear", "factor": s.factor}
        )
    d.update(extra)
    return d


HF_FIELDS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
             "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "vocab_size": "vocab_size",
             "hidden_dim": "intermediate_size", "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
             "max_seq_len": "max_position_embeddings", "sliding_window": "sliding_window",
             "tie_embeddings": "tie_word_embeddings", "rope_scaling": "rope_scaling",
             "rope_scaling.factor": "rope_scaling.factor",
             "rope_scaling.low_freq_factor": "rope_scaling.low_freq_factor",
             "rope_scaling.high_freq_factor": "rope_scaling.high_freq_factor",
             "rope_scaling.original_max_seq_len": "rope_scaling.original_max_position_embeddings"}


def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from a transformers config.json: every field of the JSON type transformers writes (an integer
    is not 2.0, a number not "tiny", rope_scaling an object), then range-checked; one FormatError line else."""
    arch = d.get("model_type")
    if arch not in ("llama", "mistral"):
        raise FormatError(f"{source}: unsupported model_type {str(arch)[:60]!r} (expected 'llama' or 'mistral')")
    scaling = None
    rs = typed_field(d, "rope_scaling", dict, source, None)
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "llama3":
            scaling = {"kind": "llama3",
                       "factor": typed_field(rs, "factor", float, source, label="rope_scaling.factor"),
                       "low_freq_factor": typed_field(rs, "low_freq_factor", float, source,
                                                      label="rope_scaling.low_freq_factor"),
                       "high_freq_factor": typed_field(rs, "high_freq_factor", float, source,
                                                       label="rope_scaling.high_freq_factor"),
                       "original_max_seq_len": typed_field(rs, "original_max_position_embeddings", int, source,
                                                           label="rope_scaling.original_max_position_embeddings")}
        elif kind == "linear":
            scaling = {"kind": "linear",
                       "factor": typed_field(rs, "factor", float, source, label="rope_scaling.factor")}
        elif kind not in (None, "default"):
            raise FormatError(f"{source}: unsupported rope_scaling type {str(kind)[:60]!r}")
    dim = typed_field(d, "hidden_size", int, source)
    n_heads = typed_field(d, "num_attention_heads", int, source)
    head_dim = typed_field(d, "head_dim", int, source, None)
    if n_heads > 0 and head_dim == dim // n_heads:
        head_dim = None
    rope_parameters = typed_field(d, "rope_parameters", dict, source, {})
    theta = typed_field(d, "rope_theta", float, source, None)
    if theta is None:
        theta = typed_field(rope_parameters, "rope_theta", float, source, 10000.0, label="rope_parameters.rope_theta")
    name = d.get("_name_or_path")
    return config_from_fields(
        source, HF_FIELDS,
        dim=dim, n_layers=typed_field(d, "num_hidden_layers", int, source), n_heads=n_heads,
        vocab_size=typed_field(d, "vocab_size", int, source),
        hidden_dim=typed_field(d, "intermediate_size", int, source),
        n_kv_heads=typed_field(d, "num_key_value_heads", int, source, None) or n_heads, head_dim=head_dim,
        norm_eps=typed_field(d, "rms_norm_eps", float, source, 1e-6), rope_theta=theta,
        rope_scaling=scaling, max_seq_len=typed_field(d, "max_position_embeddings", int, source, 2048),
        tie_embeddings=typed_field(d, "tie_word_embeddings", bool, source, False),
        sliding_window=typed_field(d, "sliding_window", int, source, None) if arch == "mistral" else None,
        name=name if isinstance(name, str) and name else "custom",
    )
