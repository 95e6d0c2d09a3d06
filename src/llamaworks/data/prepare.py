"""`llamaworks data prepare`: text corpora -> tokenized, packed token shards for pretraining.

Inputs: plain text files (.txt, .md, anything not listed below), directories (recursively, sorted),
JSONL/JSON with a text field (default "text"), Parquet (pyarrow) with a text column.

Output directory:
    manifest.json         dtype, vocab size, special ids, token counts, sources, split settings
    train-00000.bin ...   flat token ids (numpy uint16 if the vocabulary fits, else uint32), documents
    val-00000.bin         joined by EOS (and BOS when the tokenizer adds one): read them with np.memmap
    tokenizer/            the tokenizer (HF layout), so `pretrain --data DIR` needs nothing else

Deterministic: files are visited in sorted order and documents (text blocks, JSONL records, Parquet rows) are
dealt out evenly: document i goes to validation when floor((i + 1 + s) * f) > floor((i + s) * f) for
f = val_fraction and an offset s drawn from the seed. That is exactly a fraction f of the documents, spread over
the whole corpus, and at least one as soon as there are 1/f documents. Text files are split into blocks at blank
lines (up to `block_chars` characters each), so a corpus that is one big file still gets a validation part.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError
from ..files import replace_dir
from .kakaotalk import looks_like_kakao
from .records import BadRecord, DatasetError
from .textfile import read_head, read_text

MANIFEST = "manifest.json"
FORMAT = "llamaworks-tokens-v1"
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
SKIP_SUFFIXES = (".bin", ".npy", ".pt", ".safetensors", ".gguf", ".gz", ".zip", ".png", ".jpg", ".pdf")


@dataclass
class Document:
    text: str
    source: str  # file path (relative to the input argument's parent) and block/line/row
    end_of_document: bool  # False for a block of a text file that continues in the next block


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _files(sources: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            files += sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")
                            and p.suffix.lower() not in SKIP_SUFFIXES)
        elif src.is_file():
            files.append(src)
        else:
            raise FormatError(f"{src}: no such file or directory")
    if not files:
        raise FormatError(f"no input files in {', '.join(map(str, sources))}")
    return files


def _text_blocks(path: Path, block_chars: int) -> Iterator[Document]:
    text, encoding = read_text(path)  # a BOM never becomes text; cp949 files are read, and said so
    if encoding == "cp949":
        print(f"note: {path} is not UTF-8; read it as cp949 (EUC-KR)", file=sys.stderr)
    if not text.strip():
        return
    start, index = 0, 0
    while start < len(text):
        end = len(text)
        if end - start > block_chars:
            cut = text.rfind("\n\n", start, start + block_chars)
            if cut <= start:
                cut = text.rfind("\n", start, start + block_chars)
            end = cut + 1 if cut > start else start + block_chars
        yield Document(text[start:end], f"{path}#block{index}", end >= len(text))
        start, index = end, index + 1


def _json_documents(path: Path, field: str, bad: list[BadRecord]) -> Iterator[Document]:
    from .instruct import read_json_records

    for item in read_json_records(path):
        if isinstance(item, BadRecord):
            bad.append(item)
            continue
        line, record = item
        if not isinstance(record, dict):
            bad.append(BadRecord(str(path), line, f"expected a JSON object with a {field!r} field"))
        elif not isinstance(record.get(field), str):
            got = "missing" if field not in record else f"a {type(record[field]).__name__}"
            bad.append(BadRecord(str(path), line, f"field {field!r} must be a string, it is {got}"))
        elif record[field].strip():
            yield Document(record[field], f"{path}:{line}", True)


def _parquet_documents(path: Path, field: str, bad: list[BadRecord]) -> Iterator[Document]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise FormatError(f"{path}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                bad.append(BadRecord(str(path), row, f"row {row}: column {field!r} is not a string ({value!r:.40})"))
            elif value.strip():
                yield Document(value, f"{path}:row{row}", True)


def check_not_chat_export(path: Path) -> None:
    """A KakaoTalk export is chat data for `finetune`, not pretraining text: say what to run instead."""
    if path.suffix.lower() not in (".txt", ".csv", ""):
        return
    if looks_like_kakao(read_head(path)):
        raise FormatError(f"{path}: a KakaoTalk chat export, not pretraining text; fine-tune on it directly: "
                          f"`llamaworks data inspect {path}` (speakers, what is kept), then `llamaworks finetune "
                          f"lora --data {path} --kakao-assistant YOUR_NAME --out DIR`")


def iter_documents(files: Sequence[Path], text_field: str, bad: list[BadRecord],
                   block_chars: int = 16384) -> Iterator[tuple[Path, Document]]:
    for path in files:
        suffix = path.suffix.lower()
        if suffix in JSON_SUFFIXES:
            docs = _json_documents(path, text_field, bad)
        elif suffix in PARQUET_SUFFIXES:
            docs = _parquet_documents(path, text_field, bad)
        else:
            docs = _text_blocks(path, block_chars)
        for doc in docs:
            yield path, doc


def _val_selector(seed: int, val_fraction: float):
    """is_val(i) for document index i: an even, seeded deal of a fraction `val_fraction` of the documents."""
    if val_fraction <= 0:
        return lambda i: False
    digest = hashlib.blake2b(str(seed).encode(), digest_size=8).digest()
    offset = int.from_bytes(digest, "little") / 2**64 / val_fraction  # in [0, 1/f)
    return lambda i: math.floor((i + 1 + offset) * val_fraction) > math.floor((i + offset) * val_fraction)


class _ShardWriter:
    """Appends token arrays to `{split}-NNNNN.bin` files of at most `shard_tokens` tokens, atomically per file."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.files: list[dict[str, Any]] = []
        self.tokens = 0
        self.documents = 0
        self._f = None
        self._n = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.files):05d}.bin"
        self._f = (self.out_dir / (name + ".tmp")).open("wb")
        self.files.append({"file": name, "tokens": 0})
        self._n = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._f is None or self._n >= self.shard_tokens:
                self._close_current()
                self._open()
            take = ids[: self.shard_tokens - self._n]
            take.astype(self.dtype, copy=False).tofile(self._f)
            self._n += len(take)
            self.files[-1]["tokens"] += len(take)
            self.tokens += len(take)
            ids = ids[len(take):]

    def _close_current(self) -> None:
        if self._f is not None:
            self._f.close()
            name = self.files[-1]["file"]
            os.replace(self.out_dir / (name + ".tmp"), self.out_dir / name)
            self._f = None

    def close(self) -> None:
        self._close_current()


