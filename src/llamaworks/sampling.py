"""THE sampler and what goes with it, in numpy (no torch): sampling parameters, penalties, top-k/top-p/min-p,
the draw, log-probabilities, stop tokens and strings, streamed text, results. The scheduler (engine/scheduler.py)
calls it for every backend; logits arrive as numpy float32 rows from either backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ConfigError, LlamaworksError


class ContextLengthError(LlamaworksError, ValueError):
    """The prompt does not fit in the model's context window."""


@dataclass
class SamplingParams:
    """How to choose each next token and when to stop.

    temperature 0 means greedy (argmax). top_k 0 and top_p 1 and min_p 0 disable those filters.
    Penalties look at the history passed to `sample_token` (prompt + generated ids in the scheduler):
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


# -- the sampler -------------------------------------------------------------------------------------------
def penalized(logits: np.ndarray, params: SamplingParams, history: Sequence[int]) -> np.ndarray:
    """A float32 copy of one row of logits with repetition (CTRL/HF: positive logits divided, negative ones
    multiplied), presence and frequency (OpenAI: constant and count times value subtracted) penalties applied to
    the tokens in `history`. Work follows the history's length, not the vocabulary's."""
    x = np.array(logits, dtype=np.float32)
    if history and params.has_penalties:
        seen, counts = np.unique(np.asarray(history, dtype=np.int64), return_counts=True)
        seen_ok = (seen >= 0) & (seen < x.shape[0])
        seen, counts = seen[seen_ok], counts[seen_ok]
        values = x[seen]
        if params.repetition_penalty != 1.0:
            values = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
        x[seen] = values - params.presence_penalty - params.frequency_penalty * counts.astype(np.float32)
    return x


def _nucleus(x: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """x with entries outside the top_k and outside the top_p probability mass set to -inf: after top-k,
    probabilities are renormalised over the kept tokens and a token stays while the mass of those ranked before
    it is below top_p (the best token always stays). Without top-k only tokens within e^-30 of the best are
    sorted when the others cannot reach the nucleus (their whole mass is below 1 - top_p: each has all the sorted
    ones before it)."""
    V = x.shape[0]
    k = top_k if 0 < top_k < V else V
    best = float(x.max())
    candidates = np.argpartition(-x, k - 1)[:k] if k < V else np.arange(V)
    outside = 0.0  # probability mass (relative to the best token's) of tokens left unsorted
    if top_p < 1.0 and k == V:
        head = np.flatnonzero(x >= best - 30.0)
        tail = float(np.exp(np.delete(x, head).astype(np.float64) - best).sum())
        total = tail + float(np.exp(x[head].astype(np.float64) - best).sum())
        if tail < (1.0 - top_p) * total:
            candidates, outside = head, tail
    order = candidates[np.argsort(-x[candidates], kind="stable")]
    kept = x[order]
    if top_p < 1.0:
        weights = np.exp(kept.astype(np.float64) - best)
        probs = weights / (weights.sum() + outside)
        kept = np.where(np.cumsum(probs) - probs < top_p, kept, -np.inf)
    out = np.full_like(x, -np.inf)
    out[order] = kept
    return out


def sample_token(logits: np.ndarray, params: SamplingParams, history: Sequence[int],
                 rng: np.random.Generator, allowed: np.ndarray | None = None) -> int:
    """The next token from one row of logits: penalties, then the argmax (temperature 0) or temperature, top-k,
    top-p, min-p and an inverse-CDF draw with `rng`. `allowed` (bool, vocab) restricts the choice (JSON mode)."""
    x = penalized(logits, params, history)
    if allowed is not None:
        x[~allowed[: x.shape[0]]] = -np.inf
    if params.greedy:
        return int(np.argmax(x))
    x = x / np.float32(params.temperature)
    if (0 < params.top_k < x.shape[0]) or params.top_p < 1.0:
        x = _nucleus(x, params.top_k, params.top_p)
    weights = np.exp(x.astype(np.float64) - x.max())
    if params.min_p > 0:
        weights[weights < params.min_p] = 0.0  # p_i / p_max = exp(x_i - x_max): no renormalisation needed
    cdf = np.cumsum(weights)  # float64: a float32 running sum over 49k terms loses tokens below ~6e-8
    total = cdf[-1]
    if not math.isfinite(total) or total <= 0:
        raise ValueError("sampling: probabilities must be finite and not all zero")
    # side="right": the first index whose cumulative sum exceeds u * total, so a zero-weight token is never drawn.
    index = int(np.searchsorted(cdf, rng.random() * total, side="right"))
    return index if index < len(cdf) else int(np.flatnonzero(weights)[-1])


def token_logprobs(logits: np.ndarray, params: SamplingParams, history: Sequence[int]) -> np.ndarray:
    """Log-probabilities (vocab,) float64 after penalties and temperature, before top-k/top-p/min-p: what
    OpenAI-style `logprobs` report (greedy rows use temperature 1)."""
    x = penalized(logits, params, history).astype(np.float64)
    if params.temperature > 0:
        x /= params.temperature
    x -= x.max()
    return x - math.log(float(np.exp(x).sum()))


# -- results -------------------------------------------------------------------------------------------------


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


def check_prompts(prompts: Sequence[Sequence[int]], context: int) -> None:
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token (e.g. BOS)")
        if len(prompt) >= context:
            raise ContextLengthError(f"prompt has {len(prompt)} tokens but the context holds {context} "
                                     "(at least one more is needed for the reply)")



__all__ = ["ContextLengthError", "GenerationResult", "SamplingParams", "StopStringFilter", "check_prompts",
           "context_size", "sample_token", "stop_ids", "token_logprobs"]
