"""Checkpoint formats at the edge: GGUF files, Hugging Face directories and Meta's native layout.

Every reader returns a `Checkpoint` whose `state_dict` uses model.py's parameter names and rotary layout,
so `Transformer(ckpt.config).load_state_dict(ckpt.state_dict)` works whatever the source was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ModelConfig
from ..errors import FormatError
from ..files import atomic_write, atomic_write_with, replace_dir  # noqa: F401 (re-exported for the writers)

if TYPE_CHECKING:  # torch is imported where tensors are made: reading a GGUF header needs numpy alone
    import torch
    from torch import Tensor

    from ..model import Transformer
    from ..tokenizer import Tokenizer
    from .gguf import GGUFQuantTensor


class CheckpointNotFoundError(FormatError, FileNotFoundError):
    """The path given for a model does not exist."""


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, Tensor | GGUFQuantTensor]
    tokenizer: Tokenizer | None = None
    chat_template: str | None = None
    generation_config: dict[str, Any] = field(default_factory=dict)
    # Format-specific extras: GGUF key/values (tokenizer.* included), HF config.json, Meta params.json,
    # and "rope_inv_freq" when a GGUF carries rotary frequencies no RopeScaling reproduces.
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path = Path()
    format: str = ""


# -- shared helpers -----------------------------------------------------------------------------------
def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of model.py's Transformer for this config (test_checkpoints_* check it matches)."""
    d, f, v = config.dim, config.hidden_dim, config.vocab_size
    q, kv = config.n_heads * config.head_size, config.kv_heads * config.head_size
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (v, d)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention_norm.weight": (d,), p + "attention.wq.weight": (q, d),
                       p + "attention.wk.weight": (kv, d), p + "attention.wv.weight": (kv, d),
                       p + "attention.wo.weight": (d, q), p + "ffn_norm.weight": (d,),
                       p + "feed_forward.w1.weight": (f, d), p + "feed_forward.w2.weight": (d, f),
                       p + "feed_forward.w3.weight": (f, d)})
    shapes["norm.weight"] = (d,)
    if not config.tie_embeddings:
        shapes["output.weight"] = (v, d)
    return shapes


def validate_state_dict(state_dict: dict[str, Any], config: ModelConfig, source: Path | str,
                        fields: dict[str, str] | None = None) -> None:
    """Raise a one-line FormatError for a missing tensor or a shape that does not fit the config.

    The config is first held against what the file holds -- layer count, embedding rows and width -- so a
    damaged count (block_count = 2^31) is refused before anything is sized from it. `fields` maps our field
    names to the file's keys for the message (GGUF_FIELDS, HF_FIELDS, META_FIELDS)."""
    def field(name: str) -> str:
        return (fields or {}).get(name, name)

    layers = {int(k.split(".", 2)[1]) for k in state_dict if k.startswith("layers.") and k.split(".", 2)[1].isdigit()}
    if config.n_layers > len(layers):
        raise FormatError(f"{source}: {field('n_layers')} is {config.n_layers}, but the file holds tensors for "
                          f"{len(layers)} layer(s)")
    emb = state_dict.get("tok_embeddings.weight")
    if emb is not None and len(emb.shape) == 2 and tuple(emb.shape) != (config.vocab_size, config.dim):
        rows, cols = emb.shape
        which, value, expected = (("vocab_size", config.vocab_size, rows) if rows != config.vocab_size
                                  else ("dim", config.dim, cols))
        raise FormatError(f"{source}: {field(which)} is {value}, but the token embedding has shape "
                          f"{[rows, cols]} (expected {expected})")
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in state_dict:
            raise FormatError(f"{source}: missing tensor {name!r}")
        got = tuple(state_dict[name].shape)
        if got != shape:
            raise FormatError(f"{source}: tensor {name!r} has shape {list(got)}, expected {list(shape)} "
                              f"for the model described by its config")


def check_tokenizer_fits(tokenizer: Any, config: ModelConfig, source: Path | str) -> None:
    """A tokenizer that produces ids past the embedding rows would fail at generation: refuse it at load."""
    size = getattr(tokenizer, "vocab_size", None) if tokenizer is not None else None
    if isinstance(size, int) and size > config.vocab_size:
        raise FormatError(f"{source}: the tokenizer has {size} tokens, more than the {config.vocab_size} rows of "
                          f"the token embedding")


