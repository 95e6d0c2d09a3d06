"""GGUF files (llama.cpp, ollama): read and write the "llama" architecture.

The header is parsed with `struct` and tensors are numpy memory maps of the file. Quantized blocks are either
dequantized with `gguf.quants.dequantize` (imported only then: ggml_types.py has the tables a model needs)
or handed out as `GGUFQuantTensor` for kernels that work on the blocks directly; files are written with
`gguf.GGUFWriter`.
The q/k rows in a llama GGUF are already in our adjacent-pair rotary layout (llama.cpp's converter
permutes Hugging Face weights into it), so no permutation happens here.

LLaMA 3.1-style rope scaling: llama.cpp stores it as a `rope_freqs.weight` tensor of per-frequency divisors.
We recover a `RopeScaling` from those divisors (exactly when our own writer left the parameters in the
`llamaworks.rope_scaling` key) and check it reproduces every frequency; if none does, the explicit inverse
frequencies travel in `Checkpoint.metadata["rope_inv_freq"]` and `load_model` installs them.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import MAX_LAYERS, ModelConfig, RopeScaling, config_from_fields, rope_inverse_frequencies
from ..errors import FormatError
from . import (
    Checkpoint,
    atomic_write_with,
    cast_floats,
    optional_tokenizer_module,
    validate_state_dict,
    writable_tensors,
)
from .ggml_types import QUANT_SIZES, GGUFValueType
from .ggml_types import GGMLType as QType
from .quant_mix import MIXES
from .quant_mix import tensor_type as mix_tensor_type

if TYPE_CHECKING:  # torch loads only where tensors are made: parsing a header needs numpy alone
    import torch
    from torch import Tensor

ARCH = "llama"
ROPE_SCALING_KEY = "llamaworks.rope_scaling"  # our exact RopeScaling, as JSON; llama.cpp ignores unknown keys

_LAYER_NAMES = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
}
_TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_IGNORED = {"rope_freqs.weight"}  # handled as rope scaling, not a parameter
# The vocabulary's arrays: tens of thousands of Python objects each, read only where a tokenizer is built.
VOCABULARY_KEYS = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                             "tokenizer.ggml.scores"})

# Types the reader accepts (all dequantized by gguf.quants) and the ones the writer produces: a float type for
# every 2-D tensor, a quantization mix (quant_mix.MIXES: llama.cpp's per-tensor types for that name), or "keep"
# (each tensor as it is: GGUF blocks copied, floats in their own type).
READ_TYPES = {QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1,
              QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K}
FLOAT_TYPES = {"f32": QType.F32, "f16": QType.F16, "bf16": QType.BF16}
WRITE_TYPES = (*FLOAT_TYPES, *MIXES, "keep")
_FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32, **{name: code for name, (_, code) in MIXES.items()}}
_TORCH_FLOATS = {"torch.float32": QType.F32, "torch.float16": QType.F16, "torch.bfloat16": QType.BF16}


@dataclass(frozen=True, eq=False)
class GGUFQuantTensor:
    """A quantized GGUF weight kept as its blocks.

    shape: torch order (rows, cols); raw: uint8 array (rows, bytes_per_row), memory-mapped from the file.
    file_offset: where `raw` starts in the file (lets a loader read the bytes itself instead of mapping them).
    """

    ggml_type: QType
    shape: tuple[int, ...]
    raw: np.ndarray
    file_offset: int | None = None

    @property
    def block_size(self) -> int:
        return QUANT_SIZES[self.ggml_type][0]

    @property
    def type_size(self) -> int:
        return QUANT_SIZES[self.ggml_type][1]

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    def dequantize(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Tensor:
        import gguf  # the reference dequantizers, for types without a native kernel
        import torch

        values = gguf.quants.dequantize(self.raw, gguf.GGMLQuantizationType(int(self.ggml_type)))
        tensor = torch.from_numpy(np.ascontiguousarray(values)).reshape(self.shape)
        return tensor.to(dtype=dtype or torch.float32, device=device)

    def __repr__(self) -> str:
        return f"GGUFQuantTensor({self.ggml_type.name}, shape={self.shape})"


# -- names ------------------------------------------------------------------------------------------
def gguf_to_ours_name(name: str) -> str | None:
    """Our parameter name for a GGUF tensor name; None if it is not a llama parameter."""
    base = name.removesuffix(".weight")
    if base == name:
        return None
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.weight"
    return None


def ours_to_gguf_name(name: str) -> str:
    base = name.removesuffix(".weight")
    if base.startswith("layers."):
        _, idx, inner = base.split(".", 2)
        for g, ours in _LAYER_NAMES.items():
            if ours == inner:
                return f"blk.{idx}.{g}.weight"
    for g, ours in _TOP_NAMES.items():
        if ours == base:
            return f"{g}.weight"
    raise KeyError(name)


# -- reading ----------------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _round(x: float, digits: int = 7) -> float:
    """Undo float32 storage noise (9.999999747e-06 -> 1e-05)."""
    return float(f"{x:.{digits}g}")


def _rope_scaling_from_divisors(divisors: np.ndarray, config: ModelConfig) -> RopeScaling | None:
    """A "llama3" RopeScaling reproducing llama.cpp's per-frequency divisors, or None if none does.

    The curve is: divisor 1 for short wavelengths, `factor` for long ones, and in between
    1 / ((1 - s) / factor + s) with s = (orig / wavelen - low) / (high - low). Only orig/low and orig/high
    matter, so we fix low_freq_factor = 1 and fit the rest; with no in-between frequency we use Meta's
    published low/high (1, 4) and the smallest orig consistent with the data.
    """
    inv = 1.0 / (config.rope_theta ** (np.arange(0, config.head_size, 2, dtype=np.float64) / config.head_size))
    wavelen = 2 * math.pi / inv
    d = divisors.astype(np.float64)
    factor = float(d.max())
    if factor <= 1.0 + 1e-6:
        return None
    between = (d > 1 + 1e-4) & (d < factor * (1 - 1e-4))
    candidates: list[RopeScaling] = []
    if between.sum() >= 2:
        s = (1 / d[between] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / wavelen[between], s, 1)  # s = a / wavelen + b
        if b < 0:
            hf = 1 - 1 / b
            candidates.append(RopeScaling("llama3", _round(factor, 6), 1.0, _round(hf, 6), round(-a / b)))
    # Meta's Llama 3.1 / 3.2 setting: low 1, high 4, orig between the last unscaled and first scaled wavelength.
    unscaled, scaled = wavelen[d <= 1 + 1e-4], wavelen[d >= factor * (1 - 1e-4)]
    if len(unscaled) and len(scaled):
        for orig in (8192, 4096, 2048, math.floor(scaled.min()) - 1, math.ceil(4 * unscaled.max()) + 1):
            candidates.append(RopeScaling("llama3", _round(factor, 6), 1.0, 4.0, int(orig)))
    target = inv / d
    for cand in candidates:
        if cand.original_max_seq_len <= 0:
            continue
        got = _scaled_inv_freq(inv, cand)
        if np.allclose(got, target, rtol=1e-5, atol=0):
            return cand
    return None


def _scaled_inv_freq(inv: np.ndarray, s: RopeScaling) -> np.ndarray:
    # Same curve as model.rope_frequencies, in numpy, so a candidate can be checked without building a model.
    wavelen = 2 * math.pi / inv
    low_wl, high_wl = s.original_max_seq_len / s.low_freq_factor, s.original_max_seq_len / s.high_freq_factor
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv / s.factor + smooth * inv
    out = np.where(wavelen > low_wl, inv / s.factor, inv)
    return np.where((wavelen <= low_wl) & (wavelen >= high_wl), blended, out)


def _rope_divisors(config: ModelConfig) -> np.ndarray:
    base = 1.0 / (config.rope_theta ** (np.arange(0, config.head_size, 2, dtype=np.float64) / config.head_size))
    return (base / rope_inverse_frequencies(config)).astype(np.float32)


GGUF_FIELDS = {"dim": "llama.embedding_length", "n_layers": "llama.block_count",
               "n_heads": "llama.attention.head_count",
               "n_kv_heads": "llama.attention.head_count_kv", "head_dim": "llama.attention.key_length",
               "vocab_size": "llama.vocab_size", "hidden_dim": "llama.feed_forward_length",
               "norm_eps": "llama.attention.layer_norm_rms_epsilon", "rope_theta": "llama.rope.freq_base",
               "max_seq_len": "llama.context_length", "sliding_window": "llama.attention.sliding_window",
               "rope_scaling.factor": "llama.rope.scaling.factor"}


def _config_from_metadata(meta: dict[str, Any], tensors: dict[str, Any], source: Path) -> tuple[ModelConfig, Any]:
    """ModelConfig from llama.* keys; also returns explicit inverse frequencies when no RopeScaling fits.
    Every value is type- and range-checked (config_from_fields) before anything is sized from it."""
    def key(name: str, kind: type, default: Any = KeyError) -> Any:
        full = f"{ARCH}.{name}"
        if full not in meta:
            if default is KeyError:
                raise FormatError(f"{source}: missing metadata key {full!r}")
            return default
        value = meta[full]
        if isinstance(value, (list, np.ndarray)):  # per-layer arrays (some converters); we need one value
            if len(value) > MAX_LAYERS or len(value) == 0:
                raise FormatError(f"{source}: {full} is an array of {len(value)} values, expected one per layer "
                                  f"(at most {MAX_LAYERS})")
            distinct = {v.item() if isinstance(v, np.generic) else v for v in list(value)}
            if len(distinct) != 1:
                raise FormatError(f"{source}: {full} differs between layers ({list(value)[:4]}...), not supported")
            value = distinct.pop()
        ok = (isinstance(value, str) if kind is str else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
              isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            what = {str: "a string", float: "a number", int: "an integer"}[kind]
            raise FormatError(f"{source}: {full} is {str(value)[:60]!r} ({type(value).__name__}), expected {what}")
        return value

    dim = key("embedding_length", int)
    n_heads = key("attention.head_count", int)
    n_kv = key("attention.head_count_kv", int, n_heads)
    head_dim = key("attention.key_length", int, None)
    vocab = key("vocab_size", int, None)
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        emb = tensors.get("tok_embeddings.weight")
        vocab = len(tokens) if tokens else (emb.shape[0] if emb is not None else None)
        if vocab is None:
            raise FormatError(f"{source}: cannot tell the vocabulary size (no llama.vocab_size, tokens or token_embd)")
    scaling: RopeScaling | None = None
    scaling_type = key("rope.scaling.type", str, None)
    if scaling_type == "linear":
        scaling = RopeScaling("linear", _round(float(key("rope.scaling.factor", float))))
    elif scaling_type not in (None, "none"):
        raise FormatError(f"{source}: unsupported rope scaling type {scaling_type!r}")
    name = meta.get("general.name")
    config = config_from_fields(
        source, GGUF_FIELDS,
        dim=dim, n_layers=key("block_count", int), n_heads=n_heads, vocab_size=vocab,
        hidden_dim=key("feed_forward_length", int), n_kv_heads=n_kv,
        head_dim=None if isinstance(n_heads, int) and n_heads > 0 and head_dim == dim // n_heads else head_dim,
        norm_eps=_round(float(key("attention.layer_norm_rms_epsilon", float, 1e-5)), 6),
        rope_theta=_round(float(key("rope.freq_base", float, 10000.0))), rope_scaling=scaling,
        max_seq_len=key("context_length", int, 2048), tie_embeddings="output.weight" not in tensors,
        sliding_window=key("attention.sliding_window", int, None),
        name=name if isinstance(name, str) and name else source.stem,
    )
    rope_dims = key("rope.dimension_count", int, config.head_size)
    if rope_dims != config.head_size:
        raise FormatError(f"{source}: partial rotary embeddings ({rope_dims} of {config.head_size} dims) are not "
                          f"supported")
    divisors = tensors.get("rope_freqs.weight")
    if divisors is None:
        return config, None
    divisors = np.asarray(divisors, dtype=np.float32).reshape(-1)
    if divisors.shape[0] != config.head_size // 2:
        raise FormatError(f"{source}: rope_freqs has {divisors.shape[0]} values, expected {config.head_size // 2}")
    exact = meta.get(ROPE_SCALING_KEY)
    fitted = None
    if exact:
        try:
            fitted = RopeScaling(**json.loads(exact))
            exact_config = config.replace(rope_scaling=fitted)  # validated like any config
        except (ValueError, TypeError, RecursionError):
            fitted = None
    if fitted is None or not np.allclose(_rope_divisors(exact_config), divisors, rtol=1e-5):
        fitted = _rope_scaling_from_divisors(divisors, config)
    if fitted is not None:
        return config.replace(rope_scaling=fitted), None
    base = 1.0 / (config.rope_theta ** (np.arange(0, config.head_size, 2, dtype=np.float64) / config.head_size))
    return config, base / divisors.astype(np.float64)


# -- a direct GGUF parser ----------------------------------------------------------------------------
# gguf.GGUFReader builds numpy views for every array element (4 s for a 49k-token vocabulary); reading the
# header with struct takes a few milliseconds. Tensor data is still a numpy memmap of the file.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass
class _RawTensor:
    name: str
    qtype: QType
    shape: tuple[int, ...]  # torch order (rows, cols)
    offset: int  # absolute, in the file
    nbytes: int
    data: np.ndarray | None = None


# Limits of what a header may ask us to build. Real files: ~40 keys, < 2,000 tensors, vocabularies of ~256k
# tokens and merges. Numeric arrays outside tokenizer.* above the limit stay lazy numpy views of the file.
MAX_METADATA_KEYS = 1 << 16
MAX_TENSORS = 1 << 16
MAX_ARRAY = 1 << 16
MAX_TOKENIZER_ARRAY = 1 << 21
MAX_ARRAY_DEPTH = 3


class SkippedArray:
    """A metadata array that parse_gguf read past (its `skip` keys): only its length is kept."""

    __slots__ = ("count",)

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"SkippedArray({self.count})"


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0
        self.key = ""  # the metadata key being read, for limits and messages

    def scalar(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str | bytes:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise EOFError("string runs past the end of the file")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw  # some SentencePiece vocabularies hold partial UTF-8; the tokenizer accepts bytes

    def value(self, vtype: int, depth: int = 0, keep: bool = True) -> Any:
        """The value of type `vtype` at the cursor; keep=False reads past an array, checked the same way, without
        making its Python objects (a SkippedArray stands for it)."""
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            limit = MAX_TOKENIZER_ARRAY if self.key.startswith("tokenizer.") else MAX_ARRAY
            if item in _NUMPY:
                size = np.dtype(_NUMPY[item]).itemsize * count
                if self.pos + size > len(self.buf):
                    raise EOFError("array runs past the end of the file")
                values = np.frombuffer(self.buf, dtype=_NUMPY[item], count=count, offset=self.pos)
                self.pos += size
                if count <= limit:
                    return values.tolist() if keep else SkippedArray(count)
                if limit == MAX_TOKENIZER_ARRAY:
                    raise _TooLarge(f"{self.key} holds {count:,} values, more than the {limit:,} allowed")
                return values  # lazy: a read-only view of the file, never a Python list
            if count > limit:
                raise _TooLarge(f"{self.key} holds {count:,} values, more than the {limit:,} allowed")
            if item == _STRING:
                return self.strings(count) if keep else self.skip_strings(count)
            if depth >= MAX_ARRAY_DEPTH:
                raise _TooLarge(f"{self.key} nests arrays deeper than {MAX_ARRAY_DEPTH}")
            values = [self.value(item, depth + 1, keep) for _ in range(count)]
            return values if keep else SkippedArray(count)
        raise ValueError(f"unknown metadata value type {vtype}")

    def strings(self, count: int) -> list[str | bytes]:
        """An array of strings (a vocabulary: ~100k of them), without a struct call per length."""
        out: list[str | bytes] = []
        for start, end in self._string_spans(count):
            raw = bytes(self.buf[start:end])
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(raw)  # partial UTF-8 in some SentencePiece vocabularies
        return out

    def skip_strings(self, count: int) -> SkippedArray:
        for _ in self._string_spans(count):
            pass
        return SkippedArray(count)

    def _string_spans(self, count: int) -> Iterator[tuple[int, int]]:
        """(start, end) of each of `count` length-prefixed strings from the cursor on, checked against the file's
        end; the cursor ends after the last one."""
        buf, end_of_file = self.buf, len(self.buf)
        from_bytes = int.from_bytes
        for _ in range(count):
            if self.pos + 8 > end_of_file:
                raise EOFError("string array runs past the end of the file")
            n = from_bytes(buf[self.pos:self.pos + 8], "little")
            start = self.pos + 8
            if start + n > end_of_file:
                raise EOFError("string runs past the end of the file")
            self.pos = start + n
            yield start, start + n


class _TooLarge(Exception):
    pass


def parse_gguf(path: Path, skip: Collection[str] = ()) -> tuple[dict[str, Any], list[_RawTensor]]:
    """(metadata, tensors with memory-mapped data) of a GGUF v2/v3 little-endian file. Anything wrong with
    the file, whatever it provokes, is one FormatError line. Arrays under the metadata keys in `skip` are checked
    and read past, and only their length is kept (SkippedArray; VOCABULARY_KEYS: for a reader that builds the
    tokenizer from a parse of its own)."""
    path = Path(path)
    try:
        return _parse_gguf(path, frozenset(skip))
    except FormatError:
        raise
    except FileNotFoundError:
        raise FormatError(f"{path}: file is missing") from None
    except Exception as e:  # anything else a damaged header can provoke
        raise FormatError(f"{path}: not a readable GGUF file ({_one_line(e)})") from None


def _parse_gguf(path: Path, skip: frozenset[str]) -> tuple[dict[str, Any], list[_RawTensor]]:
    size = path.stat().st_size
    if size < 24:
        raise FormatError(f"{path}: file is truncated ({size} bytes, smaller than a GGUF header)")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mm))
    magic = bytes(mm[:4])
    if magic != b"GGUF":
        raise FormatError(f"{path}: not a GGUF file (wrong magic {magic!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):
        hint = " (big-endian files are not supported)" if version > 0xFFFF else ""
        raise FormatError(f"{path}: unsupported GGUF version {version}{hint}")
    try:
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        if n_kv > MAX_METADATA_KEYS or n_tensors > MAX_TENSORS:
            raise FormatError(f"{path}: header counts {n_kv:,} metadata keys and {n_tensors:,} tensors, more than "
                              f"the {MAX_METADATA_KEYS:,} / {MAX_TENSORS:,} allowed")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            cur.key = str(cur.string())
            meta[cur.key] = cur.value(cur.scalar("<I"), keep=cur.key not in skip)
        infos = []
        for _ in range(n_tensors):
            name = str(cur.string())
            n_dims = cur.scalar("<I")
            if n_dims > 4:
                raise FormatError(f"{path}: tensor {name[:80]!r} has {n_dims} dimensions, at most 4 are allowed")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            infos.append((name, cur.scalar("<I"), dims, cur.scalar("<Q")))
    except (struct.error, EOFError) as e:
        raise FormatError(f"{path}: file is truncated (header ends early: {e})") from None
    except _TooLarge as e:
        raise FormatError(f"{path}: metadata {e}") from None
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or not 1 <= alignment <= 1 << 16 \
            or alignment & (alignment - 1):
        raise FormatError(f"{path}: general.alignment is {str(alignment)[:40]!r}, expected a power of two up to 65536")
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, raw_type, dims, offset in infos:
        try:
            qtype = QType(raw_type)
        except ValueError:
            raise FormatError(f"{path}: tensor {name!r} has unknown type id {raw_type}") from None
        block, type_size = QUANT_SIZES[qtype]
        n = math.prod(dims)
        if dims and dims[0] % block:
            raise FormatError(f"{path}: tensor {name!r} rows of {dims[0]} do not fill {qtype.name} blocks of {block}")
        t = _RawTensor(name, qtype, tuple(reversed(dims)), data_start + offset, n // block * type_size)
        if t.offset + t.nbytes > size:
            raise FormatError(f"{path}: file is truncated (tensor {name!r} runs past the end)")
        t.data = mm[t.offset:t.offset + t.nbytes]
        tensors.append(t)
    return meta, tensors


def _to_tensor(t: _RawTensor, source: Path, dequantize: bool) -> Tensor | GGUFQuantTensor:
    import torch

    qtype, shape = t.qtype, t.shape  # a supported type: read_gguf_layout checked it
    assert t.data is not None
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    data = t.data
    if qtype == QType.F32:
        data = data.view(np.float32)
    elif qtype == QType.F16:
        data = data.view(np.float16)
    else:
        data = data.reshape(rows, -1)
    if qtype in (QType.F32, QType.F16):
        return torch.from_numpy(np.array(data)).reshape(shape)  # a writable copy; the map is read-only
    if qtype == QType.BF16:
        return torch.from_numpy(np.array(data).view(np.int16)).view(torch.bfloat16).reshape(shape)
    if not dequantize:
        return GGUFQuantTensor(qtype, shape, data, t.offset)
    import gguf

    values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(int(qtype)))
    return torch.from_numpy(np.ascontiguousarray(values)).reshape(shape)


@dataclass
class GGUFLayout:
    """A llama GGUF file's header, checked: what every loader needs before it touches tensor data."""

    metadata: dict[str, Any]
    config: ModelConfig
    tensors: dict[str, _RawTensor]  # by model.py's parameter name; data memory-mapped from the file
    inv_freq: np.ndarray | None  # explicit rotary inverse frequencies (float64) when no RopeScaling fits


