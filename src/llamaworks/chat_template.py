"""Chat templates: the checkpoint's own Jinja template, rendered in a sandbox the way transformers renders it,
plus built-in formats for checkpoints that carry none.

    template = template_for(tokenizer)                 # the model's template, else a built-in by vocabulary
    prompt = template.render([{"role": "user", "content": "안녕?"}], add_generation_prompt=True)
    ChatTemplate.builtin("llama-3").render(messages)

Rendering matches `transformers` `apply_chat_template(..., tokenize=False)`: an ImmutableSandboxedEnvironment with
trim_blocks, lstrip_blocks, the loopcontrols extension and the `{% generation %}` tag, the globals
`raise_exception` and `strftime_now`, and a `tojson` filter that does not escape HTML.

Templates travel inside checkpoints, so they are untrusted code. Besides the sandbox (no attribute starting with
`_`, no mutation of lists and dicts), every render runs under `TemplateLimits`: a wall-clock budget, a budget of
steps (loop iterations, calls, attribute and item lookups), a call-nesting depth (macro and recursive-loop
recursion), and a size bound on the output and on every intermediate string, list or integer; operations that
could build a huge value in one go (`*`, `**`, `%`, width arguments, `str.replace`) are checked before they run.
Whatever goes wrong ends as one `ChatTemplateError` line naming the template: the CLI and the server alike.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llamaworks.errors import FormatError

if TYPE_CHECKING:
    from llamaworks.tokenizer import Tokenizer

__all__ = ["BUILTIN_TEMPLATES", "ChatTemplate", "ChatTemplateError", "TemplateLimits", "encode_chat", "template_for"]


class ChatTemplateError(FormatError):
    """A chat template that is not valid Jinja (or not UTF-8), that failed while rendering, or that went over
    its `TemplateLimits`. The message is one line naming the template."""


@dataclass(frozen=True)
class TemplateLimits:
    """Bounds on one render of an (untrusted) chat template.

    seconds:      wall-clock budget of one render
    steps:        loop iterations + calls + attribute/item lookups + intercepted operators
    depth:        calls nested inside each other (macros calling macros, recursive loops)
    output_chars: size of the rendered text, and of any string/list built on the way
    int_bits:     size of any integer computed on the way
    int_arg:      largest integer argument a call or filter accepts (widths, counts); range() has its own cap
    source_chars: size of the template text itself
    """

    seconds: float = 2.0
    steps: int = 1_000_000
    depth: int = 64
    output_chars: int = 16_000_000
    int_bits: int = 4096
    int_arg: int = 100_000
    source_chars: int = 1_000_000


DEFAULT_LIMITS = TemplateLimits()


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
    if isinstance(indent, int) and not 0 <= indent <= 16:
        raise _LimitExceeded(f"tojson(indent={indent}): at most 16")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# -- the bounded sandbox --------------------------------------------------------------------------------
class _LimitExceeded(jinja2.exceptions.SecurityError):
    """A render went over one of its TemplateLimits."""


class _Budget:
    """What one render (on one thread) may still spend."""

    __slots__ = ("deadline", "depth", "limits", "steps")

    def __init__(self, limits: TemplateLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.steps = 0
        self.depth = 0

    def tick(self) -> None:
        self.steps += 1
        if self.steps > self.limits.steps:
            raise _LimitExceeded(f"more than {self.limits.steps} steps (loop iterations, calls, lookups)")
        if time.monotonic() > self.deadline:
            raise _LimitExceeded(f"took longer than {self.limits.seconds:g} s")

    def size(self, value: Any) -> Any:
        """`value`, unless it is a string/list/integer larger than the limits allow."""
        if isinstance(value, (str, list, tuple, dict)):
            if len(value) > self.limits.output_chars:
                raise _LimitExceeded(f"a {type(value).__name__} of more than {self.limits.output_chars} items")
        elif isinstance(value, int) and value.bit_length() > self.limits.int_bits:
            raise _LimitExceeded(f"an integer of more than {self.limits.int_bits} bits")
        return value


_local = threading.local()  # .budget: the _Budget of the render running on this thread, if any
_WIDE_FORMAT = re.compile(r"\d{6,}")  # a width/precision of 100000+ in a format string


def _budget() -> _Budget | None:
    return getattr(_local, "budget", None)


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str) and _WIDE_FORMAT.search(fmt):
        raise _LimitExceeded("a format width or precision of 100000 or more")


def _check_args(budget: _Budget, args: tuple, kwargs: dict) -> None:
    limit = budget.limits.int_arg
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > limit:
            raise _LimitExceeded(f"an argument of {a} (at most {limit})")


def _check_method(budget: _Budget, func: Any, args: tuple) -> None:
    """Methods of str that can build a string much larger than their inputs in one C call."""
    func = getattr(func, "__wrapped__", func)  # the sandbox wraps str.format
    owner, name = getattr(func, "__self__", None), getattr(func, "__name__", "")
    if not isinstance(owner, str):
        return
    if name in ("format", "format_map"):
        _check_format(owner)
    elif name == "replace" and len(args) >= 2 and isinstance(args[1], str):
        grows = len(args[1]) * (len(owner) + 1 if args[0] == "" else len(owner) // max(1, len(args[0])))
        if grows > budget.limits.output_chars:
            raise _LimitExceeded(f"a replace() result of more than {budget.limits.output_chars} characters")


class _BoundedCodeGenerator(CodeGenerator):
    """Concatenation (`~`) results are size-checked: doubling a string in a loop stops at the output limit."""

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        self.write("environment.checked_size(")
        super().visit_Concat(node, frame)
        self.write(")")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with the budget of the render in progress checked at every loop iteration, call, lookup
    and size-changing operator (see TemplateLimits). Outside a render (compiling) nothing is counted."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in list(tree.find_all(nodes.For)):  # every loop's iterable is counted item by item
            loop.iter = nodes.Filter(loop.iter, "_lw_counted", [], [], None, None, lineno=loop.iter.lineno)
        return tree

    def checked_size(self, value: Any) -> Any:
        budget = _budget()
        return value if budget is None else budget.size(value)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        if budget is None:
            return super().call(context, obj, *args, **kwargs)
        budget.tick()
        _check_args(budget, args, kwargs)
        _check_method(budget, obj, args)
        budget.depth += 1
        try:
            if budget.depth > budget.limits.depth:
                raise _LimitExceeded(f"calls nested more than {budget.limits.depth} deep (recursion)")
            result = super().call(context, obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        return budget.size(result)

    def getattr(self, obj: Any, attribute: str) -> Any:
        budget = _budget()
        if budget is not None:
            budget.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        budget = _budget()
        if budget is not None:
            budget.tick()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        if budget is None:
            return super().call_binop(context, operator, left, right)
        budget.tick()
        limits = budget.limits
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if right * max(1, abs(left).bit_length()) > limits.int_bits:
                raise _LimitExceeded(f"an integer of more than {limits.int_bits} bits")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > limits.output_chars:
                    raise _LimitExceeded(f"a {type(seq).__name__} of more than {limits.output_chars} items")
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
        return budget.size(super().call_binop(context, operator, left, right))


class _Counted:
    """An iterable whose iteration spends one step per item (keeps len() for `loop.length`)."""

    __slots__ = ("_budget", "_items")

    def __init__(self, items: Any, budget: _Budget) -> None:
        self._items, self._budget = items, budget

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Any]:
        tick = self._budget.tick
        for item in self._items:
            tick()
            yield item


def _counted(items: Any) -> Any:
    budget = _budget()
    return items if budget is None else _Counted(items, budget)


def _bounded_filter(func: Any) -> Any:
    """A built-in filter that spends a step, takes bounded integer arguments and returns a bounded value."""

    passes = getattr(func, "jinja_pass_arg", None) is not None
    formats = getattr(func, "__name__", "") == "do_format"

    @functools.wraps(func)  # keeps jinja's pass_context/pass_environment marks
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        if budget is None:
            return func(*args, **kwargs)
        budget.tick()
        skip = 2 if passes else 1  # the context/environment jinja passes first, then the filtered value
        _check_args(budget, args[skip:], kwargs)
        if formats:
            _check_format(args[skip - 1] if len(args) >= skip else None)
        return budget.size(func(*args, **kwargs))

    return bounded


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.filters["_lw_counted"] = _counted
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


class ChatTemplate:
    """A compiled chat template. `source` is Jinja text; `name` says where it came from in error messages."""

    def __init__(self, source: str | bytes, bos_token: str | None = "", eos_token: str | None = "",
                 name: str = "chat template", limits: TemplateLimits = DEFAULT_LIMITS) -> None:
        if isinstance(source, (bytes, bytearray)):  # a GGUF string that is not UTF-8 arrives as bytes
            try:
                source = bytes(source).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ChatTemplateError(f"{name}: not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
        if not isinstance(source, str):
            raise ChatTemplateError(f"{name}: expected Jinja text, got {type(source).__name__}")
        if len(source) > limits.source_chars:
            raise ChatTemplateError(f"{name}: {len(source)} characters, more than the {limits.source_chars} "
                                    "a chat template may have")
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self.name = name
        self.limits = limits
        # Compiling folds constant expressions (filters included) by running them: under the budget too.
        outer, _local.budget = _budget(), _Budget(limits)
        try:
            self._compiled = _environment().from_string(source)
        except _LimitExceeded as exc:
            raise ChatTemplateError(f"{name}: compiling stopped by the template limits: {_one_line(exc)}") from None
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"{name}: not valid Jinja (line {exc.lineno}: {_one_line(exc)})") from None
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"{name}: not valid Jinja ({_one_line(exc)})") from None
        except RecursionError:
            raise ChatTemplateError(f"{name}: not valid Jinja (nested too deeply to compile)") from None
        except MemoryError:
            raise ChatTemplateError(f"{name}: not valid Jinja (out of memory while compiling)") from None
        except Exception as exc:  # the Python compiler on generated code: SyntaxError, ValueError, ...
            raise ChatTemplateError(f"{name}: not valid Jinja ({type(exc).__name__}: {_one_line(exc)})") from None
        finally:
            _local.budget = outer

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
        budget = _Budget(self.limits)
        outer, _local.budget = _budget(), budget
        try:
            parts, size = [], 0
            for part in self._compiled.generate(**variables):
                size += len(part)
                if size > self.limits.output_chars:
                    raise _LimitExceeded(f"output of more than {self.limits.output_chars} characters")
                parts.append(part)
                budget.tick()
            return "".join(parts)
        except _LimitExceeded as exc:
            raise ChatTemplateError(f"{self.name}: rendering stopped by the template limits: {_one_line(exc)}") \
                from None
        except jinja2.exceptions.TemplateError as exc:  # includes SecurityError and UndefinedError
            raise ChatTemplateError(f"{self.name}: rendering failed: {_one_line(exc)}") from None
        except RecursionError:
            raise ChatTemplateError(f"{self.name}: rendering failed: recursion too deep") from None
        except MemoryError:
            raise ChatTemplateError(f"{self.name}: rendering failed: out of memory") from None
        except Exception as exc:  # OverflowError, TypeError, ...: the template's fault, one line
            raise ChatTemplateError(f"{self.name}: rendering failed: {type(exc).__name__}: {_one_line(exc)}") from None
        finally:
            _local.budget = outer

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
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ChatTemplateError(f"{path}: cannot read the chat template ({exc.strerror})") from None
            return ChatTemplate(data, bos, eos, name=str(path))
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
