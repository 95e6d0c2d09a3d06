"""The Python API (`llamaworks.load` / `LLM`) and the chat session logic behind `llamaworks chat`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import llamaworks
from llamaworks.chat import ChatSession, encode_messages, normalize_messages
from llamaworks.chat_template import ChatTemplate
from llamaworks.sampling import ContextLengthError, SamplingParams
from test_generate import ByteTokenizer, tiny_model


def test_import_is_cheap():
    code = "import sys, llamaworks; print(llamaworks.__version__, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [llamaworks.__version__, "False"]


def test_the_package_init_only_re_exports():
    """`llamaworks/__init__.py` defines nothing but the lazy re-exports of api.py (and the version)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(llamaworks))
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert defined == ["__getattr__"]
    from llamaworks import api

    assert llamaworks.load is api.load and llamaworks.LLM is api.LLM


def tiny_llm(**kw) -> llamaworks.LLM:
    from llamaworks.engine.backend import EngineOptions
    from llamaworks.engine.torch_backend import TorchBackend

    backend = TorchBackend.from_model(tiny_model(), ByteTokenizer(), options=EngineOptions())
    return llamaworks.LLM(backend, ChatTemplate.builtin("chatml"), **kw)


def test_llm_generate_stream_and_chat_agree():
    llm = tiny_llm()
    text = llm.generate("Hello", temperature=0, max_tokens=12)
    assert isinstance(text, str) and llm.last_result.completion_tokens <= 12
    assert "".join(llm.stream("Hello", temperature=0, max_new_tokens=12)) == text
    reply = llm.chat("Hi there", temperature=0, max_tokens=10)
    assert "".join(llm.stream([{"role": "user", "content": "Hi there"}], temperature=0, max_tokens=10)) == reply
    assert llm.last_result.prompt_tokens == len(llm.encode_chat("Hi there"))


def test_llm_sampling_options():
    llm = tiny_llm(defaults=SamplingParams(temperature=0.5, max_new_tokens=7))
    p = llm.sampling(top_k=5, max_tokens=3, seed=None)
    assert (p.temperature, p.top_k, p.max_new_tokens, p.seed) == (0.5, 5, 3, None)
    with pytest.raises(TypeError, match="nucleus"):
        llm.sampling(nucleus=0.9)
    a = llm.generate("x", temperature=1.0, seed=3, max_tokens=10)
    b = llm.generate("x", temperature=1.0, seed=3, max_tokens=10)
    assert a == b


def test_resolve_helpers():
    assert llamaworks.resolve_device("cpu") == torch.device("cpu")
    assert llamaworks.resolve_device(None).type in ("cpu", "cuda")
    assert llamaworks.resolve_dtype("bf16") is torch.bfloat16 and llamaworks.resolve_dtype("auto") is None
    with pytest.raises(ValueError, match="dtype 'int3'"):
        llamaworks.resolve_dtype("int3")


def test_normalize_messages_rejects_bad_entries():
    assert normalize_messages("hey") == [{"role": "user", "content": "hey"}]
    with pytest.raises(ValueError, match="message 1"):
        normalize_messages([{"role": "user", "content": "a"}, {"text": "b"}])


def test_encode_messages_does_not_double_bos():
    tok = ByteTokenizer()  # bos_token "<s>", adds BOS id by default
    template = ChatTemplate("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}", bos_token="<s>")
    ids = encode_messages(tok, template, [{"role": "user", "content": "hi"}])
    assert ids == list(b"<s>hi")  # the template's BOS text only; the tokenizer adds no BOS id
    ids = encode_messages(tok, ChatTemplate.builtin("chatml"), [{"role": "user", "content": "hi"}])
    assert ids[0] == tok.bos_id


# -- ChatSession -----------------------------------------------------------------------------------
def session(max_context: int, system: str | None = "Be brief.") -> ChatSession:
    llm = tiny_llm()
    return ChatSession(llm.scheduler, llm.template, system=system,
                       params=SamplingParams(temperature=0, max_new_tokens=8), max_context=max_context)


