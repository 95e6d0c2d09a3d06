"""Sliding-window perplexity: every token after the first scored once, with the context the window allows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eval_support import backend_of, tiny_model
from llamaworks.errors import ConfigError
from llamaworks.eval.perplexity import perplexity, perplexity_of_ids

pytestmark = pytest.mark.usefixtures("one_thread")


class ByteTokenizer:
    """Bytes as tokens (+ BOS 256): simple enough that the expected counts are obvious."""

    bos_id, eos_id, bos_token = 256, 257, "<s>"

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        return ([256] if add_bos is not False else []) + list(text.encode("utf-8"))


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=258)


def token_logprob(model, ids: list[int], j: int, left: int) -> float:
    """log P(ids[j] | ids[left:j]) by a plain forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[left:j]]))[0, -1]
    return float(F.log_softmax(logits.double(), -1)[ids[j]])


def test_full_window_equals_direct_sum(model):
    ids = ByteTokenizer().encode("hello world, this is a test")
    nll, scored = perplexity_of_ids(backend_of(model, rows=1), ids, max_length=64, stride=64)
    assert scored == len(ids) - 1
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([ids[:-1]])).double(), -1)[0]
    expected = -float(logprobs.gather(-1, torch.tensor(ids[1:])[:, None]).sum())
    assert nll == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(("max_length", "stride"), [(8, 3), (8, 8), (5, 1)])
def test_sliding_window_context_per_token(model, max_length, stride):
    ids = ByteTokenizer().encode("abcdefghijklmnopqrstuvw")  # 24 tokens with BOS
    nll, scored = perplexity_of_ids(backend_of(model, rows=1), ids, max_length=max_length, stride=stride)
    assert scored == len(ids) - 1
    # Chunks of `stride` targets; each chunk's window ends right before its last target, max_length long.
    expected, start = 0.0, 1
    while start < len(ids):
        stop = min(start + stride, len(ids))
        left = max(0, stop - 1 - max_length)
        expected -= sum(token_logprob(model, ids, j, left) for j in range(start, stop))
        start = stop
    assert nll == pytest.approx(expected, abs=1e-4)


def test_result_fields_and_bits_per_byte(model):
    text = "naïve café " * 3  # multi-byte characters: bytes != characters
    r = perplexity(backend_of(model, rows=1), ByteTokenizer(), text, max_length=16, stride=8)
    n_bytes = len(text.encode("utf-8"))
    assert r.bytes == n_bytes and r.tokens == n_bytes  # byte tokens after the BOS
    assert r.perplexity == pytest.approx(math.exp(r.nll / r.tokens))
    assert r.bits_per_byte == pytest.approx(r.nll / math.log(2) / n_bytes)
    assert r.to_dict()["stride"] == 8
    with pytest.raises(ConfigError, match=r"--stride must be in 1\.\.max_length"):
        perplexity(backend_of(model, rows=1), ByteTokenizer(), text, max_length=4, stride=5)
