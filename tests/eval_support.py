"""Helpers for the eval tests: a tiny random model and the default model's HF tokenizer behind our interface.

The adapter exists only until `llamaworks.tokenizer` lands; it mirrors that interface (encode with add_bos,
bos_id/eos_id/bos_token) so the eval code is exercised exactly as it will be with the real Tokenizer.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
from pathlib import Path

import torch

from llamaworks.config import get_preset
from llamaworks.engine.backend import EngineOptions
from llamaworks.engine.torch_backend import TorchBackend
from llamaworks.model import Transformer

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


class HFTokenizerAdapter:
    def __init__(self, hf) -> None:
        self.hf = hf
        self.vocab_size = len(hf)
        self.bos_id, self.eos_id = hf.bos_token_id, hf.eos_token_id
        self.bos_token, self.eos_token = hf.bos_token, hf.eos_token
        self.pad_id = hf.pad_token_id
        self.add_bos = bool(getattr(hf, "add_bos_token", False))
        self.chat_template = getattr(hf, "chat_template", None)

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    """The default model's tokenizer: ours when llamaworks.tokenizer exists, else HF's read from the GGUF."""
    from llamaworks.assets import default_model_path

    path = default_model_path()
    try:
        from llamaworks.tokenizer import load_tokenizer

        return load_tokenizer(path)
    except ImportError:
        from transformers import AutoTokenizer

        return HFTokenizerAdapter(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))


def backend_of(model: Transformer, tokenizer=None, rows: int = 16) -> TorchBackend:
    """The evaluation backend on an in-memory model: float32 KV cache, `rows` rows (context + 15 choices)."""
    return TorchBackend.from_model(model, tokenizer, EngineOptions(max_rows=rows, kv_dtype="float32"))


def tiny_model(vocab_size: int = 49152, seed: int = 0, **overrides) -> Transformer:
    """A random 2-layer GQA model over the default tokenizer's vocabulary, with weights wide enough to matter."""
    config = dataclasses.replace(get_preset("tiny-tied"), vocab_size=vocab_size, max_seq_len=4096, **overrides)
    torch.manual_seed(seed)
    model = Transformer(config)
    model.reset_parameters(std=0.2)
    return model.eval()




# -- lm-evaluation-harness on the fixture items --------------------------------------------------------
# The harness's stock task files, by the task names both sides use. Only where the data comes from is changed
# (see harness_tasks); prompts, few-shot rules and metrics stay the harness's own.
STOCK_TASKS = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "mmlu_astronomy": "mmlu/default/mmlu_astronomy.yaml",
    "mmlu_college_physics": "mmlu/default/mmlu_college_physics.yaml",
    "truthfulqa_mc1": "truthfulqa/truthfulqa_mc1.yaml",
    "truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml",
}


def _write_parquet(path: Path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _arc_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        q = r["question"]
        choices = {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}
        rows.append({"id": r["id"], "question": q["stem"], "answerKey": r["answerKey"], "choices": choices})
    return rows


def _mmlu_rows(path: Path, subject: str) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5].strip())}
                for r in csv.reader(f)]


def write_hf_exports(dest: Path, source: Path = FIXTURES) -> dict[str, dict[str, str]]:
    """The items of `source` (a folder laid out as FIXTURES) in the Hugging Face datasets' own layouts
    (allenai/ai2_arc, Rowan/hellaswag, cais/mmlu, truthful_qa multiple_choice) as Parquet files under `dest`, in
    the folder layout `llamaworks eval` finds; returns {task: {split: file}} for the harness."""
    files: dict[str, dict[str, str]] = {}
    for task, set_name in (("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")):
        files[task] = {split: _write_parquet(dest / set_name / f"{split}-00000-of-00001.parquet",
                                             _arc_rows(source / "arc" / f"{set_name}-{split.capitalize()}.jsonl"))
                       for split in ("train", "test")}
    hs = {}
    for split, name in (("train", "train"), ("validation", "val")):
        lines = (source / "hellaswag" / f"hellaswag_{name}.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines]
        hs[split] = _write_parquet(dest / "hellaswag" / f"{split}-00000-of-00001.parquet",
                                   [{**r, "label": str(r["label"])} for r in rows])  # a string on the Hub
    files["hellaswag"] = hs
    for subject in ("astronomy", "college_physics"):
        files[f"mmlu_{subject}"] = {
            split: _write_parquet(dest / subject / f"{split}-00000-of-00001.parquet",
                                  _mmlu_rows(source / "mmlu" / "data" / split / f"{subject}_{split}.csv", subject))
            for split in ("dev", "test")}
    tqa = json.loads((source / "truthfulqa" / "mc_task.json").read_text(encoding="utf-8"))
    rows = [{"question": r["question"],
             **{f"{v}_targets": {"choices": list(r[f"{v}_targets"]), "labels": list(r[f"{v}_targets"].values())}
                for v in ("mc1", "mc2")}} for r in tqa]
    path = _write_parquet(dest / "multiple_choice" / "validation-00000-of-00001.parquet", rows)
    files["truthfulqa_mc1"] = files["truthfulqa_mc2"] = {"validation": path}
    return files


def harness_tasks(files: dict[str, dict[str, str]], work: Path, num_fewshot: int):
    """A TaskManager over the harness's stock task files, each `include`d from a one-file override that only
    points it at local Parquet files (and a datasets cache under `work`).

    TruthfulQA's stock files pin num_fewshot: 0 and the harness ignores a requested shot count for such a task,
    so there the override also sets `num_fewshot` (its few-shot examples then come from its own split, minus the
    eval doc, by the harness's rule).
    """
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    stock = Path(lm_eval.tasks.__file__).parent
    folder = work / f"tasks-{num_fewshot}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data_files in files.items():
        override = {"include": str(stock / STOCK_TASKS[name]), "task": name, "dataset_path": "parquet",
                    "dataset_kwargs": {"data_files": data_files, "cache_dir": str(work / "datasets-cache")}}
        if name.startswith("truthfulqa"):
            override["num_fewshot"] = num_fewshot
        (folder / f"{name}.yaml").write_text(json.dumps(override))  # JSON is YAML
    return TaskManager(include_path=str(folder), include_defaults=False)
