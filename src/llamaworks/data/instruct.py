"""Chat / instruction data for supervised fine-tuning: read, validate, render with the chat template, tokenize
with a loss mask that covers only the assistant's tokens.

Formats (detected per record in JSONL/JSON files; KakaoTalk by file content):
- Alpaca:   {"instruction": str, "input": str (optional), "output": str, "system": str (optional)}
- ShareGPT: {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}
  ("user"/"assistant" are accepted for `from`, as are "role"/"content" keys)
- OpenAI:   {"messages": [{"role": "system"|"user"|"assistant", "content": str | [{"type":"text","text":..}]}]}
- KakaoTalk chat exports (one chosen speaker becomes the assistant, everyone else the user):
  * PC text export:  "--------------- 2024년 1월 15일 월요일 ---------------" date lines and
                     "[홍길동] [오후 3:15] 메시지" (English UI: "[John] [3:15 PM] message") message lines;
  * mobile text export: "2024. 1. 15. 오후 3:15, 홍길동 : 메시지" or "2024년 1월 15일 오후 3:15, 홍길동 : 메시지";
  * CSV export: header "Date,User,Message".
  Lines that continue a multi-line message are appended to it. A new day (or a gap of more than
  `kakao_gap_minutes`) starts a new conversation; media placeholders ("사진", "이모티콘", ...) are dropped.

Every malformed record becomes a `BadRecord(file, line, reason)`; `load_sft_dataset(..., skip_bad=False)`
raises `DatasetError` listing them, so a run stops before training starts.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ..errors import FormatError
from .loader import Example

Message = dict[str, str]

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
KAKAO_MEDIA = {"사진", "동영상", "이모티콘", "(이모티콘)", "(이모티콘) ", "파일", "음성메시지", "삭제된 메시지입니다.",
               "Photo", "Video", "Emoticon", "This message was deleted."}


@dataclass
class BadRecord:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class Conversation:
    messages: list[Message]
    file: str
    line: int


class DatasetError(FormatError):
    """One or more records are malformed; `.bad` has them all, the message names the first."""

    def __init__(self, bad: list[BadRecord]) -> None:
        self.bad = bad
        more = f" (and {len(bad) - 1} more malformed record(s); --skip-bad skips them)" if len(bad) > 1 else \
            " (--skip-bad skips it)"
        super().__init__(f"{bad[0]}{more}")


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


def _check_turns(messages: list[Message]) -> list[Message]:
    if not any(m["role"] == "assistant" for m in messages):
        raise _Bad("no assistant message to learn from")
    seen_non_system = False
    for i, m in enumerate(messages):
        if m["role"] == "system" and seen_non_system:
            raise _Bad(f"message {i}: a system message may only come first")
        seen_non_system = seen_non_system or m["role"] != "system"
    if messages[-1]["role"] != "assistant":
        messages = messages[:max(i for i, m in enumerate(messages) if m["role"] == "assistant") + 1]
    return messages


def record_to_messages(record: Any) -> list[Message]:
    """Messages of one Alpaca / ShareGPT / OpenAI record; raises _Bad with the reason otherwise."""
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
            out.append({"role": role, "content": _text(m.get("content"), f"messages[{i}].content")})
        return _check_turns(out)
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
            out.append({"role": role, "content": _text(t.get("value", t.get("content")),
                                                       f"conversations[{i}].value")})
        return _check_turns(out)
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
    text = path.read_text(encoding="utf-8-sig")
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


# -- KakaoTalk -----------------------------------------------------------------------------------

_K_PC_DATE = re.compile(r"^-{3,}\s*(?P<y>\d{4})년\s*(?P<m>\d{1,2})월\s*(?P<d>\d{1,2})일.*-{3,}\s*$")
_K_PC_DATE_EN = re.compile(r"^-{3,}\s*\w+day,\s*(?P<rest>\w+ \d{1,2}, \d{4})\s*-{3,}\s*$")
_K_PC_MSG = re.compile(r"^\[(?P<who>[^\]]+)\]\s*\[(?P<ampm>오전|오후)\s*(?P<h>\d{1,2}):(?P<mi>\d{2})\]\s?(?P<text>.*)$")
_K_PC_MSG_EN = re.compile(r"^\[(?P<who>[^\]]+)\]\s*\[(?P<h>\d{1,2}):(?P<mi>\d{2})\s*(?P<ampm>AM|PM)\]\s?(?P<text>.*)$")
_K_MOBILE_MSG = re.compile(
    r"^(?P<y>\d{4})(?:\.|년)\s*(?P<m>\d{1,2})(?:\.|월)\s*(?P<d>\d{1,2})(?:\.|일)\s*(?P<ampm>오전|오후)\s*"
    r"(?P<h>\d{1,2}):(?P<mi>\d{2}),\s*(?P<who>.+?)\s:\s(?P<text>.*)$")
_K_MOBILE_EVENT = re.compile(r"^\d{4}(?:\.|년)\s*\d{1,2}(?:\.|월)\s*\d{1,2}(?:\.|일)\s*(오전|오후)\s*\d{1,2}:\d{2}[:,]")
_K_EVENT = re.compile(r"님(이|을) .*(들어왔습니다|나갔습니다|초대했습니다|내보냈습니다)\.?$")
_K_MOBILE_DATE = re.compile(r"^(?P<y>\d{4})년\s*(?P<m>\d{1,2})월\s*(?P<d>\d{1,2})일\s*\S*요일\s*$")


def _hour24(h: int, ampm: str) -> int:
    pm = ampm in ("오후", "PM")
    return (h % 12) + (12 if pm else 0)


@dataclass
class KakaoMessage:
    when: datetime | None
    who: str
    text: str
    line: int


def is_kakao_text(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8-sig", errors="replace") as f:
            head = [next(f, "") for _ in range(40)]
    except OSError:
        return False
    text = "".join(head)
    if head and head[0].strip().replace(" ", "") in ("Date,User,Message",):
        return True
    return bool("카카오톡 대화" in text or "KakaoTalk Chats" in text
                or any(_K_PC_MSG.match(h) or _K_MOBILE_MSG.match(h) or _K_PC_MSG_EN.match(h) for h in head))


def parse_kakao(path: Path) -> tuple[list[KakaoMessage], list[BadRecord]]:
    """Messages of a KakaoTalk export (text or CSV) in file order."""
    raw = path.read_text(encoding="utf-8-sig", errors="strict")
    lines = raw.splitlines()
    if lines and lines[0].strip().replace(" ", "") == "Date,User,Message":
        return _parse_kakao_csv(path, raw)
    messages: list[KakaoMessage] = []
    bad: list[BadRecord] = []
    day: datetime | None = None
    for n, line in enumerate(lines, start=1):
        s = line.rstrip("\r")
        m = _K_PC_DATE.match(s) or _K_MOBILE_DATE.match(s)
        if m:
            day = datetime(int(m["y"]), int(m["m"]), int(m["d"]))
            continue
        m = _K_PC_DATE_EN.match(s)
        if m:
            try:
                day = datetime.strptime(m["rest"], "%B %d, %Y")
            except ValueError:
                bad.append(BadRecord(str(path), n, f"unreadable date line {s.strip()!r}"))
            continue
        m = _K_PC_MSG.match(s) or _K_PC_MSG_EN.match(s)
        if m:
            base = day
            when = None if base is None else base.replace(hour=_hour24(int(m["h"]), m["ampm"]), minute=int(m["mi"]))
            messages.append(KakaoMessage(when, m["who"].strip(), m["text"], n))
            continue
        m = _K_MOBILE_MSG.match(s)
        if m:
            when = datetime(int(m["y"]), int(m["m"]), int(m["d"]), _hour24(int(m["h"]), m["ampm"]), int(m["mi"]))
            messages.append(KakaoMessage(when, m["who"].strip(), m["text"], n))
            continue
        if _K_MOBILE_EVENT.match(s) or _K_EVENT.search(s):
            continue  # "… 홍길동님이 들어왔습니다." and similar room events
        if messages:
            messages[-1].text += "\n" + s  # a line matching nothing continues the previous message
        # Lines before the first message ("… 님과 카카오톡 대화", "저장한 날짜 : …") are the file header.
    for m in messages:
        m.text = m.text.rstrip()
    return messages, bad


def _parse_kakao_csv(path: Path, raw: str) -> tuple[list[KakaoMessage], list[BadRecord]]:
    messages: list[KakaoMessage] = []
    bad: list[BadRecord] = []
    reader = csv.reader(io.StringIO(raw))
    next(reader)
    end = reader.line_num
    for row in reader:
        n, end = end + 1, reader.line_num  # the line a (possibly multi-line) row starts on
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) != 3:
            bad.append(BadRecord(str(path), n, f"expected 3 CSV columns Date,User,Message, got {len(row)}"))
            continue
        date_s, who, text = row
        try:
            when = datetime.fromisoformat(date_s.strip())
        except ValueError:
            bad.append(BadRecord(str(path), n, f"Date {date_s!r} is not YYYY-MM-DD HH:MM:SS"))
            continue
        messages.append(KakaoMessage(when, who.strip(), text, n))
    return messages, bad


def kakao_conversations(messages: Sequence[KakaoMessage], assistant: str, file: str, *,
                        gap_minutes: float = 360.0, system: str | None = None) -> list[Conversation]:
    """Split a chat into conversations and map `assistant` -> assistant role, everyone else -> user.

    Consecutive messages of one side are joined with newlines. In a group chat (more than one other speaker)
    user turns are prefixed with "name: " so the model knows who said what."""
    speakers = {m.who for m in messages}
    if assistant not in speakers:
        shown = ", ".join(sorted(speakers)[:10])
        raise FormatError(f"{file}: speaker {assistant!r} not found in the chat; speakers are: {shown}")
    group = len(speakers - {assistant}) > 1
    sessions: list[list[KakaoMessage]] = []
    for m in messages:
        if m.text.strip() in KAKAO_MEDIA:
            continue
        prev = sessions[-1][-1] if sessions and sessions[-1] else None
        new = prev is None or (m.when is not None and prev.when is not None and (
            m.when.date() != prev.when.date() or m.when - prev.when > timedelta(minutes=gap_minutes)))
        if new:
            sessions.append([])
        sessions[-1].append(m)
    conversations = []
    for session in sessions:
        turns: list[Message] = []
        for m in session:
            role = "assistant" if m.who == assistant else "user"
            text = m.text if role == "assistant" or not group else f"{m.who}: {m.text}"
            if turns and turns[-1]["role"] == role:
                turns[-1]["content"] += "\n" + text
            else:
                turns.append({"role": role, "content": text})
        while turns and turns[0]["role"] == "assistant":  # a conversation opens with the user
            turns.pop(0)
        while turns and turns[-1]["role"] == "user":
            turns.pop()
        if not turns:
            continue
        if system:
            turns.insert(0, {"role": "system", "content": system})
        conversations.append(Conversation(turns, file, session[0].line))
    return conversations


# -- loading -------------------------------------------------------------------------------------

def load_conversations(paths: str | Path | Sequence[str | Path], *, kakao_assistant: str | None = None,
                       system: str | None = None, kakao_gap_minutes: float = 360.0
                       ) -> tuple[list[Conversation], list[BadRecord]]:
    """All conversations of the given files (and directories, recursively) plus every malformed record."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in (".jsonl", ".json", ".txt", ".csv"))
        elif p.exists():
            files.append(p)
        else:
            raise FormatError(f"{p}: no such file or directory")
    conversations: list[Conversation] = []
    bad: list[BadRecord] = []
    for f in files:
        if f.suffix.lower() in (".txt", ".csv") and is_kakao_text(f):
            if not kakao_assistant:
                raise FormatError(f"{f}: a KakaoTalk chat export; name the speaker to imitate with "
                                  "--kakao-assistant NAME")
            msgs, file_bad = parse_kakao(f)
            bad += file_bad
            conversations += kakao_conversations(msgs, kakao_assistant, str(f), gap_minutes=kakao_gap_minutes,
                                                 system=system)
            continue
        if f.suffix.lower() not in (".jsonl", ".json"):
            raise FormatError(f"{f}: expected .jsonl/.json records or a KakaoTalk .txt/.csv export")
        for item in read_json_records(f):
            if isinstance(item, BadRecord):
                bad.append(item)
                continue
            line, record = item
            try:
                msgs = record_to_messages(record)
            except _Bad as e:
                bad.append(BadRecord(str(f), line, str(e)))
                continue
            if system and msgs[0]["role"] != "system":
                msgs.insert(0, {"role": "system", "content": system})
            conversations.append(Conversation(msgs, str(f), line))
    return conversations, bad


