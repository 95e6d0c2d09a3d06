"""Builders of the internal `tokenizers.Tokenizer` engine from each vocabulary format.

Every backend (GGUF vocabularies, SentencePiece `tokenizer.model`, LLaMA 3's tiktoken file) is turned into one
Hugging Face `tokenizers.Tokenizer`, so encoding, decoding and `save_hf` share a single, fast, exact code path.
The rules follow the published formats:
- byte-level BPE (GPT-2 style): tokens are spelled in the 256-character byte alphabet, merges are given;
- SentencePiece BPE (LLaMA 2 / Mistral): merge priority is the score of the merged piece, text gets a
  "▁" prefix and spaces become "▁", unknown characters fall back to <0xNN> byte pieces;
- tiktoken (LLaMA 3): raw-byte ranks, merges are implied by the ranks, whole-word lookup first.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Engine
from tokenizers.models import BPE

# The split pattern of LLaMA 3 (and llama.cpp's "llama-bpe" pre-tokenizer).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp `tokenizer.ggml.pre` names whose split is LLaMA 3's pattern.
LLAMA3_PRE_NAMES = frozenset({"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx", "pixtral"})
# Names whose split is GPT-2's pattern after isolating every digit (SmolLM, StarCoder, ...).
DIGIT_PRE_NAMES = frozenset({"smollm", "starcoder", "refact", "codeshell", "minerva", "exaone", "command-r"})

# llama.cpp token types (`tokenizer.ggml.token_type`).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

SPM_SPACE = "\u2581"


def llama3_special_tokens() -> list[str]:
    """The 256 special tokens appended after LLaMA 3's 128000 ranks (LLaMA 3.1 naming)."""
    named = {
        0: "<|begin_of_text|>",
        1: "<|end_of_text|>",
        4: "<|finetune_right_pad_id|>",
        6: "<|start_header_id|>",
        7: "<|end_header_id|>",
        8: "<|eom_id|>",
        9: "<|eot_id|>",
        10: "<|python_tag|>",
    }
    tokens, reserved = [], 0
    for index in range(256):
        if index in named:
            tokens.append(named[index])
        else:
            tokens.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return tokens


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map from a byte to a printable character (printable bytes map to themselves)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def _byte_alphabet_spelling() -> Callable[[str], bool]:
    """Whether a string is spelled in the byte alphabet only (one compiled regex: 4x faster than set(t) <= ...)."""
    chars = "".join(re.escape(c) for c in byte_alphabet().values())
    match = re.compile(f"[{chars}]*").fullmatch
    return lambda text: match(text) is not None


def bytes_to_symbols(raw: bytes) -> str:
    alphabet = byte_alphabet()
    return "".join(alphabet[b] for b in raw)


def unique_tokens(tokens: Sequence[str]) -> list[str]:
    """A few GGUF vocabularies repeat a token string; a BPE vocabulary maps strings to ids, so a repeat would leave
    a hole in the ids (and shrink vocab_size). Repeats get a distinct placeholder name instead."""
    seen: set[str] = set()
    out = []
    for index, token in enumerate(tokens):
        if token in seen:
            token = f"<|duplicate_token_{index}|>"
        seen.add(token)
        out.append(token)
    return out


def _add_typed_tokens(engine: Engine, tokens: Sequence[str], token_types: Sequence[int] | None,
                      byte_level: bool) -> None:
    """Control tokens become special added tokens and user-defined ones plain added tokens, so both are
    matched whole in the input text (as llama.cpp does) instead of being cut by the model."""
    if not token_types:
        return
    alphabet = set(byte_alphabet().values()) if byte_level else None
    control, user = [], []
    for token, kind in zip(tokens, token_types):
        # llama.cpp matches unknown-type pieces (<unk>) in text like control ones.
        if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN) and (alphabet is None or set(token) <= alphabet):
            control.append(AddedToken(token, special=True, normalized=False))
        elif kind == TOKEN_USER_DEFINED:
            user.append(AddedToken(token, special=False, normalized=False))
    if control:
        engine.add_special_tokens(control)
    if user:
        engine.add_tokens(user)


def byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre in LLAMA3_PRE_NAMES:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre in DIGIT_PRE_NAMES:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def build_byte_level_bpe(tokens: Sequence[str], merges: Sequence[str] | Sequence[tuple[str, str]],
                         token_types: Sequence[int] | None, pre: str | None) -> Engine:
    """GGUF "gpt2" vocabulary: tokens are already spelled in the byte alphabet; merges are "left right" strings."""
    spelled = _byte_alphabet_spelling()
    # A token written in plain UTF-8 (a few converters do that for added tokens) is re-spelled.
    tokens = unique_tokens([t if spelled(t) else bytes_to_symbols(t.encode("utf-8")) for t in tokens])
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    # LLaMA 3 (tiktoken-trained) looks a whole piece up before merging, as llama.cpp does for these names.
    engine = Engine(BPE(vocab=vocab, merges=pairs, fuse_unk=False, ignore_merges=pre in LLAMA3_PRE_NAMES))
    engine.pre_tokenizer = byte_level_pre_tokenizer(pre)
    engine.decoder = decoders.ByteLevel()
    _add_typed_tokens(engine, tokens, token_types, byte_level=True)
    return engine


