"""LoRA: low-rank adapters swapped in for the model's projection layers, saved in the PEFT layout.

A `LoRALinear` wraps a frozen base projection (a plain `nn.Linear`, or an `NF4Linear` for QLoRA) and adds
`scaling * B @ A` to it, with `A` (rank, in) random and `B` (out, rank) zero at the start, so a fresh adapter
leaves the model unchanged. Only `lora_A`/`lora_B` require grad after `apply_lora`.

Adapters are written as Hugging Face PEFT writes them (`adapter_config.json` + `adapter_model.safetensors`,
keys `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`), so `peft` loads them onto the
transformers model. Our q/k rows are in the adjacent-pair rotary layout and HF's are half-split, so the rows
of q/k `lora_B` are permuted on export and back on import (`lora_A` acts on the input side and is unchanged).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints.hf_names import rotary_halves_from_pairs, rotary_pairs_from_halves
from ..config import ModelConfig
from ..errors import ConfigError, FormatError
from ..files import atomic_write_with, read_json

# Short user-facing names -> (our module path inside a layer, the HF/PEFT module name).
TARGETS: dict[str, tuple[str, str]] = {
    "q": ("attention.wq", "q_proj"),
    "k": ("attention.wk", "k_proj"),
    "v": ("attention.wv", "v_proj"),
    "o": ("attention.wo", "o_proj"),
    "gate": ("feed_forward.w1", "gate_proj"),
    "up": ("feed_forward.w3", "up_proj"),
    "down": ("feed_forward.w2", "down_proj"),
}
ALL_TARGETS: tuple[str, ...] = tuple(TARGETS)
_HF_TO_SHORT = {hf: short for short, (_, hf) in TARGETS.items()}
_OURS_TO_SHORT = {ours.split(".")[-1]: short for short, (ours, _) in TARGETS.items()}
# PEFT `modules_to_save` we accept: whole matrices trained beside the adapters (continued pretraining of an
# extended vocabulary trains the embeddings). PEFT module name -> (our parameter, its key in the adapter file).
SAVED_MODULES: dict[str, tuple[str, str]] = {
    "embed_tokens": ("tok_embeddings.weight", "base_model.model.model.embed_tokens.weight"),
    "lm_head": ("output.weight", "base_model.model.lm_head.weight"),
}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def parse_targets(spec: str | Iterable[str]) -> tuple[str, ...]:
    """"q,k,v" / ["q_proj", "wv"] / "all" -> canonical short names in a fixed order."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: set[str] = set()
    for raw in items:
        item = raw.strip().lower()
        if not item:
            continue
        if item in ("all", "all-linear"):
            names.update(ALL_TARGETS)
        elif item in TARGETS:
            names.add(item)
        elif item in _HF_TO_SHORT:
            names.add(_HF_TO_SHORT[item])
        elif item in _OURS_TO_SHORT:
            names.add(_OURS_TO_SHORT[item])
        else:
            raise ConfigError(f"--lora-targets: unknown projection {raw!r}; expected some of {','.join(ALL_TARGETS)}")
    if not names:
        raise ConfigError("--lora-targets: no projection given; expected some of " + ",".join(ALL_TARGETS))
    return tuple(t for t in ALL_TARGETS if t in names)


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_TARGETS
    use_rslora: bool = False  # scaling alpha/sqrt(rank) instead of alpha/rank
    modules_to_save: tuple[str, ...] = ()  # "embed_tokens" (+ "lm_head" when untied): trained whole, saved whole
    extra: dict = field(default_factory=dict)  # adapter_config.json fields we carry but do not interpret

    def __post_init__(self) -> None:
        self.targets = parse_targets(self.targets)
        unknown = sorted(set(self.modules_to_save) - set(SAVED_MODULES))
        if unknown:
            raise ConfigError(f"modules_to_save: {unknown[0]!r} is not supported; expected some of "
                              f"{', '.join(SAVED_MODULES)}")
        self.modules_to_save = tuple(m for m in SAVED_MODULES if m in self.modules_to_save)
        if self.rank < 1:
            raise ConfigError(f"--lora-rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_peft(self, base_model: str | None = None) -> dict:
        d = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(TARGETS[t][1] for t in self.targets),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": self.use_rslora,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": list(self.modules_to_save) or None,
            "layers_to_transform": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }
        if self.modules_to_save:
            # A tied model saves only embed_tokens; PEFT then ties lm_head to the saved copy. (Written only with
            # modules_to_save: peft releases before the key existed would refuse it on plain adapters.)
            d["ensure_weight_tying"] = self.modules_to_save == ("embed_tokens",)
        return {**self.extra, **d}

    @classmethod
    def from_peft(cls, d: dict, source: str = ADAPTER_CONFIG) -> LoRAConfig:
        if d.get("peft_type", "LORA") != "LORA":
            raise FormatError(f"{source}: peft_type {d.get('peft_type')!r} is not supported (expected 'LORA')")
        for unsupported in ("use_dora", "fan_in_fan_out"):
            if d.get(unsupported):
                raise FormatError(f"{source}: {unsupported}=true is not supported")
        if d.get("rank_pattern") or d.get("alpha_pattern"):
            raise FormatError(f"{source}: per-module rank_pattern/alpha_pattern are not supported")
        if d.get("bias", "none") != "none":
            raise FormatError(f"{source}: bias={d['bias']!r} is not supported (expected 'none')")
        saved: list[str] = []
        for name in d.get("modules_to_save") or ():
            short = name.split(".")[-1] if isinstance(name, str) else name
            if short not in SAVED_MODULES:
                raise FormatError(f"{source}: modules_to_save {name!r} is not supported (expected some of "
                                  f"{', '.join(SAVED_MODULES)})")
            saved.append(short)
        if d.get("layers_to_transform") is not None:
            raise FormatError(f"{source}: layers_to_transform is not supported")
        try:
            targets = d["target_modules"]
            if isinstance(targets, str):
                targets = "all" if targets == "all-linear" else targets
            return cls(rank=int(d["r"]), alpha=float(d["lora_alpha"]), dropout=float(d.get("lora_dropout", 0.0)),
                       targets=targets, use_rslora=bool(d.get("use_rslora", False)),
                       modules_to_save=tuple(saved))
        except KeyError as e:
            raise FormatError(f"{source}: missing field {e.args[0]!r}") from None
        except ConfigError as e:
            raise FormatError(f"{source}: {e}") from None


