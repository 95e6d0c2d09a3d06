"""THE log-likelihood scorer: log P(continuation | context) for every choice of a multiple-choice item.

Tokenisation follows lm-evaluation-harness for causal models: trailing whitespace of the context moves to the
continuation, then `context + continuation` is encoded whole and the continuation's tokens are what follows
the first len(encode(context)) tokens; the model input is encode(context) + those tokens. An empty context
is replaced by the BOS (else EOS) token.

Speed comes from computing the shared context once: it is prefilled into a batch-1 KV cache, the cache is
copied to one row per choice, and all continuations run as one right-padded batch (causal attention never lets
a real position see the padding after it, so no mask is needed for correctness). The context's cache is kept
between items and only the tokens after the longest common prefix are computed, so MMLU's shared 5-shot block
or TruthfulQA's preamble is computed once per run. Logits are taken only at the positions that are scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import KVCache, Transformer


@dataclass(frozen=True)
class ChoiceScore:
    logprob: float  # sum of log-probabilities of the continuation's tokens
    is_greedy: bool  # every continuation token was the argmax
    n_tokens: int


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LoglikelihoodScorer:
    """Scores (context, continuations) with a llamaworks Transformer and Tokenizer.

    max_length: the longest model input; longer inputs lose tokens on the left, as in the harness
    (default: the model's max_seq_len).
    """

    def __init__(self, model: Transformer, tokenizer, *, max_length: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length or model.config.max_seq_len
        self._prefix_ids: list[int] = []  # tokens whose keys/values sit in self._base
        self._base: list[KVCache] | None = None
        self.tokens_computed = 0  # forward-pass positions, for speed reports

    # -- tokenisation (the harness's rules) ------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Encode with the tokenizer's own BOS default, but never a second BOS when the text starts with one."""
        bos = getattr(self.tokenizer, "bos_token", None)
        if bos and text.startswith(bos):
            return self.tokenizer.encode(text, add_bos=False)
        return self.tokenizer.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            prefix = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id
            cont = self.tokenizer.encode(continuation, add_bos=False)
            return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return context_ids, whole[len(context_ids):]

    # -- scoring -------------------------------------------------------------------------------
    def score(self, context: str, continuations: Sequence[str]) -> list[ChoiceScore]:
        pairs = [self.encode_pair(context, c) for c in continuations]
        return self.score_tokens(pairs)

    @torch.inference_mode()
    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[ChoiceScore]:
        for _, cont in pairs:
            if not cont:
                raise ValueError("a continuation encoded to no tokens")
        context = pairs[0][0]
        shared = all(ctx == context for ctx, _ in pairs)
        too_long = max(len(ctx) + len(cont) for ctx, cont in pairs) > self.max_length + 1
        # Our caches are attached only while scoring; whatever the model had before is put back.
        before = [layer.attention.cache for layer in self.model.layers]
        try:
            if not shared or too_long:
                return [self._score_alone(ctx, cont) for ctx, cont in pairs]
            return self._score_shared(context, [cont for _, cont in pairs])
        finally:
            self._swap_caches(before)

    def _device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def _score_alone(self, context: list[int], continuation: list[int]) -> ChoiceScore:
        """One full forward without cache, left-truncated like the harness; the fallback path."""
        self._swap_caches(None)
        ids = (context + continuation)[-(self.max_length + 1):][:-1]
        tokens = torch.tensor([ids], device=self._device())
        hidden = self.model(tokens, return_hidden=True)[0, -len(continuation):]
        self.tokens_computed += len(ids)
        return self._gather(hidden, continuation)

    def _gather(self, hidden: Tensor, targets: list[int]) -> ChoiceScore:
        logprobs = F.log_softmax(self.model.lm_head(hidden).float(), dim=-1)
        target = torch.tensor(targets, device=logprobs.device)
        picked = logprobs.gather(-1, target[:, None])[:, 0]
        greedy = bool((logprobs.argmax(-1) == target).all())
        return ChoiceScore(float(picked.sum()), greedy, len(targets))

    def _score_shared(self, context: list[int], continuations: list[list[int]]) -> list[ChoiceScore]:
        model, device = self.model, self._device()
        C = len(context)
        # 1. Extend the batch-1 prefix cache to hold the context; the last context token is always computed
        # because its output scores every continuation's first token.
        reuse = min(_common_prefix(self._prefix_ids, context), C - 1)
        self._ensure_base(C)
        self._swap_caches(self._base)
        new = torch.tensor([context[reuse:]], device=device)
        key_mask = torch.ones(1, C, dtype=torch.bool, device=device) if reuse and len(new[0]) > 1 else None
        last_hidden = model(new, reuse, key_mask=key_mask, last_only=True, return_hidden=True)[0]
        self._prefix_ids = list(context)
        self.tokens_computed += C - reuse

        # 2. All continuations in one batch, each row starting from a copy of the context's cache.
        B = len(continuations)
        L = max(len(c) for c in continuations) - 1
        rows: list[Tensor] = []
        if L > 0:
            self._swap_caches(self._expanded_caches(C, B, C + L))
            inputs = torch.zeros(B, L, dtype=torch.long, device=device)
            for i, cont in enumerate(continuations):
                inputs[i, : len(cont) - 1] = torch.tensor(cont[:-1], device=device)
            key_mask = torch.ones(B, C + L, dtype=torch.bool, device=device)
            hidden = model(inputs, C, key_mask=key_mask, return_hidden=True)
            rows = [hidden[i, : len(cont) - 1] for i, cont in enumerate(continuations)]
            self.tokens_computed += sum(len(c) - 1 for c in continuations)
            self._swap_caches(self._base)
        scores = []
        for i, cont in enumerate(continuations):
            h = last_hidden if len(cont) == 1 else torch.cat([last_hidden, rows[i]])
            scores.append(self._gather(h, cont))
        return scores

    # -- cache plumbing ------------------------------------------------------------------------
    def _swap_caches(self, caches: list[KVCache] | None) -> None:
        for i, layer in enumerate(self.model.layers):
            layer.attention.cache = None if caches is None else caches[i]

    def _new_caches(self, batch: int, length: int) -> list[KVCache]:
        cfg, w = self.model.config, self.model.tok_embeddings.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        return [KVCache(batch, length, cfg.kv_heads, cfg.head_size, dtype, w.device) for _ in self.model.layers]

    def _ensure_base(self, length: int) -> None:
        """Grow the prefix cache (doubling, capped at max_length) and keep what it holds."""
        if self._base is not None and self._base[0].k.shape[2] >= length:
            return
        size = min(max(length, 2 * (self._base[0].k.shape[2] if self._base else 256)), self.max_length + 1)
        grown = self._new_caches(1, max(size, length))
        if self._base is not None:
            kept = self._base[0].k.shape[2]
            for old, new in zip(self._base, grown):
                new.k[:, :, :kept] = old.k
                new.v[:, :, :kept] = old.v
        self._base = grown

    def _expanded_caches(self, prefix_len: int, batch: int, length: int) -> list[KVCache]:
        caches = self._new_caches(batch, length)
        for base, cache in zip(self._base, caches):
            cache.k[:, :, :prefix_len] = base.k[:, :, :prefix_len]
            cache.v[:, :, :prefix_len] = base.v[:, :, :prefix_len]
        return caches

    def reset(self) -> None:
        """Forget the cached prefix (frees its memory)."""
        self._prefix_ids, self._base = [], None
