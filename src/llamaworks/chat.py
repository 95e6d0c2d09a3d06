"""Multi-turn chat: conversation state, fitting it into the context, and the terminal front end.

`ChatSession` is UI-free (the Python API and tests drive it); `run_chat` is the `llamaworks chat` loop:
a rich prompt on a terminal, plain line-per-turn behaviour when stdin is piped.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from .errors import ConfigError

HELP = """commands:
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt (/system alone removes it)
  /help          show this help
  /exit          quit (also /quit, Ctrl-D)"""


def normalize_messages(messages: Sequence[dict[str, Any]] | str) -> list[dict[str, Any]]:
    """A list of {"role", "content"} dicts; a bare string is one user message."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConfigError(f"message {i}: expected a dict with 'role' and 'content', got {m!r:.80}")
        out.append(dict(m))
    return out


def encode_messages(tokenizer: Any, template: Any, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Render with the chat template (ending with the assistant cue) and tokenize.

    Templates usually write the BOS token themselves; the tokenizer then must not add a second one.
    """
    text = template.render(list(messages), add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None) or ""
    return tokenizer.encode(text, add_bos=False if bos and text.startswith(bos) else None)


@dataclass
class Fitted:
    """A conversation's prompt ids after dropping what did not fit."""

    ids: list[int]
    dropped_messages: int


class ChatSession:
    """One conversation: an optional system prompt and alternating user/assistant turns."""

    def __init__(self, scheduler: Any, template: Any, *, system: str | None = None, params: Any = None,
                 max_context: int | None = None) -> None:
        from .sampling import SamplingParams

        self.scheduler, self.tokenizer, self.template = scheduler, scheduler.tokenizer, template
        self.system = system or None
        self.params = params or SamplingParams()
        self.context = min(scheduler.context, max_context or scheduler.context)
        self.turns: list[dict[str, str]] = []
        self.last_result: Any = None
        self.last_dropped = 0

    def reset(self) -> None:
        self.turns = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    @property
    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def fit(self, turns: list[dict[str, str]]) -> Fitted:
        """Encode system + turns, dropping the oldest turns until the prompt leaves room for a reply.

        The system prompt and the newest user message are always kept; if even they do not fit, a
        ContextLengthError says so.
        """
        from .sampling import ContextLengthError

        reserve = max(1, min(self.params.max_new_tokens, self.context // 4))
        head = [{"role": "system", "content": self.system}] if self.system else []
        dropped = 0
        while True:
            ids = encode_messages(self.tokenizer, self.template, head + turns[dropped:])
            if len(ids) + reserve <= self.context or len(turns) - dropped <= 1:
                break
            dropped += 1
            # Drop whole exchanges: never leave an assistant message first.
            while dropped < len(turns) - 1 and turns[dropped]["role"] != "user":
                dropped += 1
        if len(ids) >= self.context:
            raise ContextLengthError(f"the message needs {len(ids)} tokens with the system prompt but the "
                                     f"context holds {self.context}; shorten it or raise --max-context")
        return Fitted(ids, dropped)

    def send(self, user_text: str) -> Iterator[str]:
        """Stream the reply to `user_text`; the exchange joins the history once the reply is complete.

        Before the first piece, `last_dropped` tells how many old messages were dropped to fit the context.
        If the caller stops early (or Ctrl-C interrupts), the exchange is not recorded.
        """
        from .engine.scheduler import generate_stream
        from .sampling import GenerationResult

        turns = [*self.turns, {"role": "user", "content": user_text}]
        fitted = self.fit(turns)
        self.last_dropped = fitted.dropped_messages
        self.turns = turns[fitted.dropped_messages:-1]
        result = None
        # The scheduler's row still holds the previous turns: only the new message is computed.
        for item in generate_stream(self.scheduler, fitted.ids, self.params):
            if isinstance(item, GenerationResult):
                result = item
            else:
                yield item
        self.last_result = result
        self.turns = [*self.turns, turns[-1], {"role": "assistant", "content": result.text}]

    def reply(self, user_text: str) -> str:
        return "".join(self.send(user_text))


def _stats_line(result: Any) -> str:
    return (f"[{result.completion_tokens} tokens, {result.decode_tokens_per_second:.1f} tok/s; "
            f"prompt {result.prompt_tokens} tokens, {result.prefill_tokens_per_second:.0f} tok/s]")


class _Terminal:
    """Output for the chat loop: rich styling on a terminal, plain text when piped."""

    def __init__(self, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> None:
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.interactive = stdin.isatty()
        self.console = self.err_console = None
        if stdout.isatty():
            from rich.console import Console

            self.console = Console(file=stdout, highlight=False)
            self.err_console = Console(file=stderr, highlight=False)
        if self.interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())

    def read(self) -> str:
        """The next input line; EOFError at the end of input."""
        if not self.interactive:
            line = self.stdin.readline()
            if not line:
                raise EOFError
            return line.rstrip("\r\n")
        if self.console is not None:
            return self.console.input("[bold green]>>> [/]")
        return input(">>> ")

    def write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def note(self, text: str, style: str = "dim") -> None:
        if self.err_console is not None:
            self.err_console.print(text, style=style, markup=False, soft_wrap=True)
        else:
            print(text, file=self.stderr, flush=True)


def run_chat(*, model: str | None = None, device: str | None = None, dtype: str | None = None,
             chat_template: str | None = None, system: str | None = None, max_context: int | None = None,
             reference: bool = False, mmap: bool | None = None, backend: str | None = None,
             threads: int | None = None, cpu_target: str = "native",
             stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None,
             **sampling: Any) -> int:
    """`llamaworks chat`: load a model and talk to it until /exit or end of input. Returns an exit code."""
    from . import load

    term = _Terminal(stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr)
    from .engine.backend import EngineOptions

    llm = load(model, device=device, dtype=dtype, chat_template=chat_template, max_context=max_context,
               reference=reference, mmap=mmap, backend=backend, threads=threads,
               options=EngineOptions.from_environment(cpu_target=cpu_target))
    session = ChatSession(llm.scheduler, llm.template, system=system, params=llm.sampling(**sampling),
                          max_context=max_context)
    if term.interactive:
        cfg = llm.config
        term.note(f"{cfg.name} ({cfg.n_params / 1e6:.0f}M parameters, context {session.context}) — "
                  "/help for commands, Ctrl-D to quit")
    while True:
        try:
            line = term.read()
        except EOFError:
            if term.interactive:
                term.write("\n")
            return 0
        except KeyboardInterrupt:
            term.write("\n")
            term.note("(Ctrl-D or /exit to quit)")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command in ("/exit", "/quit", "/bye"):
                return 0
            if command == "/reset":
                session.reset()
                term.note("(conversation reset)")
            elif command == "/system":
                session.set_system(arg.strip())
                term.note("(system prompt set)" if arg.strip() else "(system prompt removed)")
            elif command in ("/help", "/?"):
                term.note(HELP, style="")
            else:
                term.note(f"unknown command {command}; /help lists the commands", style="yellow")
            continue
        _chat_turn(session, line, term)


def _chat_turn(session: ChatSession, text: str, term: _Terminal) -> None:
    from .sampling import ContextLengthError

    try:
        pieces = session.send(text)
        first = next(pieces, None)  # fitting happens before the first piece
        if session.last_dropped:
            term.note(f"note: the conversation no longer fits the {session.context}-token context; dropped the "
                      f"{session.last_dropped} oldest message(s) (the system prompt is kept)", style="yellow")
        if first is not None:
            term.write(first)
        for piece in pieces:
            term.write(piece)
        term.write("\n")
    except ContextLengthError as e:
        term.note(f"error: {e}", style="red")
        return
    except KeyboardInterrupt:
        term.write("\n")
        term.note("(reply interrupted; not added to the conversation)")
        return
    if session.last_result is not None:
        term.note(_stats_line(session.last_result))


def run_generate(prompt: str, *, model: str | None = None, device: str | None = None, dtype: str | None = None,
                 chat_template: str | None = None, chat: bool = False, system: str | None = None,
                 stream: bool = False, stats: bool = False, max_context: int | None = None, reference: bool = False,
                 mmap: bool | None = None, backend: str | None = None, threads: int | None = None,
                 cpu_target: str = "native",
                 out: Any = None, err: Any = None, **sampling: Any) -> int:
    """`llamaworks generate`: complete `prompt` (raw, or as one chat user turn with `chat`) and print the text.
    Returns an exit code."""
    from . import load

    out, err = out or sys.stdout, err or sys.stderr
    from .engine.backend import EngineOptions

    llm = load(model, device=device, dtype=dtype, chat_template=chat_template, max_context=max_context,
               reference=reference, mmap=mmap, backend=backend, threads=threads,
               options=EngineOptions.from_environment(cpu_target=cpu_target))
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = llm.encode_chat(messages)
    else:
        ids = llm.encode_prompt(prompt)
    if stream:
        for piece in llm.stream_ids(ids, **sampling):
            out.write(piece)
            out.flush()
        result = llm.last_result
    else:
        result = llm.complete(ids, **sampling)
        out.write(result.text)
    out.write("\n")
    out.flush()
    if stats and result is not None:
        print(f"[{result.completion_tokens} tokens ({result.finish_reason}), "
              f"{result.decode_tokens_per_second:.1f} tok/s; prompt {result.prompt_tokens} tokens, "
              f"{result.prefill_tokens_per_second:.0f} tok/s]", file=err)
    return 0


__all__ = ["ChatSession", "encode_messages", "normalize_messages", "run_chat", "run_generate"]
