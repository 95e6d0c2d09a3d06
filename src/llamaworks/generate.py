"""Text generation on torch models: the torch sampler, prefill + KV-cache decoding, stop handling and streaming.

`sample_next` is the only place a torch model's next token is chosen; the Python API, the chat on the torch
runtime and the server's continuous batcher all call it (the torch-free runtime's `lean.sample_token` applies the
same rules in numpy; tests/test_lean.py checks they agree). `generate_stream` / `generate` / `generate_batch`
run the model with its KV cache: one prefill forward over the (left-padded) prompts, then one single-token forward per
step. The model is always called as

    model(tokens, start_pos=..., key_mask=..., positions=..., last_only=True)

so a wrapped model (quantized linears, a compiled decode step) can stand in for `Transformer`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .sampling import (
    ContextLengthError,
    GenerationResult,
    RowState,
    SamplingParams,
    StopStringFilter,
    check_prompts,
    context_size,
)


def _penalized(logits: Tensor, params: Sequence[SamplingParams], histories: Sequence[Sequence[int]]) -> Tensor:
    """float32 copy of logits with each row's repetition/presence/frequency penalties applied.

    Work is proportional to the history length, not the vocabulary.
    """
    logits = logits.to(torch.float32, copy=True)
    for row, (p, history) in enumerate(zip(params, histories)):
        if not history or not p.has_penalties:
            continue
        seen, counts = torch.tensor(history, device=logits.device).unique(return_counts=True)
        values = logits[row, seen]
        if p.repetition_penalty != 1.0:
            values = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        values = values - p.presence_penalty - p.frequency_penalty * counts.to(torch.float32)
        logits[row, seen] = values
    return logits


def _temperatures(params: Sequence[SamplingParams], device: torch.device) -> Tensor:
    # Greedy rows divide by 1: their logprobs are the model's own distribution.
    return torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)


def token_logprobs(logits: Tensor, params: Sequence[SamplingParams], histories: Sequence[Sequence[int]]) -> Tensor:
    """Log-probabilities (B, V) after penalties and temperature, before top-k/top-p/min-p filtering.

    This is what OpenAI-style `logprobs` report; greedy rows use temperature 1.
    """
    x = _penalized(logits, params, histories)
    return torch.log_softmax(x / _temperatures(params, x.device)[:, None], dim=-1)


def _filtered(x: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """Apply top-k, then top-p (nucleus), then min-p to temperature-scaled logits; removed entries are -inf."""
    V = x.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
    top_p = [p.top_p for p in params]
    if any(k < V for k in top_k) or any(tp < 1.0 for tp in top_p):
        sorted_x, order = x.sort(dim=-1, descending=True)
        ranks = torch.arange(V, device=x.device)
        remove = ranks[None, :] >= torch.tensor(top_k, device=x.device)[:, None]
        sorted_x = sorted_x.masked_fill(remove, float("-inf"))
        probs = torch.softmax(sorted_x, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the top token always has 0 mass before it: kept
        p_t = torch.tensor(top_p, device=x.device)[:, None]
        remove = remove | ((mass_before >= p_t) & (p_t < 1.0))
        x = torch.full_like(x, float("-inf")).scatter(1, order, sorted_x.masked_fill(remove, float("-inf")))
    min_p = [p.min_p for p in params]
    if any(m > 0 for m in min_p):
        # p_i / p_max = exp(x_i - x_max): no renormalisation needed, so min-p commutes with the filters above.
        ratio = torch.exp(x - x.max(dim=-1, keepdim=True).values)
        x = x.masked_fill(ratio < torch.tensor(min_p, device=x.device)[:, None], float("-inf"))
    return x


def sample_next(logits: Tensor, params: Sequence[SamplingParams], histories: Sequence[Sequence[int]],
                generators: Sequence[torch.Generator | None] | None = None) -> Tensor:
    """Choose the next token of each row: LongTensor (B,) on logits' device.

    logits (B, V) are the last position's logits; row i uses params[i], penalises tokens in histories[i]
    and draws with generators[i] (None: torch's global RNG). Greedy rows (temperature 0) take the argmax.
    """
    B = logits.shape[0]
    if len(params) != B or len(histories) != B:
        raise ValueError(f"sample_next: {B} logits rows but {len(params)} params and {len(histories)} histories")
    generators = list(generators) if generators is not None else [None] * B
    x = _penalized(logits, params, histories)
    out = x.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return out
    rows = torch.tensor(sampled_rows, device=x.device)
    sub_params = [params[i] for i in sampled_rows]
    scaled = x.index_select(0, rows) / _temperatures(sub_params, x.device)[:, None]
    probs = torch.softmax(_filtered(scaled, sub_params), dim=-1)
    for j, i in enumerate(sampled_rows):
        out[i] = draw(probs[j], generators[i])
    return out


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index from the distribution `probs` (1-D, non-negative, any positive sum), by inverse CDF.

    ~0.1 ms for a 49k vocabulary where torch.multinomial takes ~1 ms: at 150 tok/s that is a sixth of each
    token's time. searchsorted(right=True) lands on the first index whose cumulative sum exceeds u * total,
    so a token of probability zero is never drawn.
    """
    cdf = probs.double().cumsum(0)  # float64: a float32 running sum over 49k terms loses tokens below ~6e-8
    total = float(cdf[-1])
    if not math.isfinite(total) or total <= 0 or bool((probs < 0).any()):
        raise ValueError("sampling: probabilities must be finite, non-negative and not all zero")
    u = torch.rand(1, generator=generator, device=probs.device, dtype=torch.float64)
    index = torch.searchsorted(cdf, u * total, right=True)[0]
    if index >= probs.shape[0]:  # u * total rounded up to the total: the last token with weight
        index = probs.nonzero()[-1, 0]
    return index


# --------------------------------------------------------------------------------------------------
# Stop strings and streaming text
# --------------------------------------------------------------------------------------------------






def model_device(model: Any) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")




def _ensure_cache(model: Any, batch_size: int, slots: int, context: int) -> None:
    """Reuse the model's KV cache when it is big enough for this batch, else allocate one.

    Allocation is rounded up to 256 slots (capped at the context) so a chat's growing prompts reuse it.
    """
    if model.has_cache and model.cache_len >= slots:
        cache = model.layers[0].attention.cache
        if cache.k.shape[0] == batch_size:
            return
    size = max(slots, min(context, -(-slots // 256) * 256))
    model.setup_cache(batch_size, size)






@torch.no_grad()  # not inference_mode: a cache allocated here must stay writable by later callers
def _generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
              max_context: int | None) -> Iterator[tuple[int, str] | list[GenerationResult]]:
    """Core loop: yields (row, text chunk) as text is released, and finally the list of results."""
    context = context_size(model, max_context)
    check_prompts(prompts, context)
    B = len(prompts)
    device = model_device(model)
    rows = [RowState(tokenizer, list(p), sp, min(sp.max_new_tokens, context - len(p)), sp.make_generator(device))
            for p, sp in zip(prompts, params)]
    lengths = [len(p) for p in prompts]
    L = max(lengths)
    # The last sampled token is never fed back, so L + max_new - 1 slots suffice.
    slots = L + max(r.limit for r in rows) - 1
    _ensure_cache(model, B, max(slots, L), context)

    pad = getattr(tokenizer, "pad_id", None)
    pad = pad if isinstance(pad, int) and 0 <= pad < model.config.vocab_size else 0
    tokens = torch.full((B, L), pad, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
    tokens = tokens.to(device)
    padded = any(n < L for n in lengths)
    key_mask = positions = lengths_t = None
    if padded:
        # Left padding: pad slots are masked for every query and each row's positions start at 0.
        offsets = torch.tensor([L - n for n in lengths], device=device)
        key_mask = torch.ones(B, max(slots, L) + 1, dtype=torch.bool, device=device)
        key_mask[:, :L] = torch.arange(L, device=device)[None, :] >= offsets[:, None]
        positions = (torch.arange(L, device=device)[None, :] - offsets[:, None]).clamp_min(0)
        lengths_t = torch.tensor(lengths, device=device)

    t0 = time.perf_counter()
    logits = model(tokens, start_pos=0, key_mask=None if key_mask is None else key_mask[:, :L],
                   positions=positions, last_only=True)[:, -1]
    histories = [r.history for r in rows]
    generators = [r.generator for r in rows]
    next_ids = sample_next(logits, params, histories, generators).tolist()
    prefill_seconds = time.perf_counter() - t0
    decode_seconds = 0.0

    step = 0
    while True:
        for i, row in enumerate(rows):
            if row.finish_reason is None:
                chunk = row.accept(next_ids[i])
                if chunk:
                    yield i, chunk
        if all(r.finish_reason is not None for r in rows):
            break
        t1 = time.perf_counter()
        start_pos = L + step
        feed = torch.tensor([[t if r.finish_reason is None else pad] for t, r in zip(next_ids, rows)],
                            dtype=torch.long, device=device)
        logits = model(feed, start_pos=start_pos,
                       key_mask=None if key_mask is None else key_mask[:, : start_pos + 1],
                       positions=None if lengths_t is None else (lengths_t + step)[:, None],
                       last_only=True)[:, -1]
        next_ids = sample_next(logits, params, histories, generators).tolist()
        decode_seconds += time.perf_counter() - t1
        step += 1

    yield [GenerationResult(text=r.text.text, token_ids=r.generated, finish_reason=r.finish_reason or "length",
                            prompt_tokens=r.prompt_len, completion_tokens=len(r.generated),
                            prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                            stop_sequence=r.stop_sequence)
           for r in rows]


def generate_stream(model: Any, tokenizer: Any, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                    *, max_context: int | None = None) -> Iterator[str | GenerationResult]:
    """Yield text chunks (str) as they become final, then one GenerationResult as the last item.

    Chunks never split a UTF-8 character and never contain (part of) a stop string.
    Raises ContextLengthError before generating if the prompt does not fit; max_new_tokens is capped so
    prompt + completion fit in the context (`max_context` can lower the model's own limit).
    """
    params = params or SamplingParams()
    for item in _generate(model, tokenizer, [list(prompt_ids)], [params], max_context):
        if isinstance(item, list):
            yield item[0]
        else:
            yield item[1]


def generate(model: Any, tokenizer: Any, prompt_ids: Sequence[int], params: SamplingParams | None = None,
             *, max_context: int | None = None) -> GenerationResult:
    """Generate one completion without streaming."""
    return generate_batch(model, tokenizer, [prompt_ids], [params or SamplingParams()], max_context=max_context)[0]


def generate_batch(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]],
                   params: SamplingParams | Sequence[SamplingParams] | None = None,
                   *, max_context: int | None = None) -> list[GenerationResult]:
    """Generate completions for several prompts at once (left-padded into one batch)."""
    if params is None or isinstance(params, SamplingParams):
        params = [params or SamplingParams()] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    results: list[GenerationResult] = []
    for item in _generate(model, tokenizer, [list(p) for p in prompts], list(params), max_context):
        if isinstance(item, list):
            results = item
    return results


__all__ = [
    "ContextLengthError",
    "GenerationResult",
    "SamplingParams",
    "StopStringFilter",
    "context_size",
    "generate",
    "generate_batch",
    "generate_stream",
    "sample_next",
    "token_logprobs",
]
