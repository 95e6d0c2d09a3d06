"""Perplexity of a text with a sliding window (stride), and bits per byte.

The text is encoded once (with the tokenizer's BOS default). Tokens are scored `stride` at a time, each chunk
in one forward pass over a window of at most `max_length` tokens that ends just before the chunk's last token,
so every token after the first is scored exactly once and sees at least max_length - stride + 1 tokens of
context (stride = max_length: fastest, least context). The first token has no context and is not scored
(with a BOS token, that is the BOS itself). Windows run in row 0 of any backend (engine/backend.py); log-softmax
is taken in float64.
    perplexity    = exp(total NLL / tokens scored)
    bits_per_byte = total NLL / ln 2 / UTF-8 bytes of the text
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from ..engine.backend import Backend, context_of
from ..errors import ConfigError


@dataclass(frozen=True)
class PerplexityResult:
    tokens: int  # tokens scored
    bytes: int
    nll: float  # total negative log-likelihood in nats
    perplexity: float
    bits_per_byte: float
    max_length: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def _nll(logits: np.ndarray, targets: list[int], chunk: int = 256) -> float:
    """Negative log-likelihood of the targets under float logits (n, vocab), in float64 a chunk of rows at a time."""
    total = 0.0
    for s in range(0, len(targets), chunk):
        x = logits[s:s + chunk].astype(np.float64)
        top = x.max(-1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(x - top).sum(-1))
        total -= float((x[np.arange(len(x)), targets[s:s + chunk]] - lse).sum())
    return total


def perplexity_of_ids(backend: Backend, ids: list[int], *, max_length: int | None = None, stride: int | None = None,
                      on_window: Callable[[int, int], None] | None = None) -> tuple[float, int]:
    """(total NLL, tokens scored) of `ids` on `backend` (max_length: at most its positions per row)."""
    max_length = max_length or context_of(backend)
    stride = stride or max_length // 2 or 1
    if not 0 < stride <= max_length:
        raise ConfigError(f"--stride must be in 1..max_length ({max_length}), got {stride}")
    if max_length > context_of(backend):
        raise ConfigError(f"--max-length {max_length} is more than the model's {context_of(backend)} positions")
    nll, scored, start = 0.0, 0, 1  # tokens [start, stop) are scored next
    while start < len(ids):
        stop = min(start + stride, len(ids))
        # Token j is predicted from position j-1, so the window is ids[left : stop-1], at most max_length long.
        left = max(0, stop - 1 - max_length)
        window = ids[left: stop - 1]
        logits = backend.forward([0] * len(window), window, range(len(window)), range(start - 1 - left, len(window)))
        nll += _nll(logits, ids[start:stop])
        scored += stop - start
        start = stop
        if on_window:
            on_window(stop, len(ids))
    backend.release(0)
    return nll, scored


def perplexity(backend: Backend, tokenizer, text: str, *, max_length: int | None = None, stride: int | None = None,
               on_window: Callable[[int, int], None] | None = None) -> PerplexityResult:
    ids = tokenizer.encode(text)
    max_length = max_length or context_of(backend)
    stride = stride or max_length // 2 or 1
    nll, scored = perplexity_of_ids(backend, ids, max_length=max_length, stride=stride, on_window=on_window)
    n_bytes = len(text.encode("utf-8"))
    return PerplexityResult(tokens=scored, bytes=n_bytes, nll=nll,
                            perplexity=math.exp(nll / scored) if scored else float("nan"),
                            bits_per_byte=nll / math.log(2) / n_bytes if n_bytes else float("nan"),
                            max_length=max_length, stride=stride)


def perplexity_main(*, model: str | None, files: list[str], max_length: int | None = None,
                    stride: int | None = None, out: str | None = None, progress: bool = True) -> str:
    """What `llamaworks perplexity` does: one line per file (and a JSON file with --out); returns the text."""
    import sys
    from pathlib import Path

    from tqdm import tqdm

    from ..engine.backend import EngineOptions
    from ..engine.torch_backend import TorchBackend
    from ..errors import FormatError

    texts = {}
    for name in files:
        try:
            texts[name] = Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FormatError(f"{name}: cannot read as UTF-8 text ({e})") from None
    # The float reference (as perplexity has always been measured): float weights, float32 activations and cache.
    backend = TorchBackend.load(model, EngineOptions(kv_dtype="float32"), reference=True)
    lines, results = [], {}
    for name, text in texts.items():
        with tqdm(total=1, unit="tok", desc=Path(name).name, disable=not progress, file=sys.stderr) as bar:
            def step(done: int, total: int, bar=bar) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            r = perplexity(backend, backend.tokenizer, text, max_length=max_length, stride=stride, on_window=step)
        results[name] = r.to_dict()
        lines.append(f"{name}: tokens {r.tokens}  perplexity {r.perplexity:.4f}  bits/byte {r.bits_per_byte:.4f}  "
                     f"(window {r.max_length}, stride {r.stride})")
    if out:
        from .report import write_json

        write_json({"perplexity": results, "model": str(model) if model else None}, out)
    return "\n".join(lines)
