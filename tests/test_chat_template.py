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


HOSTILE_TEMPLATES = {
    "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops over a list": "{% set l = range(100000) | list %}{% for a in l %}{% for b in l %}{% endfor %}"
                                "{% endfor %}",
    "output flood": "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
    "exponential macro": "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                         "{{ f(40) }}",
    "macro recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "recursive loop": "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
    "huge power": "{{ 10 ** 100000000 }}",
    "huge repeat": "{{ 'x' * 10000000000 }}",
    "doubling concat": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s | length }}",
    "doubling plus": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
                     "{% endfor %}",
    "squaring integer": "{% set ns = namespace(n=3) %}{% for i in range(60) %}{% set ns.n = ns.n * ns.n %}"
                        "{% endfor %}{{ ns.n }}",
    "wide filter argument": "{{ 'x' | center(1000000000) }}",
    "wide format": "{{ '{:>999999999}'.format(1) }}",
    "wide percent format": "{{ '%999999999d' % 1 }}",
    "float overflow": "{{ 1e308 * 1e308 }}{{ 10.0 ** 400 }}",
    "huge range": "{{ range(10 ** 30) }}",
    "deep nesting": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_TEMPLATES))
def test_hostile_templates_end_quickly_as_one_line_errors(kind: str) -> None:
    """Loops, recursion, output and value sizes are bounded; Overflow/Recursion/Memory errors are ours too."""
    import time

    start = time.monotonic()
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate(HOSTILE_TEMPLATES[kind], name="hostile.jinja").render([{"role": "user", "content": "hi"}])
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert message.startswith("hostile.jinja: ") and "\n" not in message and len(message) < 400, message
    assert elapsed < 5.0, (kind, elapsed)  # the wall-clock budget is 2 s; most stop in milliseconds


def test_template_limits_are_configurable_and_real_templates_fit(smollm2: Tokenizer) -> None:
    from llamaworks.chat_template import TemplateLimits

    long_chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"} for i in range(2000)]
    text = template_for(smollm2).render(long_chat)  # SmolLM2's own template, 2000 turns: well within the budget
    assert text.count("<|im_start|>") == 2002  # + the default system message and the assistant cue
    tight = ChatTemplate(smollm2.chat_template, name="tight", limits=TemplateLimits(steps=1000))
    with pytest.raises(ChatTemplateError, match=r"^tight: rendering stopped by the template limits: more than 1000"):
        tight.render(long_chat)
    slow = ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                        name="slow", limits=TemplateLimits(seconds=0.2, steps=10**12))
    with pytest.raises(ChatTemplateError, match=r"^slow: .*took longer than 0.2 s"):
        slow.render([])


def test_template_that_is_not_utf8_is_one_line(tmp_path: Path, smollm2: Tokenizer) -> None:
    bad = b"{{ messages[0]['content'] }}\xff\xfe"
    with pytest.raises(ChatTemplateError, match=r"^from-gguf: not valid UTF-8 \(byte 28: invalid start byte\)$"):
        ChatTemplate(bad, name="from-gguf")  # a GGUF string that is not UTF-8 reaches us as bytes
    gguf_like = Tokenizer(smollm2.engine, kind="gpt2", bos_token="<|im_start|>", eos_token="<|im_end|>",
                          chat_template=bad)
    with pytest.raises(ChatTemplateError, match=r"^chat template of .*: not valid UTF-8"):
        template_for(gguf_like)
    file = tmp_path / "bad.jinja"
    file.write_bytes(bad)
    with pytest.raises(ChatTemplateError, match=rf"^{file}: not valid UTF-8"):
        template_for(smollm2, str(file))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "chat_template.jinja").write_bytes(bad)
    with pytest.raises(FormatError, match=r"chat_template.jinja: chat template is not valid UTF-8"):
        Tokenizer.from_dir(folder)


def test_cli_chat_with_a_hostile_template_prints_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    file = tmp_path / "loops.jinja"
    file.write_text(HOSTILE_TEMPLATES["nested range loops"])
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "llamaworks", "chat", "--chat-template", str(file)],
                         input="hello\n", capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if str(file) in line]
    assert len(lines) == 1 and "template limits" in lines[0], run.stderr