class LoRALinear(nn.Module):
    """y = base(x) + scaling * B(A(dropout(x))); `base` is frozen, A and B are trained."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__()
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.rank = rank
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        # LoRA weights follow a float base; over a quantized base they use its compute dtype.
        if isinstance(base, nn.Linear):
            dtype, device = base.weight.dtype, base.weight.device
        else:
            dtype = getattr(base, "compute_dtype", torch.float32)
            device = next(iter(base.buffers())).device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear (and PEFT) use for A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        for p in base.parameters():
            p.requires_grad_(False)

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.disabled:
            return out - nn.functional.linear(x, self.delta_weight().to(x.dtype)) if self.merged else out
        if self.merged:
            return out
        h = nn.functional.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)
        return out + (nn.functional.linear(h, self.lora_B) * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold B@A into the base weight (fast inference); `unmerge` takes it out again."""
        if self.merged:
            return
        if not isinstance(self.base, nn.Linear):
            raise ConfigError("cannot merge into a quantized base in place; use merge_lora() to get a float model")
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear holding base + delta (dequantized if the base is quantized)."""
        with torch.no_grad():
            base_w = self.base.weight if isinstance(self.base, nn.Linear) else self.base.dequantize()
            w = base_w.float() + (0 if self.merged else self.delta_weight().float())
            dtype = base_w.dtype if isinstance(self.base, nn.Linear) else self.lora_A.dtype
            lin = nn.Linear(self.in_features, self.out_features, bias=False, device=w.device, dtype=dtype)
            lin.weight.copy_(w)
        return lin

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}"


# -- whole-model helpers ---------------------------------------------------------------------------

def _target_paths(model: nn.Module, targets: Iterable[str]) -> Iterator[tuple[int, str, str]]:
    """(layer index, our module path inside the layer, short target name) for each target projection."""
    for i, _ in enumerate(model.layers):
        for short in targets:
            yield i, TARGETS[short][0], short


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    *parents, last = path.split(".")
    for part in parents:
        module = getattr(module, part)
    setattr(module, last, value)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Swap LoRALinear in for the chosen projections of every layer and freeze everything else (in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for i, path, _ in _target_paths(model, cfg.targets):
        layer = model.layers[i]
        current = _get(layer, path)
        if isinstance(current, LoRALinear):
            raise ConfigError(f"layers.{i}.{path} already has a LoRA adapter")
        lora = LoRALinear(current, cfg.rank, cfg.alpha, cfg.dropout, cfg.use_rslora)
        _set(layer, path, lora.train(model.training))  # new modules start in train mode: follow the model
    for name in cfg.modules_to_save:
        _saved_module_weight(model, name).requires_grad_(True)
    model.lora_config = cfg  # remembered for save_adapter
    return model


def embedding_modules(model: nn.Module) -> tuple[str, ...]:
    """PEFT `modules_to_save` naming the embeddings: embed_tokens, and lm_head when the output is untied."""
    return ("embed_tokens",) if model.output is None else ("embed_tokens", "lm_head")


def _saved_module_weight(model: nn.Module, name: str) -> nn.Parameter:
    if name == "lm_head" and model.output is None:
        raise ConfigError("modules_to_save lm_head: the model ties its output to the embeddings (save embed_tokens)")
    return model.tok_embeddings.weight if name == "embed_tokens" else model.output.weight


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our names: 'layers.0.attention.wq.lora_A' -> (rank, in), '...lora_B' -> (out, rank)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


def set_merged(model: nn.Module, merged: bool) -> None:
    """Merge (True) or unmerge (False) every adapter in place; the adapters stay and can be trained again."""
    for m in lora_modules(model).values():
        m.merge() if merged else m.unmerge()


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model (e.g. DPO's frozen reference) without removing the adapters."""
    mods = list(lora_modules(model).values())
    previous = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, prev in zip(mods, previous):
            m.disabled = prev


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear back: an ordinary Transformer again.

    Quantized (NF4) bases are dequantized, so a QLoRA model comes out as a float model.
    """
    for name, m in lora_modules(model).items():
        _set(model, name, m.merged_linear())
    for name, m in list(model.named_modules()):
        if _is_quantized_linear(m):
            _set(model, name, _float_linear(m))
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def _is_quantized_linear(m: nn.Module) -> bool:
    """NF4Linear and the other weight-only quantized linears: they dequantize() to a float weight."""
    return not isinstance(m, nn.Linear) and hasattr(m, "dequantize") and hasattr(m, "in_features")


def _float_linear(qm: nn.Module) -> nn.Linear:
    w = qm.dequantize()
    lin = nn.Linear(qm.in_features, qm.out_features, bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights under the plain Transformer names, adapters folded in, quantized bases dequantized.

    The model itself is not changed (for writing a full checkpoint while training goes on).
    """
    replaced: dict[str, nn.Module] = {}
    for name, m in lora_modules(model).items():
        replaced[name] = m.merged_linear()
    for name, m in model.named_modules():
        if _is_quantized_linear(m) and not any(name.startswith(r + ".") for r in replaced):
            replaced[name] = _float_linear(m)
    sd: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        owner = next((r for r in replaced if name.startswith(r + ".")), None)
        if owner is None:
            sd[name] = t
    for name, lin in replaced.items():
        sd[f"{name}.weight"] = lin.weight.detach()
    return sd


