"""The sampler, the KV-cache decode loop, stop strings and streaming (tiny models, no checkpoint needed)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from llamaworks.config import get_preset
from llamaworks.generate import (
    ContextLengthError,
    SamplingParams,
    StopStringFilter,
    generate,
    generate_batch,
    generate_stream,
    sample_next,
    token_logprobs,
)
from llamaworks.model import Transformer


class ByteTokenizer:
    """A byte-level tokenizer: ids 0..255 are bytes, 256 BOS, 257 EOS, 258 an end-of-turn token."""

    vocab_size = 260
    bos_id, pad_id = 256, None
    add_bos = True
    bos_token, eos_token = "<s>", "</s>"
    chat_template = None

    def __init__(self) -> None:
        self.eos_id: int | None = 257
        self.stop_ids = {257, 258}

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        if self.add_bos if add_bos is None else add_bos:
            ids = [self.bos_id, *ids]
        return [*ids, self.eos_id] if add_eos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tiny_model(vocab_size: int = 260, seed: int = 0, **changes) -> Transformer:
    config = get_preset("tiny-llama3").replace(vocab_size=vocab_size, **changes)
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    model.reset_parameters(std=0.2)  # wider than the default so greedy choices are not near-ties
    return model


class ScriptedModel(Transformer):
    """Emits a fixed sequence of tokens after the prompt, whatever the input (to drive the loop exactly)."""

    def __init__(self, script: list[int], prompt_len: int, vocab_size: int = 260) -> None:
        super().__init__(get_preset("tiny-llama2").replace(vocab_size=vocab_size, max_seq_len=512))
        self.script, self.prompt_len = script, prompt_len

    def forward(self, tokens, start_pos=0, *, key_mask=None, positions=None, segment_ids=None,
                last_only=False, return_hidden=False):
        B, T = tokens.shape
        index = start_pos + T - self.prompt_len  # how many tokens were generated before this step
        logits = torch.zeros(B, 1, self.config.vocab_size)
        logits[:, :, self.script[min(index, len(self.script) - 1)]] = 10.0
        return logits


def test_greedy_is_argmax():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    got = sample_next(logits, [SamplingParams(temperature=0)] * 5, [[]] * 5, None)
    assert torch.equal(got, logits.argmax(-1))


def draws(logits: torch.Tensor, params: SamplingParams, n: int = 3000) -> Counter:
    gen = torch.Generator().manual_seed(1234)
    counts: Counter = Counter()
    for _ in range(n):
        counts[int(sample_next(logits[None], [params], [[]], [gen])[0])] += 1
    return counts


def probs_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log()


def test_top_k_restricts_support_to_k_best():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    counts = draws(logits, SamplingParams(temperature=1.0, top_k=3))
    assert set(counts) == set(logits.topk(3).indices.tolist())


def test_top_p_keeps_the_smallest_nucleus():
    logits = probs_logits([0.05, 0.5, 0.1, 0.3, 0.05])
    counts = draws(logits, SamplingParams(temperature=1.0, top_p=0.7))
    # 0.5 alone is below 0.7, 0.5 + 0.3 reaches it: the nucleus is {1, 3}, renormalised to 5:3.
    assert set(counts) == {1, 3}
    assert counts[1] / counts[3] == pytest.approx(5 / 3, rel=0.15)
    # Without top-p every token appears.
    assert set(draws(logits, SamplingParams(temperature=1.0))) == {0, 1, 2, 3, 4}


def test_min_p_drops_tokens_below_fraction_of_the_best():
    logits = probs_logits([0.05, 0.5, 0.1, 0.3, 0.05])
    counts = draws(logits, SamplingParams(temperature=1.0, min_p=0.15))  # threshold 0.075
    assert set(counts) == {1, 2, 3}


def test_temperature_sharpens_distribution():
    logits = probs_logits([0.4, 0.6])
    cold = draws(logits, SamplingParams(temperature=0.3), n=2000)
    hot = draws(logits, SamplingParams(temperature=1.0), n=2000)
    assert cold[1] > hot[1] + 300


def test_repetition_penalty_scales_seen_logits_only():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    params = [SamplingParams(temperature=1.0, repetition_penalty=2.0)]
    got = token_logprobs(logits, params, [[0, 1, 1]])
    expected = torch.log_softmax(torch.tensor([[1.0, -4.0, 1.0, 0.5]]), -1)
    torch.testing.assert_close(got, expected)
    # Greedy avoids the repeated token once the penalty is large enough.
    greedy = SamplingParams(temperature=0, repetition_penalty=3.0)
    assert sample_next(logits, [greedy], [[]])[0] == 0
    assert sample_next(logits, [greedy], [[0]])[0] == 2


def test_presence_and_frequency_penalties():
    logits = torch.zeros(1, 4)
    params = [SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.25)]
    got = token_logprobs(logits, params, [[2, 2, 2, 0]])
    expected = torch.log_softmax(torch.tensor([[-0.75, 0.0, -1.25, 0.0]]), -1)
    torch.testing.assert_close(got, expected)


def test_logprobs_apply_temperature_and_leave_input_untouched():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    before = logits.clone()
    got = token_logprobs(logits, [SamplingParams(temperature=0.5, repetition_penalty=1.5)], [[2]])
    assert torch.equal(logits, before)
    torch.testing.assert_close(got, torch.log_softmax(torch.tensor([[2.0, 4.0, 4.0]]), -1))


def test_same_seed_same_draws_different_seed_differs():
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1.0, seed=7)] * 4

    def run(seed: int) -> list[list[int]]:
        gens = [torch.Generator().manual_seed(seed) for _ in range(4)]
        return [sample_next(logits, params, [[]] * 4, gens).tolist() for _ in range(20)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_mixed_batch_rows_use_their_own_params():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=2)]
    got = sample_next(logits, params, [[]] * 3, [None, None, torch.Generator().manual_seed(0)])
    assert got[0] == logits[0].argmax() and got[1] == logits[1].argmax()


def test_invalid_params_raise_one_line_error():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


# -- stop strings ----------------------------------------------------------------------------------
def run_script(text_out: str, params: SamplingParams, prompt: str = "Q:", extra: tuple[int, ...] = ()):
    tok = ByteTokenizer()
    prompt_ids = tok.encode(prompt)
    script = [*text_out.encode("utf-8"), *extra]
    model = ScriptedModel(script, len(prompt_ids))
    items = list(generate_stream(model, tok, prompt_ids, params))
    chunks, result = items[:-1], items[-1]
    assert all(isinstance(c, str) and c for c in chunks)
    assert "".join(chunks) == result.text
    return chunks, result


def test_stop_string_split_across_tokens_is_removed_and_stops():
    params = SamplingParams(temperature=0, stop=["<END>"], max_new_tokens=100)
    chunks, result = run_script("Hello, world!<END> never shown", params)
    assert result.text == "Hello, world!"
    assert result.finish_reason == "stop" and result.stop_sequence == "<END>"
    assert result.completion_tokens == len("Hello, world!<END>")  # generation stopped right there
    assert not any("<" in c for c in chunks)


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    params = SamplingParams(temperature=0, stop=["<END>", "##"], max_new_tokens=100)
    _, result = run_script("a <EN b # c##tail", params)
    assert result.text == "a <EN b # c"
    assert result.stop_sequence == "##"


def test_held_back_text_is_released_at_length_limit():
    params = SamplingParams(temperature=0, stop=["<END>"], max_new_tokens=6)
    _, result = run_script("abc <ENxxxxx", params)
    assert result.text == "abc <E" and result.finish_reason == "length"


def test_eos_token_stops_and_is_not_decoded():
    params = SamplingParams(temperature=0, max_new_tokens=100)
    _, result = run_script("done", params, extra=(257, 65, 66))
    assert result.text == "done" and result.finish_reason == "stop"
    assert result.token_ids[-1] == 257
    _, result = run_script("turn", params, extra=(258, 65))  # end-of-turn id from tokenizer.stop_ids
    assert result.text == "turn" and result.finish_reason == "stop"
    _, result = run_script("ab", SamplingParams(temperature=0, stop_token_ids=[98]))  # 'b' as an extra stop id
    assert result.text == "a"


def test_stop_string_filter_direct():
    f = StopStringFilter(ByteTokenizer(), ["STOP"])
    out = [f.push(b) for b in b"xxSTxSTOPyy"]
    assert "".join(out) == "xxSTx" and f.stopped and f.matched == "STOP"


def test_korean_stream_never_emits_replacement_character():
    text = "안녕하세요! 한국어 스트리밍 테스트입니다. 🦙"
    chunks, result = run_script(text, SamplingParams(temperature=0, max_new_tokens=len(text.encode())))
    assert result.text == text
    assert not any("\ufffd" in c for c in chunks)
    assert len(chunks) > 5  # it really streamed, character by character


# -- decoding against references -----------------------------------------------------------------
def naive_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Re-run the full forward over the whole sequence each step (no cache)."""
    model.clear_cache()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("preset", ["tiny-llama3", "tiny-mistral"])
