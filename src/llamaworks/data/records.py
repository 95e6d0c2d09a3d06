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

    def __init__(self, bad: list[BadRecord]) -> None:
        self.bad = bad
        more = f" (and {len(bad) - 1} more malformed record(s); --skip-bad skips them)" if len(bad) > 1 else \
            " (--skip-bad skips it)"
        super().__init__(f"{bad[0]}{more}")
