"""KakaoTalk chat exports -> conversations in which one person (the persona) is the assistant.

Formats (detected by content; the encoding may be UTF-8 with or without a BOM, UTF-16 or cp949/EUC-KR):
- PC text:       "--------------- 2024년 1월 15일 월요일 ---------------" date lines and
                 "[홍길동] [오후 3:15] 메시지" (English UI: "--- Monday, January 15, 2024 ---", "[John] [3:15 PM] ...");
- iOS / Android: "2024. 1. 15. 오후 3:15, 홍길동 : 메시지" or "2024년 1월 15일 오후 3:15, 홍길동 : 메시지"
                 (24-hour times too), bare date lines such as "2024년 1월 15일 월요일" or "2024년 1월 15일 오전 8:15";
- Android English: "January 15, 2024, 8:12 AM, John : message", bare date lines "January 15, 2024, 8:12 AM"
                 or "Monday, January 15, 2024";
- CSV (Mac, PC):  header "Date,User,Message".
Lines that match none of these continue the previous message (multi-line messages). Room events ("… 님이
들어왔습니다.", "… joined this chatroom.") are skipped; media placeholders ("사진", "사진 2장", "파일: a.docx",
"이모티콘", "동영상", "삭제된 메시지입니다.", "Photo", ...) are dropped and counted by kind.

Conversations: a new day, or a silence longer than `gap_minutes`, starts a new conversation. Consecutive
messages of one side are joined with newlines. A conversation the persona opens starts with an empty user turn
(so the persona's first message is still learned); a trailing unanswered user turn is dropped. In a group chat
(more than one other speaker) user turns are prefixed with "name: ".
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from ..errors import FormatError
from .records import BadRecord, Conversation
from .textfile import read_head, read_text

Message = dict[str, str]

_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_MONTHS_SHORT = "Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"
_YMD = r"(?P<y>\d{4})(?:\.|년)\s*(?P<m>\d{1,2})(?:\.|월)\s*(?P<d>\d{1,2})(?:\.|일)"
_KTIME = r"(?:(?P<ampm>오전|오후)\s*)?(?P<h>\d{1,2}):(?P<mi>\d{2})"
_EDATE = rf"(?P<mon>{_MONTHS}|{_MONTHS_SHORT})\.? (?P<d>\d{{1,2}}), (?P<y>\d{{4}})"
_ETIME = r"(?P<h>\d{1,2}):(?P<mi>\d{2})\s*(?P<ampm>AM|PM|am|pm)"

_PC_DATE = re.compile(r"^-{3,}\s*(?P<y>\d{4})년\s*(?P<m>\d{1,2})월\s*(?P<d>\d{1,2})일.*-{3,}\s*$")
_PC_DATE_EN = re.compile(rf"^-{{3,}}\s*(?:\w+day,\s*)?{_EDATE}\s*-{{3,}}\s*$")
_PC_MSG = re.compile(r"^\[(?P<who>[^\]]+)\]\s*\[(?P<ampm>오전|오후)\s*(?P<h>\d{1,2}):(?P<mi>\d{2})\]\s?(?P<text>.*)$")
_PC_MSG_EN = re.compile(r"^\[(?P<who>[^\]]+)\]\s*\[(?P<h>\d{1,2}):(?P<mi>\d{2})\s*(?P<ampm>AM|PM)\]\s?(?P<text>.*)$")
_MOBILE_MSG = re.compile(rf"^{_YMD}\s*{_KTIME},\s*(?P<who>.+?)\s:\s(?P<text>.*)$")
_MOBILE_DATE = re.compile(rf"^{_YMD}\s*(?:\S*요일)?\s*(?:{_KTIME})?\s*$")
_MOBILE_EVENT = re.compile(rf"^{_YMD}\s*{_KTIME}\s*[:,]")
_EN_MSG = re.compile(rf"^(?:\w+day,\s*)?{_EDATE},?\s*(?:at\s+)?{_ETIME},\s*(?P<who>.+?)\s:\s(?P<text>.*)$")
_EN_DATE = re.compile(rf"^(?:\w+day,\s*)?{_EDATE}(?:,?\s*(?:at\s+)?{_ETIME})?\s*$")
_EN_EVENT = re.compile(rf"^(?:\w+day,\s*)?{_EDATE},?\s*(?:at\s+)?{_ETIME}\s*[:,]")
_EVENT = re.compile(r"님(이|을|께서) .*(들어왔습니다|나갔습니다|초대했습니다|내보냈습니다)\.?$"
                    r"|(joined|left) this chatroom\.?$|invited .+ to this chatroom\.?$")
_CSV_HEADER = "Date,User,Message"

# Whole messages that stand for media or events, not words: dropped from training text, counted by kind.
PLACEHOLDERS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(?:사진(?: \d+장)?|Photo|Photos|\d+ [Pp]hotos)$"), "photo"),
    (re.compile(r"^(?:동영상|Video|Videos|\d+ [Vv]ideos)$"), "video"),
    (re.compile(r"^\(?(?:이모티콘|Emoticon|Sticker)\)?$"), "emoticon"),
    (re.compile(r"^(?:파일|File)(?:\s*:\s*.+)?$"), "file"),
    (re.compile(r"^(?:음성메시지|Voice [Mm]essage|Voice [Nn]ote)$"), "voice message"),
    (re.compile(r"^(?:삭제된 메시지입니다|This message was deleted|Deleted message)\.?$"), "deleted message"),
    (re.compile(r"^(?:보이스톡|페이스톡|그룹콜|Voice ?Talk|Face ?Talk|Voice [Cc]all|Video [Cc]all)"
                r"\s*(?:해요|취소|종료|부재중|요청|[Ee]nded|[Cc]anceled|[Cc]ancelled|[Mm]issed)?(?:\s+[\d:]+)?$"),
     "call"),
    (re.compile(r"^(?:지도|연락처|Map|Contact|Location)(?:\s*:\s*.+)?$"), "shared location/contact"),
    (re.compile(r"^(?:송금|Money transfer|Transfer)(?:\s*:?\s*[\d,]+원?)?$"), "money transfer"),
]
_EMOTICON_PREFIX = re.compile(r"^\((?:이모티콘|emoticon|Emoticon)\)\s*")


def placeholder_kind(text: str) -> str | None:
    """The kind of media placeholder `text` is ("photo", "file", ...), or None for real words."""
    s = text.strip()
    for pattern, kind in PLACEHOLDERS:
        if pattern.match(s):
            return kind
    return None


def _hour24(h: int, ampm: str | None) -> int:
    if ampm is None:
        return h
    return (h % 12) + (12 if ampm in ("오후", "PM", "pm") else 0)


def _en_month(name: str) -> int:
    key = name[:3].lower()
    return [m[:3].lower() for m in _MONTHS.split("|")].index(key) + 1


@dataclass
class KakaoMessage:
    when: datetime | None
    who: str
    text: str
    line: int


@dataclass
class KakaoExport:
    """One parsed export: its messages in file order, malformed lines, and what was read how."""

    path: str
    messages: list[KakaoMessage]
    bad: list[BadRecord]
    encoding: str
    format: str  # "pc", "mobile", "android-en", "csv"
    events: int = 0  # room events skipped ("… 님이 들어왔습니다.")

    @property
    def speakers(self) -> Counter[str]:
        return Counter(m.who for m in self.messages)


def looks_like_kakao(text: str) -> bool:
    """True when the first lines of `text` look like a KakaoTalk export."""
    head = text.split("\n", 40)[:40]
    if head and head[0].strip().replace(" ", "") == _CSV_HEADER:
        return True
    return bool("카카오톡 대화" in text[:4000] or "KakaoTalk Chats" in text[:4000]
                or any(p.match(h) for h in head for p in (_PC_MSG, _PC_MSG_EN, _MOBILE_MSG, _EN_MSG)))


def is_kakao_text(path: str | Path) -> bool:
    try:
        return looks_like_kakao(read_head(path))
    except OSError:
        return False


def read_kakao(path: str | Path) -> KakaoExport:
    """Parse a KakaoTalk export (see the module docstring)."""
    path = Path(path)
    raw, encoding = read_text(path)
    lines = raw.split("\n")
    if lines and lines[0].strip().replace(" ", "") == _CSV_HEADER:
        messages, bad = _parse_csv(path, raw)
        return KakaoExport(str(path), messages, bad, encoding, "csv")
    messages: list[KakaoMessage] = []
    bad: list[BadRecord] = []
    formats: Counter[str] = Counter()
    day: datetime | None = None
    events = 0
    for n, s in enumerate(lines, start=1):
        m = _PC_MSG.match(s) or _PC_MSG_EN.match(s)
        if m:
            when = None if day is None else day.replace(hour=_hour24(int(m["h"]), m["ampm"]), minute=int(m["mi"]))
            messages.append(KakaoMessage(when, m["who"].strip(), m["text"], n))
            formats["pc"] += 1
            continue
        m = _MOBILE_MSG.match(s)
        if m:
            when = _datetime(path, n, bad, int(m["y"]), int(m["m"]), int(m["d"]), _hour24(int(m["h"]), m["ampm"]),
                             int(m["mi"]))
            messages.append(KakaoMessage(when, m["who"].strip(), m["text"], n))
            formats["mobile"] += 1
            continue
        m = _EN_MSG.match(s)
        if m:
            when = _datetime(path, n, bad, int(m["y"]), _en_month(m["mon"]), int(m["d"]),
                             _hour24(int(m["h"]), m["ampm"].upper()), int(m["mi"]))
            messages.append(KakaoMessage(when, m["who"].strip(), m["text"], n))
            formats["android-en"] += 1
            continue
        m = _PC_DATE.match(s) or _MOBILE_DATE.match(s)
        if m:
            day = _datetime(path, n, bad, int(m["y"]), int(m["m"]), int(m["d"])) or day
            continue
        m = _PC_DATE_EN.match(s) or _EN_DATE.match(s)
        if m:
            day = _datetime(path, n, bad, int(m["y"]), _en_month(m["mon"]), int(m["d"])) or day
            continue
        if _MOBILE_EVENT.match(s) or _EN_EVENT.match(s) or _EVENT.search(s):
            events += 1  # "… 홍길동님이 들어왔습니다." and similar room events
            continue
        if messages:
            messages[-1].text += "\n" + s  # a line matching nothing continues the previous message
        # Lines before the first message ("… 님과 카카오톡 대화", "저장한 날짜 : …") are the file header.
    for msg in messages:
        msg.text = msg.text.rstrip()
    fmt = formats.most_common(1)[0][0] if formats else "unknown"
    return KakaoExport(str(path), messages, bad, encoding, fmt, events)


def parse_kakao(path: str | Path) -> tuple[list[KakaoMessage], list[BadRecord]]:
    """Messages of a KakaoTalk export (text or CSV) in file order, and its malformed lines."""
    export = read_kakao(path)
    return export.messages, export.bad


def _datetime(path: Path, line: int, bad: list[BadRecord], *parts: int) -> datetime | None:
    try:
        return datetime(*parts)
    except ValueError as e:
        bad.append(BadRecord(str(path), line, f"impossible date or time ({e})"))
        return None


def _parse_csv(path: Path, raw: str) -> tuple[list[KakaoMessage], list[BadRecord]]:
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


# -- conversations -------------------------------------------------------------------------------

def split_names(names: str | Iterable[str] | None) -> list[str]:
    """Persona aliases from "나,회원님" or ["나", "홍길동"] (commas split, blanks dropped, order kept)."""
    if names is None:
        return []
    items = [names] if isinstance(names, str) else list(names)
    out: list[str] = []
    for item in items:
        for name in str(item).split(","):
            if name.strip() and name.strip() not in out:
                out.append(name.strip())
    return out


def persona_speakers(speakers: Iterable[str], aliases: Sequence[str]) -> set[str]:
    """The speakers of a chat that are the persona: exact alias matches, else case-insensitive ones."""
    speakers = set(speakers)
    exact = speakers & set(aliases)
    if exact:
        return exact
    folded = {a.casefold() for a in aliases}
    return {s for s in speakers if s.casefold() in folded}


def speaker_error(file: str, aliases: Sequence[str], speakers: Counter[str]) -> FormatError:
    if not speakers:
        return FormatError(f"{file}: no KakaoTalk messages were recognised, so speaker "
                           f"{', '.join(map(repr, aliases))} cannot be found; is this an unedited export? "
                           "(`llamaworks data inspect FILE` shows how it is read)")
    shown = ", ".join(f"{name} ({n})" for name, n in speakers.most_common(10))
    if len(speakers) > 10:
        shown += f", ... ({len(speakers) - 10} more)"
    which = f"speaker {aliases[0]!r}" if len(aliases) == 1 else \
        f"none of the speakers {', '.join(map(repr, aliases))}"
    return FormatError(f"{file}: {which} not found in the chat; speakers are (messages): {shown}; "
                       "pass yours with --kakao-assistant (several aliases: --kakao-assistant '나,홍길동')")


@dataclass
class KakaoStats:
    """What turning messages into conversations dropped, by reason."""

    dropped: Counter[str] = field(default_factory=Counter)
    examples: list[tuple[str, int, str, str]] = field(default_factory=list)  # (file, line, reason, text)
    persona_openings: int = 0  # conversations the persona opens (kept behind an empty user turn)

    def drop(self, file: str, line: int, reason: str, text: str) -> None:
        self.dropped[reason] += 1
        if len(self.examples) < 200:
            self.examples.append((file, line, reason, text))


def kakao_conversations(messages: Sequence[KakaoMessage], assistant: str | Sequence[str], file: str, *,
                        gap_minutes: float = 360.0, system: str | None = None,
                        stats: KakaoStats | None = None) -> list[Conversation]:
    """The conversations of a chat; `assistant` is the persona's name or its aliases."""
    aliases = split_names(assistant)
    speakers = Counter(m.who for m in messages)
    persona = persona_speakers(speakers, aliases)
    if not persona:
        raise speaker_error(file, aliases, speakers)
    stats = stats if stats is not None else KakaoStats()
    group = len(set(speakers) - persona) > 1
    sessions: list[list[KakaoMessage]] = []
    for m in messages:
        kind = placeholder_kind(m.text)
        if kind is not None:
            stats.drop(file, m.line, f"placeholder: {kind}", m.text)
            continue
        if not m.text.strip():
            stats.drop(file, m.line, "empty message", m.text)
            continue
        text = _EMOTICON_PREFIX.sub("", m.text)
        if text != m.text:
            m = KakaoMessage(m.when, m.who, text, m.line)
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
            role = "assistant" if m.who in persona else "user"
            text = m.text if role == "assistant" or not group else f"{m.who}: {m.text}"
            if turns and turns[-1]["role"] == role:
                turns[-1]["content"] += "\n" + text
            else:
                turns.append({"role": role, "content": text})
        if turns and turns[-1]["role"] == "user":
            stats.drop(file, session[-1].line, "unanswered user turn at the end of a conversation",
                       turns[-1]["content"])
            turns.pop()
        if not turns:
            continue
        if turns[0]["role"] == "assistant":  # the persona opens the conversation: keep what it said
            turns.insert(0, {"role": "user", "content": ""})
            stats.persona_openings += 1
        if system:
            turns.insert(0, {"role": "system", "content": system})
        conversations.append(Conversation(turns, file, session[0].line))
    return conversations
