"""Meta's native layout: params.json + consolidated.NN.pth (one file per model-parallel rank) + tokenizer.model.

Meta's parameter names are ours, and so is the rotary layout; the only work is merging model-parallel shards
the way Meta's fairscale layers split them:
  - column-parallel (wq, wk, wv, w1, w3, output): split along dim 0 (output rows);
  - row-parallel (wo, w2): split along dim 1 (input columns);
  - tok_embeddings: ParallelEmbedding in LLaMA 1/2 splits the embedding dim (dim 1), VocabParallelEmbedding
    in LLaMA 3 splits the vocabulary (dim 0) -- told apart by the shard's shape against params["dim"];
  - norms: replicated on every rank.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import MAX_DIM, MAX_HIDDEN, ModelConfig, RopeScaling, config_from_fields, typed_field
from ..errors import FormatError
from ..files import read_json
from . import (
    Checkpoint,
    atomic_write,
    atomic_write_with,
    cast_floats,
    check_tokenizer_fits,
    optional_tokenizer_module,
    validate_state_dict,
    writable_tensors,
)
from .hf import load_torch_weights

_COLUMN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
           "feed_forward.w3.weight", "output.weight")
_ROW = ("attention.wo.weight", "feed_forward.w2.weight")
_IGNORED = ("rope.freqs",)  # LLaMA 1 stored its rotary table as a buffer


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU width as Meta's reference computes it: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_ffn_params(dim: int, hidden_dim: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that make meta_hidden_dim() give `hidden_dim`."""
    divisors = [m for m in (4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1) if hidden_dim % m == 0]
    for m in divisors:
        if meta_hidden_dim(dim, m, None) == hidden_dim:
            return m, None
    base = int(2 * (4 * dim) / 3)
    for m in divisors:
        for mult in (hidden_dim / base, round(hidden_dim / base, 4), round(hidden_dim / base, 6)):
            if meta_hidden_dim(dim, m, mult) == hidden_dim:
                return m, mult
    raise ValueError(f"hidden_dim {hidden_dim} cannot be expressed with multiple_of/ffn_dim_multiplier for dim {dim}")


META_FIELDS = {"rope_scaling.factor": "rope_scaling_factor", "hidden_dim": "multiple_of/ffn_dim_multiplier"}


def config_from_params(params: dict[str, Any], vocab_size: int | None, source: Path,
                       name: str = "custom") -> ModelConfig:
    """ModelConfig from params.json: strict JSON types (an integer is not 2.0), then the shared range checks."""
    dim = typed_field(params, "dim", int, source)
    n_heads = typed_field(params, "n_heads", int, source)
    vocab = typed_field(params, "vocab_size", int, source, -1)
    if vocab <= 0:  # LLaMA 1 writes -1: the tokenizer decides, so read it off the embedding
        if vocab_size is None:
            raise FormatError(f"{source}: vocab_size is {vocab} and no tok_embeddings to infer it from")
        vocab = vocab_size
    multiple_of = typed_field(params, "multiple_of", int, source, 256)
    multiplier = typed_field(params, "ffn_dim_multiplier", float, source, None)
    if not 1 <= multiple_of <= MAX_HIDDEN or (multiplier is not None and not 0 < multiplier < 1e3):
        raise FormatError(f"{source}: multiple_of is {multiple_of} / ffn_dim_multiplier is {multiplier}, expected "
                          f"1..{MAX_HIDDEN} and a positive factor below 1000")
    if not 1 <= dim <= MAX_DIM:
        raise FormatError(f"{source}: dim is {dim}, expected an integer from 1 to {MAX_DIM}")
    hidden = meta_hidden_dim(dim, multiple_of, multiplier)
    use_scaled = typed_field(params, "use_scaled_rope", bool, source, False)
    factor = typed_field(params, "rope_scaling_factor", float, source, 8.0)
    scaling = RopeScaling("llama3", factor, 1.0, 4.0, 8192) if use_scaled else None
    large_vocab = vocab >= 100_000  # LLaMA 3 (8k context; 128k once rope scaling is on) vs LLaMA 2 (4k)
    default_len = (131072 if use_scaled else 8192) if large_vocab else 4096
    return config_from_fields(
        source, META_FIELDS,
        dim=dim, n_layers=typed_field(params, "n_layers", int, source), n_heads=n_heads, vocab_size=vocab,
        hidden_dim=hidden, n_kv_heads=typed_field(params, "n_kv_heads", int, source, None) or n_heads,
        norm_eps=typed_field(params, "norm_eps", float, source, 1e-5),
        rope_theta=typed_field(params, "rope_theta", float, source, 10000.0), rope_scaling=scaling,
        max_seq_len=typed_field(params, "max_seq_len", int, source, default_len), name=name,
    )


def merge_shards(shards: list[dict[str, Tensor]], dim: int, source: Path) -> dict[str, Tensor]:
    """One state dict from model-parallel ranks (see the module docstring for the split rules)."""
    if len(shards) == 1:
        return {k: v for k, v in shards[0].items() if k not in _IGNORED}
    out: dict[str, Tensor] = {}
    for name, first in shards[0].items():
        if name in _IGNORED:
            continue
        parts = []
        for rank, shard in enumerate(shards):
            if name not in shard:
                raise FormatError(f"{source}: tensor {name!r} is missing from shard {rank}")
            parts.append(shard[name])
        if first.ndim == 1:
            out[name] = first  # norms are replicated
        elif name == "tok_embeddings.weight":
            out[name] = torch.cat(parts, dim=0 if first.shape[1] == dim else 1)
        elif name.endswith(_COLUMN):
            out[name] = torch.cat(parts, dim=0)
        elif name.endswith(_ROW):
            out[name] = torch.cat(parts, dim=1)
        else:
            raise FormatError(f"{source}: unexpected tensor {name!r} in a model-parallel checkpoint")
    return out


