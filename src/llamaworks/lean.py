"""A temporary shim: the torch-free generation loop over an `engine.native.NativeBackend` (row 0), until the
scheduler replaces it. `llamaworks chat`, `generate` and `bench` and `llamaworks.load(path, runtime="lean")` run
GGUF models on the CPU through it.

    backend = NativeBackend.load(None, EngineOptions(max_context=2048))
    for item in generate_stream(backend, backend.tokenizer, ids, SamplingParams(temperature=0)): ...

The loop keeps, per backend, the tokens whose keys/values fill row 0, so a chat's earlier turns are not computed
again.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .engine.backend import EngineOptions
from .engine.native import NativeBackend, NativeUnsupported, available
from .sampling import (
    GenerationResult,
    RowState,
    SamplingParams,
    check_prompts,
    context_size,
)

# Per backend: the tokens whose keys/values fill positions 0..n-1 of row 0.
_cached: weakref.WeakKeyDictionary[NativeBackend, list[int]] = weakref.WeakKeyDictionary()
_cached_lock = threading.Lock()


def run(backend: NativeBackend, tokens: Sequence[int], start_pos: int) -> np.ndarray:
    """Run `tokens` at positions start_pos.. of row 0; the last one's logits (vocab,)."""
    tokens = [int(t) for t in tokens]
    with _cached_lock:
        cached = _cached.setdefault(backend, [])
        del cached[start_pos:]  # about to change (a failed call may have written some)
        known = start_pos == len(cached)
        if not known:
            cached.clear()  # beyond the known prefix nothing is known
    logits = backend.forward([0] * len(tokens), tokens, range(start_pos, start_pos + len(tokens)),
                             [len(tokens) - 1])[0]
    if known:
        with _cached_lock:
            _cached[backend].extend(tokens)
    return logits


def prefill(backend: NativeBackend, prompt: Sequence[int]) -> np.ndarray:
    """The last prompt token's logits, reusing row 0 for the prefix shared with the previous call."""
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("prefill needs at least one token")
    with _cached_lock:
        cached = list(_cached.get(backend, []))
    shared = 0
    limit = min(len(cached), len(prompt) - 1)  # at least one token runs, for its logits
    while shared < limit and cached[shared] == prompt[shared]:
        shared += 1
    return run(backend, prompt[shared:], shared)


# -- sampling ------------------------------------------------------------------------------------------------
def _penalized(logits: np.ndarray, params: SamplingParams, history: Sequence[int]) -> np.ndarray:
    x = np.array(logits, dtype=np.float32)
    if history and params.has_penalties:
        seen, counts = np.unique(np.asarray(history, dtype=np.int64), return_counts=True)
        values = x[seen]
        if params.repetition_penalty != 1.0:
            values = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
        x[seen] = values - params.presence_penalty - params.frequency_penalty * counts.astype(np.float32)
    return x


def _nucleus(x: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """x with entries outside the top_k and outside the top_p probability mass set to -inf, as generate.py's
    filter: after top-k, probabilities are renormalised over the kept tokens and a token stays while the mass of
    those ranked before it is below top_p. Without top-k only tokens within e^-30 of the best are sorted when the
    others cannot reach the nucleus (their whole mass is below 1 - top_p: each has all the sorted ones before it)."""
    V = x.shape[0]
    k = top_k if 0 < top_k < V else V
    best = float(x.max())
    if k < V:
        candidates = np.argpartition(-x, k - 1)[:k]
    else:
        candidates = np.arange(V)
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
                 rng: np.random.Generator) -> int:
    """The next token from one row of logits: penalties, then greedy argmax or temperature, top-k, top-p, min-p
    and an inverse-CDF draw (the same rules as generate.sample_next)."""
    x = _penalized(logits, params, history)
    if params.greedy:
        return int(np.argmax(x))
    x = x / np.float32(params.temperature)
    if (0 < params.top_k < x.shape[0]) or params.top_p < 1.0:
        x = _nucleus(x, params.top_k, params.top_p)
    best = x.max()
    weights = np.exp(x.astype(np.float64) - best)
    if params.min_p > 0:
        weights[weights < params.min_p] = 0.0  # p_i / p_max = exp(x_i - x_max)
    cdf = np.cumsum(weights)
    total = cdf[-1]
    if not math.isfinite(total) or total <= 0:
        raise ValueError("sampling: probabilities must be finite and not all zero")
    index = int(np.searchsorted(cdf, rng.random() * total, side="right"))
    return index if index < len(cdf) else int(np.flatnonzero(weights)[-1])


# -- generation ----------------------------------------------------------------------------------------------
def generate_stream(model: NativeBackend, tokenizer: Any, prompt_ids: Sequence[int],
                    params: SamplingParams | None = None, *, max_context: int | None = None
                    ) -> Iterator[str | GenerationResult]:
    """generate.generate_stream for a NativeBackend: text chunks as they become final, then one GenerationResult."""
    params = params or SamplingParams()
    context = context_size(model, max_context)
    prompt = list(prompt_ids)
    check_prompts([prompt], context)
    rng = np.random.default_rng(params.seed)
    row = RowState(tokenizer, prompt, params, min(params.max_new_tokens, context - len(prompt)), rng)
    t0 = time.perf_counter()
    logits = prefill(model, prompt)
    token = sample_token(logits, params, row.history, rng)
    prefill_seconds, decode_seconds = time.perf_counter() - t0, 0.0
    while True:
        chunk = row.accept(token)
        if chunk:
            yield chunk
        if row.finish_reason is not None:
            break
        t1 = time.perf_counter()
        logits = run(model, [token], len(prompt) + len(row.generated) - 1)
        token = sample_token(logits, params, row.history, rng)
        decode_seconds += time.perf_counter() - t1
    yield GenerationResult(text=row.text.text, token_ids=row.generated, finish_reason=row.finish_reason,
                           prompt_tokens=len(prompt), completion_tokens=len(row.generated),
                           prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                           stop_sequence=row.stop_sequence)


def generate(model: NativeBackend, tokenizer: Any, prompt_ids: Sequence[int], params: SamplingParams | None = None,
             *, max_context: int | None = None) -> GenerationResult:
    """One completion without streaming."""
    result = None
    for item in generate_stream(model, tokenizer, prompt_ids, params, max_context=max_context):
        if isinstance(item, GenerationResult):
            result = item
    assert result is not None
    return result


__all__ = ["EngineOptions", "NativeBackend", "NativeUnsupported", "available", "generate", "generate_stream",
           "prefill", "run", "sample_token"]