def writable_tensors(state_dict: dict[str, Any], config: ModelConfig, *,
                     keep_quantized: bool = False) -> dict[str, Any]:
    """The model's weights in canonical order, for the writers: quantized entries dequantized (or kept as they
    are with keep_quantized), an `output` of a tied model dropped, anything else (buffers, adapter leftovers)
    ignored, shapes validated."""
    from .gguf import GGUFQuantTensor

    expected = expected_shapes(config)
    state = {k: v for k, v in state_dict.items() if k in expected}
    validate_state_dict(state, config, "state_dict")
    return {k: (state[k].dequantize() if isinstance(state[k], GGUFQuantTensor) and not keep_quantized
                else state[k]) for k in expected}


def cast_floats(state_dict: dict[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
    if dtype is None:
        return state_dict
    from torch import Tensor

    return {k: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in state_dict.items()}


def optional_tokenizer_module() -> Any | None:
    """`llamaworks.tokenizer`, or None while it is not installed (checkpoints still load, without one)."""
    try:
        from .. import tokenizer
    except ImportError:
        return None
    return tokenizer


def _state_of(model_or_state_dict: Any) -> dict[str, Any]:
    """A module's state dict, or the dict itself."""
    get = getattr(model_or_state_dict, "state_dict", None)
    return get() if callable(get) else model_or_state_dict


# -- public API ---------------------------------------------------------------------------------------
def is_gguf_file(path: str | os.PathLike[str] | None) -> bool:
    """True for the bundled default model (None, "default") and any file that starts with the GGUF magic."""
    if path is None:
        return True
    from ..assets import resolve_model_path

    p = resolve_model_path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def detect_format(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """("gguf"|"hf"|"meta", resolved path) by looking at the files, not at names the user typed ("default": the
    bundled model)."""
    from ..assets import resolve_model_path

    path = resolve_model_path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return "gguf", path
        if path.suffix == ".gguf":
            raise FormatError(f"{path}: not a GGUF file (wrong magic {magic!r}, expected b'GGUF')")
        if path.suffix in (".safetensors", ".bin", ".json") and (path.parent / "config.json").is_file():
            return "hf", path.parent
        if path.suffix in (".pth", ".json") and (path.parent / "params.json").is_file():
            return "meta", path.parent
        raise FormatError(f"{path}: unknown checkpoint file (expected a .gguf file, a Hugging Face directory "
                          f"with config.json, or a Meta directory with params.json)")
    if (path / "config.json").is_file():
        return "hf", path
    if (path / "params.json").is_file():
        return "meta", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    what = f"{len(ggufs)} .gguf files (pass one)" if ggufs else "no config.json, params.json or .gguf file"
    raise FormatError(f"{path}: not a checkpoint directory: {what}")


def load_checkpoint(path: str | os.PathLike[str], *, dequantize: bool = True,
                    dtype: torch.dtype | None = None) -> Checkpoint:
    """Read a GGUF file, an HF directory or a Meta directory (found by sniffing) into a Checkpoint.

    dtype: cast floating tensors (None keeps the stored dtype; GGUF quantized blocks dequantize to float32).
    dequantize=False keeps GGUF quantized tensors as GGUFQuantTensor (F32/F16/BF16 come back as tensors).
    """
    kind, resolved = detect_format(path)
    if kind == "gguf":
        from .gguf import read_gguf

        return read_gguf(resolved, dequantize=dequantize, dtype=dtype)
    if kind == "hf":
        from .hf import read_hf

        return read_hf(resolved, dtype=dtype)
    from .meta import read_meta

    return read_meta(resolved, dtype=dtype)


def load_model(path: str | os.PathLike[str] | None = None, *, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> tuple[Transformer, Tokenizer | None, Checkpoint]:
    """(model.eval(), tokenizer, checkpoint) for a checkpoint path; None loads the default SmolLM2 model.

    dtype defaults to float32 (quantized GGUF blocks are dequantized); device defaults to the CPU.
    """
    import torch

    from ..model import Transformer, rope_frequencies

    if path is None:
        from ..assets import default_model_path

        path = default_model_path()
    ckpt = load_checkpoint(path, dequantize=True, dtype=dtype or torch.float32)
    device = torch.device(device) if device is not None else torch.device("cpu")
    # Build on the meta device and adopt the loaded tensors: no random init, no second copy of the weights.
    with torch.device("meta"):
        model = Transformer(ckpt.config)
    state = {k: v.to(device).contiguous() for k, v in ckpt.state_dict.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise FormatError(f"{ckpt.path}: weights do not fit the model: {' '.join(first[1:3]) or first[0]}") from None
    inv_freq = ckpt.metadata.get("rope_inv_freq")
    if inv_freq is None:
        inv_freq = rope_frequencies(ckpt.config)
    model.register_buffer("inv_freq", torch.as_tensor(inv_freq).float().to(device), persistent=False)
    ckpt.state_dict = dict(model.state_dict())  # the model owns the tensors now; don't keep a stale copy
    return model.eval(), ckpt.tokenizer, ckpt


def save_hf(directory: str | os.PathLike[str], model_or_state_dict: torch.nn.Module | dict[str, Tensor],
            config: ModelConfig, tokenizer: Tokenizer | None = None, chat_template: str | None = None,
            dtype: torch.dtype | None = None, *, max_shard_size: int | str | None = None,
            generation_config: dict[str, Any] | None = None, progress: bool = False) -> Path:
    """Write a transformers-loadable directory (config.json, safetensors, tokenizer, generation_config).

    The folder is built beside `directory` and swapped in whole; files of an existing `directory` that are
    not model files (a README, training logs) are kept, stale weights, configs and tokenizer files are not."""
    from .hf import is_hf_model_file, write_hf

    sd = _state_of(model_or_state_dict)
    directory = Path(directory)
    with replace_dir(directory, drop=is_hf_model_file) as stage:  # a kill leaves the old folder or the new one
        write_hf(stage, sd, config, tokenizer, chat_template=chat_template, dtype=dtype,
                 max_shard_size=max_shard_size, generation_config=generation_config, progress=progress)
    return directory


def save_gguf(path: str | os.PathLike[str], state_dict: dict[str, Tensor] | torch.nn.Module, config: ModelConfig,
              tokenizer: Tokenizer | None = None, chat_template: str | None = None, tensor_type: str = "f16", *,
              name: str | None = None, tokenizer_metadata: dict[str, Any] | None = None,
              file_type: int | None = None, progress: bool = False, pure: bool = False) -> Path:
    """Write one self-describing llama GGUF file (hyper-parameters, tokenizer, chat template, tensors).

    tensor_type: "f32" | "f16" | "bf16", a llama.cpp quantization mix ("q4_k_m", "q5_k_m", "q6_k", "q8_0",
    "q4_0", ...) or "keep" (quantized GGUF tensors copied as they are). pure: the mix's base type for every matrix,
    as llama-quantize --pure (e.g. a Q4_0 file whose output matrix is Q4_0 too)."""
    from .gguf import write_gguf

    sd = _state_of(state_dict)
    return write_gguf(Path(path), sd, config, tokenizer, chat_template=chat_template, tensor_type=tensor_type,
                      name=name, tokenizer_metadata=tokenizer_metadata, file_type=file_type, progress=progress,
                      pure=pure)


def save_meta(directory: str | os.PathLike[str], state_dict: dict[str, Tensor] | torch.nn.Module,
              config: ModelConfig, tokenizer_model: str | os.PathLike[str] | None = None,
              dtype: torch.dtype | None = None, *, progress: bool = False) -> Path:
    """Write Meta's layout: params.json + consolidated.00.pth (+ a copy of tokenizer.model if given)."""
    from .meta import is_meta_model_file, write_meta

    sd = _state_of(state_dict)
    directory = Path(directory)
    with replace_dir(directory, drop=is_meta_model_file) as stage:
        write_meta(stage, sd, config, tokenizer_model=tokenizer_model, dtype=dtype, progress=progress)
    return directory


def __getattr__(name: str) -> Any:
    # GGUFQuantTensor and read_gguf live in gguf.py; import it only when asked so `import checkpoints` stays light.
    if name in ("GGUFQuantTensor", "read_gguf"):
        from . import gguf

        return getattr(gguf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Checkpoint", "CheckpointNotFoundError", "GGUFQuantTensor", "detect_format", "load_checkpoint",
           "load_model", "read_gguf", "save_gguf", "save_hf", "save_meta"]
