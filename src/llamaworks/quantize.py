"""`llamaworks quantize SRC DST --to q8_0|q4_0|int8|int4`: shrink a checkpoint into one GGUF file.

SRC is a Hugging Face directory (a fine-tuned model, typically), a Meta directory or a GGUF file; DST is a GGUF
file holding the config, tokenizer and chat template with the linear and embedding weights block-quantized
(norms stay float32). The fast runtime uses those blocks as they are, and llama.cpp/ollama can read the file.

Formats (32 weights per block, float16 scales):
- q8_0 / int8: signed 8-bit, one scale per block (~8.5 bits/weight; near-lossless).
- q4_0:        signed 4-bit, one scale per block (~4.5 bits/weight).
- int4:        Q4_1, unsigned 4-bit with a scale and a minimum per block (~5 bits/weight; more accurate than q4_0).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

FORMATS = {"q8_0": "q8_0", "q4_0": "q4_0", "int8": "q8_0", "int4": "q4_1"}


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
