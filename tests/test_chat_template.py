"""Chat templates render exactly as transformers' apply_chat_template does; built-ins follow the published formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamaworks.chat_template import BUILTIN_TEMPLATES, ChatTemplate, ChatTemplateError, encode_chat, template_for
from llamaworks.errors import FormatError
from llamaworks.tokenizer import Tokenizer, load_tokenizer

SYSTEM = {"role": "system", "content": "You are a helpful assistant. 친절하게 답하세요."}
CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello!"}],
    "multi_turn": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?"},
    ],
    "korean_with_system": [
        SYSTEM,
        {"role": "user", "content": "안녕하세요? 오늘 날씨 어때요?"},
        {"role": "assistant", "content": "맑고 따뜻해요. ㅎㅎ"},
        {"role": "user", "content": "고마워요!  코드도 보여줘:\n\tprint('hi')"},
    ],
    "system_only_first_turn": [SYSTEM, {"role": "user", "content": "Hi"}],
}


def hf_reference(bos: str, eos: str):
    """A minimal transformers tokenizer whose special tokens the template sees (no files needed)."""
    from tokenizers import Tokenizer as Engine
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(dict.fromkeys(["<unk>", bos or "<bos>", eos or "<eos>"]))}
    engine = Engine(WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=engine, bos_token=bos or None, eos_token=eos or None,
                                   unk_token="<unk>")


def tiny_tokenizer(specials: list[str], bos: str, eos: str) -> Tokenizer:
    """A word-level vocabulary holding just these special tokens (for choosing a template by vocabulary)."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Engine
    from tokenizers.models import WordLevel

    engine = Engine(WordLevel({"<unk>": 0}, unk_token="<unk>"))
    engine.add_special_tokens([AddedToken(t, special=True) for t in specials])
    return Tokenizer(engine, kind="other", bos_token=bos, eos_token=eos)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> Tokenizer:
    return load_tokenizer(smollm2_gguf)


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_builtin_renders_like_transformers(name: str, conversation: str, generation_prompt: bool) -> None:
    template = ChatTemplate.builtin(name)
    messages = CONVERSATIONS[conversation]
    reference = hf_reference(template.bos_token, template.eos_token)
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                             chat_template=template.source)
    assert template.render(messages, add_generation_prompt=generation_prompt) == expected


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_smollm2_template_from_gguf_renders_like_transformers(smollm2: Tokenizer, conversation: str,
                                                              generation_prompt: bool) -> None:
    template = template_for(smollm2)
    assert template.source == smollm2.chat_template
    messages = CONVERSATIONS[conversation]
    reference = hf_reference(smollm2.bos_token, smollm2.eos_token)
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                             chat_template=smollm2.chat_template)
    rendered = template.render(messages, add_generation_prompt=generation_prompt)
    assert rendered == expected
    if messages[0]["role"] != "system":  # SmolLM2 inserts its own system prompt when none is given
        assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert rendered.endswith("<|im_start|>assistant\n") == generation_prompt


def test_builtins_follow_published_formats() -> None:
    messages = CONVERSATIONS["korean_with_system"]
    llama2 = ChatTemplate.builtin("llama-2").render(messages)
    assert llama2 == (
        "<s>[INST] <<SYS>>\nYou are a helpful assistant. 친절하게 답하세요.\n<</SYS>>\n\n"
        "안녕하세요? 오늘 날씨 어때요? [/INST]"
        " 맑고 따뜻해요. ㅎㅎ </s><s>[INST] 고마워요!  코드도 보여줘:\n\tprint('hi') [/INST]")
    llama3 = ChatTemplate.builtin("llama-3").render(CONVERSATIONS["single"])
    assert llama3 == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")
    chatml = ChatTemplate.builtin("chatml").render(CONVERSATIONS["single"])
    assert chatml == "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    alpaca = ChatTemplate.builtin("alpaca").render(CONVERSATIONS["single"])
    assert alpaca.endswith("### Instruction:\nHello!\n\n### Response:\n") and alpaca.startswith("Below is")
    vicuna = ChatTemplate.builtin("vicuna").render(CONVERSATIONS["multi_turn"])
    assert vicuna.endswith("USER: What is 2+2? ASSISTANT: It is 4.</s>USER: And 3+3? ASSISTANT:")