# -- PEFT layout -----------------------------------------------------------------------------------

def _peft_key(name: str, which: str) -> str:
    """'layers.3.attention.wq' + 'A' -> 'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight'."""
    _, idx, path = name.split(".", 2)
    short = _OURS_TO_SHORT[path.split(".")[-1]]
    hf = TARGETS[short][1]
    block = "self_attn" if hf in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"base_model.model.model.layers.{idx}.{block}.{hf}.lora_{which}.weight"


def _rotary_heads(path: str, config: ModelConfig) -> int | None:
    if path.endswith("attention.wq"):
        return config.n_heads
    if path.endswith("attention.wk"):
        return config.kv_heads
    return None


def adapter_tensors_to_peft(model: nn.Module) -> dict[str, Tensor]:
    config: ModelConfig = model.config
    out: dict[str, Tensor] = {}
    for name, m in lora_modules(model).items():
        a, b = m.lora_A.detach(), m.lora_B.detach()
        heads = _rotary_heads(name, config)
        if heads is not None:
            b = rotary_halves_from_pairs(b, heads)
        out[_peft_key(name, "A")] = a.contiguous()
        out[_peft_key(name, "B")] = b.contiguous()
    cfg: LoRAConfig | None = getattr(model, "lora_config", None)
    for name in cfg.modules_to_save if cfg is not None else ():
        out[SAVED_MODULES[name][1]] = _saved_module_weight(model, name).detach().contiguous()
    if cfg is not None and cfg.modules_to_save == ("embed_tokens",):
        # PEFT writes a tied model's lm_head too (the same matrix); a copy, as safetensors refuses shared memory.
        out[SAVED_MODULES["lm_head"][1]] = model.tok_embeddings.weight.detach().clone()
    return out


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, base_model: str | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT layout), each file atomically."""
    from safetensors.torch import save_file

    cfg: LoRAConfig | None = getattr(model, "lora_config", None)
    if cfg is None or not lora_modules(model):
        raise ConfigError("model has no LoRA adapters to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype else v).cpu().contiguous() for k, v in adapter_tensors_to_peft(model).items()}
    _atomic_write(out / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(cfg.to_peft(base_model), indent=2, ensure_ascii=False) + "\n"
    _atomic_write(out / ADAPTER_CONFIG, lambda p: Path(p).write_text(text, encoding="utf-8"))
    return out


def read_adapter_config(adapter_dir: str | os.PathLike) -> LoRAConfig:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FormatError(f"{path}: not found (a PEFT adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    d = read_json(path)
    if not isinstance(d, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return LoRAConfig.from_peft(d, str(path))


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> LoRAConfig:
    """Attach the PEFT adapter in `adapter_dir` to `model` (adding LoRA modules if it has none) and load it."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(adapter_dir)
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FormatError(f"{weights}: not found")
    tensors = {k.replace(".default.", "."): v for k, v in load_file(str(weights)).items()}
    if not lora_modules(model):
        apply_lora(model, cfg)
    mods = lora_modules(model)
    config: ModelConfig = model.config
    expected = set()
    for name, m in mods.items():
        for which in ("A", "B"):
            key = _peft_key(name, which)
            expected.add(key)
            if key not in tensors:
                raise FormatError(f"{weights}: missing tensor {key}")
            t = tensors[key]
            param = m.lora_A if which == "A" else m.lora_B
            if tuple(t.shape) != tuple(param.shape):
                raise FormatError(f"{weights}: {key} has shape {tuple(t.shape)}, expected {tuple(param.shape)}")
            heads = _rotary_heads(name, config)
            if which == "B" and heads is not None:
                t = rotary_pairs_from_halves(t, heads)
            with torch.no_grad():
                param.copy_(t)
    tied = model.output is None
    for name in cfg.modules_to_save:
        _, key = SAVED_MODULES[name]
        if key not in tensors:
            raise FormatError(f"{weights}: missing tensor {key} (modules_to_save {name})")
        target = model.tok_embeddings.weight if name == "embed_tokens" or tied else model.output.weight
        t = tensors[key]
        if tuple(t.shape) != tuple(target.shape):
            raise FormatError(f"{weights}: {key} has shape {tuple(t.shape)}, expected {tuple(target.shape)} "
                              "(the base model's vocabulary x dim)")
        if name == "lm_head" and tied:
            if not torch.equal(t.to(target.dtype), target):
                raise FormatError(f"{weights}: {key} differs from embed_tokens but the base model ties them")
        else:
            with torch.no_grad():
                target.copy_(t)
        expected.add(key)
    if cfg.modules_to_save == ("embed_tokens",) and SAVED_MODULES["lm_head"][1] in tensors:
        lm_head = tensors[SAVED_MODULES["lm_head"][1]]  # PEFT's copy of a tied output: must be the same matrix
        if not tied or not torch.equal(lm_head.to(model.tok_embeddings.weight.dtype), model.tok_embeddings.weight):
            raise FormatError(f"{weights}: lm_head is saved but modules_to_save lists only embed_tokens and "
                              "the two differ")
        expected.add(SAVED_MODULES["lm_head"][1])
    unknown = sorted(set(tensors) - expected)
    if unknown:
        raise FormatError(f"{weights}: unexpected tensor {unknown[0]} (adapter targets {','.join(cfg.targets)})")
    return cfg


def _atomic_write(path: Path, write) -> None:
    atomic_write_with(path, write)  # 0644-style mode (umask), stale temps of killed writers removed


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantized buffers count by their logical size."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if _is_quantized_linear(m):
            total += m.in_features * m.out_features
    return trainable, total


__all__ = [
    "ALL_TARGETS", "SAVED_MODULES", "TARGETS", "LoRAConfig", "LoRALinear", "adapter_tensors_to_peft", "apply_lora",
    "embedding_modules",
    "load_adapter", "lora_disabled", "lora_modules", "lora_parameters", "lora_state_dict", "merge_lora",
    "merged_state_dict", "parse_targets", "read_adapter_config", "save_adapter", "set_merged",
    "trainable_parameter_count",
]