def resolve_tokenizer(tokenizer: Any) -> Any:
    """A Tokenizer from an object, a tokenizer/model path, or "default" (the bundled default model's)."""
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from ..assets import resolve_model_path
    from ..tokenizer import load_tokenizer

    path = resolve_model_path(tokenizer)
    if not path.exists():
        raise FormatError(f"{tokenizer}: no such tokenizer or model file/directory")
    return load_tokenizer(path)


def prepare_corpus(sources: Sequence[str | Path], tokenizer: Any, out_dir: str | Path, *,
                   val_fraction: float = 0.01, seed: int = 0, text_field: str = "text",
                   add_bos: bool | None = None, add_eos: bool = True, shard_tokens: int = 2**28,
                   block_chars: int = 16384, skip_bad: bool = False, progress: bool = True,
                   save_tokenizer: bool = True) -> dict[str, Any]:
    """Tokenize `sources` into `out_dir` (see the module docstring); returns the manifest.

    add_bos: prepend BOS to every document (default: the tokenizer's own add_bos setting);
    add_eos: append EOS to every document so the model learns where documents end."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tok = resolve_tokenizer(tokenizer)
    files = _files(sources)
    for f in files:
        check_not_chat_export(f)
    final = Path(out_dir)
    # Everything is written into a fresh folder next to OUT that replaces OUT in one swap when the run succeeded
    # (files.replace_dir), so a failed run leaves a previous good output as it was (and no empty OUT when there
    # was none); files a user keeps in OUT are carried over.
    created = _missing_parents(final)
    try:
        with replace_dir(final, drop=_is_prepare_output) as out:
            manifest = _prepare_into(out, files, tok, tokenizer, sources, val_fraction=val_fraction, seed=seed,
                                     text_field=text_field, add_bos=add_bos, add_eos=add_eos,
                                     shard_tokens=shard_tokens, block_chars=block_chars, skip_bad=skip_bad,
                                     progress=progress, save_tokenizer=save_tokenizer)
    except BaseException:
        for d in created:  # parents this run created, deepest first, if still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    elapsed = manifest.pop("_elapsed")
    n_tokens = manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
    rate = n_tokens / elapsed if elapsed > 0 else float("inf")
    print(f"{n_tokens:,} tokens ({manifest['splits']['train']['tokens']:,} train / "
          f"{manifest['splits']['val']['tokens']:,} val) from {len(files)} file(s) in {elapsed:.1f}s: "
          f"{rate:,.0f} tokens/s -> {final}", file=sys.stderr)
    if manifest["skipped_records"]:
        print(f"skipped {len(manifest['skipped_records'])} malformed record(s); first: "
              f"{manifest['skipped_records'][0]}", file=sys.stderr)
    manifest["tokens_per_s"] = rate
    return manifest


def _missing_parents(path: Path) -> list[Path]:
    """The ancestors of `path` that do not exist yet, deepest first."""
    missing = []
    p = path.parent
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _is_prepare_output(name: str) -> bool:
    """Whether an entry of an old OUT is a previous run's output (replaced), not a file the user keeps there."""
    return name in (MANIFEST, "tokenizer") or (name.endswith(".bin") and name.startswith(("train-", "val-")))


