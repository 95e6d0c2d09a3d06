"""What every generation loop shares, without torch: sampling parameters, stop tokens and strings, streamed
text, results. `generate.py` (torch models) and `lean.py` (the torch-free runtime) both build on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, LlamaworksError

if TYPE_CHECKING:
    import torch


class ContextLengthError(LlamaworksError, ValueError):
    """The prompt does not fit in the model's context window."""


@dataclass
class SamplingParams:
    """How to choose each next token and when to stop.

    temperature 0 means greedy (argmax). top_k 0 and top_p 1 and min_p 0 disable those filters.
    Penalties look at `histories` passed to `sample_next` (prompt + generated ids in `generate*`):
    repetition_penalty divides positive logits of seen tokens (multiplies negative ones) as in CTRL/HF;
    presence_penalty subtracts a constant from every seen token, frequency_penalty subtracts count * value
    (OpenAI semantics). `stop` strings end generation and are never part of the output; `stop_token_ids`
    are added to the tokenizer's own stop ids (EOS, end-of-turn).
    """

    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first out-of-range field."""
        checks = [
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_k", self.top_k >= 0, ">= 0 (0 disables)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 disables)"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"sampling: {name}={getattr(self, name)!r} is invalid, expected {expected}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def make_generator(self, device: torch.device | str) -> torch.Generator | None:
        """A torch generator seeded with `seed` on `device` (None without a seed: the global RNG is used)."""
        if self.seed is None:
            return None
        import torch

        return torch.Generator(device=device).manual_seed(int(self.seed))


def _stream_decoder(tokenizer: Any, prompt_ids: Sequence[int] = ()) -> Any:
    from .tokenizer import StreamDecoder

    # Decoding after the prompt's last ids keeps a continuation's leading space (SentencePiece).
    return StreamDecoder(tokenizer, prompt_ids=prompt_ids)


class StopStringFilter:
    """Turns one row's token stream into text chunks that never contain a stop string.

    Text that could be the beginning of a stop string is held back until the next tokens show whether it is;
    a stop string split across several tokens is therefore detected and removed. Text comes from the
    tokenizer's StreamDecoder, so no incomplete UTF-8 character is ever released.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), prompt_ids: Sequence[int] = ()) -> None:
        self.decoder = _stream_decoder(tokenizer, prompt_ids)
        self.stop = [s for s in stop if s]
        self.pending = ""  # decoded but not yet released
        self.parts: list[str] = []  # released text
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def push(self, token_id: int) -> str:
        """Decode one token; return the text that is now safe to release ("" when held back or stopped)."""
        if self.stopped:
            return ""
        return self._release(self.decoder.push(token_id), final=False)

    def finish(self) -> str:
        """End of generation: release held-back text (up to a stop string, if one completed)."""
        if self.stopped:
            return ""
        return self._release(self.decoder.flush(), final=True)

    def _release(self, new_text: str, final: bool) -> str:
        self.pending += new_text
        if not self.stop:
            out, self.pending = self.pending, ""
        else:
            hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
            if hits:
                first = min(hits)
                self.matched = next(s for s in self.stop if self.pending.find(s) == first)
                out, self.pending, self.stopped = self.pending[:first], "", True
            elif final:
                out, self.pending = self.pending, ""
            else:
                keep = self._possible_stop_prefix()
                cut = len(self.pending) - keep
                out, self.pending = self.pending[:cut], self.pending[cut:]
        if out:
            self.parts.append(out)
        return out

    def _possible_stop_prefix(self) -> int:
        """Length of the longest suffix of pending text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:k]):
                    best = k
                    break
        return best


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    """One finished completion.

    token_ids are every sampled id (a final stop token included; the text excludes it and any stop string).
    finish_reason is "stop" (stop token or stop string) or "length" (max_new_tokens or the context filled).
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float
    stop_sequence: str | int | None = None

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # The first completion token comes out of the prefill; each later one costs one decode step.
        steps = max(self.completion_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


def context_size(model: Any, max_context: int | None = None) -> int:
    """Usable context: the model's (or a ModelConfig's) max_seq_len, or a smaller user limit."""
    limit = int(getattr(model, "config", model).max_seq_len)
    if max_context is None:
        return limit
    if int(max_context) < 2:
        raise ConfigError(f"max_context={max_context} is too small, expected at least 2 positions")
    return min(limit, int(max_context))


def stop_ids(tokenizer: Any, params: SamplingParams) -> set[int]:
    ids = set(getattr(tokenizer, "stop_ids", None) or ())
    eos = getattr(tokenizer, "eos_id", None)
    if eos is not None and eos >= 0:
        ids.add(eos)
    return ids | {int(i) for i in params.stop_token_ids}


class RowState:
    """Per-prompt decoding state: history for penalties, stop ids and strings, released text."""

    def __init__(self, tokenizer: Any, prompt: list[int], params: SamplingParams, limit: int,
                 generator: Any) -> None:
        self.params = params
        self.prompt_len = len(prompt)
        self.history = list(prompt)  # prompt + generated: what penalties look at
        self.generated: list[int] = []
        self.limit = limit
        self.generator = generator
        self.stop_ids = stop_ids(tokenizer, params)
        self.text = StopStringFilter(tokenizer, params.stop, prompt_ids=prompt)
        self.finish_reason: str | None = None
        self.stop_sequence: str | int | None = None

    def accept(self, token: int) -> str:
        """Record a sampled token; return newly released text. Sets finish_reason when the row is done."""
        self.generated.append(token)
        self.history.append(token)
        if token in self.stop_ids:
            self.finish_reason, self.stop_sequence = "stop", token
            return self.text.finish()
        chunk = self.text.push(token)
        if self.text.stopped:
            self.finish_reason = "stop"
            self.stop_sequence = self.text.matched
            return chunk
        if len(self.generated) >= self.limit:
            self.finish_reason = "length"
            chunk += self.text.finish()
            if self.text.stopped:  # a stop string completed in the decoder's flushed tail
                self.finish_reason, self.stop_sequence = "stop", self.text.matched
        return chunk


def check_prompts(prompts: Sequence[Sequence[int]], context: int) -> None:
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token (e.g. BOS)")
        if len(prompt) >= context:
            raise ContextLengthError(f"prompt has {len(prompt)} tokens but the context holds {context} "
                                     "(at least one more is needed for the reply)")



def stream_function(model: Any) -> Any:
    """The generate_stream that runs `model`: the torch-free loop (lean.py) for a NativeBackend, else generate.py's."""
    if getattr(model, "torch_free", False):
        from .lean import generate_stream
    else:
        from .generate import generate_stream
    return generate_stream


__all__ = ["ContextLengthError", "GenerationResult", "RowState", "SamplingParams", "StopStringFilter", "check_prompts",
           "context_size", "stop_ids", "stream_function"]