def read_gguf_layout(path: str | os.PathLike[str], skip: Collection[str] = ()) -> GGUFLayout:
    """Parse and validate a llama GGUF file's header (one-line FormatError for anything wrong); no torch.
    Arrays under the metadata keys in `skip` keep only their length (parse_gguf)."""
    path = Path(path)
    meta, raw_tensors = parse_gguf(path, skip)
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise FormatError(f"{path}: unsupported architecture {arch!r}; only 'llama' GGUFs (LLaMA 1-3, Mistral, "
                          f"TinyLlama, SmolLM2, ...) can be loaded")
    tensors: dict[str, _RawTensor] = {}
    extra: dict[str, Any] = {}
    for t in raw_tensors:
        if t.name in _IGNORED:
            if t.qtype != QType.F32:
                raise FormatError(f"{path}: {t.name} must be F32, found {t.qtype.name}")
            extra[t.name] = np.array(t.data).view(np.float32)
            continue
        ours = gguf_to_ours_name(t.name)
        if ours is None:
            raise FormatError(f"{path}: unexpected tensor {t.name!r} for a llama model")
        if t.qtype not in READ_TYPES:
            raise FormatError(f"{path}: tensor {t.name!r} has type {t.qtype.name}, which is not supported "
                              f"(supported: {', '.join(sorted(q.name for q in READ_TYPES))})")
        tensors[ours] = t
    config, inv_freq = _config_from_metadata(meta, {**tensors, **extra}, path)
    validate_state_dict(tensors, config, path, GGUF_FIELDS)
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list | SkippedArray) and len(tokens) > config.vocab_size:
        raise FormatError(f"{path}: tokenizer.ggml.tokens has {len(tokens)} entries, more than the "
                          f"{config.vocab_size} rows of token_embd.weight")
    return GGUFLayout(meta, config, tensors, inv_freq)