def _prepare_into(out: Path, files: list[Path], tok: Any, tokenizer: Any, sources: Sequence[str | Path], *,
                  val_fraction: float, seed: int, text_field: str, add_bos: bool | None, add_eos: bool,
                  shard_tokens: int, block_chars: int, skip_bad: bool, progress: bool,
                  save_tokenizer: bool) -> dict[str, Any]:
    dtype = token_dtype(tok.vocab_size)
    bos = tok.bos_id if (tok.add_bos if add_bos is None else add_bos) else None
    eos = tok.eos_id if add_eos else None
    writers = {"train": _ShardWriter(out, "train", dtype, shard_tokens),
               "val": _ShardWriter(out, "val", dtype, shard_tokens)}
    bad: list[BadRecord] = []
    total_bytes = sum(f.stat().st_size for f in files)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr)
    t0 = time.perf_counter()
    n_tokens = 0
    current_file: Path | None = None
    continuing = False  # inside a multi-block text file: no BOS before the next block
    is_val = _val_selector(seed, val_fraction)
    n_documents = 0
    encode_batch = getattr(tok, "encode_batch", None)

    def flush(pending: list[tuple[Path, Document]]) -> None:
        nonlocal continuing, n_tokens, current_file, n_documents
        texts = [d.text for _, d in pending]
        encoded = (encode_batch(texts, add_bos=False, add_eos=False) if encode_batch is not None
                   else [tok.encode(t, add_bos=False, add_eos=False) for t in texts])
        for (path, doc), ids in zip(pending, encoded):
            if bar is not None and path != current_file:
                if current_file is not None:
                    bar.update(current_file.stat().st_size)
                current_file = path
            # Blocks of one big file are split independently, so even a one-file corpus gets validation text.
            split = "val" if is_val(n_documents) else "train"
            n_documents += 1
            if not continuing and bos is not None:
                ids = [bos, *ids]
            if doc.end_of_document and eos is not None:
                ids = [*ids, eos]
            writers[split].write(np.asarray(ids, dtype=np.int64))
            writers[split].documents += 1
            continuing = not doc.end_of_document
            n_tokens += len(ids)
        if bar is not None:
            bar.set_postfix(tokens=f"{n_tokens:,}", refresh=False)

    try:
        pending: list[tuple[Path, Document]] = []
        pending_chars = 0
        for path, doc in iter_documents(files, text_field, bad, block_chars):
            pending.append((path, doc))
            pending_chars += len(doc.text)
            if len(pending) >= 512 or pending_chars >= 4_000_000:  # batches keep the Rust encoder busy
                flush(pending)
                pending, pending_chars = [], 0
        if pending:
            flush(pending)
        if bar is not None and current_file is not None:
            bar.update(current_file.stat().st_size)
    finally:
        for w in writers.values():
            w.close()
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    if bad and not skip_bad:
        raise DatasetError(bad)
    if writers["train"].tokens == 0:
        raise FormatError("no training tokens: every document went to validation or the inputs are empty")
    if writers["val"].tokens == 0 and val_fraction > 0:
        print("warning: no document fell into the validation split; use more data or a larger --val-fraction",
              file=sys.stderr)
    tokenizer_dir = None
    if save_tokenizer and hasattr(tok, "save_hf"):
        tokenizer_dir = "tokenizer"
        tok.save_hf(out / tokenizer_dir)
    manifest = {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "add_bos": bos is not None,
        "add_eos": eos is not None,
        "tokenizer": tokenizer_dir,
        "tokenizer_source": str(tokenizer) if isinstance(tokenizer, (str, Path)) else None,
        "sources": [str(s) for s in sources],
        "files": len(files),
        "text_field": text_field,
        "val_fraction": val_fraction,
        "seed": seed,
        "splits": {name: {"files": w.files, "tokens": w.tokens, "documents": w.documents}  # documents or blocks
                   for name, w in writers.items()},
        "skipped_records": [str(b) for b in bad[:1000]],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    manifest["_elapsed"] = elapsed
    return manifest


@dataclass
class PreparedData:
    path: Path
    manifest: dict[str, Any]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    def arrays(self, split: str) -> list[np.ndarray]:
        """Memory-mapped token arrays of a split ("train" or "val")."""
        files = self.manifest["splits"][split]["files"]
        return [np.memmap(self.path / f["file"], dtype=self.dtype, mode="r") for f in files if f["tokens"] > 0]

    def tokens(self, split: str) -> int:
        return int(self.manifest["splits"][split]["tokens"])

    @property
    def tokenizer_path(self) -> Path | None:
        t = self.manifest.get("tokenizer")
        return self.path / t if t else None


def load_prepared(path: str | Path) -> PreparedData:
    p = Path(path)
    mf = p / MANIFEST
    if not mf.exists():
        raise FormatError(f"{p}: no {MANIFEST}; create it with `llamaworks data prepare SRC... --out {p}`")
    manifest = json.loads(mf.read_text())
    if manifest.get("format") != FORMAT:
        raise FormatError(f"{mf}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return PreparedData(p, manifest)
