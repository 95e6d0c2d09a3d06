"""Chat templates: the checkpoint's own Jinja template, rendered in a sandbox the way transformers renders it,
plus built-in formats for checkpoints that carry none.

    template = template_for(tokenizer)                 # the model's template, else a built-in by vocabulary
    prompt = template.render([{"role": "user", "content": "안녕?"}], add_generation_prompt=True)
    ChatTemplate.builtin("llama-3").render(messages)

Rendering matches `transformers` `apply_chat_template(..., tokenize=False)`: an ImmutableSandboxedEnvironment with
trim_blocks, lstrip_blocks, the loopcontrols extension and the `{% generation %}` tag, the globals
`raise_exception` and `strftime_now`, and a `tojson` filter that does not escape HTML.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llamaworks.errors import FormatError

if TYPE_CHECKING:
    from llamaworks.tokenizer import Tokenizer

__all__ = ["BUILTIN_TEMPLATES", "ChatTemplate", "ChatTemplateError", "encode_chat", "template_for"]


class ChatTemplateError(FormatError):
    """A chat template that is not valid Jinja, or that failed while rendering."""


def _alternation_check() -> str:
    return ("{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
            "{% endif %}")


# Written from the published prompt formats. Each is one Jinja text, kept on single lines so that
# trim_blocks/lstrip_blocks cannot change their whitespace.
BUILTIN_TEMPLATES: dict[str, str] = {
    # Meta's LLaMA 2 chat: <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s><s>[INST] ...
    "llama-2": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set system_message = none %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}" + _alternation_check() +
        "{% if message['role'] == 'user' %}"
        "{% if loop.first and system_message is not none %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    # Meta's LLaMA 3 instruct format.
    "llama-3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # OpenAI's ChatML, as used by SmolLM2, Qwen and many fine-tunes.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Stanford Alpaca's instruction format; a system message replaces the default preamble.
    "alpaca": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{{ messages[0]['content'] | trim + '\\n\\n' }}{% set loop_messages = messages[1:] %}"
        "{% else %}{{ 'Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\\n\\n' }}"
        "{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}" + _alternation_check() +
        "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] | trim + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] | trim + eos_token + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    # Vicuna v1.1: "{system} USER: {user} ASSISTANT: {answer}</s>USER: ..."
    "vicuna": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{{ messages[0]['content'] | trim + ' ' }}{% set loop_messages = messages[1:] %}"
        "{% else %}{{ 'A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user\\'s questions. ' }}"
        "{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}" + _alternation_check() +
        "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] | trim + ' ' }}"
        "{% else %}{{ 'ASSISTANT: ' + message['content'] | trim + eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
}


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): renders its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, '); chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


class ChatTemplate:
    """A compiled chat template. `source` is Jinja text; `name` says where it came from in error messages."""

    def __init__(self, source: str, bos_token: str | None = "", eos_token: str | None = "",
                 name: str = "chat template") -> None:
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self.name = name
        try:
            self._compiled = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"{name}: not valid Jinja (line {exc.lineno}: {_one_line(exc)})") from None
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"{name}: not valid Jinja ({_one_line(exc)})") from None

    @classmethod
    def builtin(cls, name: str, bos_token: str | None = None, eos_token: str | None = None) -> ChatTemplate:
        """One of BUILTIN_TEMPLATES; default special tokens are the ones that format's models use."""
        if name not in BUILTIN_TEMPLATES:
            raise ChatTemplateError(f"unknown built-in chat template {name!r}; choose one of "
                                    f"{', '.join(sorted(BUILTIN_TEMPLATES))}")
        defaults = {"llama-3": ("<|begin_of_text|>", "<|eot_id|>"), "chatml": ("", "<|im_end|>")}
        bos, eos = defaults.get(name, ("<s>", "</s>"))
        return cls(BUILTIN_TEMPLATES[name], bos if bos_token is None else bos_token,
                   eos if eos_token is None else eos_token, name=f"built-in template {name!r}")

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}]); extra kwargs reach the template."""
        variables: dict[str, Any] = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        variables.update(kwargs)
        variables.update(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                         tools=[dict(t) for t in tools] if tools is not None else None)
        try:
            return self._compiled.render(**variables)
        except jinja2.exceptions.TemplateError as exc:  # includes SecurityError and UndefinedError
            raise ChatTemplateError(f"{self.name}: rendering failed: {_one_line(exc)}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as exc:
            raise ChatTemplateError(f"{self.name}: rendering failed: {type(exc).__name__}: {_one_line(exc)}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name})"


def template_for(tokenizer: Tokenizer | None, override: str | None = None) -> ChatTemplate:
    """The template to use for a model: `override` (a built-in name, Jinja text or a file holding it), else the
    tokenizer's own template, else a built-in chosen by the vocabulary's special tokens."""
    bos = getattr(tokenizer, "bos_token", None)
    eos = getattr(tokenizer, "eos_token", None)
    if override:
        if override in BUILTIN_TEMPLATES:
            return ChatTemplate.builtin(override, bos, eos)
        if "{{" in override or "{%" in override:
            return ChatTemplate(override, bos, eos, name="chat template override")
        path = Path(override)
        if path.is_file():
            return ChatTemplate(path.read_text(encoding="utf-8"), bos, eos, name=str(path))
        raise ChatTemplateError(f"chat template {override!r} is not a built-in "
                                f"({', '.join(sorted(BUILTIN_TEMPLATES))}), Jinja text, or a file")
    if tokenizer is None:
        return ChatTemplate.builtin("chatml")
    if tokenizer.chat_template:
        return ChatTemplate(tokenizer.chat_template, bos, eos, name=f"chat template of {tokenizer.source}")
    if tokenizer.token_to_id("<|start_header_id|>") is not None:
        return ChatTemplate.builtin("llama-3", bos, "<|eot_id|>")
    if tokenizer.token_to_id("<|im_start|>") is not None:
        return ChatTemplate.builtin("chatml", bos, "<|im_end|>")
    return ChatTemplate.builtin("llama-2", bos, eos)


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], template: ChatTemplate | None = None,
                add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
    """Render `messages` with `template` (default: `template_for(tokenizer)`) and encode the prompt.

    Templates usually write the BOS token themselves, so BOS is added by the tokenizer only when the rendered
    text does not already start with it (never two BOS tokens)."""
    template = template or template_for(tokenizer)
    text = template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    starts_with_bos = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    return tokenizer.encode(text, add_bos=False if starts_with_bos else None)