def read_gguf(path: str | os.PathLike[str], dequantize: bool = True, dtype: torch.dtype | None = None) -> Checkpoint:
    """Read a llama GGUF file into a Checkpoint (format "gguf")."""
    path = Path(path)
    layout = read_gguf_layout(path)
    meta, config, inv_freq = layout.metadata, layout.config, layout.inv_freq
    state: dict[str, Any] = {}
    for ours, t in layout.tensors.items():
        try:
            state[ours] = _to_tensor(t, path, dequantize)
        except FormatError:
            raise
        except Exception as e:
            raise FormatError(f"{path}: cannot read tensor {t.name!r} ({_one_line(e)})") from None
    state = cast_floats(state, dtype)

    tok_meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    chat_template = meta.get("tokenizer.chat_template")
    tokenizer = None
    module = optional_tokenizer_module()
    if module is not None and any(k.startswith("tokenizer.ggml.") for k in tok_meta):
        tokenizer = module.Tokenizer.from_gguf_metadata(tok_meta, str(path))
    if inv_freq is not None:
        meta["rope_inv_freq"] = inv_freq
    return Checkpoint(config=config, state_dict=state, tokenizer=tokenizer, chat_template=chat_template,
                      generation_config=_generation_config(meta), metadata=meta, path=path, format="gguf")


