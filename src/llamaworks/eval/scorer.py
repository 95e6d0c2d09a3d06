"""THE log-likelihood scorer: log P(continuation | context) for every choice of a multiple-choice item.

Tokenisation follows lm-evaluation-harness for causal models: trailing whitespace of the context moves to the
continuation, then `context + continuation` is encoded whole and the continuation's tokens are what follows
the first len(encode(context)) tokens; the model input is encode(context) + those tokens. An empty context
is replaced by the BOS (else EOS) token.

It runs on any backend (engine/backend.py: the native one or TorchBackend). Speed comes from computing each
context once and from few, large forward calls: items are scored in batches; each item's context goes in a row of
its own (a context row), then is copied (`backend.copy`) into one row per choice of more than one token, and the
choices' continuation tokens of the whole batch run in one `backend.forward` call, each choice in its own row. A
batch takes items while their new context tokens stay within `batch_tokens` and their rows within the backend's:
every weight is then read once for many items' tokens. Context rows are kept between batches and only the tokens
after the longest common prefix with what a row held are computed, so MMLU's shared 5-shot block or TruthfulQA's
preamble is computed once per run. Logits are asked for only at the positions that are scored; log-softmax is
taken in float64. A token's result does not depend on the other tokens of its forward call (each row attends
only to itself), so batching changes no score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..engine.backend import Backend, context_of


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


def _logprobs(logits: np.ndarray, targets: Sequence[int]) -> tuple[np.ndarray, bool]:
    """(log P of each target, whether every target is the argmax) from float logits (n, vocab), in float64."""
    x = logits.astype(np.float64)
    top = x.max(-1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(x - top).sum(-1))
    target = np.asarray(targets)
    picked = x[np.arange(len(target)), target] - lse
    return picked, bool((x.argmax(-1) == target).all())


class LoglikelihoodScorer:
    """Scores (context, continuations) with a backend and a llamaworks Tokenizer.

    tokenizer:    default the backend's own.
    max_length:   the longest model input; longer inputs lose tokens on the left, as in the harness
                  (default and at most: the backend's positions per row).
    batch_tokens: a batch of items stops taking items once their new context tokens reach this many.
    """

    def __init__(self, backend: Backend, tokenizer: Any = None, *, max_length: int | None = None,
                 batch_tokens: int = 96) -> None:
        self.backend = backend
        self.tokenizer = tokenizer if tokenizer is not None else backend.tokenizer
        self.max_length = min(max_length or context_of(backend), context_of(backend))
        self.batch_tokens = batch_tokens
        self._row_ids: dict[int, list[int]] = {}  # row -> tokens whose keys/values it holds
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
        return self.score_many([(context, continuations)])[0]

    def score_many(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[list[ChoiceScore]]:
        """The scores of every item's continuations, items batched into few forward calls."""
        return self.score_tokens_many([[self.encode_pair(ctx, c) for c in conts] for ctx, conts in items])

    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[ChoiceScore]:
        return self.score_tokens_many([pairs])[0]

    def score_tokens_many(self, items: Sequence[Sequence[tuple[list[int], list[int]]]]) -> list[list[ChoiceScore]]:
        results: list[list[ChoiceScore]] = [[] for _ in items]
        batch: list[int] = []
        batch_tokens = batch_rows = 0

        def flush() -> None:
            nonlocal batch_tokens, batch_rows
            if batch:
                scored = self._score_batch([items[i][0][0] for i in batch],
                                           [[cont for _, cont in items[i]] for i in batch])
                for i, scores in zip(batch, scored):
                    results[i] = scores
            batch.clear()
            batch_tokens = batch_rows = 0

        for index, pairs in enumerate(items):
            for _, cont in pairs:
                if not cont:
                    raise ValueError("a continuation encoded to no tokens")
            context = pairs[0][0]
            shared = all(ctx == context for ctx, _ in pairs)
            too_long = max(len(ctx) + len(cont) for ctx, cont in pairs) > self.max_length + 1
            if not shared or too_long:
                flush()
                results[index] = [self._score_alone(ctx, cont) for ctx, cont in pairs]
                continue
            rows = 1 + sum(len(cont) > 1 for _, cont in pairs)  # its context row and its longer choices' rows
            new = len(context) - _common_prefix(self._row_ids.get(len(batch), []), context)
            if batch and (batch_rows + rows > self.backend.max_rows or batch_tokens + new > self.batch_tokens):
                flush()
                new = len(context) - _common_prefix(self._row_ids.get(0, []), context)
            batch.append(index)
            batch_rows += rows
            batch_tokens += new
        flush()
        return results

    def _forward(self, rows: list[int], tokens: list[int], positions: list[int], logits_for: list[int]) -> np.ndarray:
        logits = self.backend.forward(rows, tokens, positions, logits_for)
        self.tokens_computed += len(tokens)
        return logits

    def _score_alone(self, context: list[int], continuation: list[int]) -> ChoiceScore:
        """One sequence in row 0, left-truncated like the harness; the fallback path."""
        ids = (context + continuation)[-(self.max_length + 1):][:-1]
        n = len(continuation)
        reuse = min(_common_prefix(self._row_ids.get(0, []), ids), len(ids) - n)
        self._row_ids[0] = []  # (until the call has written the row)
        logits = self._forward([0] * (len(ids) - reuse), ids[reuse:], list(range(reuse, len(ids))),
                               list(range(len(ids) - reuse - n, len(ids) - reuse)))
        self._row_ids[0] = list(ids)
        picked, greedy = _logprobs(logits, continuation)
        return ChoiceScore(float(picked.sum()), greedy, n)

    def _score_batch(self, contexts: list[list[int]], continuations: list[list[list[int]]]) -> list[list[ChoiceScore]]:
        # 1. Item j's context in row j, only what follows the row's common prefix with it; its last token is
        # always computed: it scores every choice's first token.
        rows: list[int] = []
        tokens: list[int] = []
        positions: list[int] = []
        last: list[int] = []
        for j, context in enumerate(contexts):
            reuse = min(_common_prefix(self._row_ids.get(j, []), context), len(context) - 1)
            self._row_ids[j] = []  # (until the call has written the row)
            rows += [j] * (len(context) - reuse)
            tokens += context[reuse:]
            positions += range(reuse, len(context))
            last.append(len(tokens) - 1)
        first = self._forward(rows, tokens, positions, last)
        for j, context in enumerate(contexts):
            self._row_ids[j] = list(context)
        # 2. Choices of more than one token: each in a row holding a copy of its context, all in one forward call
        # (with one row only, one by one in row 0 after the context).
        spare = list(range(len(contexts), self.backend.max_rows)) or [0]
        longer = [(j, i) for j, conts in enumerate(continuations) for i, cont in enumerate(conts) if len(cont) > 1]
        logits: dict[tuple[int, int], np.ndarray] = {}
        for g in range(0, len(longer), len(spare)):
            group = longer[g:g + len(spare)]
            rows, tokens, positions = [], [], []
            for row, (j, i) in zip(spare, group):
                C = len(contexts[j])
                if row != j:
                    self.backend.copy(j, row, C)
                    self._row_ids[row] = list(contexts[j])
                inputs = continuations[j][i][:-1]
                rows += [row] * len(inputs)
                tokens += inputs
                positions += range(C, C + len(inputs))
            out = self._forward(rows, tokens, positions, list(range(len(tokens))))
            start = 0
            for j, i in group:
                n = len(continuations[j][i]) - 1
                logits[j, i] = out[start:start + n]
                start += n
        scores = []
        for j, conts in enumerate(continuations):
            item = []
            for i, cont in enumerate(conts):
                rows_logits = np.concatenate([first[j:j + 1], logits[j, i]]) if (j, i) in logits else first[j:j + 1]
                picked, greedy = _logprobs(rows_logits, cont)
                item.append(ChoiceScore(float(picked.sum()), greedy, len(cont)))
            scores.append(item)
        return scores

    def reset(self) -> None:
        """Forget the cached prefixes (their memory, and the choices' rows', goes back where the backend can)."""
        self._row_ids = {}
        for row in range(self.backend.max_rows):
            self.backend.release(row)
