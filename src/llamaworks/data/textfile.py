"""Reading a user's text files: UTF-8 (with or without a BOM), UTF-16 with a BOM, and the legacy Korean Windows
code page cp949 (a superset of EUC-KR, what older Windows KakaoTalk exports use) when the bytes are not UTF-8.

Line ends are normalised to "\\n" as Python's text mode does, and a byte-order mark never becomes text. A file
that none of these read raises a FormatError naming the file, the line and the byte."""

from __future__ import annotations

import codecs
from pathlib import Path

from ..errors import FormatError

LEGACY = "cp949"


def decode_text(data: bytes, name: str, *, fallback: bool = True) -> tuple[str, str]:
    """(text, encoding) of `data`; encoding is "utf-8", "utf-8-sig", "utf-16" or "cp949"."""
    if data.startswith(codecs.BOM_UTF8):
        data, encoding = data[len(codecs.BOM_UTF8):], "utf-8-sig"
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise FormatError(f"{name}: starts with a UTF-16 byte-order mark but is not UTF-16 ({e.reason} at "
                              f"byte {e.start})") from None
        return _newlines(text.lstrip("\ufeff")), "utf-16"
    else:
        encoding = "utf-8"
    try:
        return _newlines(data.decode("utf-8")), encoding
    except UnicodeDecodeError as e:
        first_error = e
    if fallback and encoding == "utf-8":
        try:
            return _newlines(data.decode(LEGACY)), LEGACY
        except UnicodeDecodeError:
            pass
    line = data.count(b"\n", 0, first_error.start) + 1
    column = first_error.start - (data.rfind(b"\n", 0, first_error.start) + 1) + 1
    tried = "UTF-8 or cp949/EUC-KR" if fallback and encoding == "utf-8" else "UTF-8"
    raise FormatError(f"{name}:{line}: not {tried} text (byte 0x{data[first_error.start]:02x} at column "
                      f"{column}); re-save the file as UTF-8 or leave it out") from None


def read_text(path: str | Path, *, fallback: bool = True) -> tuple[str, str]:
    """(text, encoding) of a file; see the module docstring."""
    p = Path(path)
    return decode_text(p.read_bytes(), str(p), fallback=fallback)


def read_head(path: str | Path, n_bytes: int = 65536) -> str:
    """The start of a file as text, for sniffing its format: decoded like `read_text`, a character cut at the
    end (or a stray byte) replaced instead of raising."""
    with Path(path).open("rb") as f:
        data = f.read(n_bytes)
    try:
        return decode_text(data, str(path))[0]
    except FormatError:
        text = data.decode("utf-8", errors="replace").lstrip("\ufeff")
        if text.count("\ufffd") > 4:
            text = data.decode(LEGACY, errors="replace")
        return _newlines(text)


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text
