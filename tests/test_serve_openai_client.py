"""The official `openai` client against `llamaworks serve` running on 127.0.0.1 (uvicorn in a thread)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from llamaworks.serve.app import create_app
from serve_testutil import engine_for, running_server, tiny_model, wait_until

MODEL = "tiny-serve"
USER = [{"role": "user", "content": "Tell me about llamas."}]



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from llamaworks.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def server(tokenizer):
    """(base_url, engine) of a server over a tiny random model with SmolLM2's real tokenizer and template."""
    model = tiny_model(tokenizer.vocab_size)
    engine = engine_for(model, tokenizer, max_rows=8, queue_size=64)
    with running_server(create_app(engine, model_name=MODEL)) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat_prompt_ids(tokenizer, messages) -> list[int]:
    from llamaworks.chat_template import template_for

    text = template_for(tokenizer).render(messages, add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    return tokenizer.encode(text, add_bos=False if bos and text.startswith(bos) else None)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def _greedy_reference(model, prompt: list[int], n: int):
    """n greedy steps done by hand: a full float64 forward each step, log_softmax, argmax. Returns the ids and
    the log-probability rows they were chosen from."""
    import torch
    import torch.nn.functional as F

    ids, rows = [], []
    with torch.no_grad():
        for _ in range(n):
            row = F.log_softmax(model(torch.tensor([prompt + ids])).double()[0, -1], -1)
            rows.append(row)
            ids.append(int(row.argmax()))
    return ids, rows


def test_chat_usage_and_logprobs(client, server, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    choice = r.choices[0]
    prompt = _chat_prompt_ids(tokenizer, USER)
    assert choice.message.role == "assistant"
    assert r.usage.prompt_tokens == len(prompt)
    entries = choice.logprobs.content
    assert r.usage.completion_tokens == len(entries) == 8  # the random model never says <|im_end|> this early
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # The returned values are the model's own: log_softmax of its logits along its greedy path.
    ids, rows = _greedy_reference(server[1].backend.model, prompt, 8)
    assert [e.token for e in entries] == [tokenizer.decode([i]) for i in ids]
    assert [e.logprob for e in entries] == pytest.approx([float(r[i]) for r, i in zip(rows, ids)], abs=1e-4)
    for e, row in zip(entries, rows):
        assert len(e.top_logprobs) == 3
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
        assert [t.token for t in e.top_logprobs] == [tokenizer.decode([int(i)]) for i in row.topk(3).indices]
    assert choice.finish_reason == "length"
    assert choice.message.content == tokenizer.decode(ids)


def test_completion_usage_and_logprobs(client, server, tokenizer):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    c = r.choices[0]
    ids = tokenizer.encode(prompt)
    assert r.usage.prompt_tokens == len(ids)
    assert c.finish_reason == "length" and r.usage.completion_tokens == 6
    assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == 6
    generated, rows = _greedy_reference(server[1].backend.model, ids, 6)
    assert c.logprobs.tokens == [tokenizer.decode([i]) for i in generated]
    assert c.logprobs.token_logprobs == pytest.approx([float(r[i]) for r, i in zip(rows, generated)], abs=1e-4)
    for top, row in zip(c.logprobs.top_logprobs, rows):
        assert sorted(top.values(), reverse=True) == pytest.approx(row.topk(2).values.tolist(), abs=1e-4)


def test_streaming_matches_non_streaming(client):
    kwargs = dict(model=MODEL, messages=USER, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]

    comp = list(client.completions.create(model=MODEL, prompt="Once", max_tokens=5, temperature=0, stream=True))
    ref = client.completions.create(model=MODEL, prompt="Once", max_tokens=5, temperature=0)
    assert "".join(c.choices[0].text for c in comp) == ref.choices[0].text


def test_n_choices_and_seed(client):
    kwargs = dict(model=MODEL, messages=USER, max_tokens=8, temperature=1.0, seed=42, n=2, logprobs=True)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]  # same seed, same answers
    assert texts[0] != texts[1]  # the two choices are different draws
    other = client.chat.completions.create(**{**kwargs, "seed": 43})
    assert [c.message.content for c in other.choices] != texts
    assert a.usage.completion_tokens == sum(len(c.logprobs.content) for c in a.choices)  # summed over choices


def test_stop_strings(client):
    base = dict(model=MODEL, prompt="Hello", max_tokens=16, temperature=0)
    full = client.completions.create(**base).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    r = client.completions.create(**base, stop=[stop, "never-appears"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]


def test_json_object_output_parses(client):
    for seed in (1, 2):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON please"}],
                                           response_format={"type": "json_object"}, max_tokens=30, seed=seed,
                                           temperature=1.0)
        assert isinstance(json.loads(r.choices[0].message.content), dict)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
HISTORY = [*USER, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Seoul"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf):
    """transformers' tokenizer read from the same GGUF: its apply_chat_template is the reference renderer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def _hf_messages(messages):
    """The conversation as transformers' chat-template docs write it: tool-call arguments as a dict."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def test_tools_render_as_the_models_own_template_does(tokenizer, hf_tokenizer):
    """A template with tool support (Qwen2.5-7B-Instruct's published one, fixtures/templates, as llama.cpp ships
    it): the server's prompt is exactly what transformers' apply_chat_template(..., tools=...) renders, for a first
    turn and for a history holding a tool call and its result."""
    from llamaworks.chat_template import ChatTemplate
    from llamaworks.serve.app import _Server
    from llamaworks.serve.schemas import ChatCompletionRequest

    source = (TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(encoding="utf-8")
    model = tiny_model(tokenizer.vocab_size, max_seq_len=512)  # Qwen's tool preamble is ~250 tokens
    engine = engine_for(model, tokenizer, max_rows=2, queue_size=4)
    server = _Server(engine, MODEL, ChatTemplate(source))
    assert server.template_supports_tools
    for messages in (USER, HISTORY):
        ids, text = server.chat_prompt(ChatCompletionRequest(model=MODEL, messages=messages, tools=TOOLS))
        expected = hf_tokenizer.apply_chat_template(_hf_messages(messages), tools=TOOLS, chat_template=source,
                                                    add_generation_prompt=True, tokenize=False)
        assert text == expected
        assert ids == hf_tokenizer.encode(expected, add_special_tokens=False)
        assert '"name": "get_weather"' in text  # (the tools did reach it)
    with running_server(create_app(engine, model_name=MODEL, chat_template=ChatTemplate(source))) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for messages in (USER, HISTORY):
            r = c.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=2, temperature=0)
            expected = hf_tokenizer.apply_chat_template(_hf_messages(messages), tools=TOOLS, chat_template=source,
                                                        add_generation_prompt=True, tokenize=True)
            expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
            assert r.usage.prompt_tokens == len(expected)


def test_tools_reach_a_template_without_tool_support(client, tokenizer, hf_tokenizer):
    """SmolLM2's template has no tool support: the tools go in a Hermes-style system message (the wording is
    ours: TOOL_SYSTEM_PROMPT), rendered here by transformers with SmolLM2's own template."""
    from llamaworks.serve.app import TOOL_SYSTEM_PROMPT

    assert "tools" not in tokenizer.chat_template
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, max_tokens=4, temperature=0)
    system = {"role": "system", "content": TOOL_SYSTEM_PROMPT.format(tools=json.dumps(TOOLS))}
    assert json.dumps(TOOLS) in system["content"]
    expected = hf_tokenizer.apply_chat_template([system, *USER], chat_template=tokenizer.chat_template,
                                                add_generation_prompt=True, tokenize=False)
    assert r.usage.prompt_tokens == len(hf_tokenizer.encode(expected, add_special_tokens=False))
    plain = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, max_tokens=4,
                                                 temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == (r.choices[0].message.content or "")
    # A history with a tool call and its result: the call as a Hermes <tool_call>, the result as a user turn.
    r = client.chat.completions.create(model=MODEL, messages=HISTORY, tools=TOOLS, max_tokens=4, temperature=0)
    history = [system, USER[0],
               {"role": "assistant", "content": '<tool_call>{"name": "get_weather", "arguments": {"city": "Seoul"}}'
                                                '</tool_call>'},
               {"role": "user", "content": "<tool_response>sunny, 21 C</tool_response>"}]
    expected = hf_tokenizer.apply_chat_template(history, chat_template=tokenizer.chat_template,
                                                add_generation_prompt=True, tokenize=False)
    assert r.usage.prompt_tokens == len(hf_tokenizer.encode(expected, add_special_tokens=False))


def test_errors(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=USER, temperature=2.5)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 400)
    assert e.value.body["code"] == "context_length_exceeded"