def spm_merges(tokens: Sequence[str], scores: Sequence[float],
               token_types: Sequence[int] | None = None) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece BPE vocabulary: joining two pieces is ranked by the merged piece's score.

    SentencePiece (and llama.cpp) repeatedly join the adjacent pair whose concatenation is the best-scored
    piece; a BPE model with merges sorted by that score does the same. Only normal pieces take part.
    """
    if token_types is None:
        normal = {token: index for index, token in enumerate(tokens)}
    else:
        normal = {token: index for index, (token, kind) in enumerate(zip(tokens, token_types)) if kind == TOKEN_NORMAL}
    ranked: list[tuple[float, int, str, str]] = []
    for token, index in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[index], index, left, right))
    ranked.sort()  # best score first; equal scores in vocabulary order
    return [(left, right) for _, _, left, right in ranked]


def build_spm_bpe(tokens: Sequence[str], scores: Sequence[float], token_types: Sequence[int] | None,
                  unk_token: str | None, add_space_prefix: bool, remove_extra_whitespaces: bool = False) -> Engine:
    """SentencePiece BPE with byte fallback (LLaMA 1/2, TinyLlama, Mistral v1).

    The "▁" prefix is a normalizer, not Metaspace: like SentencePiece and llama.cpp it is added even when the
    text already starts with a space, and again after every special token.
    """
    tokens = unique_tokens(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = spm_merges(tokens, scores, token_types)
    has_unk = unk_token is not None and unk_token in vocab
    engine = Engine(BPE(vocab=vocab, merges=merges, unk_token=unk_token if has_unk else None,
                        fuse_unk=True, byte_fallback=True))
    steps: list[normalizers.Normalizer] = []
    if remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if add_space_prefix:
        steps.append(normalizers.Prepend(SPM_SPACE))
    steps.append(normalizers.Replace(" ", SPM_SPACE))
    engine.normalizer = normalizers.Sequence(steps)
    engine.pre_tokenizer = None
    chain = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        chain.append(decoders.Strip(content=" ", left=1, right=0))
    engine.decoder = decoders.Sequence(chain)
    _add_typed_tokens(engine, tokens, token_types, byte_level=False)
    return engine


def read_tiktoken_ranks(data: bytes) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one "base64-token rank" pair per line. Raises ValueError if malformed."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"line {number}: expected 'base64-token rank'")
        ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
    if not ranks:
        raise ValueError("no tokens")
    return ranks


def looks_like_tiktoken(data: bytes) -> bool:
    first = data[:200].split(b"\n", 1)[0].split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except ValueError:
        return False
    return True


def build_tiktoken_bpe(ranks: dict[bytes, int], special_tokens: Sequence[str], pattern: str = LLAMA3_PATTERN) -> Engine:
    """tiktoken ranks as a byte-level BPE: a token's merges are every split into two lower-ranked tokens,
    ranked by the merged token; `ignore_merges` reproduces tiktoken's whole-piece lookup first."""
    vocab: dict[str, int] = {}
    ranked: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        vocab[bytes_to_symbols(token)] = rank
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                ranked.append((rank, ranks[left], ranks[right], left, right))
    ranked.sort()
    merges = [(bytes_to_symbols(left), bytes_to_symbols(right)) for _, _, _, left, right in ranked]
    engine = Engine(BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    engine.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    engine.decoder = decoders.ByteLevel()
    engine.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return engine


# ---- facts about an existing tokenizer.json ---------------------------------------------------------------------
def classify_hf_model(spec: dict[str, Any]) -> tuple[str, bool]:
    """("gpt2" | "llama" | "other", add_space_prefix) from a tokenizer.json's model and pipeline."""
    text = json.dumps({k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")})
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return "other", False
    if model.get("byte_fallback") or '"ByteFallback"' in text or '"Metaspace"' in text:
        prefix = '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text)
        return "llama", prefix
    if '"ByteLevel"' in text:
        return "gpt2", False
    return "other", False


def detect_byte_level_pre(spec: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level tokenizer.json."""
    text = json.dumps(spec.get("pre_tokenizer"))
    if "\\\\p{N}{1,3}" in text or "\\p{N}{1,3}" in text:
        return "llama-bpe"
    if '"Digits"' in text:
        return "smollm"
    return "gpt-2"


def scores_from_merges(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece-style scores for a BPE vocabulary: a token made by an earlier merge scores higher."""
    first_rank: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        first_rank.setdefault(merge.replace(" ", ""), rank)
    return [-float(first_rank[t]) if t in first_rank else 0.0 for t in tokens]
