"""A small, fast reader of a GGUF file's key/value metadata (the tokenizer lives there).

`gguf.GGUFReader` builds a numpy view per array element, which takes seconds for a 128k-token vocabulary and
280k merges; this walks the key/value section once with `struct` and stops before the tensor data.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

from llamaworks.errors import FormatError

# GGUF value types -> (struct format, numpy dtype) for fixed-size scalars.
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"), 5: ("<i", "<i4"),
    6: ("<f", "<f4"), 7: ("<?", "<u1"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7


class _Cursor:
    def __init__(self, data: memoryview | bytes, path: str) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise FormatError(f"{self.path}: GGUF metadata is truncated at byte {self.pos}")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        end = self.pos + length
        if end > len(self.data):
            raise FormatError(f"{self.path}: GGUF string runs past the end of the file at byte {self.pos}")
        raw = bytes(self.data[self.pos:end])
        self.pos = end
        return raw.decode("utf-8", "replace")

    def value(self, kind: int, key: str) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.take("<I"), self.take("<Q")
            if item_kind == _STRING:
                return [self.string() for _ in range(count)]
            if item_kind in _SCALARS:
                dtype = np.dtype(_SCALARS[item_kind][1])
                end = self.pos + dtype.itemsize * count
                if end > len(self.data):
                    raise FormatError(f"{self.path}: GGUF array {key!r} runs past the end of the file")
                values = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
                self.pos = end
                return [bool(v) for v in values] if item_kind == _BOOL else values.tolist()
            if item_kind == _ARRAY:
                return [self.value(_ARRAY, key) for _ in range(count)]
            raise FormatError(f"{self.path}: GGUF array {key!r} has unknown element type {item_kind}")
        if kind in _SCALARS:
            return self.take(_SCALARS[kind][0])
        raise FormatError(f"{self.path}: GGUF key {key!r} has unknown value type {kind}")


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (v2/v3, little-endian) as plain Python values."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            if handle.read(4) != b"GGUF":
                raise FormatError(f"{path}: not a GGUF file (missing 'GGUF' magic)")
            handle.seek(0)
            try:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # empty or unmappable file
                mapped = handle.read()
    except OSError as exc:
        raise FormatError(f"{path}: cannot read GGUF file ({exc.strerror})") from None
    cursor = _Cursor(memoryview(mapped) if isinstance(mapped, mmap.mmap) else mapped, str(path))
    try:
        cursor.pos = 4
        version = cursor.take("<I")
        if version not in (2, 3):
            raise FormatError(f"{path}: unsupported GGUF version {version} (expected 2 or 3, little-endian)")
        cursor.take("<Q")  # tensor count
        kv_count = cursor.take("<Q")
        meta: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cursor.string()
            meta[key] = cursor.value(cursor.take("<I"), key)
        return meta
    finally:
        if isinstance(cursor.data, memoryview):
            cursor.data.release()
        if isinstance(mapped, mmap.mmap):
            mapped.close()
