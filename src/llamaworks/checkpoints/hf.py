"""Hugging Face model directories: config.json + safetensors (single or sharded) or pytorch_model.bin.

Reading accepts model.safetensors, model.safetensors.index.json (shards), pytorch_model.bin and its
index (loaded with torch.load(weights_only=True)). Writing produces what transformers'
LlamaForCausalLM / MistralForCausalLM load unchanged: config.json, safetensors (sharded above
`max_shard_size`), generation_config.json and the tokenizer files. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..config import ModelConfig
from ..errors import FormatError
from ..files import contained_path, read_json
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
from .hf_names import HF_FIELDS, config_from_hf, config_to_hf, hf_to_ours, hf_to_ours_name, ours_to_hf

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def _read_json(path: Path) -> Any:
    return read_json(path)


def is_hf_model_file(name: str) -> bool:
    """Files write_hf owns: when a model is written over an old folder these are replaced, never kept stale."""
    return (name in (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_INDEX, "config.json",
                     "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                     "special_tokens_map.json")
            or bool(_SHARD_RE.match(name)) or name.startswith("pytorch_model-"))


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:  # memory-mapped; tensors materialise on access
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except FileNotFoundError:
        raise FormatError(f"{path}: file is missing") from None
    except Exception as e:  # SafetensorError for a bad header, OSError for I/O
        raise FormatError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0]})") from None


def load_torch_weights(path: Path) -> dict[str, Tensor]:
    """torch.load restricted to plain tensors: a pickle carrying code or custom objects is refused."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files can't be memory-mapped; retry without
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FormatError(f"{path}: file is missing") from None
    except Exception as e:
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        reason = next((ln.strip() for ln in lines if "Unsupported global" in ln or "GLOBAL" in ln),
                      lines[0] if lines else "")
        raise FormatError(f"{path}: not a plain weights file, refusing to unpickle it ({reason[:200]})") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise FormatError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def _read_weights(directory: Path) -> dict[str, Tensor]:
    if (directory / SAFETENSORS).is_file():
        return _load_safetensors(directory / SAFETENSORS)
    for index_name, loader in ((SAFETENSORS_INDEX, _load_safetensors), (PYTORCH_INDEX, load_torch_weights)):
        index_path = directory / index_name
        if index_path.is_file():
            index = _read_json(index_path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise FormatError(f"{index_path}: missing 'weight_map'")
            out: dict[str, Tensor] = {}
            paths = {}  # every entry checked before any file is opened
            for shard in weight_map.values():
                if not isinstance(shard, str) or shard not in paths:
                    paths[shard] = contained_path(directory, shard, index_path, "weight_map entry")
            shards = sorted(paths)
            for shard in shards:
                tensors = loader(paths[shard])
                out.update({k: v for k, v in tensors.items() if weight_map.get(k) == shard})
            missing = [k for k, shard in weight_map.items() if k not in out]
            if missing:
                raise FormatError(f"{directory / weight_map[missing[0]]}: tensor {missing[0]!r} listed in "
                                  f"{index_name} is not in the shard")
            return out
    if (directory / PYTORCH_BIN).is_file():
        return load_torch_weights(directory / PYTORCH_BIN)
    raise FormatError(f"{directory}: no weights found (expected {SAFETENSORS}, {SAFETENSORS_INDEX}, "
                      f"{PYTORCH_BIN} or {PYTORCH_INDEX})")


def _chat_template(directory: Path) -> str | None:
    """tokenizer_config.json's chat_template (string, or the 'default' of a named list), or chat_template.jinja."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tc_path = directory / "tokenizer_config.json"
    if not tc_path.is_file():
        return None
    tc = _read_json(tc_path)
    template = tc.get("chat_template") if isinstance(tc, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def read_hf(directory: str | os.PathLike[str], dtype: torch.dtype | None = None) -> Checkpoint:
    directory = Path(directory)
    config_path = directory / "config.json"
    hf_config = _read_json(config_path)
    if not isinstance(hf_config, dict):
        raise FormatError(f"{config_path}: expected a JSON object")
    config = config_from_hf(hf_config, str(config_path))
    if config.name == "custom":
        config = config.replace(name=directory.name)
    raw = _read_weights(directory)
    names = {ours: t for k, t in raw.items() if (ours := hf_to_ours_name(k)) is not None}
    if not config.tie_embeddings and "output.weight" not in names and "tok_embeddings.weight" in names:
        # Some exports leave lm_head out when it equals the embeddings without setting tie_word_embeddings.
        config = config.replace(tie_embeddings=True)
    if config.tie_embeddings:
        names.pop("output.weight", None)
    validate_state_dict(names, config, config_path, HF_FIELDS)  # shapes first: the q/k permutation needs them
    state = hf_to_ours(raw, config)
    state = cast_floats(state, dtype)

    tokenizer = None
    module = optional_tokenizer_module()
    if module is not None and any(
            (directory / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "original/tokenizer.model")):
        tokenizer = module.Tokenizer.from_dir(directory)
        check_tokenizer_fits(tokenizer, config, directory)
    gen_path = directory / "generation_config.json"
    generation_config = _read_json(gen_path) if gen_path.is_file() else {}
    if not isinstance(generation_config, dict):
        raise FormatError(f"{gen_path}: expected a JSON object")
    # Tensors outside the LLaMA body (e.g. a sequence classifier's `score.weight`) for loaders that want them.
    extra = {k: t for k, t in raw.items() if hf_to_ours_name(k) is None and not k.endswith("rotary_emb.inv_freq")}
    return Checkpoint(config=config, state_dict=state, tokenizer=tokenizer, chat_template=_chat_template(directory),
                      generation_config=generation_config,
                      metadata={"config.json": hf_config, "extra_tensors": extra},
                      path=directory, format="hf")


# -- writing ----------------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """Bytes from 500000, "500KB", "2GB", "1.5GiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", size.upper().replace("IB", "iB"), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {size!r} (examples: 2GB, 500MB, 1000000)")
    unit = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * unit ** " KMGT".index(m.group(2).upper() or " "))