def test_api_key_required(tokenizer):
    engine = engine_for(tiny_model(tokenizer.vocab_size), tokenizer, max_rows=2)
    with running_server(create_app(engine, api_key="k-123", model_name=MODEL)) as url:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="k-123", max_retries=0)
        r = good.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert r.usage.completion_tokens == 2
        assert httpx.get(url + "/health").status_code == 200  # health and the page stay open


def test_queue_full_answers_503_with_retry_after(tokenizer):
    # A long context so the running request cannot finish before the queue is tested.
    engine = engine_for(tiny_model(tokenizer.vocab_size, max_seq_len=4096), tokenizer, max_rows=1, queue_size=1)
    with running_server(create_app(engine, model_name=MODEL)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        long = dict(model=MODEL, prompt="Hi", max_tokens=4000, temperature=0)
        first = c.completions.create(**long, stream=True)   # occupies the only slot
        second = c.completions.create(**long, stream=True)  # waits in the queue
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(**long)
        assert e.value.status_code == 503
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.body["code"] == "queue_full"
        first.close()
        second.close()
        assert wait_until(lambda: engine.stats.active == 0 and engine.stats.waiting == 0)


def test_continuous_batching_concurrent_equals_sequential(client, server):
    """8 concurrent greedy streams are decoded together and give the same text as one at a time."""
    engine = server[1]
    prompts = [f"Story number {i}: once upon a time" + " and then" * i for i in range(8)]
    sequential = [client.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0).choices[0].text
                  for p in prompts]
    steps_before, multi_before = engine.stats.decode_steps, engine.stats.multi_row_steps
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        try:
            start.wait()
            stream = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=24, temperature=0,
                                               stream=True)
            results[i] = "".join(c.choices[0].text for c in stream if c.choices)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [results[i] for i in range(8)] == sequential
    steps = engine.stats.decode_steps - steps_before
    multi = engine.stats.multi_row_steps - multi_before
    assert engine.stats.max_rows_in_step > 1
    assert multi >= steps // 2, (multi, steps)  # most steps decoded several sequences at once
    assert steps < 8 * 23  # far fewer model calls than serving the 8 streams one after another