def test_kv_cache_generation_equals_naive_loop(preset):
    tok = ByteTokenizer()
    config = get_preset(preset).replace(vocab_size=260)
    torch.manual_seed(1)
    model = Transformer(config).eval()
    model.reset_parameters(std=0.2)
    prompt = tok.encode("The llama")
    params = SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=[])
    tok.stop_ids = set()  # let it run the full length
    tok.eos_id = None
    result = generate(model, tok, prompt, params)
    assert result.finish_reason == "length" and result.completion_tokens == 20
    assert result.token_ids == naive_greedy(model, prompt, 20)


def test_left_padded_batch_equals_one_by_one():
    tok = ByteTokenizer()
    tok.stop_ids, tok.eos_id = set(), None
    model = tiny_model()
    prompts = [tok.encode(p) for p in ["Hi", "A much longer prompt here", "Mid length"]]
    params = SamplingParams(temperature=0, max_new_tokens=12)
    batched = generate_batch(model, tok, prompts, params)
    single = [generate(model, tok, p, params) for p in prompts]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert [r.prompt_tokens for r in batched] == [len(p) for p in prompts]


def test_batched_rows_finish_independently():
    tok = ByteTokenizer()
    model = tiny_model()
    prompts = [tok.encode("one"), tok.encode("three tokens")]
    params = [SamplingParams(temperature=0, max_new_tokens=3), SamplingParams(temperature=0, max_new_tokens=9)]
    results = generate_batch(model, tok, prompts, params)
    assert results[0].completion_tokens <= 3 and results[1].completion_tokens <= 9
    tok.stop_ids, tok.eos_id = set(), None
    results = generate_batch(model, tok, prompts, params)
    assert [r.completion_tokens for r in results] == [3, 9]


