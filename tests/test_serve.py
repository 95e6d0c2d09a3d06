"""The serving engine (continuous batching), JSON-mode grammar, tool-call parsing and the HTTP error contract."""

from __future__ import annotations

import json
import queue
import random

import pytest

from llamaworks.generate import SamplingParams, generate
from llamaworks.serve.constrained import JsonState, closing_text, step
from llamaworks.serve.engine import Engine, FinishEvent, QueueFullError, TokenEvent
from serve_testutil import tiny_model, wait_until

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from llamaworks.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer.vocab_size)


def _drain(q: queue.Queue, timeout: float = 60.0) -> tuple[list[TokenEvent], FinishEvent]:
    tokens = []
    while True:
        ev = q.get(timeout=timeout)
        if isinstance(ev, FinishEvent):
            return tokens, ev
        tokens.append(ev)


def _submit(engine: Engine, prompt: list[int], **kw) -> queue.Queue:
    q: queue.Queue = queue.Queue()
    params = SamplingParams(**{"temperature": 0.0, "max_new_tokens": 12, **kw})
    engine.submit(prompt, params, q.put)
    return q


def test_concurrent_greedy_equals_sequential_generate(model, tokenizer):
    """Rows joining and leaving mid-flight (3 slots, 7 prompts of different lengths, a cache that must grow
    and compact) give exactly what generate() gives one prompt at a time."""
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "한국어", "text", "streams"]
    prompts = [tokenizer.encode(" ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))) for _ in range(7)]
    lengths = [5 + 4 * i for i in range(7)]
    engine = Engine(model, tokenizer, max_batch=3, queue_size=16, initial_capacity=16).start()
    try:
        queues = [_submit(engine, p, max_new_tokens=n) for p, n in zip(prompts, lengths)]
        results = [_drain(q) for q in queues]
        stats = engine.stats
    finally:
        engine.stop()
    assert stats.max_rows_in_step == 3 and stats.multi_row_steps > 0
    for prompt, n, (events, fin) in zip(prompts, lengths, results):
        ref = generate(model, tokenizer, prompt, SamplingParams(temperature=0.0, max_new_tokens=n))
        assert fin.token_ids == ref.token_ids
        assert fin.text == ref.text == "".join(e.text for e in events)
        assert fin.prompt_tokens == len(prompt) and fin.completion_tokens == len(ref.token_ids)
    model.clear_cache()


@pytest.mark.slow
def test_engine_on_the_quantized_default_model_equals_generate(smollm2_gguf):
    """Batched decode steps over the server's per-slot cache give the tokens of generate()."""
    import llamaworks

    llm = llamaworks.load(smollm2_gguf)  # GGUF on the CPU: the quantized fast path
    tok = llm.tokenizer
    prompts = [tok.encode(p) for p in ["The capital of France is", "1, 2, 3, 4,", "A"]]
    engine = Engine(llm.model, tok, max_batch=3).start()
    try:
        queues = [_submit(engine, p, max_new_tokens=10) for p in prompts]
        results = [_drain(q) for q in queues]
    finally:
        engine.stop()
    for prompt, (_, fin) in zip(prompts, results):
        ref = generate(llm.model, tok, prompt, SamplingParams(temperature=0.0, max_new_tokens=10))
        assert fin.token_ids == ref.token_ids


def test_choices_of_one_request_share_one_prefill(model, tokenizer):
    prompt = tokenizer.encode("Choices share the prompt")
    engine = Engine(model, tokenizer, max_batch=4).start()
    try:
        q: queue.Queue = queue.Queue()
        engine.submit(prompt, SamplingParams(temperature=0.0, max_new_tokens=8), q.put, n=3)
        finishes = []
        while len(finishes) < 3:
            ev = q.get(timeout=60)
            if isinstance(ev, FinishEvent):
                finishes.append(ev)
        prefills = engine.stats.prefills
    finally:
        engine.stop()
    ref = generate(model, tokenizer, prompt, SamplingParams(temperature=0.0, max_new_tokens=8))
    assert prefills == 1
    assert sorted(f.index for f in finishes) == [0, 1, 2]
    assert all(f.token_ids == ref.token_ids for f in finishes)
    model.clear_cache()


def test_seeded_sampling_is_reproducible_and_batch_independent(model, tokenizer):
    prompt = tokenizer.encode("Once upon a time")
    engine = Engine(model, tokenizer, max_batch=4).start()
    try:
        alone = _drain(_submit(engine, prompt, temperature=1.0, seed=7, max_new_tokens=10))[1].token_ids
        crowd = [_submit(engine, prompt, temperature=1.0, seed=s, max_new_tokens=10) for s in (7, 8, 7)]
        a, b, c = (_drain(q)[1].token_ids for q in crowd)
    finally:
        engine.stop()
    assert a == alone == c
    assert a != b


def test_stop_string_is_cut_and_reported(model, tokenizer):
    prompt = tokenizer.encode("Hello there")
    engine = Engine(model, tokenizer).start()
    try:
        full = _drain(_submit(engine, prompt, max_new_tokens=20))[1].text
        stop = full[len(full) // 2: len(full) // 2 + 3]
        assert stop.strip(), full
        events, fin = _drain(_submit(engine, prompt, max_new_tokens=20, stop=[stop]))
    finally:
        engine.stop()
    assert fin.reason == "stop"
    assert fin.text == full[: full.index(stop)]
    assert "".join(e.text for e in events) == fin.text


def test_cancel_frees_the_slot_and_queue_full_is_raised(model, tokenizer):
    prompt = tokenizer.encode("Hi")
    engine = Engine(model, tokenizer, max_batch=1, queue_size=1).start()
    try:
        q1: queue.Queue = queue.Queue()
        r1 = engine.submit(prompt, SamplingParams(temperature=0.0, max_new_tokens=200), q1.put)
        q1.get(timeout=30)  # r1 is running
        q2 = _submit(engine, prompt, max_new_tokens=3)  # waits: the only slot is taken
        with pytest.raises(QueueFullError):
            _submit(engine, prompt)
        assert engine.stats.rejected == 1
        r1.cancel()
        _, fin1 = _drain(q1)
        assert fin1.reason == "cancelled" and fin1.completion_tokens < 200
        _, fin2 = _drain(q2)  # the freed slot served the waiting request
        assert fin2.reason == "length" and fin2.completion_tokens == 3
        assert wait_until(lambda: engine.stats.active == 0)
    finally:
        engine.stop()


def test_a_failing_step_answers_with_an_error_and_the_engine_keeps_serving(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2).start()
    try:
        running = _submit(engine, tokenizer.encode("still fine"), max_new_tokens=30)
        _, bad = _drain(_submit(engine, [model.config.vocab_size + 5]))  # out of the embedding's range
        assert bad.reason == "error" and "IndexError" in bad.error
        _, after = _drain(_submit(engine, tokenizer.encode("Hello"), max_new_tokens=3))
        assert after.reason == "length" and after.completion_tokens == 3
        assert _drain(running)[1].reason in ("error", "length")  # in flight when the step failed: answered
        assert engine.stats.errors == 1
    finally:
        engine.stop()


def test_prompt_must_fit_the_context(model, tokenizer):
    engine = Engine(model, tokenizer, max_context=64)
    with pytest.raises(ValueError, match="context"):
        engine.submit(list(range(100, 164)), SamplingParams(), lambda e: None)


def test_json_mode_output_parses_even_when_truncated(model, tokenizer):
    prompt = tokenizer.encode("Give me a JSON object:")
    engine = Engine(model, tokenizer, max_batch=4).start()
    try:
        queues = []
        for seed, n in ((1, 40), (2, 12), (3, 6)):
            q: queue.Queue = queue.Queue()
            engine.submit(prompt, SamplingParams(temperature=1.0, seed=seed, max_new_tokens=n), q.put, json_mode=True)
            queues.append(q)
        outs = [_drain(q)[1] for q in queues]
    finally:
        engine.stop()
    for fin in outs:
        assert isinstance(json.loads(fin.text), dict), fin.text


def test_json_automaton_accepts_json_and_rejects_the_rest():
    def run(text: str) -> JsonState | None:
        state: JsonState | None = JsonState()
        for ch in text:
            state = step(state, ch)
            if state is None:
                return None
        return state

    good = ['{"a": [1, -2.5e+3, true, null, {"b": "x\\u00e9\\n"}], "c": {}}', "{}", '{"k":[[]],"l":"한글"}']
    for text in good:
        assert run(text).mode == "done", text
        for i in range(len(text)):  # every prefix can be completed into valid JSON
            prefix = run(text[:i])
            assert json.loads(text[:i] + closing_text(prefix)) is not None
    for text in ['{"a":01}', '{"a":}', "[1]", '{"a" 1}', '{"a":tru}', '{"a":"\x01"}', "{,}", '{"a":1}}']:
        state = run(text)
        assert state is None or state.mode != "done", text


def test_parse_tool_calls():
    from llamaworks.serve.app import parse_tool_calls

    text = 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul"}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Sure."
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Seoul"}
    assert parse_tool_calls("no tools here") == ("no tools here", [])
    assert parse_tool_calls("<tool_call>{not json}</tool_call>")[1] == []


def test_http_errors_have_the_openai_shape_and_no_500(model, tokenizer):
    from fastapi.testclient import TestClient

    from llamaworks.serve.app import create_app

    engine = Engine(model, tokenizer, max_batch=2, max_context=128)
    app = create_app(engine, api_key="sekrit", model_name="tiny")
    auth = {"Authorization": "Bearer sekrit"}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with TestClient(app) as client:
        assert client.get("/health").json()["status"] == "ok"
        r = client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = client.post("/v1/chat/completions", json=chat, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        bad_bodies = [
            {**chat, "temperature": 3},
            {**chat, "n": 0},
            {**chat, "messages": []},
            {**chat, "messages": [{"role": "wizard", "content": "x"}]},
            {**chat, "max_tokens": 0},
            {**chat, "stop": ["a", "b", "c", "d", "e"]},
            {**chat, "top_logprobs": 3},
            {**chat, "response_format": {"type": "yaml"}},
            {"messages": chat["messages"]},
            {**chat, "messages": [{"role": "user", "content": "word " * 300}]},
        ]
        for body in bad_bodies:
            r = client.post("/v1/chat/completions", json=body, headers=auth)
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
        r = client.post("/v1/chat/completions", content=b"{not json",
                        headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 400
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": [10**9]}, headers=auth)
        assert r.status_code == 400
        r = client.post("/v1/completions", json={"model": "other", "prompt": "x"}, headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert client.get("/v1/models/other", headers=auth).status_code == 404
        assert client.get("/v1/nothing-here", headers=auth).status_code == 404
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, headers=auth)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        page = client.get("/")
        assert page.status_code == 200 and "app.js" in page.text
        assert client.get("/static/app.js").status_code == 200
    model.clear_cache()


def test_listen_socket_errors_are_one_line():
    import socket

    from llamaworks.errors import ConfigError
    from llamaworks.serve.app import listen_socket

    with pytest.raises(ConfigError, match=r"--port 99999: expected a port number from 0 to 65535"):
        listen_socket("127.0.0.1", 99999)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{port}: .*in use"):
            listen_socket("127.0.0.1", port)
    finally:
        busy.close()
    ok = listen_socket("127.0.0.1", 0)  # port 0: the OS picks a free one
    assert ok.getsockname()[1] > 0
    ok.close()


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_a_stream_that_fails_mid_way_ends_with_an_error_event(model, tokenizer, monkeypatch, route):
    from fastapi.testclient import TestClient

    from llamaworks.model import Transformer
    from llamaworks.serve.app import create_app

    def prefill_only(tokens, *args, **kwargs):
        if tokens.shape[1] == 1:
            raise RuntimeError("boom")  # every decode step fails; the prefill (first token) works
        return Transformer.forward(model, tokens, *args, **kwargs)

    monkeypatch.setattr(model, "forward", prefill_only)
    engine = Engine(model, tokenizer, max_batch=2, max_context=128)
    body = ({"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {"prompt": "Hello"})
    with TestClient(create_app(engine, model_name="tiny")) as client:
        r = client.post(route, json={"model": "tiny", "max_tokens": 8, "stream": True, **body})
        assert r.status_code == 200  # the status line went out before the failure
        events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
        assert "[DONE]" not in events
        error = json.loads(events[-1])["error"]
        assert error["type"] == "server_error" and "RuntimeError: boom" in error["message"]
        assert client.get("/health").json()["status"] == "ok"  # the server keeps serving