def _generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ours, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                      ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        if _is_int(meta.get(key)):
            out[ours] = int(meta[key])
    eos = [int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                  "tokenizer.ggml.eom_token_id") if _is_int(meta.get(k))]
    if eos:
        out["eos_token_id"] = sorted(set(eos), key=eos.index) if len(set(eos)) > 1 else eos[0]
    for ours, key in (("temperature", "general.sampling.temp"), ("top_k", "general.sampling.top_k"),
                      ("top_p", "general.sampling.top_p"), ("min_p", "general.sampling.min_p"),
                      ("repetition_penalty", "general.sampling.penalty_repeat")):
        value = meta.get(key)  # sampling hints: ignored when damaged, like llama.cpp does
        if ours == "top_k" and _is_int(value):
            out[ours] = int(value)
        elif ours != "top_k" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value):
            out[ours] = _round(float(value), 6)
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- writing ----------------------------------------------------------------------------------------
_TOKENIZER_TYPES: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {
    "tokenizer.ggml.model": (GGUFValueType.STRING, None),
    "tokenizer.ggml.pre": (GGUFValueType.STRING, None),
    "tokenizer.ggml.tokens": (GGUFValueType.ARRAY, GGUFValueType.STRING),
    "tokenizer.ggml.merges": (GGUFValueType.ARRAY, GGUFValueType.STRING),
    "tokenizer.ggml.token_type": (GGUFValueType.ARRAY, GGUFValueType.INT32),
    "tokenizer.ggml.scores": (GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
    "tokenizer.chat_template": (GGUFValueType.STRING, None),
}


def _value_type(key: str, value: Any) -> tuple[GGUFValueType, GGUFValueType | None]:
    """GGUF types llama.cpp expects: token ids are UINT32, flags BOOL, token types INT32, scores FLOAT32."""
    if key in _TOKENIZER_TYPES:
        return _TOKENIZER_TYPES[key]
    if isinstance(value, bool):
        return GGUFValueType.BOOL, None
    if isinstance(value, int):
        return (GGUFValueType.UINT32 if 0 <= value < 2**32 else GGUFValueType.INT64), None
    if isinstance(value, float):
        return GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return GGUFValueType.STRING, None
    if isinstance(value, (list, tuple)):
        first = value[0] if len(value) else ""
        sub, _ = _value_type("", first)
        return GGUFValueType.ARRAY, (GGUFValueType.INT32 if sub == GGUFValueType.UINT32 else sub)
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata key {key!r}")


def _add_kv(writer: Any, key: str, value: Any) -> None:
    import gguf

    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)) and not value:
        return
    vtype, sub = _value_type(key, value)
    writer.add_key_value(key, list(value) if vtype == GGUFValueType.ARRAY else value, gguf.GGUFValueType(vtype),
                         sub_type=None if sub is None else gguf.GGUFValueType(sub))


