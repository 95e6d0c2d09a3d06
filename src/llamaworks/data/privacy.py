"""Scrubbing personal data out of training text before it can end up in a model's weights.

Kinds (each replaced by a tag the model may learn to write, never the value itself):
  phone    Korean mobile/landline numbers (010-1234-5678, 01012345678, 02-123-4567, +82 10-1234-5678) and
           international +CC numbers                                          -> [PHONE]
  email    e-mail addresses                                                    -> [EMAIL]
  id       resident registration numbers (주민등록번호, 900101-1234567)           -> [ID]
  account  bank account and card numbers: digit groups joined by '-' with 10-16 digits in all
           (110-123-456789, 1002-345-678901, 1234-5678-9012-3456), cards written 1234 5678 9012 3456, or a
           bare run of 10-16 digits
           (dates such as 2024-01-15 have 8 digits and stay)                  -> [ACCOUNT]
  name     other people's names: the other speakers of a chat export, plus any given with --scrub-name; a
           three-syllable Korean name also matches its two-syllable given name (김민수 -> 민수)
                                                                                -> [NAME1], [NAME2], ...

Defaults: chat exports (KakaoTalk) are scrubbed of phone, email, id and account; other data is left as written
unless --scrub names kinds. `parse_kinds("all")` adds names; "none" turns scrubbing off.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import ConfigError

KINDS = ("phone", "email", "id", "account", "name")
DEFAULT_CHAT_KINDS = ("phone", "email", "id", "account")

_PHONE = re.compile(
    r"(?<![\w.-])(?:"
    r"(?:\+82[-.\s]?|0)1[016789][-.\s]?\d{3,4}[-.\s]?\d{4}"  # mobile
    r"|(?:\+82[-.\s]?|0)(?:2|[3-6][1-5]|70)[-.\s)]?\d{3,4}[-.\s]?\d{4}"  # landline, internet phone
    r"|\+(?!82)\d{1,3}[-.\s]?\(?\d{1,4}\)?[-.\s]?\d{3,4}[-.\s]?\d{3,4}"  # other countries
    r"|1[5-9]\d{2}-\d{4}"  # 1588-1234 style service numbers
    r")(?![\w-])")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_ID = re.compile(r"(?<![\d-])\d{6}-?[1-8]\d{6}(?![\d-])")
_ACCOUNT = re.compile(r"(?<![\d-])\d{2,6}(?:-\d{2,8}){1,4}(?![\d-])|(?<!\d)(?<!\d )\d{4}(?: \d{4}){3}(?!\d)"
                      r"|(?<!\d)\d{10,16}(?!\d)")
_HANGUL_NAME = re.compile(r"^[가-힣]{3}$")


def parse_kinds(spec: str | Sequence[str] | None, default: Sequence[str] = DEFAULT_CHAT_KINDS) -> tuple[str, ...]:
    """Kinds from "phone,email", "all", "none"/"off" or a list; None gives `default`."""
    if spec is None:
        return tuple(default)
    items = [spec] if isinstance(spec, str) else list(spec)
    kinds: list[str] = []
    for item in items:
        for k in str(item).lower().split(","):
            k = k.strip().rstrip("s")  # "phones", "emails", "names", "accounts" too
            if not k:
                continue
            if k in ("none", "off", "no"):
                return ()
            if k == "all":
                kinds += [x for x in KINDS if x not in kinds]
                continue
            if k == "e-mail":
                k = "email"
            if k not in KINDS:
                raise ConfigError(f"--scrub: unknown kind {k!r}; expected {', '.join(KINDS)}, all or none")
            if k not in kinds:
                kinds.append(k)
    return tuple(kinds)


@dataclass
class Scrubber:
    """Replaces personal data in text; `counts` says how many of each kind were replaced."""

    kinds: tuple[str, ...] = DEFAULT_CHAT_KINDS
    names: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._tags: dict[str, str] = {}
        self._name_re: re.Pattern[str] | None = None
        self.add_names(self.names)

    def add_names(self, names: Iterable[str]) -> None:
        """Register names to replace (only used when "name" is among the kinds)."""
        for name in names:
            name = name.strip()
            if not name or name in self._tags:
                continue
            tag = f"[NAME{len(set(self._tags.values())) + 1}]"
            self._tags[name] = tag
            if _HANGUL_NAME.match(name):
                self._tags.setdefault(name[1:], tag)  # 김민수 -> 민수
        forms = sorted(self._tags, key=len, reverse=True)
        self._name_re = re.compile("|".join(map(re.escape, forms))) if forms else None

    def name_tag(self, name: str) -> str:
        """The tag that stands for `name` (e.g. in a group chat's "name: " prefix)."""
        if "name" not in self.kinds or name not in self._tags:
            return name
        self.counts["name"] += 1
        return self._tags[name]

    def __call__(self, text: str) -> str:
        if not self.kinds or not text:
            return text
        if "email" in self.kinds:
            text = self._sub(_EMAIL, "[EMAIL]", "email", text)
        if "phone" in self.kinds:
            text = self._sub(_PHONE, "[PHONE]", "phone", text)
        if "id" in self.kinds:
            text = self._sub(_ID, "[ID]", "id", text)
        if "account" in self.kinds:
            text = _ACCOUNT.sub(self._account, text)
        if "name" in self.kinds and self._name_re is not None:
            text = self._name_re.sub(self._name, text)
        return text

    def _sub(self, pattern: re.Pattern[str], tag: str, kind: str, text: str) -> str:
        text, n = pattern.subn(tag, text)
        if n:
            self.counts[kind] += n
        return text

    def _account(self, m: re.Match[str]) -> str:
        digits = sum(c.isdigit() for c in m.group())
        if not 10 <= digits <= 16:
            return m.group()
        self.counts["account"] += 1
        return "[ACCOUNT]"

    def _name(self, m: re.Match[str]) -> str:
        self.counts["name"] += 1
        return self._tags[m.group()]


def describe_counts(counts: Counter[str], kinds: Sequence[str]) -> str:
    """"3 phone numbers, 1 e-mail address, ..." for the kinds that were scrubbed."""
    label = {"phone": ("phone number", "phone numbers"), "email": ("e-mail address", "e-mail addresses"),
             "id": ("ID number", "ID numbers"), "account": ("account/card number", "account/card numbers"),
             "name": ("name", "names")}
    return ", ".join(f"{counts.get(k, 0)} {label[k][counts.get(k, 0) != 1]}" for k in kinds)
