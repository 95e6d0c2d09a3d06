"""Do our prompts equal lm-evaluation-harness's, string for string? (no model needed, seconds to run)

    python benchmarks/eval_prompt_parity.py --data-dir /path/to/benchmarks --limit 50 --num-fewshot 5

For every task whose files are in --data-dir (with a train/dev file when --num-fewshot > 0), lm-eval builds
its requests from its *stock* task YAMLs (included by absolute path; only the dataset location is overridden
to read our local files, converted to the Hugging Face schema) and we build ours; every (context,
continuation) pair is compared.
lm-eval is an optional extra (pip install lm-eval torch==<the installed torch>).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from llamaworks.eval import FewshotSampler, build_prompt, load_tasks
from llamaworks.eval.task import find_files


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _arc_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            q = r["question"]
            rows.append({"id": r["id"], "question": q["stem"], "answerKey": r["answerKey"],
                         "choices": {"text": [c["text"] for c in q["choices"]],
                                     "label": [c["label"] for c in q["choices"]]}})
    return rows


def _mmlu_rows(path: Path, subject: str) -> list[dict]:
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        return [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5].strip())}
                for r in csv.reader(f)]


def _tqa_rows(path: Path) -> list[dict]:
    return [{"question": r["question"],
             "mc1_targets": {"choices": list(r["mc1_targets"]), "labels": list(r["mc1_targets"].values())},
             "mc2_targets": {"choices": list(r["mc2_targets"]), "labels": list(r["mc2_targets"].values())}}
            for r in json.loads(path.read_text(encoding="utf-8"))]


def prepare(data_dir: Path, work: Path, stock: Path, mmlu_subjects: int, shots: int) -> dict[str, str]:
    """Write local data + YAMLs; returns {lm-eval task name: our task name}."""
    tasks: dict[str, str] = {}

    def add(name: str, ours: str, include: Path, splits: dict[str, list[dict]]) -> None:
        files = {}
        for split, rows in splits.items():
            files[split] = str(work / f"{name}_{split}.jsonl")
            _write_jsonl(Path(files[split]), rows)
        cfg = {"include": str(include), "task": name, "dataset_path": "json", "dataset_name": None,
               "dataset_kwargs": {"data_files": files}, "tag": []}
        (work / f"{name}.yaml").write_text(json.dumps(cfg), encoding="utf-8")  # JSON is valid YAML
        tasks[name] = ours

    for ours, set_name in (("arc_challenge", "ARC-Challenge"), ("arc_easy", "ARC-Easy")):
        test = find_files(data_dir, [f"{set_name}-Test.jsonl"])
        train = find_files(data_dir, [f"{set_name}-Train.jsonl"])
        if test and (train or not shots):
            add(f"local_{ours}", ours, stock / "arc" / f"{ours}.yaml",
                {"test": _arc_rows(test[0]), "train": _arc_rows(train[0] if train else test[0])})
    val = find_files(data_dir, ["hellaswag_val.jsonl"])
    train = find_files(data_dir, ["hellaswag_train.jsonl"])
    if val and (train or not shots):
        read = lambda p: [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
        add("local_hellaswag", "hellaswag", stock / "hellaswag" / "hellaswag.yaml",
            {"validation": read(val[0]), "train": read(train[0] if train else val[0])})
    for test in find_files(data_dir, ["test/*_test.csv"])[:mmlu_subjects]:
        subject = test.name[: -len("_test.csv")]
        dev = test.parent.parent / "dev" / f"{subject}_dev.csv"
        add(f"local_mmlu_{subject}", f"mmlu_{subject}", stock / "mmlu" / "default" / f"mmlu_{subject}.yaml",
            {"test": _mmlu_rows(test, subject), "dev": _mmlu_rows(dev, subject)})
    tqa = find_files(data_dir, ["mc_task.json"])
    if tqa:
        for v in ("mc1", "mc2"):
            add(f"local_truthfulqa_{v}", f"truthfulqa_{v}", stock / "truthfulqa" / f"truthfulqa_{v}.yaml",
                {"validation": _tqa_rows(tqa[0])})
    return tasks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--mmlu-subjects", type=int, default=3, help="how many MMLU subjects to check")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager, get_task_dict

    stock = Path(lm_eval.__file__).parent / "tasks"
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        names = prepare(args.data_dir, work, stock, args.mmlu_subjects, args.num_fewshot)
        task_dict = get_task_dict(list(names), TaskManager(include_path=str(work)))
        for name, ours_name in names.items():
            theirs = task_dict[name]
            # TruthfulQA's YAML fixes num_fewshot to 0, as its own config does when run by simple_evaluate.
            shots = 0 if "truthfulqa" in name else args.num_fewshot
            theirs.set_config(key="num_fewshot", value=shots)
            theirs.set_fewshot_seed(seed=args.seed)
            theirs.build_all_requests(limit=args.limit)
            by_doc: dict[int, list] = {}
            for inst in theirs.instances:
                by_doc.setdefault(inst.doc_id, []).append(inst.args)
            (ours_task,) = load_tasks([ours_name], args.data_dir)
            sampler = FewshotSampler(ours_task, args.seed)
            same = 0
            for doc_id, doc in enumerate(ours_task.docs[: args.limit]):
                p = build_prompt(ours_task, doc, sampler.sample(shots, doc))
                mine = [(p.context, c) for c in p.continuations]
                if mine == [tuple(a) for a in by_doc[doc_id]]:
                    same += 1
                elif failures < 3:
                    failures += 1
                    print(f"  {name} doc {doc_id} differs:\n    ours   {mine[0]!r}\n    theirs {by_doc[doc_id][0]!r}")
            n = min(args.limit, len(ours_task.docs))
            print(f"{ours_name}: {same}/{n} items with identical (context, continuation) pairs ({shots}-shot)")
            failures += n - same
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