def _encode(t: Tensor | GGUFQuantTensor, qtype: QType) -> np.ndarray:
    """Tensor (rows, cols) -> the array GGUFWriter stores: f32/f16 values or uint8 blocks."""
    if isinstance(t, GGUFQuantTensor):  # kept as it is: its blocks are copied
        return np.asarray(t.raw)
    t = t.detach().to("cpu")
    if qtype == QType.F32:
        return t.float().contiguous().numpy()
    if qtype == QType.F16:
        return t.half().contiguous().numpy()
    if qtype == QType.BF16:  # torch rounds to bf16 the same way llama.cpp does (nearest even)
        import torch

        return t.bfloat16().contiguous().view(torch.int16).numpy().view(np.uint8)
    from .kquants import quantize

    return quantize(t.float().contiguous().numpy(), qtype)


def _tensor_type_for(name: str, t: Tensor | GGUFQuantTensor, tensor_type: str, config: ModelConfig,
                     pure: bool = False) -> QType:
    if len(t.shape) == 1:
        return QType.F32  # norms stay exact; llama.cpp expects F32 there
    if tensor_type in FLOAT_TYPES:
        return FLOAT_TYPES[tensor_type]
    if tensor_type == "keep":
        return t.ggml_type if isinstance(t, GGUFQuantTensor) else _TORCH_FLOATS.get(str(t.dtype), QType.F32)
    return mix_tensor_type(name, tuple(t.shape), config, tensor_type, pure=pure)


