"""Per-item metrics and their aggregation, as lm-evaluation-harness computes them.

acc       argmax of the choices' log-likelihoods is the gold index
acc_norm  argmax of log-likelihood / len(choice text in characters; no target delimiter) is the gold index
mc2       exp(ll) normalised over all choices, summed over the true ones (TruthfulQA; reported as "acc")
stderr    sample standard deviation (n-1) / sqrt(n); a size-weighted group (MMLU) pools the subtask variances
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def argmax(values: Sequence[float]) -> int:
    """First index of the maximum, like numpy.argmax (ties go to the earliest choice)."""
    return int(np.argmax(np.asarray(values, dtype=np.float64)))


def acc(logprobs: Sequence[float], gold: int) -> float:
    return 1.0 if argmax(logprobs) == gold else 0.0


def acc_norm(logprobs: Sequence[float], choices: Sequence[str], gold: int) -> float:
    lengths = np.array([float(len(c)) for c in choices])
    return 1.0 if argmax(np.asarray(logprobs, dtype=np.float64) / lengths) == gold else 0.0


def mc2(logprobs: Sequence[float], labels: Sequence[int]) -> float:
    # Shifting by the max changes nothing mathematically, but keeps exp() from underflowing to 0/0 on very
    # long answers (where the harness's plain exp() would give NaN).
    lls = np.asarray(logprobs, dtype=np.float64)
    probs = np.exp(lls - lls.max())
    probs = probs / probs.sum()
    return float(probs[np.asarray(labels) == 1].sum())


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def mean_stderr(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
    """Stderr of the size-weighted mean of subtasks, from their stderrs (the harness's group formula)."""
    if sum(sizes) - len(sizes) <= 0:
        return float("nan")
    # A one-item subtask has no stderr (NaN) but also no weight here: (n - 1) = 0.
    var = sum((n - 1) * s**2 * n for s, n in zip(stderrs, sizes) if n > 1) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))


def unweighted_stderr(stderrs: Sequence[float]) -> float:
    """Stderr of the plain mean of k independent subtask means: sqrt(sum se_i^2) / k (NaN if any is unknown)."""
    return math.sqrt(sum(s**2 for s in stderrs)) / len(stderrs) if stderrs else float("nan")
