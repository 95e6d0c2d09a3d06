"""Chat / instruction data for supervised fine-tuning: read, validate, render with the chat template, tokenize
with a loss mask that covers only the assistant's tokens.

Formats (detected per record in JSONL/JSON files; KakaoTalk by file content):
- Alpaca:   {"instruction": str, "input": str (optional), "output": str, "system": str (optional)}
- ShareGPT: {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}
  ("user"/"assistant" are accepted for `from`, as are "role"/"content" keys)
- OpenAI:   {"messages": [{"role": "system"|"user"|"assistant", "content": str | [{"type":"text","text":..}]}]}
  An assistant message (OpenAI or ShareGPT) may carry `"weight": 0` (OpenAI's fine-tuning field): it stays in the
  context but is not learned (Ghost Attention data, `data/gatt.py`, keeps only the last reply's loss this way).
- KakaoTalk chat exports (`kakaotalk.py`): the persona (one speaker, under any of its aliases) becomes the
  assistant, everyone else the user. Several exports are merged; a conversation found in two overlapping
  exports is kept once. Personal data is scrubbed from chat exports by default (`privacy.py`).

Long conversations are split into windows of whole exchanges (user turns + the persona's reply) that fit
`max_seq_len`; only an exchange longer than a row on its own is cut, and `SFTDataset.report` counts that.

Every malformed record becomes a `BadRecord(file, line, reason)`; `load_sft_dataset(..., skip_bad=False)`
raises `DatasetError` listing them, so a run stops before training starts.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..errors import FormatError
from .kakaotalk import (  # noqa: F401  (re-exported: the KakaoTalk API used to live here)
    KakaoMessage,
    KakaoStats,
    is_kakao_text,
    kakao_conversations,
    looks_like_kakao,
    parse_kakao,
    persona_speakers,
    read_kakao,
    split_names,
)
from .loader import Example
from .privacy import DEFAULT_CHAT_KINDS, Scrubber, parse_kinds
from .records import BadRecord, Conversation, DatasetError, RecordInvalid
from .textfile import read_text

T = TypeVar("T")

Message = dict[str, Any]  # role, content and, on a reply not learned, "weight": 0

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


@dataclass
class FileReport:
    """How one input file was read."""

    path: str
    format: str  # "jsonl", "json", "kakaotalk pc", "kakaotalk mobile", "kakaotalk android-en", "kakaotalk csv"
    encoding: str
    records: int  # JSON records or chat messages
    conversations: int = 0
    speakers: Counter[str] = field(default_factory=Counter)  # chat exports: messages per speaker
    persona: list[str] = field(default_factory=list)  # chat exports: the speakers that became the assistant
    events: int = 0  # chat exports: room events skipped


@dataclass
class DataReport:
    """Everything a user should see before training: per-file reading, what was dropped and why, scrubbing,
    and (after tokenizing) how long conversations were fitted into rows."""

    files: list[FileReport] = field(default_factory=list)
    kakao: KakaoStats = field(default_factory=KakaoStats)
    duplicates: int = 0  # conversations dropped because an earlier export already had them
    scrub_kinds: dict[str, tuple[str, ...]] = field(default_factory=dict)  # file -> kinds scrubbed there
    scrubbed: Counter[str] = field(default_factory=Counter)
    conversations: int = 0
    examples: int | None = None  # set once tokenized
    split_conversations: int = 0  # conversations longer than a row, split into windows of whole turns
    windows: int = 0  # examples those conversations became
    truncated: int = 0  # examples still longer than a row (one exchange alone does not fit): cut
    truncated_tokens: int = 0  # tokens cut off those
    dropped_examples: int = 0  # examples with no reply token left inside the row: not used at all
    dropped_tokens: int = 0
    max_seq_len: int | None = None

    def summary(self) -> str:
        """A few lines on what happened to the data (printed by finetune, data inspect)."""
        lines = [f"data: {len(self.files)} file(s), {self.conversations} conversation(s)"
                 + (f" -> {self.examples} example(s)" if self.examples is not None else "")]
        legacy = [f"{f.path} ({f.encoding})" for f in self.files if f.encoding not in ("utf-8", "utf-8-sig")]
        if legacy:
            lines.append(f"  not UTF-8, read as: {', '.join(legacy)}")
        if self.split_conversations:
            lines.append(f"  {self.split_conversations} conversation(s) longer than --seq-len {self.max_seq_len} "
                         f"split into {self.windows} windows of whole turns")
        if self.max_seq_len is not None:
            if self.truncated:
                lines.append(f"  {self.truncated} example(s) still longer than --seq-len {self.max_seq_len} "
                             f"(a single exchange too long): {self.truncated_tokens} token(s) cut off the end")
            else:
                lines.append(f"  nothing truncated at --seq-len {self.max_seq_len}")
        if self.dropped_examples:
            lines.append(f"  {self.dropped_examples} example(s) ({self.dropped_tokens} tokens) dropped: no reply "
                         f"token within --seq-len {self.max_seq_len}; raise --seq-len to use them")
        if self.kakao.dropped:
            shown = ", ".join(f"{n} {reason}" for reason, n in self.kakao.dropped.most_common())
            lines.append(f"  chat messages dropped: {shown}")
        if self.kakao.persona_openings:
            lines.append(f"  {self.kakao.persona_openings} conversation(s) opened by the persona (kept, after an "
                         "empty user turn)")
        if self.duplicates:
            lines.append(f"  {self.duplicates} duplicate conversation(s) from overlapping exports kept once")
        if self.scrub_kinds:
            from .privacy import describe_counts

            kinds = tuple(dict.fromkeys(k for ks in self.scrub_kinds.values() for k in ks))
            if kinds:
                lines.append(f"  privacy: scrubbed {describe_counts(self.scrubbed, kinds)} (--scrub to change)")
            else:
                lines.append("  privacy: no scrubbing (--scrub none)")
        return "\n".join(lines)


class _Bad(Exception):
    pass


# -- record formats ------------------------------------------------------------------------------

def _text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts
        parts = []
        for p in value:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise _Bad(f"{where}: only text content parts are supported")
            parts.append(p["text"])
        return "".join(parts)
    raise _Bad(f"{where} must be a string, got {type(value).__name__}")


def _weight(m: dict[str, Any], where: str) -> int | None:
    """The message's loss weight (OpenAI's fine-tuning field): 0 keeps a reply as context only, 1 learns it."""
    if "weight" not in m:
        return None
    w = m["weight"]
    if isinstance(w, bool) or w not in (0, 1):
        raise _Bad(f"{where}.weight must be 0 or 1, got {w!r}")
    if m.get("role", m.get("from")) not in ("assistant", "gpt", "chatgpt", "bing", "bard"):
        raise _Bad(f"{where}.weight is only meaningful on an assistant message")
    return int(w)


def _message(role: str, content: str, weight: int | None) -> Message:
    return {"role": role, "content": content} if weight is None or weight == 1 else \
        {"role": role, "content": content, "weight": weight}


def learned(m: dict[str, Any]) -> bool:
    """Whether the tokens of this assistant message are learned (not `"weight": 0`)."""
    return m.get("weight", 1) != 0


def _check_turns(messages: list[Message], need_reply: bool = True) -> list[Message]:
    if not need_reply:  # prompts only (GAtt samples the replies): any user turn will do
        if not any(m["role"] == "user" for m in messages):
            raise _Bad("no user message")
        return messages
    if not any(m["role"] == "assistant" for m in messages):
        raise _Bad("no assistant message to learn from")
    if not any(m["role"] == "assistant" and learned(m) for m in messages):
        raise _Bad("every assistant message has weight 0: nothing to learn from")
    seen_non_system = False
    for i, m in enumerate(messages):
        if m["role"] == "system" and seen_non_system:
            raise _Bad(f"message {i}: a system message may only come first")
        seen_non_system = seen_non_system or m["role"] != "system"
    if messages[-1]["role"] != "assistant":
        messages = messages[:max(i for i, m in enumerate(messages) if m["role"] == "assistant") + 1]
    return messages


def record_to_messages(record: Any, need_reply: bool = True) -> list[Message]:
    """Messages of one Alpaca / ShareGPT / OpenAI record; raises _Bad with the reason otherwise. need_reply=False
    accepts conversations without an assistant reply (GAtt's user turns)."""
    if not isinstance(record, dict):
        raise _Bad(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise _Bad("'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise _Bad(f"messages[{i}] must be an object")
            role = m.get("role")
            if role not in ROLES:
                raise _Bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
            out.append(_message(role, _text(m.get("content"), f"messages[{i}].content"),
                                _weight(m, f"messages[{i}]")))
        return _check_turns(out, need_reply)
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise _Bad("'conversations' must be a non-empty list")
        out = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise _Bad(f"conversations[{i}] must be an object")
            who = t.get("from", t.get("role"))
            role = SHAREGPT_ROLES.get(str(who).lower()) if who is not None else None
            if role is None:
                raise _Bad(f"conversations[{i}].from must be human/gpt/system, got {who!r}")
            out.append(_message(role, _text(t.get("value", t.get("content")), f"conversations[{i}].value"),
                                _weight({**t, "role": role}, f"conversations[{i}]")))
        return _check_turns(out, need_reply)
    if "instruction" in record or "output" in record:
        instruction, output = record.get("instruction"), record.get("output")
        if not isinstance(instruction, str) or not instruction.strip():
            raise _Bad("'instruction' must be a non-empty string")
        if not isinstance(output, str):
            raise _Bad("'output' must be a string")
        extra = record.get("input", "")
        if extra is None:
            extra = ""
        if not isinstance(extra, str):
            raise _Bad("'input' must be a string")
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        system = record.get("system")
        if isinstance(system, str) and system.strip():
            msgs.insert(0, {"role": "system", "content": system})
        return msgs
    keys = ", ".join(sorted(map(str, record))[:6])
    raise _Bad(f"unknown record format (keys: {keys}); expected messages, conversations or instruction/output")


def _json_array_records(path: Path, text: str) -> Iterable[tuple[int, Any] | BadRecord]:
    """(line number, element) of a top-level JSON array, each element with the line it starts on."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield BadRecord(str(path), line, f"invalid JSON: {e.msg} (the rest of the array cannot be read)")
            return
        yield line, obj


def read_json_records(path: Path) -> Iterable[tuple[int, Any] | BadRecord]:
    """Records of a JSONL file (one per line) or a JSON array file, with their line numbers."""
    text, _ = read_text(path, fallback=False)  # JSON is UTF-8; a bad byte is reported with its file:line
    if text.lstrip().startswith("["):
        yield from _json_array_records(path, text)
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            yield BadRecord(str(path), n, f"invalid JSON: {e.msg} at column {e.colno}")


def parse_json_records(path: Path, parse: Callable[[Any], T]) -> list[T]:
    """parse(record) for each record of a JSONL / JSON file, for files of one kind of item (instructions, judge
    prompts) whose commands have no --skip-bad: parse raises RecordInvalid(reason) for a malformed record, and a
    DatasetError names every malformed record (file:line: reason) after the whole file is read."""
    out: list[T] = []
    bad: list[BadRecord] = []
    for item in read_json_records(path):
        if isinstance(item, BadRecord):
            bad.append(item)
            continue
        line, record = item
        try:
            out.append(parse(record))
        except RecordInvalid as e:
            bad.append(BadRecord(str(path), line, str(e)))
    if bad:
        raise DatasetError(bad, skippable=False)
    return out


# -- loading -------------------------------------------------------------------------------------

def _input_files(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            if (p / "manifest.json").exists() and '"llamaworks-tokens' in (p / "manifest.json").read_text(
                    encoding="utf-8", errors="replace")[:200]:
                raise FormatError(f"{p}: a `data prepare` output (pretraining tokens), not chat data; give "
                                  "finetune the chat files themselves (e.g. --data KakaoTalk.txt "
                                  "--kakao-assistant NAME, or a .jsonl of conversations)")
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in (".jsonl", ".json", ".txt", ".csv"))
        elif p.exists():
            files.append(p)
        else:
            raise FormatError(f"{p}: no such file or directory")
    return files


def load_conversations(paths: str | Path | Sequence[str | Path], *,
                       kakao_assistant: str | Sequence[str] | None = None, system: str | None = None,
                       kakao_gap_minutes: float = 360.0, scrub: str | Sequence[str] | None = None,
                       scrub_names: Sequence[str] = (), report: DataReport | None = None,
                       need_reply: bool = True) -> tuple[list[Conversation], list[BadRecord]]:
    """All conversations of the given files (and directories, recursively) plus every malformed record.

    kakao_assistant: the persona in chat exports, a name or aliases ("나,홍길동" or a list); in each export
    the speakers matching any alias become the assistant. scrub: kinds of personal data to replace (see
    `privacy.parse_kinds`; None: phone/email/id/account in chat exports, nothing elsewhere); scrub_names: more
    names to replace. `report`, when given, is filled with what was read, dropped and scrubbed. need_reply=False
    also accepts conversations of user turns only (GAtt samples the replies)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    report = report if report is not None else DataReport()
    aliases = split_names(kakao_assistant)
    scrubber = Scrubber(kinds=())
    scrubber.add_names(scrub_names)
    conversations: list[Conversation] = []
    bad: list[BadRecord] = []
    seen_chats: set[tuple[tuple[str, str], ...]] = set()
    for f in _input_files(paths):
        chat = f.suffix.lower() in (".txt", ".csv") and is_kakao_text(f)
        kinds = parse_kinds(scrub, default=DEFAULT_CHAT_KINDS if chat else ())
        if scrub_names and "name" not in kinds and scrub not in ("none", "off", "no"):
            kinds = (*kinds, "name")
        scrubber.kinds = kinds
        report.scrub_kinds[str(f)] = kinds
        if chat:
            if not aliases:
                raise FormatError(f"{f}: a KakaoTalk chat export; name the speaker to imitate with "
                                  "--kakao-assistant NAME (`llamaworks data inspect FILE` lists the speakers)")
            export = read_kakao(f)
            bad += export.bad
            pairs = kakao_conversations(export.messages, aliases, str(f), gap_minutes=kakao_gap_minutes,
                                        system=system, stats=report.kakao)
            persona = persona_speakers(export.speakers, aliases)
            if "name" in kinds:
                scrubber.add_names(sorted(set(export.speakers) - persona))
            kept = 0
            for conv in pairs:
                msgs = [m if m["role"] == "system" else {**m, "content": scrubber(m["content"])}
                        for m in conv.messages]
                key = tuple((m["role"], m["content"].strip()) for m in msgs)
                if key in seen_chats:  # the same conversation in another (overlapping) export
                    report.duplicates += 1
                    continue
                seen_chats.add(key)
                conversations.append(Conversation(msgs, str(f), conv.line))
                kept += 1
            report.files.append(FileReport(str(f), f"kakaotalk {export.format}", export.encoding,
                                           len(export.messages), kept, export.speakers, sorted(persona),
                                           export.events))
            continue
        if f.suffix.lower() not in (".jsonl", ".json"):
            hint = ""
            if f.suffix.lower() in (".txt", ".csv"):
                try:
                    read_text(f)
                except FormatError as e:
                    raise FormatError(f"{e} (expected .jsonl/.json records or a KakaoTalk .txt/.csv export)") \
                        from None
                hint = "; it does not look like a KakaoTalk export (`llamaworks data inspect FILE` shows why)"
            raise FormatError(f"{f}: expected .jsonl/.json records or a KakaoTalk .txt/.csv export{hint}")
        n_records, before = 0, len(conversations)
        for item in read_json_records(f):
            if isinstance(item, BadRecord):
                bad.append(item)
                continue
            n_records += 1
            line, record = item
            try:
                msgs = record_to_messages(record, need_reply)
            except _Bad as e:
                bad.append(BadRecord(str(f), line, str(e)))
                continue
            if kinds:
                msgs = [m if m["role"] == "system" else {**m, "content": scrubber(m["content"])} for m in msgs]
            if system and msgs[0]["role"] != "system":
                msgs.insert(0, {"role": "system", "content": system})
            conversations.append(Conversation(msgs, str(f), line))
        report.files.append(FileReport(str(f), f.suffix.lower().lstrip("."), "utf-8", n_records,
                                       len(conversations) - before))
    report.scrubbed.update(scrubber.counts)
    report.conversations = len(conversations)
    return conversations, bad


# -- rendering + masking -------------------------------------------------------------------------

def tokenize_conversation(messages: list[Message], tokenizer: Any, template: Any, *,
                          train_on_prompt: bool = False, allow_empty: bool = False) -> Example:
    """Token ids and loss mask of a conversation rendered with `template` (a ChatTemplate).

    The text is cut at the boundaries of each assistant reply: render(messages[:i], generation prompt) must be a
    prefix of render(messages[:i+1]); the part in between (the reply and its end-of-turn marker) is learned,
    unless the reply has `"weight": 0` (then it is context, like the prompt). Pieces are tokenized separately so
    the mask lines up with token boundaries exactly. allow_empty: return an example with nothing to learn instead
    of raising (a window of zero-weight replies)."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True)
        full = template.render(messages[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise _Bad("the chat template does not render this conversation as a growing prefix; "
                       "cannot locate the assistant replies")
        pieces.append((prompt[len(done):], False))
        pieces.append((full[len(prompt):], learned(m)))
        done = full
    ids: list[int] = []
    mask: list[bool] = []
    bos_token = getattr(tokenizer, "bos_token", None) or ""
    if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None and not (
            bos_token and pieces and pieces[0][0].startswith(bos_token)):
        ids.append(tokenizer.bos_id)
        mask.append(False)
    for text, learn in pieces:
        if not text:
            continue
        piece_ids = tokenizer.encode(text, add_bos=False, add_eos=False)
        ids += piece_ids
        mask += [learn or train_on_prompt] * len(piece_ids)
    if not any(mask) and not allow_empty:
        raise _Bad("no assistant tokens after rendering")
    return Example(ids, mask)


@dataclass
class SFTDataset:
    examples: list[Example]
    bad: list[BadRecord] = field(default_factory=list)
    conversations: int = 0
    truncated: int = 0  # examples longer than max_seq_len + 1 even after windowing (cut to fit)
    report: DataReport = field(default_factory=DataReport)
    groups: list[int] = field(default_factory=list)  # the conversation each example comes from
    parsed: list[Conversation] = field(default_factory=list)  # the conversations, before tokenizing

    @property
    def n_tokens(self) -> int:
        return sum(len(e) for e in self.examples)

    @property
    def n_loss_tokens(self) -> int:
        return sum(sum(e.loss_mask) for e in self.examples)

    def split(self, val_fraction: float, seed: int = 0) -> tuple[SFTDataset, SFTDataset]:
        """(train, validation): a seeded share `val_fraction` of the conversations (all windows of a
        conversation stay on one side), at least one when there are two or more conversations."""
        import numpy as np

        ids = sorted(set(self.groups))
        n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids)))) if val_fraction > 0 else 0
        if n_val <= 0:
            raise FormatError(f"--val-fraction {val_fraction}: {len(ids)} conversation(s) are too few to hold "
                              "any out; use more data or --val-data FILE")
        picked = {ids[int(i)] for i in np.random.default_rng([seed, 17]).permutation(len(ids))[:n_val]}
        parts: tuple[list[int], list[int]] = ([], [])
        for i, g in enumerate(self.groups):
            parts[g in picked].append(i)

        def subset(idx: list[int]) -> SFTDataset:
            return SFTDataset([self.examples[i] for i in idx], [], len({self.groups[i] for i in idx}),
                              sum(1 for i in idx if self.report.max_seq_len is not None
                                  and len(self.examples[i]) > self.report.max_seq_len + 1),
                              self.report, [self.groups[i] for i in idx], self.parsed)

        return subset(parts[0]), subset(parts[1])


def fit_conversation(messages: list[Message], tokenize: Callable[[list[Message]], Example],
                     max_len: int | None) -> list[Example]:
    """`messages` as one example, or, when longer than `max_len` tokens, as windows of whole exchanges (the
    user turns before a reply and the reply) that each fit; the system message heads every window. An exchange
    that does not fit on its own becomes one window, longer than max_len (the batch source cuts it). A window with
    nothing to learn (only `"weight": 0` replies) is left out."""
    whole = tokenize(messages)
    if max_len is None or len(whole) <= max_len:
        return [whole]
    head = messages[:1] if messages[0]["role"] == "system" else []
    exchanges: list[list[Message]] = []
    current: list[Message] = []
    for m in messages[len(head):]:
        current.append(m)
        if m["role"] == "assistant":
            exchanges.append(current)
            current = []
    if len(exchanges) < 2:
        return [whole]
    windows: list[Example] = []
    start = 0
    while start < len(exchanges):
        end = start + 1
        best = tokenize(head + [m for ex in exchanges[start:end] for m in ex])
        while end < len(exchanges):
            candidate = tokenize(head + [m for ex in exchanges[start:end + 1] for m in ex])
            if len(candidate) > max_len:
                break
            best, end = candidate, end + 1
        if any(best.loss_mask):
            windows.append(best)
        start = end
    return windows


def load_sft_dataset(paths: str | Path | Sequence[str | Path], tokenizer: Any, *, template: Any = None,
                     train_on_prompt: bool = False, skip_bad: bool = False, max_seq_len: int | None = None,
                     kakao_assistant: str | Sequence[str] | None = None, system: str | None = None,
                     kakao_gap_minutes: float = 360.0, scrub: str | Sequence[str] | None = None,
                     scrub_names: Sequence[str] = (), split_long: bool = True) -> SFTDataset:
    """Read, validate, render and tokenize SFT data. Raises DatasetError naming file:line: reason of the first
    malformed record (with the count of the others) unless skip_bad, which reports them and continues.

    template: a ChatTemplate (default: `chat_template.template_for(tokenizer)`, the model's own template).
    max_seq_len: the row length; longer conversations are split into windows of whole turns (split_long) and
    what is still cut or dropped is counted in `.report` (see `DataReport.summary()`)."""
    if template is None:
        from ..chat_template import template_for

        template = template_for(tokenizer)
    report = DataReport(max_seq_len=max_seq_len)
    conversations, bad = load_conversations(paths, kakao_assistant=kakao_assistant, system=system,
                                            kakao_gap_minutes=kakao_gap_minutes, scrub=scrub,
                                            scrub_names=scrub_names, report=report)
    limit = max_seq_len + 1 if max_seq_len else None  # a row of seq_len positions reads seq_len + 1 tokens

    def tokenize(messages: list[Message]) -> Example:
        return tokenize_conversation(messages, tokenizer, template, train_on_prompt=train_on_prompt,
                                     allow_empty=True)  # a window of zero-weight replies is left out

    examples: list[Example] = []
    groups: list[int] = []
    for index, conv in enumerate(conversations):
        try:
            fitted = fit_conversation(conv.messages, tokenize, limit if split_long else None)
        except _Bad as e:
            bad.append(BadRecord(conv.file, conv.line, str(e)))
            continue
        except Exception as e:  # a template raising on this record (e.g. roles not alternating)
            bad.append(BadRecord(conv.file, conv.line, f"chat template failed: {e}"))
            continue
        if len(fitted) > 1:
            report.split_conversations += 1
            report.windows += len(fitted)
        for ex in fitted:
            if limit is not None and len(ex) > limit:
                if not any(ex.loss_mask[1:limit]):
                    report.dropped_examples += 1
                    report.dropped_tokens += len(ex)
                    continue
                report.truncated += 1
                report.truncated_tokens += len(ex) - limit
            examples.append(ex)
            groups.append(index)
    bad.sort(key=lambda b: (b.file, b.line))
    if bad and not skip_bad:
        raise DatasetError(bad)
    if not examples:
        why = f" ({report.dropped_examples} dropped: no reply within --seq-len {max_seq_len})" \
            if report.dropped_examples else ""
        raise FormatError(f"no usable training example in {', '.join(map(str, _as_list(paths)))}{why}")
    report.examples = len(examples)
    return SFTDataset(examples, bad, len(conversations), report.truncated, report, groups, conversations)


def _as_list(paths: str | Path | Sequence[str | Path]) -> list[str | Path]:
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def report_bad(bad: Sequence[BadRecord], limit: int = 20) -> str:
    """A human-readable list of malformed records (the first `limit`)."""
    lines = [str(b) for b in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"... and {len(bad) - limit} more")
    return "\n".join(lines)
