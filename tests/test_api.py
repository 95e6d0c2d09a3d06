"""The Python API (`llamaworks.load` / `LLM`) and the chat session logic behind `llamaworks chat`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import llamaworks
from llamaworks.chat import ChatSession, encode_messages, normalize_messages
from llamaworks.chat_template import ChatTemplate
from llamaworks.generate import ContextLengthError, SamplingParams
from test_generate import ByteTokenizer, tiny_model


def test_import_is_cheap():
    code = "import sys, llamaworks; print(llamaworks.__version__, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [llamaworks.__version__, "False"]


def tiny_llm(**kw) -> llamaworks.LLM:
    return llamaworks.LLM(tiny_model(), ByteTokenizer(), ChatTemplate.builtin("chatml"), **kw)


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
    return ChatSession(llm.model, llm.tokenizer, llm.template, system=system,
                       params=SamplingParams(temperature=0, max_new_tokens=8), max_context=max_context)


def test_chat_session_keeps_history_and_resets():
    s = session(256)
    first = s.reply("one")
    s.reply("two")
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
    assert llm.model.config.n_layers == 30 and llm.tokenizer.vocab_size == 49152
    assert "<|im_start|>assistant" in llm.template.render([{"role": "user", "content": "hi"}])
    reply = llm.chat("What is the capital of France?", temperature=0, max_tokens=24)
    assert "Paris" in reply
    assert llm.last_result.finish_reason == "stop"
    pieces = list(llm.stream([{"role": "user", "content": "What is the capital of France?"}],
                             temperature=0, max_tokens=24))
    assert "".join(pieces) == reply and len(pieces) > 1
    text = llm.generate("The capital of France is", temperature=0, max_tokens=5)
    assert llm.last_result.completion_tokens == 5 and llm.last_result.finish_reason == "length"
    assert text == llm.last_result.text == llm.tokenizer.decode(llm.last_result.token_ids) == "".join(
        llm.stream("The capital of France is", temperature=0, max_new_tokens=5))


@pytest.mark.slow
def test_gguf_loads_on_the_quantized_fast_path_unless_asked_not_to(default_llm):
    """A GGUF on the CPU keeps its blocks quantized (no float copy of the weights); fast=False is the reference."""
    from llamaworks.runtime import FastForward

    from llamaworks.quant.linear import GGMLLinear

    fast = default_llm
    assert isinstance(fast.model.forward, FastForward)
    assert isinstance(fast.model.layers[0].attention.wq, GGMLLinear)
    ref = llamaworks.load(fast=False)
    assert not isinstance(ref.model.forward, FastForward)
    assert isinstance(ref.model.layers[0].attention.wq, torch.nn.Linear)
    prompt = "List three colours:"
    # Float32 activations: the same text exactly. With the defaults (int8 decode, bf16 prefill) the text may
    # part at a near tie; tests/test_runtime.py bounds that drift.
    from llamaworks.quant import kernels

    with kernels.float_activations():
        assert (fast.generate(prompt, temperature=0, max_tokens=16)
                == ref.generate(prompt, temperature=0, max_tokens=16))


def test_load_errors_are_one_line():
    with pytest.raises(FileNotFoundError, match="/nonexistent"):
        llamaworks.load("/nonexistent/model.gguf")
