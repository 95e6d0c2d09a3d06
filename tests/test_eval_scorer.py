"""The log-likelihood scorer: harness tokenisation, and values equal to a direct full forward + log_softmax."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eval_support import backend_of, default_tokenizer, tiny_model
from llamaworks.eval.scorer import LoglikelihoodScorer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def direct_loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The plain definition: one forward over context+continuation[:-1], log_softmax, gather."""
    ids = context + continuation
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([ids[:-1]])).double(), dim=-1)[0]
    rows = logprobs[len(context) - 1:]
    target = torch.tensor(continuation)
    return float(rows.gather(-1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def test_encode_pair_moves_trailing_space_and_splits_the_whole_encoding(tokenizer, model):
    scorer = LoglikelihoodScorer(backend_of(model), tokenizer)
    ctx, cont = scorer.encode_pair("Question: Why?\nAnswer: ", "Because")
    # The harness: context "Question: Why?\nAnswer:", continuation " Because", whole string encoded then split.
    expected_ctx = tokenizer.encode("Question: Why?\nAnswer:")
    assert ctx == expected_ctx
    assert cont == tokenizer.encode("Question: Why?\nAnswer: Because")[len(expected_ctx):]
    assert cont == tokenizer.encode(" Because", add_bos=False)
    # Empty context: the BOS (else EOS) token stands in for it.
    ctx, cont = scorer.encode_pair("", " hello")
    assert ctx == [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id]
    assert cont == tokenizer.encode(" hello", add_bos=False)


def test_loglikelihoods_equal_direct_computation(tokenizer, model):
    scorer = LoglikelihoodScorer(backend_of(model), tokenizer)
    items = [
        ("Question: What is 2+2?\nAnswer:", [" four", " five apples and more", " x", " 22"]),
        # shares a long token prefix with the previous context: exercises the prefix-cache reuse
        ("Question: What is 2+2?\nAnswer: four\n\nQuestion: Why?\nAnswer:", [" because", " it is so", " no"]),
        ("Question: What is 2+2?\nAnswer: ", ["four", "5"]),  # trailing space moves to the continuation
        ("Question: What is 2+2?\nAnswer:", [" four", " x"]),  # same context again: everything reused but 1
        ("Completely different text", [" here", " and there and everywhere else too"]),
        ("", [" hello world", " bye"]),
    ]
    for context, continuations in items:
        scores = scorer.score(context, continuations)
        assert len(scores) == len(continuations)
        for cont, got in zip(continuations, scores):
            ctx_ids, cont_ids = scorer.encode_pair(context, cont)
            expected, greedy = direct_loglikelihood(model, ctx_ids, cont_ids)
            assert got.logprob == pytest.approx(expected, abs=1e-5, rel=1e-6), (context, cont)
            assert got.n_tokens == len(cont_ids)
            assert got.is_greedy == greedy


def test_cache_reuse_computes_the_context_once(tokenizer, model):
    scorer = LoglikelihoodScorer(backend_of(model), tokenizer)
    context = "The following are questions. " * 20
    conts = [" yes", " no", " maybe so"]
    scorer.score(context, conts)
    first = scorer.tokens_computed
    n_ctx = len(scorer.encode_pair(context, " yes")[0])
    extra = sum(len(scorer.encode_pair(context, c)[1]) - 1 for c in conts)
    assert first == n_ctx + extra  # context once, plus each continuation's inputs
    scorer.score(context, conts)
    assert scorer.tokens_computed - first == 1 + extra  # second time: only the last context token


def test_left_truncation_matches_the_harness(tokenizer, model):
    scorer = LoglikelihoodScorer(backend_of(model), tokenizer, max_length=12)
    context = "one two three four five six seven eight nine ten eleven twelve"
    cont = " thirteen fourteen"
    ctx_ids, cont_ids = scorer.encode_pair(context, cont)
    assert len(ctx_ids) + len(cont_ids) > 13
    (got,) = scorer.score(context, [cont])
    ids = (ctx_ids + cont_ids)[-13:]  # the harness keeps the last max_length + 1 tokens
    expected, _ = direct_loglikelihood(model, ids[: len(ids) - len(cont_ids)], cont_ids)
    assert got.logprob == pytest.approx(expected, abs=1e-5)


def test_grouped_query_sliding_window_model(tokenizer):
    model = tiny_model(sliding_window=8, n_kv_heads=1)
    scorer = LoglikelihoodScorer(backend_of(model), tokenizer)
    context = "a b c d e f g h i j k l m n o p"
    for _ in range(2):  # second round reuses the prefix
        for cont, got in zip([" q r s", " z"], scorer.score(context, [" q r s", " z"])):
            expected, _ = direct_loglikelihood(model, *scorer.encode_pair(context, cont))
            assert got.logprob == pytest.approx(expected, abs=1e-5)


def _counting(forward, calls: list[int]):
    def counted(*args, **kwargs):
        calls.append(len(args[1]))
        return forward(*args, **kwargs)
    return counted


def test_batched_items_equal_direct_computation_in_two_forward_calls(tokenizer, model):
    """score_many puts several items' contexts in one forward call and all their choices in a second; every
    score stays the direct computation's, whatever else shares its call. With fewer rows the batch splits."""
    items = [
        ("Question: Which is largest?\nAnswer:", [" the sun", " a cat", " B"]),
        ("Question: Which is smallest?\nAnswer:", [" an atom of hydrogen", " x"]),
        ("Completely different text here", [" and there", " ok"]),
    ]
    for rows, expected_calls in [(12, 2), (5, 4)]:  # 3 context rows + 4 choice rows fit in 12, not in 5
        backend = backend_of(model, rows=rows)
        calls: list[int] = []
        backend.forward = _counting(backend.forward, calls)
        scorer = LoglikelihoodScorer(backend, tokenizer, batch_tokens=1000)
        got = scorer.score_many(items)
        assert len(calls) == expected_calls, calls
        for (context, continuations), scores in zip(items, got):
            for cont, score in zip(continuations, scores):
                expected, greedy = direct_loglikelihood(model, *scorer.encode_pair(context, cont))
                assert score.logprob == pytest.approx(expected, abs=1e-5, rel=1e-6), (rows, context, cont)
                assert score.is_greedy == greedy
