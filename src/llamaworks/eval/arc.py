"""ARC (AI2 Reasoning Challenge), Easy and Challenge sets.

Formats: AI2's `ARC-Challenge-Test.jsonl` (`question.stem`, `question.choices[].label/text`, `answerKey`;
labels are letters or, for some items, "1".."4") and the Hugging Face `allenai/ai2_arc` Parquet export
(`ARC-Challenge/test-*.parquet`: `question`, `choices.text/label`, `answerKey`).
Harness prompt: "Question: {question}\\nAnswer:", choices are the answer texts, gold is the index of
`answerKey` among the labels; few-shot examples are drawn with a seeded random from the train split.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import FormatError
from .task import Doc, Task, field_of, find_files, read_records, require_files

SETS = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}


def parse_record(record: dict, path: Path, line: int) -> Doc:
    question = field_of(record, "question", path, line, (str, dict))
    if isinstance(question, dict):  # AI2 layout
        stem = field_of(question, "stem", path, line)
        raw_choices = field_of(question, "choices", path, line, list)
        try:
            labels = [str(c["label"]) for c in raw_choices]
            texts = [c["text"] for c in raw_choices]
        except (KeyError, TypeError):
            raise FormatError(f"{path}:{line}: question.choices should be a list of {{label, text}}") from None
    else:  # Hugging Face layout
        stem = question
        choices = field_of(record, "choices", path, line, dict)
        labels = [str(x) for x in choices.get("label") or []]
        texts = list(choices.get("text") or [])
        if not labels or len(labels) != len(texts):
            raise FormatError(f"{path}:{line}: choices.label and choices.text should be lists of equal length")
    answer = str(field_of(record, "answerKey", path, line, (str, int)))
    if answer not in labels:
        raise FormatError(f"{path}:{line}: answerKey {answer!r} is not one of the labels {labels}")
    return Doc(query=f"Question: {stem}\nAnswer:", choices=tuple(texts), gold=labels.index(answer),
               id=str(record.get("id", line)))


def read_docs(paths: list[Path]) -> list[Doc]:
    return [parse_record(record, path, line) for path in paths for line, record in read_records(path)]


def _split_files(data_dir: Path, set_name: str, split: str) -> list[str]:
    return [f"{set_name}-{split.capitalize()}.jsonl", f"{set_name}/{split}-*.parquet"]


def load(name: str, data_dir: Path) -> Task:
    set_name = SETS[name]
    test = require_files(data_dir, _split_files(data_dir, set_name, "test"), f"{set_name} test")
    train = find_files(data_dir, _split_files(data_dir, set_name, "train"))
    return Task(name=name, docs=read_docs(test), fewshot_docs=read_docs(train) if train else None,
                fewshot_sampler="random",
                metrics=("acc", "acc_norm"), source=str(test[0]), fewshot_source=str(train[0]) if train else "")