def test_environment_features_match_transformers() -> None:
    source = ("{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
              "{{ m | tojson }}|{% generation %}{{ m.content }}{% endgeneration %}\n{% endfor %}"
              "{{ tools | tojson(indent=1) }}{{ extra }}{{ strftime_now('%Y') | length }}")
    messages = [{"role": "user", "content": "<b>&'한'</b>"}, {"role": "skip", "content": "x"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    ours = ChatTemplate(source).render(messages, add_generation_prompt=False, tools=tools, extra="!")
    expected = hf_reference("<s>", "</s>").apply_chat_template(
        messages, tokenize=False, chat_template=source, tools=tools, extra="!")
    assert ours == expected
    assert '"<b>&\'한\'</b>"' in ours  # no HTML escaping, no \u escapes


def test_template_for_picks_override_own_or_vocabulary_builtin(smollm2: Tokenizer, sentencepiece_model: Path,
                                                               tmp_path: Path) -> None:
    assert template_for(smollm2, "llama-2").source == BUILTIN_TEMPLATES["llama-2"]
    assert template_for(smollm2, "{{ 'x' }}").render([]) == "x"
    file = tmp_path / "t.jinja"
    file.write_text("{{ messages | length }}")
    assert template_for(smollm2, str(file)).render([{"role": "user", "content": "a"}]) == "1"
    assert template_for(smollm2).source == smollm2.chat_template
    llama3_like = tiny_tokenizer(["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
                                 bos="<|begin_of_text|>", eos="<|eot_id|>")
    assert llama3_like.chat_template is None
    chosen = template_for(llama3_like)
    assert chosen.source == BUILTIN_TEMPLATES["llama-3"] and chosen.bos_token == "<|begin_of_text|>"
    spm = load_tokenizer(sentencepiece_model)
    rendered = template_for(spm).render(CONVERSATIONS["multi_turn"])
    assert rendered.startswith("<s>[INST] What is 2+2? [/INST] It is 4. </s><s>[INST]")
    no_template = Tokenizer(smollm2.engine, kind="gpt2", bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert template_for(no_template).source == BUILTIN_TEMPLATES["chatml"]
    with pytest.raises(ChatTemplateError, match="not a built-in"):
        template_for(smollm2, "no-such-format")


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__mro__ }}",
    "{{ os.system('echo pwned') }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% set x = messages.append({'role': 'user'}) %}{{ x }}",
])
def test_sandbox_blocks_escapes(source: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate(source, name="evil").render(messages)
    assert "evil" in str(info.value) and "\n" not in str(info.value)
    assert messages == [{"role": "user", "content": "hi"}]


def test_bad_templates_give_one_line_errors() -> None:
    with pytest.raises(ChatTemplateError, match=r"^my-template: not valid Jinja \(line 2"):
        ChatTemplate("ok\n{% for m in %}", name="my-template")
    with pytest.raises(ChatTemplateError, match="must alternate"):
        ChatTemplate.builtin("llama-2").render([{"role": "assistant", "content": "first"}])
    with pytest.raises(FormatError, match="unknown built-in"):
        ChatTemplate.builtin("llama-9")
    with pytest.raises(ChatTemplateError, match="rendering failed: custom stop"):
        ChatTemplate("{{ raise_exception('custom stop') }}").render([])


def test_encode_chat_never_doubles_bos(sentencepiece_model: Path, smollm2: Tokenizer) -> None:
    spm = load_tokenizer(sentencepiece_model)
    ids = encode_chat(spm, CONVERSATIONS["single"])  # llama-2 template writes "<s>" itself
    assert ids[0] == spm.bos_id and ids[1] != spm.bos_id
    assert spm.decode(ids) == "<s> [INST] Hello! [/INST]"  # LLaMA's space prefix after <s>, as in Meta's code
    plain = encode_chat(spm, CONVERSATIONS["single"], ChatTemplate("{{ messages[0]['content'] }}"))
    assert plain == spm.encode("Hello!") and plain[0] == spm.bos_id
    ids = encode_chat(smollm2, CONVERSATIONS["single"])
    assert ids[:1] == [smollm2.token_to_id("<|im_start|>")]
    assert smollm2.decode(ids).endswith("<|im_start|>assistant\n")
