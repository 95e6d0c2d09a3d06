"""`llamaworks convert`: any readable checkpoint -> Hugging Face directory, GGUF file or Meta directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from . import load_checkpoint, save_gguf, save_hf, save_meta
from .quant_mix import MIXES

DTYPES = {"f32": torch.float32, "float32": torch.float32, "f16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
QUANTS = tuple(MIXES)  # llama.cpp's mixes: q4_k_m, q5_k_m, q6_k, q8_0, q4_0, q4_1, q5_0, q5_1
_GGUF_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _source_dtype(state_dict: dict) -> torch.dtype:
    """The stored float dtype of the 2-D weights (quantized GGUF blocks count as float16)."""
    for t in state_dict.values():
        if isinstance(t, torch.Tensor) and t.ndim == 2:
            return t.dtype if t.dtype in _GGUF_NAMES else torch.float32
        if not isinstance(t, torch.Tensor):
            return torch.float16
    return torch.float32


def _default_gguf_type(ckpt) -> tuple[str, str]:
    """(tensor_type, what it means) for `convert --to gguf` without --dtype/--quant: the source's own precision.

    A GGUF keeps each tensor's type (its blocks are copied); float weights are written as 16-bit floats, bf16
    for bf16 sources and F16 otherwise (float32 training output included: what llama.cpp's converter writes by
    default, half the size; --dtype f32 keeps float32)."""
    if ckpt.format == "gguf":
        return "keep", "each tensor in the source's own type (quantized blocks copied)"
    source = _source_dtype(ckpt.state_dict)
    if source == torch.bfloat16:
        return "bf16", "BF16, as the source's bfloat16 weights"
    if source == torch.float16:
        return "f16", "F16, as the source's float16 weights"
    return "f16", "F16 from the source's float32 weights (--dtype f32 keeps float32, --quant q8_0 etc. quantizes)"


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str, dtype: str | None = None,
            quant: str | None = None, *, progress: bool = True) -> Path:
    """Convert `src` (GGUF, HF or Meta, detected) to `to` ("hf" | "gguf" | "meta") at `dst`; returns dst.

    dtype: "f32" | "f16" | "bf16" for the written floats (default: the source's; for GGUF output, see
    _default_gguf_type: a GGUF keeps its tensors' types, float weights become F16/BF16);
    quant: a llama.cpp mix for GGUF output only: "q4_k_m" | "q5_k_m" | "q6_k" | "q8_0" (also q4_0, q4_1, q5_0,
    q5_1), each tensor typed as llama-quantize types it; 1-D norms always stay F32.
    """
    to = to.lower()
    if to not in ("hf", "gguf", "meta"):
        raise ValueError(f"--to must be hf, gguf or meta, not {to!r}")
    if dtype is not None and dtype.lower() not in DTYPES:
        raise ValueError(f"--dtype must be f32, f16 or bf16, not {dtype!r}")
    if quant is not None:
        quant = quant.lower()
        if to != "gguf":
            raise ValueError("--quant is only for --to gguf")
        if quant not in QUANTS:
            raise ValueError(f"--quant must be one of {', '.join(QUANTS)}, not {quant!r}")
    ckpt = load_checkpoint(src, dequantize=False)
    target = DTYPES[dtype.lower()] if dtype else _source_dtype(ckpt.state_dict)
    dst = Path(dst)
    if to == "gguf":
        if dst.is_dir() or (not dst.suffix and not dst.exists()):
            dst = dst / f"{Path(src).stem if Path(src).is_file() else Path(src).name}.gguf"
        tok_meta = None
        if ckpt.format == "gguf":  # carry the vocabulary over even when no Tokenizer object could be built
            tok_meta = {k: v for k, v in ckpt.metadata.items() if k.startswith("tokenizer.")}
        tensor_type, file_type = quant or (dtype and _GGUF_NAMES[target]), None
        if not tensor_type:
            tensor_type, what = _default_gguf_type(ckpt)
            if tensor_type == "keep":
                file_type = ckpt.metadata.get("general.file_type")
                file_type = file_type if isinstance(file_type, int) and not isinstance(file_type, bool) else None
            if progress:
                print(f"writing {what}", file=sys.stderr)
        return save_gguf(dst, ckpt.state_dict, ckpt.config, ckpt.tokenizer, ckpt.chat_template,
                         tensor_type=tensor_type, tokenizer_metadata=tok_meta, file_type=file_type,
                         progress=progress)
    if to == "hf":
        return save_hf(dst, ckpt.state_dict, ckpt.config, ckpt.tokenizer, ckpt.chat_template, dtype=target,
                       generation_config=_sampling_defaults(ckpt.generation_config), progress=progress)
    tokenizer_model = ckpt.path / "tokenizer.model" if ckpt.path.is_dir() else None
    return save_meta(dst, ckpt.state_dict, ckpt.config,
                     tokenizer_model=tokenizer_model if tokenizer_model and tokenizer_model.is_file() else None,
                     dtype=target, progress=progress)


def _sampling_defaults(generation_config: dict) -> dict:
    keep = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "do_sample", "max_new_tokens")
    return {k: v for k, v in generation_config.items() if k in keep}


__all__ = ["convert"]
