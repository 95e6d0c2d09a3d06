"""`llamaworks quantize SRC DST --to q4_k_m|q5_k_m|q6_k|q8_0|q4_0|int8|int4`: shrink a checkpoint into one GGUF.

SRC is a Hugging Face directory (a fine-tuned model, typically), a Meta directory or a GGUF file; DST is a GGUF
file holding the config, tokenizer and chat template with the linear and embedding weights block-quantized
(norms stay float32), each tensor typed as llama.cpp's `llama-quantize` types it for that name
(checkpoints/quant_mix.py: the output/tied embeddings and some attn_v/ffn_down layers wider). llama.cpp/ollama
read the file; our runtime converts K-quant blocks to its kernels' types at load.

Mixes (bits/weight for a 7B-shaped model, from the block sizes):
- q8_0 / int8: signed 8-bit, one scale per 32 (~8.5; near-lossless).
- q6_k:        6-bit, 16 scales per 256 (~6.6).
- q5_k_m:      mostly Q5_K (5-bit with 6-bit scales and minimums per 32; ~5.7 with its Q6_K layers).
- q4_k_m:      mostly Q4_K (4-bit with 6-bit scales and minimums per 32; ~4.9 with its Q6_K layers).
- q4_0:        signed 4-bit, one scale per 32 (~4.5).
- int4:        Q4_1, unsigned 4-bit with a scale and a minimum per 32 (~5).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

FORMATS = {"q4_k_m": "q4_k_m", "q5_k_m": "q5_k_m", "q6_k": "q6_k", "q8_0": "q8_0", "q4_0": "q4_0",
           "int8": "q8_0", "int4": "q4_1"}


def quantize_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str = "q8_0") -> dict[str, Any]:
    """Write DST (GGUF) from SRC quantized to `to`; returns sizes for a summary line."""
    from .checkpoints import load_checkpoint, save_gguf
    from .errors import ConfigError

    fmt = FORMATS.get(to.lower())
    if fmt is None:
        raise ConfigError(f"--to {to}: expected one of {', '.join(FORMATS)}")
    dst = Path(dst)
    if dst.is_dir():
        raise ConfigError(f"{dst}: is a directory; the output is one .gguf file")
    checkpoint = load_checkpoint(src)
    save_gguf(dst, checkpoint.state_dict, checkpoint.config, checkpoint.tokenizer,
              chat_template=checkpoint.chat_template, tensor_type=fmt)
    src_path = Path(src)
    src_bytes = (sum(f.stat().st_size for f in src_path.rglob("*") if f.is_file()) if src_path.is_dir()
                 else src_path.stat().st_size)
    return {"src": str(src_path), "dst": str(dst), "format": fmt, "src_bytes": src_bytes,
            "dst_bytes": dst.stat().st_size, "params": checkpoint.config.n_params}


def main(src: str, dst: str, to: str) -> int:
    info = quantize_checkpoint(src, dst, to)
    print(f"wrote {info['dst']} ({info['format']}, {info['dst_bytes'] / 2**20:.1f} MiB; "
          f"source {info['src_bytes'] / 2**20:.1f} MiB)")
    return 0