def test_chat_session_keeps_history_and_resets():
    s = session(256)
    first = s.reply("one")
    computed = s.scheduler.stats.prefill_tokens
    s.reply("two")
    # The second turn's prompt starts with the whole first exchange, which the row still holds: only the tokens
    # after it (minus those the reply's end already fed) are computed.
    second_prompt = s.last_result.prompt_tokens
    assert s.scheduler.stats.prefill_tokens - computed < second_prompt - 10
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert s.messages[2]["content"] == first and s.last_dropped == 0
    s.set_system("Other.")
    assert s.messages[0]["content"] == "Other." and len(s.turns) == 4
    s.reset()
    assert s.messages == [{"role": "system", "content": "Other."}]


def test_chat_session_drops_oldest_turns_but_keeps_system():
    s = session(160)
    dropped = []
    for i in range(6):
        s.reply(f"message number {i} with some padding text")
        dropped.append(s.last_dropped)
        assert s.last_result.prompt_tokens + 8 <= 160  # the prompt left room for the reply
    assert dropped[0] == 0 and any(dropped)
    assert s.messages[0] == {"role": "system", "content": "Be brief."}
    assert s.turns[0]["role"] == "user"
    assert s.turns[-2]["content"] == "message number 5 with some padding text"
    assert all("number 0" not in m["content"] for m in s.messages)


def test_chat_session_message_too_long_for_context():
    s = session(64)
    with pytest.raises(ContextLengthError, match="context holds 64"):
        s.reply("x" * 100)
    assert s.turns == []  # nothing recorded


# -- the real default model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_llm(smollm2_gguf):
    return llamaworks.load()


@pytest.mark.slow
def test_load_default_model_and_chat(default_llm):
    llm = default_llm
    assert llm.backend.name == "native"  # the same default as the CLI: a GGUF on the CPU
    assert llm.config.n_layers == 30 and llm.tokenizer.vocab_size == 49152
    assert "<|im_start|>assistant" in llm.template.render([{"role": "user", "content": "hi"}])
    # (Not France: with int8 activations "The" and "L'Étoile" are a near tie there, docs/performance.md.)
    reply = llm.chat("What is the capital of Japan?", temperature=0, max_tokens=24)
    assert "Tokyo" in reply
    assert llm.last_result.finish_reason == "stop"
    pieces = list(llm.stream([{"role": "user", "content": "What is the capital of Japan?"}],
                             temperature=0, max_tokens=24))
    assert "".join(pieces) == reply and len(pieces) > 1
    text = llm.generate("The capital of France is", temperature=0, max_tokens=5)
    assert llm.last_result.completion_tokens == 5 and llm.last_result.finish_reason == "length"
    assert text == llm.last_result.text == llm.tokenizer.decode(llm.last_result.token_ids) == "".join(
        llm.stream("The capital of France is", temperature=0, max_new_tokens=5))


@pytest.mark.slow
def test_both_backends_give_the_same_greedy_text_with_float_activations(smollm2_gguf):
    """The same GGUF on the native backend, on the torch backend (quantized linears) and as the torch float
    reference: with float activations the greedy text is the same."""
    from llamaworks.engine.backend import EngineOptions
    from llamaworks.quant.linear import GGMLLinear

    options = EngineOptions(int8_activations=False, bf16_prefill=False)
    native = llamaworks.load(smollm2_gguf, options=options)
    quantized = llamaworks.load(smollm2_gguf, backend="torch", options=options)
    reference = llamaworks.load(smollm2_gguf, reference=True)
    assert native.backend.name == "native" and quantized.backend.name == "torch"
    assert isinstance(quantized.model.layers[0].attention.wq, GGMLLinear)  # the blocks stay quantized
    assert isinstance(reference.model.layers[0].attention.wq, torch.nn.Linear)
    assert type(quantized.model).forward is type(reference.model).forward  # no forward replaced on an instance
    prompt = "List three colours:"
    texts = {llm.backend.name + str(i): llm.generate(prompt, temperature=0, max_tokens=16)
             for i, llm in enumerate((native, quantized, reference))}
    assert len(set(texts.values())) == 1, texts


def test_load_errors_are_one_line():
    with pytest.raises(FileNotFoundError, match="/nonexistent"):
        llamaworks.load("/nonexistent/model.gguf")