def read_meta(directory: str | os.PathLike[str], dtype: torch.dtype | None = None) -> Checkpoint:
    directory = Path(directory)
    params_path = directory / "params.json"
    params = read_json(params_path)
    if not isinstance(params, dict):
        raise FormatError(f"{params_path}: expected a JSON object")
    files = sorted(directory.glob("consolidated.*.pth"))
    if not files:
        raise FormatError(f"{directory}: no consolidated.NN.pth weight files next to params.json")
    shards = [load_torch_weights(f) for f in tqdm(files, desc="reading shards", unit="file", disable=len(files) < 3)]
    dim = typed_field(params, "dim", int, params_path)
    try:
        state = merge_shards(shards, dim, directory)
    except (RuntimeError, IndexError) as e:  # shards whose shapes do not line up
        raise FormatError(f"{directory}: model-parallel shards do not fit together ({str(e).splitlines()[0]})") \
            from None
    emb = state.get("tok_embeddings.weight")
    config = config_from_params(params, emb.shape[0] if emb is not None else None, params_path, name=directory.name)
    out = state.get("output.weight")
    if out is None or (emb is not None and out.shape == emb.shape and torch.equal(out, emb)):
        # Meta writes the output matrix even for tied models (LLaMA 3.2 1B/3B); equal -> tied.
        config = config.replace(tie_embeddings=True)
        state.pop("output.weight", None)
    validate_state_dict(state, config, params_path, META_FIELDS)
    state = cast_floats(state, dtype)

    tokenizer = None
    module = optional_tokenizer_module()
    if module is not None and (directory / "tokenizer.model").is_file():
        tokenizer = module.load_tokenizer(directory / "tokenizer.model")
        check_tokenizer_fits(tokenizer, config, directory)
    generation_config: dict[str, Any] = {}
    if tokenizer is not None:
        generation_config = {"bos_token_id": tokenizer.bos_id, "eos_token_id": sorted(tokenizer.stop_ids)}
    return Checkpoint(config=config, state_dict=state, tokenizer=tokenizer, chat_template=None,
                      generation_config=generation_config, metadata={"params.json": params}, path=directory,
                      format="meta")


def is_meta_model_file(name: str) -> bool:
    """Files write_meta owns (replaced, never kept stale, when a model is written over an old folder)."""
    return name == "params.json" or (name.startswith("consolidated.") and name.endswith(".pth"))


def config_to_params(config: ModelConfig) -> dict[str, Any]:
    if config.head_dim is not None and config.head_dim != config.dim // config.n_heads:
        raise ValueError("Meta's params.json cannot express a head_dim other than dim // n_heads")
    multiple_of, multiplier = meta_ffn_params(config.dim, config.hidden_dim)
    # Only the keys Meta's own loaders know: LLaMA 2's ModelArgs is a strict dataclass, and max_seq_len is
    # passed separately there (putting it in params.json would collide).
    params: dict[str, Any] = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads}
    if config.kv_heads != config.n_heads:
        params["n_kv_heads"] = config.kv_heads
    params.update(vocab_size=config.vocab_size, multiple_of=multiple_of)
    if multiplier is not None:
        params["ffn_dim_multiplier"] = multiplier
    params["norm_eps"] = config.norm_eps
    if config.rope_theta != 10000.0:
        params["rope_theta"] = config.rope_theta
    s = config.rope_scaling
    if s is not None:
        if s.kind != "llama3" or (s.low_freq_factor, s.high_freq_factor, s.original_max_seq_len) != (1.0, 4.0, 8192):
            raise ValueError(f"Meta's params.json only expresses LLaMA 3.1 rope scaling (low 1, high 4, 8192), "
                             f"not {s}")
        params["use_scaled_rope"] = True
        if s.factor != 8.0:  # llama-models' key for LLaMA 3.2's factor 32; 8 is the implied default
            params["rope_scaling_factor"] = s.factor
    if config.sliding_window is not None:
        raise ValueError("Meta's params.json cannot express a sliding window")
    return params


def write_meta(directory: Path, state_dict: dict[str, Any], config: ModelConfig, *,
               tokenizer_model: str | os.PathLike[str] | None = None, dtype: torch.dtype | None = None,
               progress: bool = False) -> Path:
    """Single-rank Meta checkpoint. Tied models get an explicit output matrix, as Meta's own files have."""
    params = config_to_params(config)
    state = cast_floats(writable_tensors(state_dict, config), dtype)
    out = {k: v.detach().to("cpu").contiguous().clone()
           for k, v in tqdm(state.items(), desc="preparing", unit="tensor", disable=not progress)}
    if config.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"].clone()
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_with(directory / "consolidated.00.pth", lambda tmp: torch.save(out, tmp))
    for stale in directory.glob("consolidated.*.pth"):
        if stale.name != "consolidated.00.pth":
            stale.unlink()
    with atomic_write(directory / "params.json", "w") as f:
        json.dump(params, f, indent=2)
    if tokenizer_model is not None and Path(tokenizer_model).resolve() != (directory / "tokenizer.model").resolve():
        atomic_write_with(directory / "tokenizer.model", lambda tmp: shutil.copyfile(tokenizer_model, tmp))
    return directory


__all__ = ["config_from_params", "config_to_params", "merge_shards", "meta_ffn_params", "meta_hidden_dim",
           "read_meta", "write_meta"]
