"""llamaworks: own an open LLaMA-family chatbot end to end.

    import llamaworks
    llm = llamaworks.load()                      # the bundled SmolLM2-135M-Instruct, or a path
    llm.chat("Tell me about llamas.", temperature=0)
    for piece in llm.stream([{"role": "user", "content": "Hi!"}]):
        print(piece, end="", flush=True)

Imports are lazy: `import llamaworks` does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    import torch

    from .chat_template import ChatTemplate
    from .lean import LeanModel
    from .model import Transformer
    from .sampling import GenerationResult, SamplingParams
    from .tokenizer import Tokenizer

Messages = Sequence[dict[str, Any]]

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


class LLM:
    """A loaded model with its tokenizer and chat template, ready to generate.

    Sampling keywords (all optional): temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
    frequency_penalty, seed, max_new_tokens (alias max_tokens), stop, stop_token_ids.
    """

    def __init__(self, model: Transformer | LeanModel, tokenizer: Tokenizer, template: ChatTemplate | None = None,
                 *, checkpoint: Any = None, max_context: int | None = None,
                 defaults: SamplingParams | None = None) -> None:
        from .sampling import SamplingParams

        self.model = model
        self.tokenizer = tokenizer
        self._template = template
        self.checkpoint = checkpoint
        self.max_context = max_context
        self.defaults = defaults or SamplingParams()
        self.last_result: GenerationResult | None = None

    @property
    def template(self) -> ChatTemplate:
        """The chat template: the one given, else the model's own (or a built-in fallback)."""
        if self._template is None:
            from .chat_template import template_for

            self._template = template_for(self.tokenizer)
        return self._template

    @property
    def context_size(self) -> int:
        from .sampling import context_size

        return context_size(self.model, self.max_context)

    def sampling(self, **overrides: Any) -> SamplingParams:
        """The default sampling parameters with `overrides` applied (None values are ignored)."""
        import dataclasses

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
        from .sampling import GenerationResult, stream_function

        generate_stream = stream_function(self.model)  # the torch or the torch-free runtime's loop
        for item in generate_stream(self.model, self.tokenizer, list(prompt_ids), self.sampling(**sampling),
                                    max_context=self.max_context):
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
        name = getattr(self.model.config, "name", "model")
        return f"LLM({name}, {self.model.config.n_params / 1e6:.0f}M params)"


def load(path: str | Path | None = None, *, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, chat_template: str | None = None,
         max_context: int | None = None, fast: bool | None = None, mmap: bool | None = None,
         runtime: str | None = None, threads: int | None = None) -> LLM:
    """Load a checkpoint (GGUF file, Hugging Face or Meta directory; None = the bundled default model).

    device: "cpu", "cuda", ... (default: CUDA if available, else CPU). dtype: "float32", "bf16", ...
    chat_template: a built-in name ("chatml", "llama-3", ...) or a Jinja file, instead of the model's own.
    max_context: use fewer context positions than the model supports.
    fast: keep a GGUF's quantized blocks in memory and decode with the native kernels (`runtime.py`).
          Default: on for GGUF files on the CPU in float32; off elsewhere (the float reference path).
    mmap: with `fast` or the lean runtime, keep the blocks memory-mapped from the file instead of reading them
          into huge pages (default: the LLAMAWORKS_MMAP environment variable, else off; see quant/memory.py).
    runtime: "torch" (default: `llm.model` is a `Transformer`), "lean" (the torch-free runtime, `lean.py`: a GGUF
          file on the CPU in about half the memory; torch is never imported) or "auto" (lean where it applies,
          else torch: what the CLI's chat/generate/bench use).
    threads: the lean runtime's threads (default: physical cores; the torch runtime follows torch's setting).
    """
    from .chat_template import template_for
    from .sampling import SamplingParams

    lean_model = None
    if choose_runtime(runtime, path, device, dtype, reference=fast is False) == "lean":
        from .lean import LeanModel, LeanUnsupported

        try:
            lean_model = LeanModel.load(path, max_context=max_context, mmap=mmap, threads=threads)
        except LeanUnsupported:
            if runtime != "auto":
                raise
            from .engine.torch_backend import set_threads  # a valid file the torch runtime runs, as auto promises

            set_threads(threads)
    if lean_model is not None:
        if lean_model.tokenizer is None:
            from .errors import FormatError

            raise FormatError(f"{lean_model.path}: the checkpoint carries no tokenizer")
        template = template_for(lean_model.tokenizer, chat_template)
        return LLM(lean_model, lean_model.tokenizer, template, checkpoint=None, max_context=max_context,
                   defaults=_defaults_from(lean_model.generation_config, SamplingParams))

    from .checkpoints import load_model

    device_, dtype_ = resolve_device(device), resolve_dtype(dtype)
    if fast is None:
        fast = device_.type == "cpu" and dtype_ in (None, _torch_float32()) and _is_gguf_file(path)
    if fast:
        from .runtime import load_quantized_model

        # weights=None: float tensors of the file stay float; quantized blocks stay quantized.
        model, tokenizer, checkpoint = load_quantized_model(path, weights=None, mmap=mmap)
    else:
        model, tokenizer, checkpoint = load_model(path, dtype=dtype_, device=device_)
    model.eval()
    if tokenizer is None:
        from .errors import FormatError

        raise FormatError(f"{checkpoint.path}: the checkpoint carries no tokenizer")
    template = template_for(tokenizer, chat_template)
    return LLM(model, tokenizer, template, checkpoint=checkpoint, max_context=max_context,
               defaults=_defaults_from(getattr(checkpoint, "generation_config", None) or {}, SamplingParams))


RUNTIMES = ("auto", "lean", "torch")


def choose_runtime(runtime: str | None, path: str | Path | None, device: Any = None, dtype: Any = None, *,
                   reference: bool = False) -> str:
    """"lean" or "torch" for a load request, without importing torch. runtime None means "torch"; "auto" picks
    lean for a GGUF file on the CPU in float32 (device cpu, or auto with no GPU visible) when the torch-free
    library builds here; "lean" raises ConfigError saying what rules it out."""
    from .errors import ConfigError

    runtime = (runtime or "torch").lower()
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return "torch"
    from .hardware import gpu_visible

    obstacle = None
    if reference:
        obstacle = "the float reference path (--reference) runs on torch"
    elif not _is_gguf_file(path):
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
        return "lean"
    if runtime == "lean":
        raise ConfigError(f"the torch-free runtime cannot load this: {obstacle}")
    return "torch"


def _torch_float32() -> Any:
    import torch

    return torch.float32


def _is_gguf_file(path: str | Path | None) -> bool:
    """True for the default model and any file that starts with the GGUF magic."""
    if path is None:
        return True
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


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


__all__ = ["LLM", "RUNTIMES", "__version__", "choose_runtime", "load", "resolve_device", "resolve_dtype"]