def test_seeded_sampling_is_reproducible():
    tok = ByteTokenizer()
    model = tiny_model()
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_new_tokens=16)
    a = generate(model, tok, tok.encode("seed"), params)
    b = generate(model, tok, tok.encode("seed"), params)
    c = generate(model, tok, tok.encode("seed"), SamplingParams(temperature=1.0, top_p=0.95, seed=43,
                                                                 max_new_tokens=16))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_context_limit_errors_and_caps():
    tok = ByteTokenizer()
    tok.stop_ids, tok.eos_id = set(), None
    model = tiny_model()  # max_seq_len 256
    with pytest.raises(ContextLengthError, match="300 tokens"):
        generate(model, tok, [65] * 300, SamplingParams(temperature=0))
    with pytest.raises(ContextLengthError):
        generate(model, tok, [65] * 20, SamplingParams(temperature=0), max_context=20)
    result = generate(model, tok, [65] * 250, SamplingParams(temperature=0, max_new_tokens=100))
    assert result.completion_tokens == 6 and result.finish_reason == "length"
    result = generate(model, tok, [65] * 10, SamplingParams(temperature=0, max_new_tokens=100), max_context=16)
    assert result.completion_tokens == 6


def test_timings_reported():
    tok = ByteTokenizer()
    tok.stop_ids, tok.eos_id = set(), None
    result = generate(tiny_model(), tok, tok.encode("time me"), SamplingParams(temperature=0, max_new_tokens=8))
    assert result.prefill_seconds > 0 and result.decode_seconds > 0
    # The rates are the token counts over those times: prompt tokens in prefill, every token after the first in
    # decode (the first comes out of prefill).
    assert result.prefill_tokens_per_second == pytest.approx(result.prompt_tokens / result.prefill_seconds)
    assert result.decode_tokens_per_second == pytest.approx((result.completion_tokens - 1) / result.decode_seconds)


