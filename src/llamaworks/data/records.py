"""Shared by the readers of training data: a conversation, a malformed record (`BadRecord`) and the error that
lists them."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FormatError


@dataclass
class BadRecord:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class Conversation:
    messages: list[dict[str, str]]  # {"role": "system"|"user"|"assistant", "content": str}
    file: str
    line: int


class DatasetError(FormatError):
    """One or more records are malformed; `.bad` has them all, the message names the first."""

    def __init__(self, bad: list[BadRecord], *, skippable: bool = True) -> None:
        """skippable: the command has --skip-bad, so the message suggests it."""
        self.bad = bad
        hint = "; --skip-bad skips them" if skippable else ""
        more = f" (and {len(bad) - 1} more malformed record(s){hint})" if len(bad) > 1 else \
            (" (--skip-bad skips it)" if skippable else "")
        super().__init__(f"{bad[0]}{more}")


class RecordInvalid(ValueError):
    """Raised by a record parser (see `data.instruct.parse_json_records`): the record's problem, in words."""
