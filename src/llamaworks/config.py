"""Model hyper-parameters and the named presets of published LLaMA-family shapes."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


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
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")

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
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a valid model config: {e}") from None


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


__all__ = ["PRESETS", "ModelConfig", "RopeScaling", "get_preset"]