def test_korean_stream_with_real_byte_level_bpe(smollm2_gguf):
    """SmolLM2's byte-level BPE splits Hangul syllables across tokens: chunks must still be whole characters."""
    from llamaworks.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_gguf)
    text = "안녕하세요! 한국어 스트리밍 테스트입니다. 🦙 끝."
    script = tok.encode(text, add_bos=False)
    assert any("\ufffd" in tok.decode([i]) for i in script)  # the hard case really occurs
    prompt = tok.encode("<|im_start|>user\n인사해 줘<|im_end|>\n<|im_start|>assistant\n", add_bos=False)
    model = ScriptedModel([*script, tok.eos_id], len(prompt), vocab_size=tok.vocab_size)
    items = list(generate_stream(model, tok, prompt, SamplingParams(temperature=0, max_new_tokens=200)))
    chunks, result = items[:-1], items[-1]
    assert result.text == text and result.finish_reason == "stop"
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)
    assert len(chunks) >= 10


@pytest.mark.slow
def test_greedy_matches_transformers_on_default_model(smollm2_ours, smollm2_transformers):
    """32 greedy tokens (or up to the shared end-of-turn token) equal transformers' greedy generate."""
    from llamaworks.chat_template import template_for

    model, tok, _ = smollm2_ours
    template = template_for(tok)
    hf = smollm2_transformers
    compared = 0
    for question in ["Write a haiku about llamas.", "List three prime numbers.", "Explain what a rainbow is."]:
        text = template.render([{"role": "user", "content": question}], add_generation_prompt=True)
        ids = tok.encode(text, add_bos=False)
        x = torch.tensor([ids])
        with torch.no_grad():  # an explicit mask: the prompt contains the pad id (<|im_end|>)
            expected = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                                   eos_token_id=sorted(tok.stop_ids), pad_token_id=tok.pad_id)[0, len(ids):]
        got = generate(model, tok, ids, SamplingParams(temperature=0, max_new_tokens=32))
        assert got.token_ids == expected.tolist(), question
        compared += len(got.token_ids)
    assert compared >= 64


def test_draw_follows_the_distribution_and_never_picks_a_filtered_token():
    from llamaworks.generate import draw

    probs = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.stack([draw(probs, g) for _ in range(20000)]), minlength=5).float() / 20000
    assert counts[1] == 0 and counts[4] == 0  # zero probability: never drawn, even as the last index
    assert torch.allclose(counts, probs, atol=0.015)  # 20k draws: standard error <= 0.0035
    assert draw(torch.tensor([0.0, 0.0, 3.0]), g) == 2  # unnormalised weights are fine
    for bad in ([0.0, 0.0], [0.5, float("nan")], [0.5, -0.1]):
        with pytest.raises(ValueError, match="finite, non-negative"):
            draw(torch.tensor(bad), g)
