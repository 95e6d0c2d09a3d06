"""One `Tokenizer` facade over GGUF vocabularies, Hugging Face `tokenizer.json`, SentencePiece and tiktoken files.

Every format is turned into a Hugging Face `tokenizers.Tokenizer` (the "engine", see tokenizer_engines.py), so
ids are computed one way everywhere and `save_hf` is a plain dump. Special-token strings in the text are
recognised; BOS/EOS are added by this class (never by the engine's post-processor) so the flags mean one thing.

    tok = load_tokenizer("model.gguf")          # or a HF dir, tokenizer.json, tokenizer.model
    ids = tok.encode("Hello")                     # BOS added when the vocabulary asks for it
    text = tok.decode(ids, skip_special_tokens=True)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Engine
from tokenizers import processors

from llamaworks.errors import ConfigError, FormatError
from llamaworks.files import atomic_write_text, read_json
from llamaworks.tokenizer_engines import (
    LLAMA3_PATTERN,
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_USER_DEFINED,
    build_byte_level_bpe,
    build_spm_bpe,
    build_tiktoken_bpe,
    classify_hf_model,
    detect_byte_level_pre,
    llama3_special_tokens,
    looks_like_tiktoken,
    read_tiktoken_ranks,
    scores_from_merges,
)

__all__ = ["END_OF_TURN_TOKENS", "StreamDecoder", "Tokenizer", "load_tokenizer", "read_gguf_tokenizer_metadata"]

# Tokens that end a turn or a text in the vocabularies we know; generation stops on any the vocab defines.
END_OF_TURN_TOKENS = (
    "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "</s>", "<|end|>",
    "<end_of_turn>", "<|eos|>",
)

GGUF_PREFIX = "tokenizer.ggml."


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)  # 0644-style mode (umask), stale temps of killed writers removed


class Tokenizer:
    """Text <-> token ids for a LLaMA-family vocabulary. Build it with a `from_*` constructor or `load_tokenizer`.

    `kind` is the GGUF tokenizer model it corresponds to: "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE);
    "other" for tokenizer.json models that have no GGUF equivalent here (they still encode/decode/save_hf).
    """

    def __init__(self, engine: Engine, *, kind: str, source: str = "<memory>", pre: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None,
                 unk_token: str | None = None, add_bos: bool = False, add_eos: bool = False,
                 add_space_prefix: bool = False, chat_template: str | None = None,
                 scores: Sequence[float] | None = None, token_types: Sequence[int] | None = None,
                 extra_stop_ids: Iterable[int] = ()) -> None:
        self.engine = engine
        self.kind = kind
        self.source = source
        self.pre = pre
        self.add_bos = bool(add_bos)
        self.add_eos = bool(add_eos)
        self.add_space_prefix = bool(add_space_prefix)
        self.chat_template = chat_template
        self._scores = list(scores) if scores is not None else None
        self._token_types = list(token_types) if token_types is not None else None
        self.vocab_size: int = engine.get_vocab_size(with_added_tokens=True)
        self.bos_token, self.bos_id = self._known(bos_token)
        self.eos_token, self.eos_id = self._known(eos_token)
        self.pad_token, self.pad_id = self._known(pad_token)
        self.unk_token, self.unk_id = self._known(unk_token)
        if self.add_bos and self.bos_id is None:
            self.add_bos = False  # asking for a BOS the vocabulary lacks would only fail later
        # Only added/special tokens count: a byte-level vocabulary may hold "</s>" as ordinary HTML text.
        added = self.engine.get_added_tokens_decoder()
        stops = {self.engine.token_to_id(t) for t in END_OF_TURN_TOKENS} & set(added)
        stops |= {int(i) for i in extra_stop_ids if 0 <= int(i) < self.vocab_size}
        if self.eos_id is not None:
            stops.add(self.eos_id)
        self.stop_ids: set[int] = {i for i in stops if i is not None}

    def _known(self, token: str | None) -> tuple[str | None, int | None]:
        if token is None:
            return None, None
        token_id = self.engine.token_to_id(token)
        return (token, token_id) if token_id is not None else (None, None)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, source={self.source!r})"

    def __len__(self) -> int:
        return self.vocab_size

    # ---- encode / decode -------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings (e.g. "<|im_start|>") become their ids.

        `add_bos=None` follows the vocabulary's own flag (`self.add_bos`)."""
        ids = self.engine.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None, add_eos: bool = False) -> list[list[int]]:
        batch = self.engine.encode_batch(list(texts), add_special_tokens=False)
        prefix = [self.bos_id] if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None else []
        suffix = [self.eos_id] if add_eos and self.eos_id is not None else []
        return [prefix + e.ids + suffix for e in batch]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.engine.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.engine.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.engine.id_to_token(int(token_id))

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids()

    def _special_ids(self) -> set[int]:
        if not hasattr(self, "_special_cache"):
            decoder = self.engine.get_added_tokens_decoder()
            self._special_cache = {i for i, tok in decoder.items() if tok.special}
        return self._special_cache

    # ---- constructors ----------------------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str = "<gguf>") -> Tokenizer:
        """Build from GGUF key/values (`tokenizer.ggml.*`, `tokenizer.chat_template`) as plain Python values."""
        meta = {k: _plain(v) for k, v in meta.items() if k.startswith("tokenizer.")}

        def need(key: str) -> Any:
            if key not in meta:
                raise FormatError(f"{source}: GGUF metadata has no {key!r}; cannot build a tokenizer")
            return meta[key]

        model = need(GGUF_PREFIX + "model")
        tokens = [t.decode("utf-8", "replace") if isinstance(t, bytes | bytearray) else str(t)
                  for t in need(GGUF_PREFIX + "tokens")]
        types = [int(t) for t in meta.get(GGUF_PREFIX + "token_type") or []] or None
        if types is not None and len(types) != len(tokens):
            raise FormatError(f"{source}: {GGUF_PREFIX}token_type has {len(types)} entries for {len(tokens)} tokens")
        pre = meta.get(GGUF_PREFIX + "pre")

        def token_at(key: str, engine: Engine | None = None) -> str | None:
            """The token a `*_token_id` key names, spelled as the engine spells it once built."""
            index = meta.get(GGUF_PREFIX + key)
            if index is None or not 0 <= int(index) < len(tokens):
                return None
            return engine.id_to_token(int(index)) if engine is not None else tokens[int(index)]

        scores = None
        if model == "gpt2":
            merges = meta.get(GGUF_PREFIX + "merges")
            if not merges:
                raise FormatError(f"{source}: byte-level BPE vocabulary without {GGUF_PREFIX}merges")
            engine = build_byte_level_bpe(tokens, [str(m) for m in merges], types, pre)
            add_bos_default, add_space_default = False, False
        elif model == "llama":
            scores = [float(s) for s in need(GGUF_PREFIX + "scores")]
            if len(scores) != len(tokens):
                raise FormatError(f"{source}: {GGUF_PREFIX}scores has {len(scores)} entries for {len(tokens)} tokens")
            add_space_default = True
            engine = build_spm_bpe(tokens, scores, types, token_at("unknown_token_id"),
                                   bool(meta.get(GGUF_PREFIX + "add_space_prefix", add_space_default)))
            add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
        else:
            raise FormatError(f"{source}: unsupported {GGUF_PREFIX}model {model!r} (expected 'gpt2' or 'llama')")
        return cls(
            engine, kind=model, source=source, pre=pre, bos_token=token_at("bos_token_id", engine),
            eos_token=token_at("eos_token_id", engine), pad_token=token_at("padding_token_id", engine),
            unk_token=token_at("unknown_token_id", engine),
            add_bos=bool(meta.get(GGUF_PREFIX + "add_bos_token", add_bos_default)),
            add_eos=bool(meta.get(GGUF_PREFIX + "add_eos_token", False)),
            add_space_prefix=bool(meta.get(GGUF_PREFIX + "add_space_prefix", add_space_default)),
            chat_template=meta.get("tokenizer.chat_template"), scores=scores, token_types=types,
            extra_stop_ids=[meta[k] for k in (GGUF_PREFIX + "eot_token_id", GGUF_PREFIX + "eom_token_id")
                            if isinstance(meta.get(k), int)],
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        return cls.from_gguf_metadata(read_gguf_tokenizer_metadata(path), str(path))

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, config: dict[str, Any] | None = None,
                            extra_stop_ids: Iterable[int] = ()) -> Tokenizer:
        """A Hugging Face tokenizer.json; `config` is the parsed tokenizer_config.json (bos/eos/add_bos/template)."""
        path = Path(path)
        try:
            engine = Engine.from_file(str(path))
            spec = json.loads(path.read_text(encoding="utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise FormatError(f"{path}: not a valid tokenizer.json ({str(exc).splitlines()[0][:200]})") from None
        config = dict(config or {})
        kind, add_space_prefix = classify_hf_model(spec)
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            # Infer from what the post-processor does: LLaMA 3's tokenizer.json adds BOS only there.
            probe = engine.encode("a", add_special_tokens=True).ids
            plain = engine.encode("a", add_special_tokens=False).ids
            add_bos = len(probe) > len(plain) and probe[0] != plain[0]
            if add_bos and bos is None:
                bos = engine.id_to_token(probe[0])
        engine.post_processor = None
        pre = detect_byte_level_pre(spec) if kind == "gpt2" else None
        return cls(engine, kind=kind, source=str(path), pre=pre, bos_token=bos, eos_token=eos,
                   pad_token=_token_text(config.get("pad_token")), unk_token=_token_text(config.get("unk_token")),
                   add_bos=bool(add_bos), add_eos=bool(config.get("add_eos_token", False)),
                   add_space_prefix=add_space_prefix, chat_template=_config_chat_template(config),
                   extra_stop_ids=extra_stop_ids)

    @classmethod
    def from_sentencepiece(cls, path: str | Path, data: bytes | None = None) -> Tokenizer:
        """A SentencePiece BPE `tokenizer.model` (LLaMA 1/2, TinyLlama, Mistral)."""
        from sentencepiece import sentencepiece_model_pb2

        path = Path(path)
        proto = sentencepiece_model_pb2.ModelProto()
        try:
            proto.ParseFromString(data if data is not None else path.read_bytes())
        except Exception:
            raise FormatError(f"{path}: not a SentencePiece model or a tiktoken file") from None
        if not proto.pieces:
            raise FormatError(f"{path}: SentencePiece model has no pieces")
        if proto.trainer_spec.model_type != 2:  # 2 is BPE; unigram models are not LLaMA-family
            raise FormatError(f"{path}: SentencePiece model type {proto.trainer_spec.model_type} is not BPE (2)")
        norm = proto.normalizer_spec
        if norm.name not in ("identity", "") or norm.precompiled_charsmap:
            raise FormatError(f"{path}: SentencePiece normalizer {norm.name!r} is not supported (expected identity)")
        # SentencePiece's piece types: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte (as GGUF's).
        tokens = [p.piece for p in proto.pieces]
        scores = [p.score for p in proto.pieces]
        types = [p.type for p in proto.pieces]
        unk = tokens[proto.trainer_spec.unk_id] if 0 <= proto.trainer_spec.unk_id < len(tokens) else None
        add_space_prefix = bool(norm.add_dummy_prefix)
        engine = build_spm_bpe(tokens, scores, types, unk, add_space_prefix, norm.remove_extra_whitespaces)

        def piece(index: int) -> str | None:
            return tokens[index] if 0 <= index < len(tokens) else None

        spec = proto.trainer_spec
        return cls(engine, kind="llama", source=str(path), bos_token=piece(spec.bos_id), eos_token=piece(spec.eos_id),
                   pad_token=piece(spec.pad_id), unk_token=unk, add_bos=True, add_space_prefix=add_space_prefix,
                   scores=scores, token_types=types)

    @classmethod
    def from_tiktoken(cls, path: str | Path, data: bytes | None = None) -> Tokenizer:
        """LLaMA 3's tiktoken `tokenizer.model`: 128000 ranks plus 256 special tokens."""
        path = Path(path)
        try:
            ranks = read_tiktoken_ranks(data if data is not None else path.read_bytes())
        except ValueError as exc:
            raise FormatError(f"{path}: malformed tiktoken file ({exc})") from None
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise FormatError(f"{path}: tiktoken ranks are not 0..{len(ranks) - 1} without gaps")
        specials = llama3_special_tokens()
        engine = build_tiktoken_bpe(ranks, specials, LLAMA3_PATTERN)
        return cls(engine, kind="gpt2", source=str(path), pre="llama-bpe", bos_token="<|begin_of_text|>",
                   eos_token="<|end_of_text|>", pad_token="<|finetune_right_pad_id|>", add_bos=True)

    @classmethod
    def from_model_file(cls, path: str | Path) -> Tokenizer:
        """A `tokenizer.model`: tiktoken text or SentencePiece protobuf, told apart by content."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise FormatError(f"{path}: cannot read tokenizer model ({exc.strerror})") from None
        if looks_like_tiktoken(data):
            return cls.from_tiktoken(path, data)
        return cls.from_sentencepiece(path, data)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """A model directory: tokenizer.json (+ tokenizer_config.json), else tokenizer.model (also Meta's
        `original/` sub-folder), else a single .gguf file."""
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        template_file = path / "chat_template.jinja"
        if template_file.is_file() and not config.get("chat_template"):
            try:
                config["chat_template"] = template_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise FormatError(f"{template_file}: chat template is not valid UTF-8 (byte {exc.start}: "
                                  f"{exc.reason})") from None
        stops = _generation_eos_ids(path)
        if (path / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(path / "tokenizer.json", config, stops)
        for candidate in (path / "tokenizer.model", path / "original" / "tokenizer.model"):
            if candidate.is_file():
                tok = cls.from_model_file(candidate)
                tok._apply_config(config, stops)
                return tok
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return cls.from_gguf(ggufs[0])
        raise FormatError(f"{path}: no tokenizer.json, tokenizer.model or single .gguf file in this directory")

    def _apply_config(self, config: dict[str, Any], extra_stop_ids: Iterable[int]) -> None:
        """Let a tokenizer_config.json next to a tokenizer.model override the special tokens and flags."""
        for attr in ("bos", "eos", "pad", "unk"):
            token = _token_text(config.get(f"{attr}_token"))
            if token is not None and self.engine.token_to_id(token) is not None:
                setattr(self, f"{attr}_token", token)
                setattr(self, f"{attr}_id", self.engine.token_to_id(token))
        if "add_bos_token" in config:
            self.add_bos = bool(config["add_bos_token"]) and self.bos_id is not None
        if "add_eos_token" in config:
            self.add_eos = bool(config["add_eos_token"])
        self.chat_template = _config_chat_template(config) or self.chat_template
        self.stop_ids |= {int(i) for i in extra_stop_ids if 0 <= int(i) < self.vocab_size}
        if self.eos_id is not None:
            self.stop_ids.add(self.eos_id)

    # ---- writers ---------------------------------------------------------------------------------------------
    def token_list(self) -> list[str]:
        """Tokens ordered by id (ids without a token, which well-formed vocabularies lack, become "<unused_N>")."""
        return [self.engine.id_to_token(i) or f"<unused_{i}>" for i in range(self.vocab_size)]

    def to_gguf_metadata(self) -> dict[str, Any]:
        """The `tokenizer.*` GGUF keys (llama.cpp names) describing this vocabulary, as plain Python values."""
        if self.kind not in ("gpt2", "llama"):
            raise ConfigError(f"{self.source}: this tokenizer model has no GGUF vocabulary equivalent "
                              "(only byte-level BPE and SentencePiece BPE are supported)")
        spec = json.loads(self.engine.to_str())
        tokens = self.token_list()
        special = self._special_ids()
        added = {int(t["id"]) for t in spec.get("added_tokens", [])}
        types = self._token_types
        if types is None or len(types) != len(tokens):
            types = []
            for i, token in enumerate(tokens):
                if i in special:
                    types.append(TOKEN_CONTROL)
                elif i in added:
                    types.append(TOKEN_USER_DEFINED)
                elif i == self.unk_id:
                    types.append(TOKEN_UNKNOWN)
                elif self.kind == "llama" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                    types.append(TOKEN_BYTE)
                else:
                    types.append(TOKEN_NORMAL)
        meta: dict[str, Any] = {
            GGUF_PREFIX + "model": self.kind,
            GGUF_PREFIX + "pre": self.pre or ("default" if self.kind == "llama" else "gpt-2"),
            GGUF_PREFIX + "tokens": tokens,
            GGUF_PREFIX + "token_type": [int(t) for t in types],
        }
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
        if self.kind == "gpt2":
            meta[GGUF_PREFIX + "merges"] = merges
        else:
            meta[GGUF_PREFIX + "scores"] = self._scores if self._scores is not None else scores_from_merges(
                tokens, merges)
        for key, value in (("bos_token_id", self.bos_id), ("eos_token_id", self.eos_id),
                           ("unknown_token_id", self.unk_id), ("padding_token_id", self.pad_id)):
            if value is not None:
                meta[GGUF_PREFIX + key] = int(value)
        meta[GGUF_PREFIX + "add_bos_token"] = self.add_bos
        meta[GGUF_PREFIX + "add_eos_token"] = self.add_eos
        meta[GGUF_PREFIX + "add_space_prefix"] = self.add_space_prefix
        if self.chat_template:
            meta["tokenizer.chat_template"] = self.chat_template
        return meta

    def save_hf(self, directory: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json so `transformers.AutoTokenizer` gives the same ids."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        engine = Engine.from_str(self.engine.to_str())
        specials: list[tuple[str, int]] = []
        single = "$A:0"
        if self.add_bos and self.bos_token is not None:
            single = f"{self.bos_token}:0 {single}"
            specials.append((self.bos_token, self.bos_id))
        if self.add_eos and self.eos_token is not None:
            single = f"{single} {self.eos_token}:0"
            if self.eos_token != self.bos_token:
                specials.append((self.eos_token, self.eos_id))
        pair = single + " " + single.replace("$A:0", "$B:1").replace(":0", ":1")
        engine.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        for name in ("bos", "eos", "pad", "unk"):
            token = getattr(self, f"{name}_token")
            if token is not None:
                config[f"{name}_token"] = token
        if self.chat_template:
            config["chat_template"] = self.chat_template
        _atomic_write_text(directory / "tokenizer.json", engine.to_str(pretty=False))
        _atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))


class StreamDecoder:
    """Turns ids pushed one at a time into text, emitting only complete UTF-8 characters.

    It decodes a short window of recent ids and emits what the newest id added, so byte-fallback pieces
    (<0xEB>...) and byte-level BPE fragments of one character are held back until the character is whole, and
    SentencePiece's "drop the first space" rule applies only at the very start. Pass `prompt_ids` when decoding a
    continuation: the first generated piece is then decoded after the prompt, so " world" keeps its space.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False,
                 prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = [int(i) for i in prompt_ids][-4:]
        self._ids: list[int] = context
        self._prefix = 0  # window start
        self._read = len(context)  # ids before this were already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        emitted = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        # U+FFFD at the end means the last character is still missing bytes.
        if full.endswith("\ufffd") or len(full) <= len(emitted) or not full.startswith(emitted):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(emitted):]

    def flush(self) -> str:
        """Whatever is still held back, without a character whose bytes never all arrived (a reply cut by the
        token limit in the middle of a multi-byte character ends before it, not in U+FFFD); resets the window."""
        emitted = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        held = self._ids[self._read:]
        self._prefix = self._read = len(self._ids)
        shared = 0
        while shared < min(len(emitted), len(full)) and emitted[shared] == full[shared]:
            shared += 1
        # Drop trailing U+FFFD where the held-back tokens end in it: push() holds tokens back exactly while their
        # bytes end in an incomplete character. (A model that itself ends a cut reply with the character U+FFFD
        # loses it too: the bytes cannot tell the two apart.)
        tail = full[shared:]
        if held and tail.endswith("\ufffd") and self._decode(held).endswith("\ufffd"):
            tail = tail.rstrip("\ufffd")
        return tail


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a .gguf file, tokenizer.json, tokenizer.model, or a model directory."""
    path = Path(path)
    if path.is_dir():
        return Tokenizer.from_dir(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such tokenizer file or directory")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic == b"GGUF":
        return Tokenizer.from_gguf(path)
    if path.suffix == ".json":
        stops = _generation_eos_ids(path.parent)
        return Tokenizer.from_tokenizer_json(path, _read_json(path.parent / "tokenizer_config.json"), stops)
    if path.suffix == ".gguf":
        raise FormatError(f"{path}: not a GGUF file (bad magic {magic!r})")
    return Tokenizer.from_model_file(path)


def read_gguf_tokenizer_metadata(path: str | Path) -> dict[str, Any]:
    """The `tokenizer.*` keys (and `general.architecture`) of a GGUF file as plain Python values."""
    from llamaworks.checkpoints.gguf import parse_gguf  # the one GGUF header parser

    meta, _ = parse_gguf(Path(path))
    return {k: v for k, v in meta.items() if k.startswith("tokenizer.") or k == "general.architecture"}


# ---- helpers ---------------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """numpy arrays/scalars and tuples (as some GGUF readers return them) -> plain Python values."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, tuple):
        value = list(value)
    return value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    value = read_json(path)  # one FormatError line for bad UTF-8, deep nesting, huge numbers, ...
    if not isinstance(value, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return value


def _generation_eos_ids(directory: Path) -> list[int]:
    """generation_config.json's eos_token_id (int or list) marks extra stop tokens (e.g. <|eot_id|>)."""
    eos = _read_json(directory / "generation_config.json").get("eos_token_id")
    if isinstance(eos, int):
        return [eos]
    return [i for i in eos if isinstance(i, int)] if isinstance(eos, list) else []


def _config_chat_template(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None
