"""The Python API: `load()` a checkpoint onto a backend and get an `LLM` that generates on the one scheduler.

    llm = load()                                  # the bundled SmolLM2 on the native backend (this CPU)
    llm = load("model.gguf", backend="torch")     # the same file on the torch backend (CUDA, the float reference)
    llm.chat("Hi!", temperature=0)

The CLI's chat/generate/bench/serve/eval pick a backend the same way (`choose_backend`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .engine.backend import Backend, EngineOptions

if TYPE_CHECKING:
    import torch

    from .chat_template import ChatTemplate
    from .engine.scheduler import Scheduler
    from .sampling import GenerationResult, SamplingParams

Messages = Sequence[dict[str, Any]]
BACKENDS = ("auto", "native", "torch")

_DTYPES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None or "auto": CUDA when available, else CPU."""
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None = None) -> torch.dtype | None:
    """A torch dtype from a name like "bf16"; None or "auto" lets the checkpoint loader decide."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    name = _DTYPES.get(str(dtype).lower())
    if name is None:
        from .errors import ConfigError

        raise ConfigError(f"dtype {dtype!r} is not supported; expected one of float32, bfloat16, float16, auto")
    return getattr(torch, name)


def choose_backend(backend: str | None, path: str | Path | None, device: Any = None, dtype: Any = None, *,
                   reference: bool = False) -> str:
    """"native" or "torch" for a load request, without importing torch. "auto" (the default) picks native for a
    GGUF file on the CPU in float32 (device cpu, or auto with no GPU visible) when the native library builds here;
    "native" raises ConfigError saying what rules it out."""
    from .checkpoints import is_gguf_file
    from .errors import ConfigError

    backend = (backend or "auto").lower()
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    from .hardware import gpu_visible

    obstacle = None
    if reference:
        obstacle = "the float reference path (--reference) runs on torch"
    elif not is_gguf_file(path):
        obstacle = f"{path}: it runs GGUF files only"
    elif str(device) not in ("None", "auto", "cpu"):
        obstacle = f"it runs on the CPU only (device {device} requested)"
    elif str(device) != "cpu" and gpu_visible():
        obstacle = "it runs on the CPU only (--device auto and a GPU is visible: pass --device cpu)"
    elif str(dtype) not in ("None", "auto", "float32", "fp32", "f32", "torch.float32"):
        obstacle = f"it computes in float32 (dtype {dtype} requested)"
    else:
        from .quant.lean_kernels import LeanUnavailable, library

        try:
            library()
        except LeanUnavailable as e:
            obstacle = str(e)
    if obstacle is None:
        return "native"
    if backend == "native":
        raise ConfigError(f"the native backend cannot load this: {obstacle}")
    return "torch"


def load_backend(path: str | Path | None = None, *, backend: str | None = "auto", options: EngineOptions | None = None,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 reference: bool = False, quantize: str | None = None) -> Backend:
    """The backend `choose_backend` picks, loaded with `options` (a file the native backend cannot run, e.g.
    dimensions not multiples of 32, goes to the torch backend under "auto"). quantize: the torch backend's format
    for float weights of a non-GGUF checkpoint ("q8_0", "q4_0", "q4_1"; None keeps them float)."""
    options = options or EngineOptions()
    if choose_backend(backend, path, device, dtype, reference=reference) == "native":
        from .engine.native import NativeBackend, NativeUnsupported

        try:
            return NativeBackend.load(path, options)
        except NativeUnsupported:
            if backend == "native":
                raise
    from .engine.torch_backend import TorchBackend

    return TorchBackend.load(path, options, device=resolve_device(device), dtype=resolve_dtype(dtype),
                             reference=reference, quantize=quantize)


class LLM:
    """A loaded model with its tokenizer and chat template, generating on one scheduler.

    Sampling keywords (all optional): temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
    frequency_penalty, seed, max_new_tokens (alias max_tokens), stop, stop_token_ids.
    Successive calls reuse the cache for the prefix they share with the previous prompt (a chat's earlier turns).
    """

    def __init__(self, backend: Backend, template: ChatTemplate | None = None, *,
                 defaults: SamplingParams | None = None) -> None:
        from .engine.scheduler import Scheduler
        from .errors import FormatError
        from .sampling import SamplingParams

        if backend.tokenizer is None:
            raise FormatError(f"{getattr(backend, 'path', 'the checkpoint')}: the checkpoint carries no tokenizer")
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self._template = template
        self.defaults = defaults or _defaults_from(backend.generation_config, SamplingParams)
        self.scheduler: Scheduler = Scheduler(backend)
        self.last_result: GenerationResult | None = None

    @property
    def model(self) -> Any:
        """The torch backend's `Transformer`, else the backend itself."""
        return getattr(self.backend, "model", self.backend)

    @property
    def config(self) -> Any:
        return self.backend.config

    @property
    def template(self) -> ChatTemplate:
        """The chat template: the one given, else the model's own (or a built-in fallback)."""
        if self._template is None:
            from .chat_template import template_for

            self._template = template_for(self.tokenizer)
        return self._template

    @property
    def context_size(self) -> int:
        return self.scheduler.context

    def sampling(self, **overrides: Any) -> SamplingParams:
        """The default sampling parameters with `overrides` applied (None values are ignored)."""
        if "max_tokens" in overrides:
            overrides.setdefault("max_new_tokens", overrides.pop("max_tokens"))
        known = {f.name for f in dataclasses.fields(self.defaults)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self.defaults, **{k: v for k, v in overrides.items() if v is not None})

    # -- prompts ----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a raw completion prompt (BOS added when the tokenizer wants one)."""
        return self.tokenizer.encode(prompt)

    def encode_chat(self, messages: Messages | str) -> list[int]:
        """Token ids of a conversation rendered with the chat template, ending with the assistant cue."""
        from .chat import encode_messages, normalize_messages

        return encode_messages(self.tokenizer, self.template, normalize_messages(messages))

    # -- generation -------------------------------------------------------------------------------
    def complete(self, prompt_ids: Sequence[int], **sampling: Any) -> GenerationResult:
        """Generate from token ids; returns the full result (text, ids, finish reason, timings)."""
        for _ in self.stream_ids(prompt_ids, **sampling):
            pass
        assert self.last_result is not None
        return self.last_result

    def stream_ids(self, prompt_ids: Sequence[int], **sampling: Any) -> Iterator[str]:
        """Stream text pieces generated from token ids; afterwards `last_result` holds the GenerationResult."""
        from .engine.scheduler import generate_stream
        from .sampling import GenerationResult

        for item in generate_stream(self.scheduler, list(prompt_ids), self.sampling(**sampling)):
            if isinstance(item, GenerationResult):
                self.last_result = item
            else:
                yield item

    def generate(self, prompt: str, **sampling: Any) -> str:
        """Raw text completion of `prompt` (no chat template)."""
        return self.complete(self.encode_prompt(prompt), **sampling).text

    def chat(self, messages: Messages | str, **sampling: Any) -> str:
        """The assistant's reply to `messages` (a list of {"role", "content"} dicts, or one user message)."""
        return self.complete(self.encode_chat(messages), **sampling).text

    def stream(self, prompt_or_messages: str | Messages, **sampling: Any) -> Iterator[str]:
        """Stream text pieces: a str is a raw completion prompt, a list of messages is a chat.

        After the iterator is exhausted, `last_result` holds the GenerationResult.
        """
        if isinstance(prompt_or_messages, str):
            ids = self.encode_prompt(prompt_or_messages)
        else:
            ids = self.encode_chat(prompt_or_messages)
        yield from self.stream_ids(ids, **sampling)

    def __repr__(self) -> str:
        cfg = self.backend.config
        return f"LLM({getattr(cfg, 'name', 'model')}, {cfg.n_params / 1e6:.0f}M params, {self.backend.name} backend)"


def load(path: str | Path | None = None, *, backend: str | None = "auto", device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, chat_template: str | None = None, max_context: int | None = None,
         reference: bool = False, threads: int | None = None, mmap: bool | None = None,
         options: EngineOptions | None = None) -> LLM:
    """Load a checkpoint (GGUF file, Hugging Face or Meta directory; None = the bundled default model).

    backend: "auto" (default, as the CLI): the native backend for a GGUF file on the CPU in float32, else torch;
          "native" (C++ kernels, torch never imported) or "torch" (`llm.model` is a `Transformer`).
    device: "cpu", "cuda", ... (torch backend; default: CUDA if available, else CPU). dtype: "float32", "bf16", ...
    chat_template: a built-in name ("chatml", "llama-3", ...) or a Jinja file, instead of the model's own.
    max_context, threads, mmap: shortcuts for the same fields of `options` (EngineOptions: KV dtype, int8
          activations, ...). reference: the torch backend's float model (a GGUF dequantized), for comparisons.
    """
    from .chat_template import template_for

    options = (options or EngineOptions()).with_(max_context=max_context, threads=threads, mmap=mmap)
    model = load_backend(path, backend=backend, options=options, device=device, dtype=dtype, reference=reference)
    if model.tokenizer is None:
        from .errors import FormatError

        raise FormatError(f"{getattr(model, 'path', path)}: the checkpoint carries no tokenizer")
    return LLM(model, template_for(model.tokenizer, chat_template))


def _defaults_from(generation_config: dict[str, Any], params_cls: type) -> Any:
    """Sampling defaults from a checkpoint's generation_config.json (temperature, top_p, ...)."""
    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    values = {k: generation_config[k] for k in keys if isinstance(generation_config.get(k), (int, float))}
    if generation_config.get("do_sample") is False:
        values["temperature"] = 0.0
    try:
        return params_cls(**values)
    except ValueError:  # an odd generation_config must not make the model unusable
        return params_cls()


__all__ = ["BACKENDS", "LLM", "choose_backend", "load", "load_backend", "resolve_device", "resolve_dtype"]
