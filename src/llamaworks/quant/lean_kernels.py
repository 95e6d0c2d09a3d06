"""The torch-free native library (`_lean.cpp`): built once per machine like the torch kernels, loaded with ctypes.

`library()` returns the loaded library or raises `LeanUnavailable` with the reason (no compiler, Windows, ...).
The structures below mirror `LwLayer` / `LwModel` in `_lean.cpp` field by field.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
from pathlib import Path

from .build import compile_library, first_error, library_path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_lean.cpp")
CORE_HEADER = Path(__file__).with_name("_kernels_core.h")
ABI_VERSION = 2

_c_i64, _c_f32p = ctypes.c_int64, ctypes.POINTER(ctypes.c_float)
_c_u8p = ctypes.c_void_p  # raw block bytes


class LeanUnavailable(RuntimeError):
    """The torch-free library cannot be used here; the message says why."""


class LwLayer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("weight", ctypes.c_void_p * 7),
                ("type", _c_i64 * 7)]


class LwModel(ctypes.Structure):
    _fields_ = [(name, _c_i64) for name in ("dim", "hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                                             "vocab", "ctx", "window")] + [
        ("eps", ctypes.c_double), ("inv_freq", ctypes.c_void_p), ("embedding", ctypes.c_void_p),
        ("embedding_type", _c_i64), ("output", ctypes.c_void_p), ("output_type", _c_i64),
        ("output_norm", ctypes.c_void_p), ("layers", ctypes.POINTER(LwLayer)), ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p), ("kv_float32", _c_i64)]


_library: ctypes.CDLL | None = None
_failure: str | None = None


def _declare(lib: ctypes.CDLL) -> None:
    err = [ctypes.c_char_p, _c_i64]
    lib.lw_abi_version.restype = ctypes.c_int
    lib.lw_can_interleave.restype = ctypes.c_int
    lib.lw_int8_decode.argtypes, lib.lw_int8_decode.restype = [ctypes.c_int], ctypes.c_int
    lib.lw_pool_new.argtypes, lib.lw_pool_new.restype = [ctypes.c_int], ctypes.c_void_p
    lib.lw_pool_parts.argtypes, lib.lw_pool_parts.restype = [ctypes.c_void_p], ctypes.c_int
    lib.lw_interleave.argtypes = [ctypes.c_void_p, _c_i64, _c_i64, _c_i64, ctypes.c_void_p, *err]
    lib.lw_interleave.restype = ctypes.c_int
    lib.lw_forward.argtypes = [ctypes.POINTER(LwModel), ctypes.c_void_p, ctypes.c_void_p, _c_i64, _c_i64,
                               ctypes.c_void_p, ctypes.c_int, *err]
    lib.lw_forward.restype = ctypes.c_int


def library() -> ctypes.CDLL:
    """The loaded library, built on first use (a few seconds); LeanUnavailable when it cannot be built or loaded."""
    global _library, _failure
    if _library is not None:
        return _library
    if _failure is not None:
        raise LeanUnavailable(_failure)
    if sys.platform == "win32" or os.environ.get("LLAMAWORKS_NO_NATIVE"):
        _failure = "the torch-free runtime needs the native library (not built on Windows or with LLAMAWORKS_NO_NATIVE)"
        raise LeanUnavailable(_failure)
    target = library_path("llamaworks_lean", [SOURCE, CORE_HEADER])
    try:
        if not target.exists():
            log.info("building the torch-free native library (once per machine) into %s", target.parent)
            compile_library(SOURCE, target, ["-pthread"])
        lib = ctypes.CDLL(str(target))
        _declare(lib)
        if lib.lw_abi_version() != ABI_VERSION:
            raise OSError(f"{target}: ABI version {lib.lw_abi_version()}, expected {ABI_VERSION}")
    except (OSError, subprocess.CalledProcessError) as e:
        _failure = f"the torch-free native library could not be built or loaded: {first_error(e)}"
        raise LeanUnavailable(_failure) from None
    for name, switch in (("LLAMAWORKS_INT8_DECODE", lib.lw_int8_decode),):
        if name in os.environ:
            switch(int(os.environ[name] not in ("", "0")))
    _library = lib
    return lib


def int8_decode(enable: bool | None = None) -> bool:
    """Whether the library's kernels quantize activations to int8 blocks (VNNI dot products: the default where
    the CPU has them) or keep them float32; `enable` switches it. Shared by every LeanModel in the process."""
    return bool(library().lw_int8_decode(-1 if enable is None else int(enable)))


def call(fn: ctypes._CFuncPtr, *args: object) -> None:  # type: ignore[name-defined]
    """fn(*args, err, len) -> 0, else RuntimeError with the library's one-line message."""
    err = ctypes.create_string_buffer(512)
    if fn(*args, err, len(err)) != 0:
        raise RuntimeError(err.value.decode("utf-8", "replace") or f"{fn.__name__} failed")


__all__ = ["LeanUnavailable", "LwLayer", "LwModel", "call", "int8_decode", "library"]
