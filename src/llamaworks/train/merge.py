"""`llamaworks merge-lora --base M --adapter DIR --out DIR|FILE.gguf`: fold a PEFT LoRA adapter into its base.

The adapter may come from `llamaworks finetune lora|qlora` (OUT/adapter or any OUT/checkpoints/step-N) or from
Hugging Face PEFT itself. The result is an ordinary checkpoint: an HF directory, or one GGUF file when --out
ends with .gguf.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ConfigError, FormatError
from ..files import contained_path, read_json
from .lora import ADAPTER_CONFIG, load_adapter, merge_lora


def _base_from_adapter(adapter_dir: Path) -> str | None:
    """The adapter's recorded base model when it names a path inside the adapter's folder; None when it names
    no existing path (a hub id: the bundled default model is used). A recorded path outside the folder is
    refused -- a path read from a file never picks what we open outside that file's folder -- pass --base."""
    config_path = adapter_dir / ADAPTER_CONFIG
    try:
        d = read_json(config_path)
    except FormatError:
        return None  # load_adapter reports a broken adapter_config.json with its own message
    name = d.get("base_model_name_or_path") if isinstance(d, dict) else None
    if not isinstance(name, str) or not name:
        return None
    try:
        inside = contained_path(adapter_dir, name, config_path, "base_model_name_or_path")
        if inside.exists():
            return str(inside)
    except FormatError:
        pass
    if "\x00" not in name and Path(name).exists():
        raise ConfigError(f"{config_path}: base_model_name_or_path {name!r} is outside {adapter_dir}; "
                          f"pass --base to choose the base model")
    return None


def merge_adapter(base: str | os.PathLike | None, adapter: str | os.PathLike, out: str | os.PathLike, *,
                  dtype: torch.dtype | None = None, gguf_type: str = "f16", device: str | None = None) -> Path:
    """Load `base` (None: the path the adapter records, else the bundled default model), apply the adapter,
    merge, and write `out` (a GGUF file if it ends with .gguf, else an HF directory)."""
    from ..checkpoints import load_model, save_gguf, save_hf

    adapter_dir = Path(adapter)
    if not adapter_dir.is_dir():
        raise ConfigError(f"--adapter {adapter_dir}: not a directory (expected {ADAPTER_CONFIG} + weights)")
    if (adapter_dir / "adapter" / ADAPTER_CONFIG).is_file() and not (adapter_dir / ADAPTER_CONFIG).is_file():
        adapter_dir = adapter_dir / "adapter"  # a finetune OUT directory
    if base is None:
        base = _base_from_adapter(adapter_dir)
    model, tokenizer, ckpt = load_model(base, device=device)
    load_adapter(model, adapter_dir)
    merge_lora(model)
    out = Path(out)
    sd = model.state_dict()
    if out.suffix == ".gguf":
        return save_gguf(out, sd, ckpt.config, tokenizer, chat_template=ckpt.chat_template, tensor_type=gguf_type)
    return save_hf(out, sd, ckpt.config, tokenizer, chat_template=ckpt.chat_template, dtype=dtype,
                   generation_config=ckpt.generation_config or None)


def run_merge_lora(*, base: str | None, adapter: str, out: str, dtype: str | None = None,
                   gguf_type: str = "f16", device: str | None = None) -> int:
    from .finetune import parse_dtype

    path = merge_adapter(base, adapter, out, dtype=parse_dtype(dtype), gguf_type=gguf_type, device=device)
    print(f"merged {adapter} into {base or 'the base model'}: {path}")
    return 0


__all__ = ["merge_adapter", "run_merge_lora"]
