"""THE log-likelihood scorer: log P(continuation | context) for every choice of a multiple-choice item.

Tokenisation follows lm-evaluation-harness for causal models: trailing whitespace of the context moves to the
continuation, then `context + continuation` is encoded whole and the continuation's tokens are what follows
the first len(encode(context)) tokens; the model input is encode(context) + those tokens. An empty context
is replaced by the BOS (else EOS) token.

It runs on any backend (engine/backend.py: the native one or TorchBackend). Speed comes from computing the
shared context once: it is kept in cache row 0, copied (`backend.copy`) into one row per choice, and all the
choices' continuation tokens run in one `backend.forward` call, each in its own row. Row 0 is kept between items
and only the tokens after the longest common prefix with the previous input are computed, so MMLU's shared 5-shot
block or TruthfulQA's preamble is computed once per run. Logits are asked for only at the positions that are
scored; log-softmax is taken in float64.
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

    tokenizer:  default the backend's own.
    max_length: the longest model input; longer inputs lose tokens on the left, as in the harness
                (default and at most: the backend's positions per row).
    """

    def __init__(self, backend: Backend, tokenizer: Any = None, *, max_length: int | None = None) -> None:
        self.backend = backend
        self.tokenizer = tokenizer if tokenizer is not None else backend.tokenizer
        self.max_length = min(max_length or context_of(backend), context_of(backend))
        self._prefix_ids: list[int] = []  # tokens whose keys/values sit in row 0
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

    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[ChoiceScore]:
        for _, cont in pairs:
            if not cont:
                raise ValueError("a continuation encoded to no tokens")
        context = pairs[0][0]
        shared = all(ctx == context for ctx, _ in pairs)
        too_long = max(len(ctx) + len(cont) for ctx, cont in pairs) > self.max_length + 1
        if not shared or too_long:
            return [self._score_alone(ctx, cont) for ctx, cont in pairs]
        return self._score_shared(context, [cont for _, cont in pairs])

    def _extend_row0(self, ids: list[int], n_logits: int) -> np.ndarray:
        """Make row 0 hold `ids`, computing only what follows its common prefix with what it held; the logits
        of the last n_logits tokens."""
        reuse = min(_common_prefix(self._prefix_ids, ids), len(ids) - n_logits)
        new = ids[reuse:]
        self._prefix_ids = []  # (until the call has written the row)
        logits = self.backend.forward([0] * len(new), new, range(reuse, len(ids)),
                                      range(len(new) - n_logits, len(new)))
        self._prefix_ids = list(ids)
        self.tokens_computed += len(new)
        return logits

    def _score_alone(self, context: list[int], continuation: list[int]) -> ChoiceScore:
        """One sequence in row 0, left-truncated like the harness; the fallback path."""
        ids = (context + continuation)[-(self.max_length + 1):][:-1]
        picked, greedy = _logprobs(self._extend_row0(ids, len(continuation)), continuation)
        return ChoiceScore(float(picked.sum()), greedy, len(continuation))

    def _score_shared(self, context: list[int], continuations: list[list[int]]) -> list[ChoiceScore]:
        C = len(context)
        # 1. Row 0 holds the context; its last token is always computed: it scores every choice's first token.
        first = self._extend_row0(context, 1)
        # 2. Choices of more than one token: each in a row holding a copy of the context, all in one forward call
        # (groups of max_rows - 1 choices; with one row only, one by one in row 0 after the context).
        logits: dict[int, np.ndarray] = {}
        longer = [i for i, cont in enumerate(continuations) if len(cont) > 1]
        spare = list(range(1, self.backend.max_rows)) or [0]
        for g in range(0, len(longer), len(spare)):
            group = longer[g:g + len(spare)]
            rows: list[int] = []
            tokens: list[int] = []
            positions: list[int] = []
            for row, i in zip(spare, group):
                if row:
                    self.backend.copy(0, row, C)
                inputs = continuations[i][:-1]
                rows += [row] * len(inputs)
                tokens += inputs
                positions += range(C, C + len(inputs))
            out = self.backend.forward(rows, tokens, positions, range(len(tokens)))
            start = 0
            for i in group:
                n = len(continuations[i]) - 1
                logits[i] = out[start:start + n]
                start += n
            self.tokens_computed += len(tokens)
        scores = []
        for i, cont in enumerate(continuations):
            rows_logits = np.concatenate([first, logits[i]]) if i in logits else first
            picked, greedy = _logprobs(rows_logits, cont)
            scores.append(ChoiceScore(float(picked.sum()), greedy, len(cont)))
        return scores

    def reset(self) -> None:
        """Forget the cached prefix (its memory, and the choices' rows', goes back where the backend can)."""
        self._prefix_ids = []
        for row in range(self.backend.max_rows):
            self.backend.release(row)
