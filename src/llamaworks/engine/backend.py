"""The backend contract: what the scheduler, the sampler and every front end (chat, generate, serve, eval, the
Python API) need from a model, and nothing more.

A backend holds the weights and a static KV cache of `max_rows` rows, each `config.max_seq_len` positions long
(the gpt-fast / litgpt / torchtune contract: keys and values are written at the positions given, never shifted
or compacted). The scheduler above it owns the rows: which sequence is in which row and which tokens fill its
positions. Two implementations:

- `engine.native.NativeBackend`: GGUF blocks on the C++ kernels (quant/_lean.cpp), torch never imported;
- `engine.torch_backend.TorchBackend`: `model.Transformer` with quantized linear modules swapped in at load
  (CUDA, training-time evaluation, the float reference).

Both take their numerics from one `EngineOptions` given at load; nothing is read from process-wide switches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..config import ModelConfig


@dataclass(frozen=True)
class EngineOptions:
    """Per-model inference options, passed explicitly to a backend when it is loaded.

    threads:          CPU threads for the kernels (None: physical cores).
    max_rows:         sequences that can be in flight at once (KV cache rows; a row's memory is committed only
                      as its positions fill, and returned when the scheduler releases it).
    max_context:      positions per row (None: the model's maximum).
    kv_dtype:         "float16" (half the memory, as llama.cpp) or "float32"; attention math is float32 either way.
                      None: the backend's own (native: float16; torch: the model's activation dtype, so the float
                      reference stays exact).
    int8_activations: quantize activations to int8 blocks for the decode kernels (integer dot products, as
                      llama.cpp); False keeps them float32 (the float reference's numerics, for evaluation).
    bf16_prefill:     torch backend only: prefill gemms in bfloat16 (None: where the CPU has AVX512-BF16).
    mmap:             keep quantized blocks mapped from the file instead of reading them into memory.
    interleave:       regroup Q4_0/Q4_1 rows 8 at a time at load (faster kernels; not with mmap).
    cpu_target:       the native kernels' build target: "native" or a -march value such as "x86-64-v3".
    """

    threads: int | None = None
    max_rows: int = 1
    max_context: int | None = None
    kv_dtype: str | None = None
    int8_activations: bool = True
    bf16_prefill: bool | None = None
    mmap: bool = False
    interleave: bool = True
    cpu_target: str = "native"

    def __post_init__(self) -> None:
        from ..errors import ConfigError

        if self.kv_dtype not in (None, "float16", "float32"):
            raise ConfigError(f"kv_dtype {self.kv_dtype!r}: expected float16 or float32")
        if self.max_rows < 1:
            raise ConfigError(f"max_rows={self.max_rows}: expected at least 1")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads={self.threads}: expected a positive number")
        if self.max_context is not None and self.max_context < 2:
            raise ConfigError(f"max_context={self.max_context} is too small, expected at least 2 positions")

    def with_(self, **changes: Any) -> EngineOptions:
        """A copy with `changes` applied (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_environment(cls, **changes: Any) -> EngineOptions:
        """Defaults from the environment, read here and nowhere else (the CLI calls this once):
        LLAMAWORKS_MMAP=1, LLAMAWORKS_INT8_ACTIVATIONS=0, LLAMAWORKS_INTERLEAVE=0, LLAMAWORKS_KV_DTYPE."""
        env: dict[str, Any] = {}
        flags = {"LLAMAWORKS_MMAP": "mmap", "LLAMAWORKS_INT8_ACTIVATIONS": "int8_activations",
                 "LLAMAWORKS_INTERLEAVE": "interleave"}
        for name, option in flags.items():
            if name in os.environ:
                env[option] = os.environ[name] not in ("", "0")
        if os.environ.get("LLAMAWORKS_KV_DTYPE"):
            env["kv_dtype"] = os.environ["LLAMAWORKS_KV_DTYPE"]
        return cls(**env).with_(**changes)


@runtime_checkable
class Backend(Protocol):
    """A model that runs tokens into per-row KV caches and returns logits."""

    name: str  # "native" or "torch"
    config: ModelConfig  # max_seq_len: the positions of one row
    options: EngineOptions
    tokenizer: Any  # llamaworks.tokenizer.Tokenizer, or None when the checkpoint carries none
    chat_template: str | None  # the checkpoint's own Jinja template, if any
    generation_config: dict[str, Any]  # sampling defaults from the checkpoint

    @property
    def max_rows(self) -> int: ...

    def forward(self, rows: Sequence[int], tokens: Sequence[int], positions: Sequence[int],
                logits_for: Sequence[int]) -> np.ndarray:
        """Run a batch of tokens: token i belongs to cache row rows[i] at position positions[i]; its key and value
        are written there, and it attends to its own row's positions 0..positions[i] (within the sliding window).
        A row's tokens in one call have consecutive increasing positions; earlier positions of that row must hold
        what the caller put there. Returns float32 logits (len(logits_for), vocab) for the token indices in
        logits_for, in that order. Raises ValueError for a row, position or token id out of range."""
        ...

    def copy(self, src: int, dst: int, length: int) -> None:
        """Copy positions [0, length) of row src into row dst (a shared prompt prefix is not computed again)."""
        ...

    def release(self, row: int, keep: int = 0) -> None:
        """Positions >= keep of `row` are no longer needed: their memory may go back to the operating system."""
        ...

    def cache_bytes(self) -> int:
        """Resident bytes of the KV cache now (what the server reports and the memory tests read)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Facts for benchmark reports: kernel_isa (the SIMD paths used), threads, weights_in ("memory" or
        "mmap"), interleaved_linears (share of layer matrices in x8 rows), ..."""
        ...


def context_of(backend: Backend) -> int:
    return int(backend.config.max_seq_len)


__all__ = ["Backend", "EngineOptions", "context_of"]
