"""HellaSwag (sentence completion), validation split.

Formats: the authors' `hellaswag_val.jsonl` / `hellaswag_train.jsonl` (`activity_label`, `ctx_a`, `ctx_b`,
`endings`, `label`) and the Hugging Face `Rowan/hellaswag` Parquet export (`validation-*.parquet`, same fields,
`label` as a string). Harness preprocessing: query = clean(activity_label + ": " + ctx_a + " " +
ctx_b.capitalize()), choices = clean(ending), where clean strips, turns " [title]" into ". ", deletes any
"[...]" tag and folds double spaces once. No "Answer:" cue; few-shot examples come from the train split
(k + 1 drawn per item, k kept, as the harness does for a task without a test split).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import FormatError
from .task import Doc, Task, field_of, find_files, read_records, require_files

_BRACKET_TAG = re.compile(r"\[.*?\]")


def clean(text: str) -> str:
    """The harness's WikiHow artefact cleanup, step for step."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = _BRACKET_TAG.sub("", text)
    return text.replace("  ", " ")


def parse_record(record: dict, path: Path, line: int) -> Doc:
    activity = field_of(record, "activity_label", path, line)
    ctx_a = field_of(record, "ctx_a", path, line)
    ctx_b = field_of(record, "ctx_b", path, line)
    endings = field_of(record, "endings", path, line, list)
    label = field_of(record, "label", path, line, (int, str))
    try:
        gold = int(label)
    except ValueError:
        raise FormatError(f"{path}:{line}: label {label!r} is not an integer (the test split has no labels)") from None
    if not 0 <= gold < len(endings):
        raise FormatError(f"{path}:{line}: label {gold} is out of range for {len(endings)} endings")
    query = clean(activity + ": " + ctx_a + " " + ctx_b.capitalize())
    return Doc(query=query, choices=tuple(clean(e) for e in endings), gold=gold, id=str(record.get("ind", line)))


def read_docs(paths: list[Path]) -> list[Doc]:
    return [parse_record(record, path, line) for path in paths for line, record in read_records(path)]


def _patterns(jsonl_split: str, parquet_split: str) -> list[str]:
    return [f"hellaswag_{jsonl_split}.jsonl", f"hellaswag/{parquet_split}-*.parquet",
            f"hellaswag/data/{parquet_split}-*.parquet"]


def load(name: str, data_dir: Path) -> Task:
    val = require_files(data_dir, _patterns("val", "validation"), "HellaSwag validation")
    train = find_files(data_dir, _patterns("train", "train"))
    # The harness's hellaswag has no test split, so its sampler is handed the eval doc to exclude: it draws
    # k + 1 train docs per item and keeps k. That changes which shots later items get, so we do the same.
    return Task(name=name, docs=read_docs(val), fewshot_docs=read_docs(train) if train else None,
                fewshot_sampler="random", fewshot_excludes_eval_doc=True, metrics=("acc", "acc_norm"),
                source=str(val[0]), fewshot_source=str(train[0]) if train else "")
