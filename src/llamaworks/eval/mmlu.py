"""MMLU (Hendrycks et al.), 57 subjects, each its own task `mmlu_<subject>`; `mmlu` means all of them.

Formats: the original CSVs `data/{dev,val,test}/<subject>_{dev,val,test}.csv` (no header: question, A, B, C,
D, answer letter) and the Hugging Face `cais/mmlu` Parquet export (`<subject>/test-*.parquet` or
`all/test-*.parquet`: `question`, `subject`, `choices`, `answer` index).
Harness prompt: description "The following are multiple choice questions (with answers) about <subject with
spaces>.\\n\\n", then "<question stripped>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:" with choices " A".." D";
few-shot examples are the first k dev items, in file order.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from ..errors import FormatError
from .task import Doc, Task, field_of, find_files, read_parquet

LETTERS = ("A", "B", "C", "D")
# The 57 subjects, as named in the CSV file names and the cais/mmlu configs.
SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine",
    "college_physics", "computer_security", "conceptual_physics", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
    "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions",
)


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def make_doc(question: str, options: list[str], gold: int, doc_id: str) -> Doc:
    lines = [question.strip()] + [f"{letter}. {text}" for letter, text in zip(LETTERS, options)]
    return Doc(query="\n".join(lines) + "\nAnswer:", choices=LETTERS, gold=gold, id=doc_id)


def read_csv(path: Path) -> list[Doc]:
    docs = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            for row in reader:
                line = reader.line_num
                if len(row) != 6:
                    raise FormatError(f"{path}:{line}: expected 6 columns (question, A, B, C, D, answer), "
                                      f"got {len(row)}")
                if row[5].strip() not in LETTERS:
                    raise FormatError(f"{path}:{line}: answer {row[5]!r} should be one of A, B, C, D")
                docs.append(make_doc(row[0], row[1:5], LETTERS.index(row[5].strip()), f"{path.stem}:{len(docs)}"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FormatError(f"{path}: cannot read as CSV ({e})") from None
    return docs


def read_parquet_by_subject(path: Path, default_subject: str) -> dict[str, list[Doc]]:
    out: dict[str, list[Doc]] = defaultdict(list)
    for line, record in read_parquet(path):
        subject = record.get("subject") or default_subject
        options = field_of(record, "choices", path, line, list)
        answer = field_of(record, "answer", path, line, (int, str))
        gold = LETTERS.index(answer) if answer in LETTERS else int(answer)
        if len(options) != 4 or not 0 <= gold < 4:
            raise FormatError(f"{path}:{line}: expected 4 choices and an answer in 0..3")
        out[subject].append(make_doc(field_of(record, "question", path, line), options, gold,
                                     f"{subject}:{len(out[subject])}"))
    return out


def load_split(data_dir: Path, split: str) -> dict[str, list[Doc]]:
    """Docs per subject for one split, from CSVs or Parquet, whichever the directory holds."""
    csvs = find_files(data_dir, [f"{split}/*_{split}.csv"])
    if csvs:
        return {p.stem[: -len(split) - 1]: read_csv(p) for p in csvs}
    by_subject: dict[str, list[Doc]] = {}
    for path in find_files(data_dir, [f"*/{split}-*.parquet"]):
        subject = path.parent.name
        if subject == "data":  # some exports put files under <subject>/data/
            subject = path.parent.parent.name
        if subject != "all" and subject not in SUBJECTS:
            continue  # another dataset's split file (e.g. ARC-Challenge/test-*.parquet)
        for name, docs in read_parquet_by_subject(path, subject).items():
            if subject == "all" or name == subject:
                by_subject.setdefault(name, []).extend(docs)
    return by_subject


def load_all(data_dir: Path, subjects: list[str] | None = None) -> list[Task]:
    if not data_dir.is_dir():
        raise FormatError(f"{data_dir}: data directory not found")
    test = load_split(data_dir, "test")
    if not test:
        raise FormatError(f"{data_dir}: no MMLU test files found (looked for test/<subject>_test.csv and "
                          "<subject>/test-*.parquet)")
    dev = load_split(data_dir, "dev")
    wanted = subjects or sorted(test)
    tasks = []
    for subject in wanted:
        if subject not in test:
            raise FormatError(f"{data_dir}: no MMLU test file for subject {subject!r}")
        tasks.append(Task(name=f"mmlu_{subject}", docs=test[subject], fewshot_docs=dev.get(subject),
                          description=description(subject), fewshot_sampler="first_n", metrics=("acc",),
                          group="mmlu", source=str(data_dir)))
    return tasks
