"""The torch-free native library (`_lean.cpp`, behind engine/native.py): built once per machine like the torch
kernels, loaded with ctypes.

`library(cpu_target)` returns the library built for a CPU target ("native": this machine; or a -march value such
as "x86-64-v3", to run the AVX2 kernels on an AVX-512 machine), or raises `LeanUnavailable` with the reason (no
compiler, Windows, ...). Each target's library is its own copy of the kernels with its own thread pools. The
structures below mirror `Layer` / `Model` in `_kernels_core.h` field by field.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

from .build import compile_library, first_error, library_path

SOURCE = Path(__file__).with_name("_lean.cpp")
CORE_HEADER = Path(__file__).with_name("_kernels_core.h")
ABI_VERSION = 4

_c_i64, _c_f32p = ctypes.c_int64, ctypes.POINTER(ctypes.c_float)
_c_u8p = ctypes.c_void_p  # raw block bytes


class LeanUnavailable(RuntimeError):
    """The torch-free library cannot be used here; the message says why."""


class LwLayer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("weight", ctypes.c_void_p * 7),
                ("type", _c_i64 * 7)]


class LwModel(ctypes.Structure):
    _fields_ = [(name, _c_i64) for name in ("dim", "hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                                             "vocab", "ctx", "window", "max_rows")] + [
        ("eps", ctypes.c_double), ("inv_freq", ctypes.c_void_p), ("embedding", ctypes.c_void_p),
        ("embedding_type", _c_i64), ("output", ctypes.c_void_p), ("output_type", _c_i64),
        ("output_norm", ctypes.c_void_p), ("layers", ctypes.POINTER(LwLayer)), ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p), ("kv_float32", _c_i64), ("int8_activations", _c_i64)]


_libraries: dict[str, ctypes.CDLL] = {}
_failures: dict[str, str] = {}


def _declare(lib: ctypes.CDLL) -> None:
    err = [ctypes.c_char_p, _c_i64]
    lib.lw_abi_version.restype = ctypes.c_int
    lib.lw_isa.restype = ctypes.c_char_p
    lib.lw_pool_new.argtypes, lib.lw_pool_new.restype = [ctypes.c_int], ctypes.c_void_p
    lib.lw_pool_parts.argtypes, lib.lw_pool_parts.restype = [ctypes.c_void_p], ctypes.c_int
    lib.lw_interleave.argtypes = [ctypes.c_void_p, _c_i64, _c_i64, _c_i64, ctypes.c_void_p, *err]
    lib.lw_interleave.restype = ctypes.c_int
    model = ctypes.POINTER(LwModel)
    lib.lw_forward_batch.argtypes = [model, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, _c_i64,
                                     ctypes.c_void_p, _c_i64, ctypes.c_void_p, *err]
    lib.lw_copy_rows.argtypes = [model, _c_i64, _c_i64, _c_i64, *err]
    lib.lw_release.argtypes = [model, _c_i64, _c_i64, *err]
    for fn in (lib.lw_forward_batch, lib.lw_copy_rows, lib.lw_release):
        fn.restype = ctypes.c_int


def library(cpu_target: str = "native") -> ctypes.CDLL:
    """The library for `cpu_target`, built on first use (a few seconds); LeanUnavailable when it cannot be built
    or loaded."""
    if cpu_target in _libraries:
        return _libraries[cpu_target]
    if cpu_target in _failures:
        raise LeanUnavailable(_failures[cpu_target])
    if sys.platform == "win32":
        _failures[cpu_target] = "the native backend's library is not built on Windows"
        raise LeanUnavailable(_failures[cpu_target])
    target = library_path("llamaworks_lean", [SOURCE, CORE_HEADER], cpu_target=cpu_target)
    try:
        if not target.exists():
            import logging

            logging.getLogger(__name__).info("building the torch-free native library for %s (once per machine) "
                                             "into %s", cpu_target, target.parent)
            compile_library(SOURCE, target, ["-pthread"], cpu_target=cpu_target)
        lib = ctypes.CDLL(str(target))
        _declare(lib)
        if lib.lw_abi_version() != ABI_VERSION:
            raise OSError(f"{target}: ABI version {lib.lw_abi_version()}, expected {ABI_VERSION}")
    except OSError as e:  # a CompileError too
        _failures[cpu_target] = (f"the torch-free native library for {cpu_target} could not be built or loaded: "
                                 f"{first_error(e)}")
        raise LeanUnavailable(_failures[cpu_target]) from None
    _libraries[cpu_target] = lib
    return lib


def isa(cpu_target: str = "native") -> str:
    """The SIMD level of each kernel family in the library for `cpu_target`."""
    return library(cpu_target).lw_isa().decode()


def call(fn: ctypes._CFuncPtr, *args: object) -> None:  # type: ignore[name-defined]
    """fn(*args, err, len) -> 0; else the library's one-line message as ValueError (-2: an argument out of range)
    or RuntimeError."""
    err = ctypes.create_string_buffer(512)
    code = fn(*args, err, len(err))
    if code != 0:
        message = err.value.decode("utf-8", "replace") or f"{fn.__name__} failed"
        raise (ValueError if code == -2 else RuntimeError)(message)


__all__ = ["LeanUnavailable", "LwLayer", "LwModel", "call", "isa", "library"]