# -- rendering + masking -------------------------------------------------------------------------

def tokenize_conversation(messages: list[Message], tokenizer: Any, template: Any, *,
                          train_on_prompt: bool = False) -> Example:
    """Token ids and loss mask of a conversation rendered with `template` (a ChatTemplate).

    The text is cut at the boundaries of each assistant reply: render(messages[:i], generation prompt) must be a
    prefix of render(messages[:i+1]); the part in between (the reply and its end-of-turn marker) is learned.
    Pieces are tokenized separately so the mask lines up with token boundaries exactly."""
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
        pieces.append((full[len(prompt):], True))
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
    if not any(mask):
        raise _Bad("no assistant tokens after rendering")
    return Example(ids, mask)


@dataclass
class SFTDataset:
    examples: list[Example]
    bad: list[BadRecord] = field(default_factory=list)
    conversations: int = 0
    truncated: int = 0  # examples longer than max_seq_len + 1 (cut to fit)

    @property
    def n_tokens(self) -> int:
        return sum(len(e) for e in self.examples)

    @property
    def n_loss_tokens(self) -> int:
        return sum(sum(e.loss_mask) for e in self.examples)


def load_sft_dataset(paths: str | Path | Sequence[str | Path], tokenizer: Any, *, template: Any = None,
                     train_on_prompt: bool = False, skip_bad: bool = False, max_seq_len: int | None = None,
                     kakao_assistant: str | None = None, system: str | None = None,
                     kakao_gap_minutes: float = 360.0) -> SFTDataset:
    """Read, validate, render and tokenize SFT data. Raises DatasetError naming file:line: reason of the first
    malformed record (with the count of the others) unless skip_bad, which reports them and continues.

    template: a ChatTemplate (default: `chat_template.template_for(tokenizer)`, the model's own template)."""
    if template is None:
        from ..chat_template import template_for

        template = template_for(tokenizer)
    conversations, bad = load_conversations(paths, kakao_assistant=kakao_assistant, system=system,
                                            kakao_gap_minutes=kakao_gap_minutes)
    examples: list[Example] = []
    for conv in conversations:
        try:
            examples.append(tokenize_conversation(conv.messages, tokenizer, template,
                                                  train_on_prompt=train_on_prompt))
        except _Bad as e:
            bad.append(BadRecord(conv.file, conv.line, str(e)))
        except Exception as e:  # a template raising on this record (e.g. roles not alternating)
            bad.append(BadRecord(conv.file, conv.line, f"chat template failed: {e}"))
    bad.sort(key=lambda b: (b.file, b.line))
    if bad and not skip_bad:
        raise DatasetError(bad)
    if not examples:
        raise FormatError(f"no usable training example in {', '.join(map(str, _as_list(paths)))}")
    truncated = sum(1 for e in examples if max_seq_len and len(e) > max_seq_len + 1)
    return SFTDataset(examples, bad, len(conversations), truncated)


def _as_list(paths: str | Path | Sequence[str | Path]) -> list[str | Path]:
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def report_bad(bad: Sequence[BadRecord], limit: int = 20) -> str:
    """A human-readable list of malformed records (the first `limit`)."""
    lines = [str(b) for b in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"... and {len(bad) - limit} more")
    return "\n".join(lines)
