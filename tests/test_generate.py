"""The one sampler, the one generation loop (the scheduler), stop strings and streaming (tiny models)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from llamaworks.config import get_preset
from llamaworks.engine import scheduler as engine
from llamaworks.model import Transformer
from llamaworks.sampling import (
    ContextLengthError,
    SamplingParams,
    StopStringFilter,
    sample_token,
    token_logprobs,
)
from serve_testutil import engine_for


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


class ScriptedBackend:
    """A backend that emits a fixed sequence of tokens after the prompt, whatever the input (drives the loop
    exactly): the logits scored at position p favour script[p - (prompt_len - 1)]."""

    name = "scripted"
    chat_template = None

    def __init__(self, script: list[int], prompt_len: int, tokenizer, vocab_size: int = 260) -> None:
        from llamaworks.engine.backend import EngineOptions

        self.generation_config: dict = {}
        self.config = get_preset("tiny-llama2").replace(vocab_size=vocab_size, max_seq_len=512)
        self.options = EngineOptions()
        self.tokenizer = tokenizer
        self.script, self.prompt_len = script, prompt_len
        self.max_rows = 1

    def forward(self, rows, tokens, positions, logits_for):
        out = np.zeros((len(logits_for), self.config.vocab_size), np.float32)
        for j, i in enumerate(logits_for):
            out[j, self.script[min(positions[i] - (self.prompt_len - 1), len(self.script) - 1)]] = 10.0
        return out

    def copy(self, src, dst, length):
        pass

    def release(self, row, keep=0):
        pass

    def cache_bytes(self):
        return 0


def _rng(seed: int = 1234) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_greedy_is_argmax():
    logits = _rng(0).standard_normal((5, 300)).astype(np.float32)
    got = [sample_token(row, SamplingParams(temperature=0), [], _rng()) for row in logits]
    assert got == logits.argmax(-1).tolist()


def draws(logits: np.ndarray, params: SamplingParams, n: int = 3000) -> Counter:
    rng = _rng()
    return Counter(sample_token(logits, params, [], rng) for _ in range(n))


def probs_logits(probs: list[float]) -> np.ndarray:
    return np.log(np.array(probs, dtype=np.float32))


def test_top_k_restricts_support_to_k_best():
    logits = _rng(3).standard_normal(50).astype(np.float32)
    counts = draws(logits, SamplingParams(temperature=1.0, top_k=3))
    assert set(counts) == set(np.argsort(-logits)[:3].tolist())


def test_top_p_keeps_the_smallest_nucleus():
    logits = probs_logits([0.05, 0.5, 0.1, 0.3, 0.05])
    counts = draws(logits, SamplingParams(temperature=1.0, top_p=0.7))
    # 0.5 alone is below 0.7, 0.5 + 0.3 reaches it: the nucleus is {1, 3}, renormalised to 5:3.
    assert set(counts) == {1, 3}
    assert counts[1] / counts[3] == pytest.approx(5 / 3, rel=0.15)
    # Without top-p every token appears.
    assert set(draws(logits, SamplingParams(temperature=1.0))) == {0, 1, 2, 3, 4}


def test_top_p_matches_transformers_top_p_warper():
    """The nucleus equals transformers' TopPLogitsWarper's on random distributions (the reference's rule: keep the
    tokens whose mass before them is below top_p)."""
    import torch

    transformers = pytest.importorskip("transformers")
    from llamaworks.sampling import _nucleus

    rng = _rng(5)
    for top_p in (0.3, 0.6, 0.9, 0.99):
        logits = (rng.standard_normal(500) * 3).astype(np.float32)
        ours = np.isfinite(_nucleus(logits, 0, top_p))
        warper = transformers.TopPLogitsWarper(top_p=top_p)
        theirs = torch.isfinite(warper(None, torch.from_numpy(logits)[None]))[0].numpy()
        assert (ours == theirs).all(), top_p


def test_min_p_drops_tokens_below_fraction_of_the_best():
    logits = probs_logits([0.05, 0.5, 0.1, 0.3, 0.05])
    counts = draws(logits, SamplingParams(temperature=1.0, min_p=0.15))  # threshold 0.075
    assert set(counts) == {1, 2, 3}


def test_temperature_sharpens_distribution():
    logits = probs_logits([0.4, 0.6])
    cold = draws(logits, SamplingParams(temperature=0.3), n=2000)
    hot = draws(logits, SamplingParams(temperature=1.0), n=2000)
    assert cold[1] > hot[1] + 300


def _log_softmax(x: list[float]) -> np.ndarray:
    a = np.array(x, dtype=np.float64)
    return a - a.max() - np.log(np.exp(a - a.max()).sum())


def test_repetition_penalty_scales_seen_logits_only():
    logits = np.array([2.0, -2.0, 1.0, 0.5], np.float32)
    got = token_logprobs(logits, SamplingParams(temperature=1.0, repetition_penalty=2.0), [0, 1, 1])
    np.testing.assert_allclose(got, _log_softmax([1.0, -4.0, 1.0, 0.5]), rtol=1e-6)
    # Greedy avoids the repeated token once the penalty is large enough.
    greedy = SamplingParams(temperature=0, repetition_penalty=3.0)
    assert sample_token(logits, greedy, [], _rng()) == 0
    assert sample_token(logits, greedy, [0], _rng()) == 2


def test_presence_and_frequency_penalties():
    logits = np.zeros(4, np.float32)
    params = SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = token_logprobs(logits, params, [2, 2, 2, 0])
    np.testing.assert_allclose(got, _log_softmax([-0.75, 0.0, -1.25, 0.0]), rtol=1e-6)


def test_logprobs_apply_temperature_and_leave_input_untouched():
    logits = np.array([1.0, 2.0, 3.0], np.float32)
    before = logits.copy()
    got = token_logprobs(logits, SamplingParams(temperature=0.5, repetition_penalty=1.5), [2])
    assert (logits == before).all()
    np.testing.assert_allclose(got, _log_softmax([2.0, 4.0, 4.0]), rtol=1e-6)


def test_same_seed_same_draws_different_seed_differs():
    logits = _rng(0).standard_normal(1000).astype(np.float32)
    params = SamplingParams(temperature=1.0)

    def run(seed: int) -> list[int]:
        rng = _rng(seed)
        return [sample_token(logits, params, [], rng) for _ in range(20)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_invalid_params_raise_one_line_error():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_draw_follows_the_distribution_and_never_picks_a_filtered_token():
    logits = np.array([np.log(0.5), -np.inf, np.log(0.2), np.log(0.3), -np.inf], np.float32)
    params = SamplingParams(temperature=1.0)
    rng = _rng(0)
    counts = np.bincount([sample_token(logits, params, [], rng) for _ in range(20000)], minlength=5) / 20000
    assert counts[1] == 0 and counts[4] == 0  # zero probability: never drawn, even as the last index
    np.testing.assert_allclose(counts, [0.5, 0.0, 0.2, 0.3, 0.0], atol=0.015)  # 20k draws: s.e. <= 0.0035
    with pytest.raises(ValueError, match="finite"):
        sample_token(np.array([np.nan, 0.0], np.float32), params, [], rng)


# -- stop strings ----------------------------------------------------------------------------------
def run_script(text_out: str, params: SamplingParams, prompt: str = "Q:", extra: tuple[int, ...] = ()):
    tok = ByteTokenizer()
    prompt_ids = tok.encode(prompt)
    script = [*text_out.encode("utf-8"), *extra]
    items = list(engine.generate_stream(engine.Scheduler(ScriptedBackend(script, len(prompt_ids), tok)), prompt_ids,
                                        params))
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
    expected = naive_greedy(model, prompt, 20)
    result = engine.generate(engine_for(model, tok), prompt, params)
    assert result.finish_reason == "length" and result.completion_tokens == 20
    assert result.token_ids == expected


def test_batch_equals_one_by_one():
    tok = ByteTokenizer()
    tok.stop_ids, tok.eos_id = set(), None
    model = tiny_model()
    prompts = [tok.encode(p) for p in ["Hi", "A much longer prompt here", "Mid length"]]
    params = SamplingParams(temperature=0, max_new_tokens=12)
    batched = engine.generate_batch(engine_for(model, tok, max_rows=3), prompts, params)
    single = [engine.generate(engine_for(model, tok), p, params) for p in prompts]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert [r.prompt_tokens for r in batched] == [len(p) for p in prompts]


def test_batched_rows_finish_independently():
    tok = ByteTokenizer()
    model = tiny_model()
    prompts = [tok.encode("one"), tok.encode("three tokens")]
    params = [SamplingParams(temperature=0, max_new_tokens=3), SamplingParams(temperature=0, max_new_tokens=9)]
    results = engine.generate_batch(engine_for(model, tok, max_rows=2), prompts, params)
    assert results[0].completion_tokens <= 3 and results[1].completion_tokens <= 9
    tok.stop_ids, tok.eos_id = set(), None
    results = engine.generate_batch(engine_for(model, tok, max_rows=2), prompts, params)
    assert [r.completion_tokens for r in results] == [3, 9]


def test_seeded_sampling_is_reproducible():
    tok = ByteTokenizer()
    model = tiny_model()
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_new_tokens=16)
    run = engine_for(model, tok)
    a = engine.generate(run, tok.encode("seed"), params)
    b = engine.generate(run, tok.encode("seed"), params)
    c = engine.generate(run, tok.encode("seed"), SamplingParams(temperature=1.0, top_p=0.95, seed=43,
                                                                max_new_tokens=16))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_context_limit_errors_and_caps():
    tok = ByteTokenizer()
    tok.stop_ids, tok.eos_id = set(), None
    model = tiny_model()  # max_seq_len 256
    with pytest.raises(ContextLengthError, match="300 tokens"):
        engine.generate(engine_for(model, tok), [65] * 300, SamplingParams(temperature=0))
    with pytest.raises(ContextLengthError):
        engine.generate(engine_for(model, tok, max_context=20), [65] * 20, SamplingParams(temperature=0))
    result = engine.generate(engine_for(model, tok), [65] * 250, SamplingParams(temperature=0, max_new_tokens=100))
    assert result.completion_tokens == 6 and result.finish_reason == "length"
    result = engine.generate(engine_for(model, tok, max_context=16), [65] * 10,
                             SamplingParams(temperature=0, max_new_tokens=100))
    assert result.completion_tokens == 6


def test_timings_reported():
    tok = ByteTokenizer()
    tok.stop_ids, tok.eos_id = set(), None
    result = engine.generate(engine_for(tiny_model(), tok), tok.encode("time me"),
                             SamplingParams(temperature=0, max_new_tokens=8))
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
    backend = ScriptedBackend([*script, tok.eos_id], len(prompt), tok, vocab_size=tok.vocab_size)
    items = list(engine.generate_stream(engine.Scheduler(backend), prompt,
                                        SamplingParams(temperature=0, max_new_tokens=200)))
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
    run = engine_for(model, tok)
    hf = smollm2_transformers
    compared = 0
    for question in ["Write a haiku about llamas.", "List three prime numbers.", "Explain what a rainbow is."]:
        text = template.render([{"role": "user", "content": question}], add_generation_prompt=True)
        ids = tok.encode(text, add_bos=False)
        x = torch.tensor([ids])
        with torch.no_grad():  # an explicit mask: the prompt contains the pad id (<|im_end|>)
            expected = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                                   eos_token_id=sorted(tok.stop_ids), pad_token_id=tok.pad_id)[0, len(ids):]
        got = engine.generate(run, ids, SamplingParams(temperature=0, max_new_tokens=32))
        assert got.token_ids == expected.tolist(), question
        compared += len(got.token_ids)
    assert compared >= 64
