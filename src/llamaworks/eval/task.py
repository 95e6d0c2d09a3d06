"""What a multiple-choice task is, and how lm-evaluation-harness turns one into prompt strings.

A task is data: eval documents, a few-shot pool, a description line, a few-shot sampling rule and the
metrics it reports. Every task file (`arc.py`, `hellaswag.py`, `mmlu.py`, `truthfulqa.py`) only parses its
published formats into `Doc`s and fills in a `Task`; the prompt assembly below is shared and follows the
harness's plain-text rules:

    context      = description + "".join(shot.query + " " + shot.answer + "\\n\\n" for shot in shots) + doc.query
    continuation = " " + choice                    (target_delimiter " ", fewshot_delimiter "\\n\\n")

With a chat template the description becomes the system message, each few-shot example a user/assistant turn
pair and the question the last user turn, rendered with a generation prompt; continuations lose their leading
space (the harness drops target_delimiter then).
"""

from __future__ import annotations

import fnmatch
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FormatError

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
DEFAULT_FEWSHOT_SEED = 1234  # lm-evaluation-harness's default --fewshot_random_seed


@dataclass(frozen=True)
class Doc:
    """One multiple-choice question, already in the harness's doc_to_text/doc_to_choice form."""

    query: str  # the text the continuation is appended to, e.g. "Question: ...\nAnswer:"
    choices: tuple[str, ...]  # without the target delimiter
    gold: int  # index of the answer (also the answer shown when the doc is a few-shot example)
    id: str = ""
    labels: tuple[int, ...] | None = None  # TruthfulQA mc2: 1 for every true choice


@dataclass
class Task:
    """A multiple-choice task: documents plus the harness settings that shape its prompts and metrics."""

    name: str
    docs: Sequence[Doc]
    fewshot_docs: Sequence[Doc] | None = None  # None: the task has no few-shot split in the given files
    description: str = ""
    default_fewshot: int = 0
    fewshot_sampler: str = "random"  # "random" (seeded random.sample per doc) or "first_n" (MMLU)
    # The harness hands its sampler the eval doc to exclude when the task has no test split (HellaSwag,
    # TruthfulQA): it then draws k + 1 docs, drops the eval doc and keeps k, which shifts the random stream.
    fewshot_excludes_eval_doc: bool = False
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    group: str | None = None  # e.g. "mmlu" for the 57 subject tasks
    source: str = ""  # file the docs came from, for messages and the report
    fewshot_source: str = ""


@dataclass
class FewshotSampler:
    """The harness's few-shot rule: one seeded Random per task, drawn from once per eval doc, in order.

    `random.sample` picks by index from len(pool) alone, so sampling indices equals sampling the docs.
    """

    task: Task
    seed: int = DEFAULT_FEWSHOT_SEED
    _rnd: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rnd = random.Random(self.seed)

    def sample(self, k: int, doc: Doc) -> list[Doc]:
        if k == 0:
            return []
        pool = self.task.fewshot_docs
        if not pool:
            raise FormatError(f"{self.task.name}: {k}-shot needs a few-shot split (train/dev file), none was found")
        if self.task.fewshot_sampler == "first_n":
            if k > len(pool):
                raise FormatError(f"{self.task.name}: {k}-shot asked, the few-shot split has {len(pool)} items")
            return list(pool[:k])
        if self.task.fewshot_excludes_eval_doc:
            drawn = [pool[i] for i in self._rnd.sample(range(len(pool)), k + 1)]
            kept = [d for d in drawn if d != doc][:k]
            if len(kept) < k:  # duplicates of the eval doc in the pool: redraw without any copy
                rest = [d for d in pool if d != doc]
                kept = [rest[i] for i in self._rnd.sample(range(len(rest)), k)]
            return kept
        if k > len(pool):
            raise FormatError(f"{self.task.name}: {k}-shot asked, the few-shot split has {len(pool)} items")
        return [pool[i] for i in self._rnd.sample(range(len(pool)), k)]


@dataclass(frozen=True)
class Prompt:
    context: str
    continuations: tuple[str, ...]


def build_prompt(task: Task, doc: Doc, shots: Sequence[Doc],
                 chat: Callable[[list[dict[str, str]]], str] | None = None) -> Prompt:
    """The context and continuation strings the harness scores for `doc` after `shots`.

    With `chat` (a renderer of role/content messages that adds the generation prompt) the layout is the
    harness's --apply_chat_template default (fewshot_as_multiturn): description as the system message, each
    shot a user turn plus an assistant turn with its answer, the question a last user turn; continuations
    then have no leading space.
    """
    if chat is None:
        body = "".join(s.query + TARGET_DELIMITER + s.choices[s.gold] + FEWSHOT_DELIMITER for s in shots)
        return Prompt(task.description + body + doc.query, tuple(TARGET_DELIMITER + c for c in doc.choices))
    messages = [{"role": "system", "content": task.description}] if task.description else []
    for s in shots:
        messages += [{"role": "user", "content": s.query}, {"role": "assistant", "content": s.choices[s.gold]}]
    messages.append({"role": "user", "content": doc.query})
    return Prompt(chat(messages), tuple(doc.choices))


# -- reading files ----------------------------------------------------------------------------------

def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-empty line; a bad line is a FormatError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FormatError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise FormatError(f"{path}:{lineno}: expected a JSON object per line")
                yield lineno, record
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from None


def read_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number starting at 1, record) for each row of a Parquet file (Hugging Face exports)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for broken files
        raise FormatError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    yield from enumerate(table.to_pylist(), 1)


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    return read_parquet(path) if path.suffix == ".parquet" else read_jsonl(path)


def field_of(record: dict[str, Any], key: str, path: Path, line: int, kind: type | tuple[type, ...] = str) -> Any:
    """record[key], checked for presence and type, else a FormatError naming file, line and field."""
    if key not in record:
        raise FormatError(f"{path}:{line}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise FormatError(f"{path}:{line}: field {key!r} should be {names}, got {type(value).__name__}")
    return value


def find_files(data_dir: Path, patterns: Sequence[str]) -> list[Path]:
    """Files under data_dir (any depth, symlinks followed) whose trailing path parts match the first pattern
    that matches anything, e.g. "ARC-Challenge/test-*.parquet" matches .../ARC-Challenge/test-0000.parquet."""
    files = []
    for root, _, names in os.walk(data_dir, followlinks=True):
        files.extend(Path(root) / name for name in names)
    for pattern in patterns:
        parts = pattern.split("/")
        hits = sorted(f for f in files if len(f.parts) >= len(parts)
                      and all(fnmatch.fnmatchcase(a, b) for a, b in zip(f.parts[-len(parts):], parts)))
        if hits:
            return hits
    return []


def require_files(data_dir: Path, patterns: Sequence[str], what: str) -> list[Path]:
    if not data_dir.is_dir():
        raise FormatError(f"{data_dir}: data directory not found")
    hits = find_files(data_dir, patterns)
    if not hits:
        raise FormatError(f"{data_dir}: no {what} file found (looked for {', '.join(patterns)})")
    return hits
