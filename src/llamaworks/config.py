"""Model hyper-parameters and the named presets of published LLaMA-family shapes."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, FormatError


@dataclass(frozen=True)
class RopeScaling:
    """LLaMA 3.1-style frequency scaling ("llama3") or plain position interpolation ("linear")."""

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    hidden_dim: int  # SwiGLU inner size
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads == n_heads)
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    sliding_window: int | None = None  # Mistral v0.1
    name: str = "custom"

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            unknown = set(self.rope_scaling) - {f.name for f in dataclasses.fields(RopeScaling)}
            if unknown:
                raise InvalidConfigField("rope_scaling", self.rope_scaling,
                                         f"only {', '.join(f.name for f in dataclasses.fields(RopeScaling))}")
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        validate_config(self)
        for f in dataclasses.fields(self):  # plain Python numbers (JSON writes 500000 for 500000.0)
            v = getattr(self, f.name)
            if f.name in ("norm_eps", "rope_theta"):
                object.__setattr__(self, f.name, float(v))
            elif _is_int(v):
                object.__setattr__(self, f.name, int(v))

    # Derived sizes are computed, never stored, so a config cannot contradict itself.
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def n_params(self) -> int:
        hd, kvd = self.n_heads * self.head_size, self.kv_heads * self.head_size
        attn = self.dim * hd * 2 + self.dim * kvd * 2
        mlp = 3 * self.dim * self.hidden_dim
        per_layer = attn + mlp + 2 * self.dim
        embed = self.vocab_size * self.dim
        return self.n_layers * per_layer + self.dim + embed * (1 if self.tie_embeddings else 2)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                d = yaml.safe_load(text)
            else:
                d = json.loads(text)
            return cls.from_dict(d)
        except Exception as e:  # YAML/JSON syntax, deep nesting, wrong types, out-of-range values
            raise ConfigError(f"{path}: not a valid model config: {str(e).splitlines()[0] if str(e) else e!r}") \
                from None


# -- validation -------------------------------------------------------------------------------------
# Bounds no published LLaMA-family checkpoint comes near (405B: dim 16384, 126 layers, 128 heads; the largest
# vocabularies ~256k; contexts up to ~10M). Outside them a value is damage or an attack, and believing it
# would allocate without end before a single tensor is checked.
MAX_DIM = 1 << 16
MAX_HIDDEN = 1 << 20
MAX_LAYERS = 1 << 10
MAX_HEAD_DIM = 1 << 12
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 24


class InvalidConfigField(ConfigError):
    """A ModelConfig field out of range or of the wrong type; `field` is our name for it (the readers
    re-raise it as a FormatError naming the file and the file's own key)."""

    def __init__(self, field: str, value: Any, expected: str) -> None:
        self.field, self.value, self.expected = field, value, expected
        super().__init__(f"{field} is {_short(value)}, expected {expected}")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _int_in(config: Any, name: str, lo: int, hi: int, optional: bool = False) -> None:
    v = getattr(config, name)
    if v is None and optional:
        return
    if not _is_int(v) or not lo <= v <= hi:
        raise InvalidConfigField(name, v, f"an integer from {lo} to {hi}")


def _number_in(config: Any, name: str, lo: float, hi: float, field: str | None = None) -> None:
    v = getattr(config, name)
    if not _is_number(v) or not math.isfinite(v) or not lo < v < hi:
        raise InvalidConfigField(field or name, v, f"a number greater than {lo:g} and less than {hi:g}")


def validate_config(config: ModelConfig) -> None:
    """Types, ranges and relations of every field (InvalidConfigField naming the first bad one). Every
    ModelConfig passes through here when it is made, whatever file it came from."""
    _int_in(config, "dim", 1, MAX_DIM)
    _int_in(config, "hidden_dim", 1, MAX_HIDDEN)
    _int_in(config, "n_layers", 1, MAX_LAYERS)
    _int_in(config, "vocab_size", 1, MAX_VOCAB)
    _int_in(config, "n_heads", 1, config.dim)
    _int_in(config, "n_kv_heads", 1, config.n_heads, optional=True)
    if config.n_heads % config.kv_heads:
        raise InvalidConfigField("n_kv_heads", config.n_kv_heads, f"a divisor of n_heads ({config.n_heads})")
    _int_in(config, "head_dim", 2, MAX_HEAD_DIM, optional=True)
    if config.head_dim is None and config.dim % config.n_heads:
        raise InvalidConfigField("n_heads", config.n_heads,
                                 f"a divisor of dim ({config.dim}) when head_dim is not given")
    if config.head_size % 2:
        raise InvalidConfigField("head_dim", config.head_size, "an even number (rotary embeddings rotate pairs)")
    _int_in(config, "max_seq_len", 1, MAX_CONTEXT)
    _int_in(config, "sliding_window", 1, MAX_CONTEXT, optional=True)
    _number_in(config, "norm_eps", 0.0, 1.0)
    _number_in(config, "rope_theta", 0.0, 1e12)
    if not isinstance(config.tie_embeddings, bool):
        raise InvalidConfigField("tie_embeddings", config.tie_embeddings, "true or false")
    if not isinstance(config.name, str):
        raise InvalidConfigField("name", config.name, "a string")
    s = config.rope_scaling
    if s is None:
        return
    if not isinstance(s, RopeScaling):
        raise InvalidConfigField("rope_scaling", s, "null or an object with the scaling parameters")
    if s.kind not in ("llama3", "linear"):
        raise InvalidConfigField("rope_scaling.kind", s.kind, "'llama3' or 'linear'")
    _number_in(s, "factor", 0.0, 1e6, "rope_scaling.factor")
    if s.kind == "llama3":
        _number_in(s, "low_freq_factor", 0.0, 1e6, "rope_scaling.low_freq_factor")
        _number_in(s, "high_freq_factor", s.low_freq_factor, 1e6, "rope_scaling.high_freq_factor")
        v = s.original_max_seq_len
        if not _is_int(v) or not 1 <= v <= MAX_CONTEXT:
            raise InvalidConfigField("rope_scaling.original_max_seq_len", v, f"an integer from 1 to {MAX_CONTEXT}")


def config_from_fields(source: Any, names: dict[str, str], **values: Any) -> ModelConfig:
    """ModelConfig(**values) for a reader: a bad field is one FormatError line naming the file (`source`) and
    the file's own key for it (`names`: our field name -> theirs)."""
    try:
        return ModelConfig(**values)
    except InvalidConfigField as e:
        raise FormatError(f"{source}: {names.get(e.field, e.field)} is {_short(e.value)}, expected {e.expected}") \
            from None


def _short(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


_MISSING = object()
_KINDS = {int: (_is_int, "an integer"), float: (_is_number, "a number"),
          str: (lambda v: isinstance(v, str), "a string"), bool: (lambda v: isinstance(v, bool), "true or false"),
          dict: (lambda v: isinstance(v, dict), "an object")}


def typed_field(d: dict[str, Any], key: str, kind: type, source: Any, default: Any = _MISSING,
                label: str | None = None) -> Any:
    """d[key] if it has the JSON type `kind` (int: not 2.0 nor true; float: any number); `default` when it is
    missing or null; else one FormatError line naming the file and key."""
    value = d.get(key)
    if value is None:
        if default is _MISSING:
            raise FormatError(f"{source}: missing field {label or key!r}")
        return default
    check, what = _KINDS[kind]
    if not check(value):
        raise FormatError(f"{source}: {label or key} is {_short(value)} ({type(value).__name__}), expected {what}")
    return value


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Rotary inverse frequencies theta^(-2i/d) (float64, head_size / 2 of them), with LLaMA 3.1 ("llama3") or
    linear scaling applied. numpy, so the torch-free runtime shares them with model.py."""
    d = config.head_size
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s.kind == "linear":
        return inv_freq / s.factor
    if s.kind != "llama3":
        raise ValueError(f"unsupported rope scaling kind {s.kind!r}")
    # Long wavelengths are divided by the factor, short ones kept, and the band between blended.
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_wavelen = s.original_max_seq_len / s.high_freq_factor
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    between = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return np.where(between, blended, scaled)


def _llama3_scaling(factor: float) -> RopeScaling:
    return RopeScaling("llama3", factor, 1.0, 4.0, 8192)


# Published shapes (papers, model cards, and the checkpoints' own config files).
PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        ModelConfig(4096, 32, 32, 32000, 11008, norm_eps=1e-6, max_seq_len=2048, name="llama-1-7b"),
        ModelConfig(5120, 40, 40, 32000, 13824, norm_eps=1e-6, max_seq_len=2048, name="llama-1-13b"),
        ModelConfig(6656, 60, 52, 32000, 17920, norm_eps=1e-6, max_seq_len=2048, name="llama-1-33b"),
        ModelConfig(8192, 80, 64, 32000, 22016, norm_eps=1e-5, max_seq_len=2048, name="llama-1-65b"),
        ModelConfig(4096, 32, 32, 32000, 11008, max_seq_len=4096, name="llama-2-7b"),
        ModelConfig(5120, 40, 40, 32000, 13824, max_seq_len=4096, name="llama-2-13b"),
        ModelConfig(8192, 80, 64, 32000, 28672, n_kv_heads=8, max_seq_len=4096, name="llama-2-70b"),
        ModelConfig(4096, 32, 32, 128256, 14336, n_kv_heads=8, rope_theta=500000.0, max_seq_len=8192,
                    name="llama-3-8b"),
        ModelConfig(8192, 80, 64, 128256, 28672, n_kv_heads=8, rope_theta=500000.0, max_seq_len=8192,
                    name="llama-3-70b"),
        ModelConfig(4096, 32, 32, 128256, 14336, n_kv_heads=8, rope_theta=500000.0, max_seq_len=131072,
                    rope_scaling=_llama3_scaling(8.0), name="llama-3.1-8b"),
        ModelConfig(8192, 80, 64, 128256, 28672, n_kv_heads=8, rope_theta=500000.0, max_seq_len=131072,
                    rope_scaling=_llama3_scaling(8.0), name="llama-3.1-70b"),
        ModelConfig(2048, 16, 32, 128256, 8192, n_kv_heads=8, rope_theta=500000.0, max_seq_len=131072,
                    rope_scaling=_llama3_scaling(32.0), tie_embeddings=True, name="llama-3.2-1b"),
        ModelConfig(3072, 28, 24, 128256, 8192, n_kv_heads=8, rope_theta=500000.0, max_seq_len=131072,
                    rope_scaling=_llama3_scaling(32.0), tie_embeddings=True, name="llama-3.2-3b"),
        ModelConfig(4096, 32, 32, 32000, 14336, n_kv_heads=8, max_seq_len=32768, sliding_window=4096,
                    name="mistral-7b"),
        ModelConfig(2048, 22, 32, 32000, 5632, n_kv_heads=4, max_seq_len=2048, name="tinyllama-1.1b"),
        ModelConfig(576, 30, 9, 49152, 1536, n_kv_heads=3, rope_theta=100000.0, max_seq_len=8192,
                    tie_embeddings=True, name="smollm2-135m"),
        ModelConfig(960, 32, 15, 49152, 2560, n_kv_heads=5, rope_theta=100000.0, max_seq_len=8192,
                    tie_embeddings=True, name="smollm2-360m"),
        ModelConfig(2048, 24, 32, 49152, 8192, rope_theta=130000.0, max_seq_len=8192, tie_embeddings=True,
                    name="smollm2-1.7b"),
        # Tiny sizes for tests and quick experiments: same structure, seconds to run.
        ModelConfig(64, 2, 4, 256, 172, max_seq_len=128, name="tiny-llama2"),
        ModelConfig(64, 2, 4, 256, 160, n_kv_heads=2, rope_theta=500000.0, max_seq_len=256,
                    rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 32), name="tiny-llama3"),
        ModelConfig(64, 2, 4, 256, 160, n_kv_heads=2, tie_embeddings=True, max_seq_len=128, name="tiny-tied"),
        ModelConfig(64, 2, 4, 256, 160, n_kv_heads=1, max_seq_len=128, sliding_window=8, name="tiny-mistral"),
        ModelConfig(256, 4, 8, 2048, 704, n_kv_heads=4, max_seq_len=512, name="tiny-12m"),
    ]
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None


__all__ = ["PRESETS", "InvalidConfigField", "ModelConfig", "RopeScaling", "config_from_fields", "get_preset",
           "typed_field", "validate_config"]