def _nbytes(shape: tuple[int, ...], qtype: QType) -> int:
    block, size = QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def write_gguf(path: Path, state_dict: dict[str, Any], config: ModelConfig, tokenizer: Any = None, *,
               chat_template: str | None = None, tensor_type: str = "f16", name: str | None = None,
               tokenizer_metadata: dict[str, Any] | None = None, file_type: int | None = None,
               progress: bool = False, pure: bool = False) -> Path:
    """Write a llama GGUF file atomically; tensors are converted one at a time (streamed, not all in memory).

    tensor_type: "f32" | "f16" | "bf16" (every 2-D tensor), a mix of quant_mix.MIXES ("q4_k_m", "q5_k_m", "q6_k",
    "q8_0", "q4_0", ...: llama.cpp's per-tensor types for that name) or "keep" (GGUF blocks copied as they are,
    float tensors in their own type; file_type then says what general.file_type to record). pure: a mix's base
    type for every matrix (llama-quantize --pure)."""
    import gguf
    import torch

    tensor_type = tensor_type.lower()
    if tensor_type not in WRITE_TYPES:
        raise ValueError(f"unsupported GGUF tensor type {tensor_type!r}; choose one of {', '.join(WRITE_TYPES)}")
    state = writable_tensors(state_dict, config, keep_quantized=tensor_type == "keep")

    writer = gguf.GGUFWriter(None, ARCH)
    writer.add_type("model")
    writer.add_name(name or config.name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_rope_dimension_count(config.head_size)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.kv_heads)
    if config.head_dim is not None and config.head_dim != config.dim // config.n_heads:
        writer.add_key_length(config.head_size)
        writer.add_value_length(config.head_size)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_vocab_size(config.vocab_size)
    if file_type is None and tensor_type != "keep":
        file_type = _FILE_TYPES[tensor_type]
    if file_type is not None:  # optional in GGUF (llama.cpp only shows it); "keep" records the source's
        writer.add_file_type(int(file_type))
    if config.sliding_window is not None:
        writer.add_sliding_window(config.sliding_window)
    scaling = config.rope_scaling
    if scaling is not None and scaling.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling.factor)
    elif scaling is not None:
        writer.add_string(ROPE_SCALING_KEY, json.dumps(scaling.__dict__))

    tok_meta = dict(tokenizer.to_gguf_metadata()) if tokenizer is not None else dict(tokenizer_metadata or {})
    template = chat_template or (getattr(tokenizer, "chat_template", None) if tokenizer is not None else None)
    if template:
        tok_meta["tokenizer.chat_template"] = template
    for key, value in tok_meta.items():
        if key.startswith("tokenizer."):
            _add_kv(writer, key, value)

    # Plan every tensor first (the header lists them all), then convert and stream them one by one.
    plan: list[tuple[str, Tensor | GGUFQuantTensor, QType]] = []
    if scaling is not None and scaling.kind == "llama3":
        plan.append(("rope_freqs.weight", torch.from_numpy(_rope_divisors(config)), QType.F32))
    for ours, t in state.items():
        plan.append((ours_to_gguf_name(ours), t, _tensor_type_for(ours, t, tensor_type, config, pure)))
    if any(qtype not in (QType.F32, QType.F16, QType.BF16) for _, _, qtype in plan):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for gname, t, qtype in plan:
        shape = tuple(t.shape)
        if qtype in (QType.F32, QType.F16):
            writer.add_tensor_info(gname, shape, np.dtype(np.float32 if qtype == QType.F32 else np.float16),
                                   _nbytes(shape, qtype))
        else:
            theirs = gguf.GGMLQuantizationType(int(qtype))
            byte_shape = gguf.quant_shape_to_byte_shape(shape, theirs)
            writer.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), _nbytes(shape, qtype), raw_dtype=theirs)

    def write(tmp: Path) -> None:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            from tqdm.auto import tqdm  # here, not at import: it pulls in asyncio and importlib.metadata (MiBs)

            for _name, t, qtype in tqdm(plan, desc=f"writing {path.name}", unit="tensor", disable=not progress):
                writer.write_tensor_data(_encode(t, qtype))
        finally:
            writer.close()

    atomic_write_with(path, write)
    return path


__all__ = ["GGUFQuantTensor", "gguf_to_ours_name", "ours_to_gguf_name", "read_gguf", "write_gguf"]