def _write_json(path: Path, data: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _shards(tensors: dict[str, Tensor], max_bytes: int | None) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if max_bytes is not None and shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def write_hf(directory: Path, state_dict: dict[str, Any], config: ModelConfig, tokenizer: Any = None, *,
             chat_template: str | None = None, dtype: torch.dtype | None = None,
             max_shard_size: int | str | None = None, generation_config: dict[str, Any] | None = None,
             progress: bool = False, extra_tensors: dict[str, Tensor] | None = None,
             config_extra: dict[str, Any] | None = None) -> Path:
    """extra_tensors: HF-named tensors beside the LLaMA body (a head such as `score.weight`), written as given;
    config_extra: config.json keys set last (e.g. `architectures`, `num_labels` of a sequence classifier)."""
    state = cast_floats(writable_tensors(state_dict, config), dtype)
    directory.mkdir(parents=True, exist_ok=True)

    hf_state = ours_to_hf(state, config)
    hf_state.update(cast_floats(dict(extra_tensors or {}), dtype))
    torch_dtype = next(iter(hf_state.values())).dtype
    hf_config = config_to_hf(config, torch_dtype=str(torch_dtype).removeprefix("torch."))
    if tokenizer is not None:
        for attr, key in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")):
            value = getattr(tokenizer, attr, None)
            if value is not None:
                hf_config[key] = int(value)
    hf_config.update(config_extra or {})

    max_bytes = parse_size(max_shard_size) if max_shard_size is not None else None
    shards = _shards(hf_state, max_bytes)
    names = [SAFETENSORS] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                   for i in range(len(shards))]
    bar = tqdm(total=len(hf_state), desc=f"writing {directory.name}", unit="tensor", disable=not progress)
    for name, shard in zip(names, shards):
        # contiguous, unshared storage: safetensors refuses views, and the q/k permutation makes copies anyway
        shard = {k: v.detach().to("cpu").contiguous().clone() if v.storage_offset() or not v.is_contiguous()
                 else v.detach().to("cpu") for k, v in shard.items()}
        atomic_write_with(directory / name, lambda tmp, s=shard: save_file(s, str(tmp), metadata={"format": "pt"}))
        bar.update(len(shard))
    bar.close()
    # Remove weights a previous save left behind, so loaders don't pick up a stale single file or index.
    stale = [p for p in directory.iterdir()
             if (p.name == SAFETENSORS or _SHARD_RE.match(p.name)) and p.name not in names]
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in hf_state.values())
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        _write_json(directory / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    else:
        stale.append(directory / SAFETENSORS_INDEX)
    for p in stale:
        p.unlink(missing_ok=True)
    _write_json(directory / "config.json", hf_config)
    _write_json(directory / "generation_config.json", _generation_config(tokenizer, generation_config))

    if tokenizer is not None:
        tokenizer.save_hf(directory)
    template = chat_template or (getattr(tokenizer, "chat_template", None) if tokenizer is not None else None)
    if template:
        _set_chat_template(directory, template)
    return directory


def _generation_config(tokenizer: Any, extra: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if tokenizer is not None:
        if getattr(tokenizer, "bos_id", None) is not None:
            out["bos_token_id"] = int(tokenizer.bos_id)
        stops = sorted(int(i) for i in (getattr(tokenizer, "stop_ids", None) or ()))
        eos = getattr(tokenizer, "eos_id", None)
        if eos is not None:  # transformers stops on any id in the list; EOS first by convention
            stops = [int(eos)] + [i for i in stops if i != eos]
        if stops:
            out["eos_token_id"] = stops[0] if len(stops) == 1 else stops
        if getattr(tokenizer, "pad_id", None) is not None:
            out["pad_token_id"] = int(tokenizer.pad_id)
    out.update(extra or {})
    if any(k in out for k in ("temperature", "top_p", "top_k", "min_p")):
        out.setdefault("do_sample", True)
    return out


def _set_chat_template(directory: Path, template: str) -> None:
    """Put the template where both transformers 4.x (tokenizer_config.json) and 5.x look for it."""
    tc_path = directory / "tokenizer_config.json"
    tc = _read_json(tc_path) if tc_path.is_file() else {}
    tc["chat_template"] = template
    _write_json(tc_path, tc)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file() and jinja.read_text(encoding="utf-8") != template:
        with atomic_write(jinja, "w") as f:
            f.write(template)


__all__ = ["load_torch_weights", "parse_size", "read_hf", "write_hf"]