def test_disconnecting_client_frees_its_slot(tokenizer):
    engine = engine_for(tiny_model(tokenizer.vocab_size, max_seq_len=4096), tokenizer, max_rows=2)
    with running_server(create_app(engine, model_name=MODEL)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        stream = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=4000, temperature=0, stream=True)
        got = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got += 1
                if got == 3:
                    break
        stream.close()
        assert wait_until(lambda: engine.stats.cancelled == 1 and engine.stats.active == 0, timeout=15)
        generated = engine.stats.generated_tokens
        time.sleep(0.3)
        assert engine.stats.generated_tokens == generated < 4000  # nothing runs for the departed client


@pytest.mark.slow
def test_real_model_end_to_end(smollm2_gguf):
    """The bundled SmolLM2-135M-Instruct on the server's default (native) backend: a sensible chat answer, JSON
    mode, streaming."""
    from llamaworks.api import load_backend
    from llamaworks.chat_template import template_for
    from llamaworks.engine.backend import EngineOptions
    from llamaworks.engine.scheduler import Scheduler

    backend = load_backend(smollm2_gguf, options=EngineOptions(max_rows=4, max_context=1024))
    assert backend.name == "native"
    engine = Scheduler(backend)
    with running_server(create_app(engine, model_name="smollm2", chat_template=template_for(backend.tokenizer))) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
        r = c.chat.completions.create(model="smollm2", temperature=0, max_tokens=24,
                                      messages=[{"role": "user", "content": "What is the capital of Japan?"}])
        assert "Tokyo" in r.choices[0].message.content
        assert r.choices[0].finish_reason in ("stop", "length")
        r = c.chat.completions.create(model="smollm2", max_tokens=60, temperature=0,
                                      response_format={"type": "json_object"},
                                      messages=[{"role": "user", "content": "Describe a cat as JSON: name, age."}])
        assert isinstance(json.loads(r.choices[0].message.content), dict)
        text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="smollm2", temperature=0, max_tokens=16, stream=True,
            messages=[{"role": "user", "content": "Say hello."}]) if ch.choices)
        assert text.strip()


def test_non_streaming_client_that_gives_up_is_cancelled(tokenizer):
    engine = engine_for(tiny_model(tokenizer.vocab_size, max_seq_len=4096), tokenizer, max_rows=2)
    with running_server(create_app(engine, model_name=MODEL)) as url:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4000, "temperature": 0}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/v1/completions", json=body, timeout=0.5)
        assert wait_until(lambda: engine.stats.cancelled == 1 and engine.stats.active == 0, timeout=10)
        assert engine.stats.generated_tokens < 4000
