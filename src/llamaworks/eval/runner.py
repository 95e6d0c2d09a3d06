"""`llamaworks eval`: load tasks from a data directory, score them, aggregate, report.

Task names: arc_challenge, arc_easy, hellaswag, mmlu (all 57 subjects) or mmlu_<subject>, truthfulqa_mc1,
truthfulqa_mc2. `leaderboard=True` runs the Open LLM Leaderboard (v1) set with its fixed shot counts.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..engine.backend import Backend, EngineOptions
from ..errors import ConfigError
from . import arc, hellaswag, metrics, mmlu, truthfulqa
from .scorer import LoglikelihoodScorer
from .task import DEFAULT_FEWSHOT_SEED, FewshotSampler, Task, build_prompt

DEFAULT_ROWS = 16  # KV cache rows when the tasks are not known: the context's and 15 choices'
ITEMS_PER_CALL = 4  # rows_for gives room for this many items per forward call (the scorer's batches)
SCORE_ITEMS = 32  # items handed to the scorer at a time (the progress bar moves between them)

TASK_NAMES = ("arc_challenge", "arc_easy", "hellaswag", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2")

# Open LLM Leaderboard v1: task -> (shots, metric reported)
LEADERBOARD = {
    "arc_challenge": (25, "acc_norm"),
    "hellaswag": (10, "acc_norm"),
    "mmlu": (5, "acc"),
    "truthfulqa_mc2": (0, "acc"),
}


@dataclass
class EvalSettings:
    tasks: list[str]
    data_dir: Path
    num_fewshot: int | None = None  # None: each task's default (0, as in the harness) or the leaderboard's
    limit: int | None = None  # first N docs of each task (of each MMLU subject)
    seed: int = DEFAULT_FEWSHOT_SEED
    chat_template: bool = False
    log_samples: bool = False
    leaderboard: bool = False
    fewshot_by_task: dict[str, int] = field(default_factory=dict)


def parse_tasks(spec: str | list[str]) -> list[str]:
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    for name in names:
        if name not in TASK_NAMES and not name.startswith("mmlu_"):
            raise ConfigError(f"--tasks: unknown task {name!r}; choose from {', '.join(TASK_NAMES)} or mmlu_<subject>")
    return names


def load_tasks(names: list[str], data_dir: Path) -> list[Task]:
    """Tasks in the order asked; `mmlu_<subject>` names are read together, where the first of them stands."""
    tasks: list[Task] = []
    subjects = [n[len("mmlu_"):] for n in names if n.startswith("mmlu_")]
    for name in dict.fromkeys(names):
        if name in arc.SETS:
            tasks.append(arc.load(name, data_dir))
        elif name == "hellaswag":
            tasks.append(hellaswag.load(name, data_dir))
        elif name in ("truthfulqa_mc1", "truthfulqa_mc2"):
            tasks.append(truthfulqa.load(name, data_dir))
        elif name == "mmlu":
            tasks.extend(mmlu.load_all(data_dir))
        elif name.startswith("mmlu_") and subjects:
            tasks.extend(mmlu.load_all(data_dir, subjects))
            subjects = []
    seen: set[str] = set()
    return [t for t in tasks if not (t.name in seen or seen.add(t.name))]  # "mmlu" and "mmlu_x" both asked


def _fewshot_for(task: Task, settings: EvalSettings) -> int:
    key = task.group or task.name
    if key in settings.fewshot_by_task:
        return settings.fewshot_by_task[key]
    if settings.num_fewshot is not None:
        return settings.num_fewshot
    return task.default_fewshot


def _chat_renderer(tokenizer) -> Callable[[list[dict[str, str]]], str]:
    from ..chat_template import template_for  # only needed with --chat-template

    template = template_for(tokenizer)
    return lambda messages: template.render(messages, add_generation_prompt=True)


def score_task(task: Task, scorer: LoglikelihoodScorer, settings: EvalSettings, *, chat=None,
               on_item: Callable[[], None] | None = None) -> dict[str, Any]:
    """Per-item metric values (and samples) for one task."""
    k = _fewshot_for(task, settings)
    sampler = FewshotSampler(task, settings.seed)
    docs = task.docs[: settings.limit] if settings.limit else task.docs
    values: dict[str, list[float]] = {m: [] for m in task.metrics}
    samples = []
    prompts = [build_prompt(task, doc, sampler.sample(k, doc), chat) for doc in docs]
    scored: list = []
    for index, (doc, prompt) in enumerate(zip(docs, prompts)):
        if index % SCORE_ITEMS == 0:  # the scorer batches items within each slice
            scored = scorer.score_many([(p.context, p.continuations) for p in prompts[index:index + SCORE_ITEMS]])
        scores = scored[index % SCORE_ITEMS]
        lls = [s.logprob for s in scores]
        item: dict[str, float] = {}
        if doc.labels is not None:  # TruthfulQA mc2 reports its probability mass as "acc"
            item["acc"] = metrics.mc2(lls, doc.labels)
        else:
            item["acc"] = metrics.acc(lls, doc.gold)
            if "acc_norm" in task.metrics:
                item["acc_norm"] = metrics.acc_norm(lls, doc.choices, doc.gold)
        for m in task.metrics:
            values[m].append(item[m])
        if settings.log_samples:
            samples.append({"doc_id": index, "id": doc.id, "context": prompt.context,
                            "continuations": list(prompt.continuations), "gold": doc.gold,
                            "labels": list(doc.labels) if doc.labels else None,
                            "loglikelihoods": lls, "is_greedy": [s.is_greedy for s in scores],
                            "pred": metrics.argmax(lls),
                            "pred_norm": metrics.argmax([ll / len(c) for ll, c in zip(lls, doc.choices)]),
                            **item})
        if on_item:
            on_item()
    result: dict[str, Any] = {"n": len(docs), "num_fewshot": k}
    for m, vals in values.items():
        result[m] = metrics.mean(vals)
        result[f"{m}_stderr"] = metrics.mean_stderr(vals)
    return {"result": result, "samples": samples}


def aggregate_groups(results: dict[str, dict[str, Any]], tasks: list[Task]) -> dict[str, dict[str, Any]]:
    """MMLU as the harness reports it: size-weighted mean with pooled stderr; plus the plain subject mean."""
    groups: dict[str, list[Task]] = {}
    for t in tasks:
        if t.group:
            groups.setdefault(t.group, []).append(t)
    out = {}
    for group, members in groups.items():
        rs = [results[t.name] for t in members]
        sizes = [r["n"] for r in rs]
        out[group] = {
            "n": sum(sizes), "subtasks": len(rs), "num_fewshot": rs[0]["num_fewshot"],
            "acc": sum(r["acc"] * n for r, n in zip(rs, sizes)) / sum(sizes),
            "acc_stderr": metrics.pooled_stderr([r["acc_stderr"] for r in rs], sizes),
            "acc_subject_mean": metrics.mean([r["acc"] for r in rs]),
            "acc_subject_mean_stderr": metrics.unweighted_stderr([r["acc_stderr"] for r in rs]),
        }
    return out


def leaderboard_summary(results: dict[str, dict], groups: dict[str, dict]) -> dict[str, Any]:
    scores = {}
    for name, (shots, metric) in LEADERBOARD.items():
        if name == "mmlu" and "mmlu" in groups:
            scores[name] = {"metric": "acc (mean of subjects)", "num_fewshot": shots,
                            "value": groups["mmlu"]["acc_subject_mean"]}
        elif name in results:
            label = "mc2" if name == "truthfulqa_mc2" else metric
            scores[name] = {"metric": label, "num_fewshot": shots, "value": results[name][metric]}
    complete = len(scores) == len(LEADERBOARD)
    return {"scores": scores, "average": metrics.mean([s["value"] for s in scores.values()]) if complete else None}


def run_eval(backend: Backend, tokenizer: Any, settings: EvalSettings, *, model_info: dict[str, Any] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Evaluate on `backend` (tokenizer None: the backend's) and return the results document (see report.py for
    its layout). Give the backend at least max choices + 1 rows (`rows_for`) to score an item in one call."""
    if settings.leaderboard:
        settings.tasks = list(LEADERBOARD)
        settings.fewshot_by_task = {name: shots for name, (shots, _) in LEADERBOARD.items()}
    tasks = load_tasks(settings.tasks, Path(settings.data_dir))
    scorer = LoglikelihoodScorer(backend, tokenizer)
    chat = _chat_renderer(scorer.tokenizer) if settings.chat_template else None
    total = sum(min(len(t.docs), settings.limit or len(t.docs)) for t in tasks)
    bar = _progress_bar(total, progress)
    results: dict[str, dict[str, Any]] = {}
    samples: dict[str, list] = {}
    started = time.perf_counter()
    try:
        for task in tasks:
            bar.set_description(task.name)
            scored = score_task(task, scorer, settings, chat=chat, on_item=lambda: bar.update(1))
            results[task.name] = scored["result"]
            if settings.log_samples:
                samples[task.name] = scored["samples"]
    finally:
        bar.close()
        scorer.reset()
    elapsed = time.perf_counter() - started
    groups = aggregate_groups(results, tasks)
    doc: dict[str, Any] = {
        "results": results,
        "groups": groups,
        "settings": {**asdict(settings), "data_dir": str(settings.data_dir),
                     "sources": {t.name: {"docs": t.source, "fewshot": t.fewshot_source} for t in tasks}},
        "model": model_info or {},
        "timing": {"seconds": elapsed, "items": total, "items_per_second": total / elapsed if elapsed else None,
                   "tokens_computed": scorer.tokens_computed},
    }
    if settings.leaderboard:
        doc["leaderboard"] = leaderboard_summary(results, groups)
    if settings.log_samples:
        doc["samples"] = samples
    return doc


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="item", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def rows_for(tasks: list[Task]) -> int:
    """KV cache rows that score ITEMS_PER_CALL items of `tasks` per forward call: each item's context row plus one
    per choice. Rows cost memory only for the positions written (the backends' caches are allocated lazily)."""
    return ITEMS_PER_CALL * (1 + max((len(doc.choices) for t in tasks for doc in t.docs), default=DEFAULT_ROWS - 1))


def _load(model_path: str | None, rows: int, backend_name: str = "auto") -> tuple[Backend, dict[str, Any]]:
    """The model for scoring, with float32 activations and KV cache so per-item log-likelihoods stay those of the
    float model (the harness's): the native backend for a GGUF on the CPU (its blocks read as they are), else the
    torch backend's float reference."""
    from ..api import load_backend

    options = EngineOptions(max_rows=rows, kv_dtype="float32", int8_activations=False, bf16_prefill=False)
    backend = load_backend(model_path, backend=backend_name, options=options,
                           reference=not _native_runs(model_path, backend_name))
    path = getattr(backend, "path", None) or getattr(getattr(backend, "checkpoint", None), "path", None) or model_path
    config = backend.config.to_dict()
    from .report import model_fingerprint

    fmt = "gguf" if backend.name == "native" else getattr(getattr(backend, "checkpoint", None), "format", None)
    info = {"path": str(path) if path else None, "format": fmt, "backend": backend.name,
            "config": config, "fingerprint": model_fingerprint(path, config)}
    return backend, info


def _native_runs(model_path: str | None, backend_name: str) -> bool:
    from ..api import choose_backend

    return choose_backend(backend_name, model_path, "cpu") == "native"


def eval_main(*, model: str | None, tasks: str | None, data_dir: str | None, num_fewshot: int | None = None,
              limit: int | None = None, seed: int = DEFAULT_FEWSHOT_SEED, chat_template: bool = False,
              log_samples: bool = False, out: str | None = None, leaderboard: bool = False,
              compare: list[str] | None = None, progress: bool = True) -> str:
    """What `llamaworks eval` does; returns the markdown to print."""
    from . import report

    if compare:
        if len(compare) != 2:
            raise ConfigError("--compare takes exactly two results files: A.json B.json")
        a, b = (report.read_json(p) for p in compare)
        return report.compare(a, b, Path(compare[0]).name, Path(compare[1]).name)
    if not data_dir:
        raise ConfigError("--data-dir is required: the folder holding the benchmark files")
    if not leaderboard and not tasks:
        raise ConfigError("--tasks is required (or --leaderboard)")
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be a positive number of items, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    settings = EvalSettings(tasks=parse_tasks(tasks) if tasks else [], data_dir=Path(data_dir),
                            num_fewshot=num_fewshot, limit=limit, seed=seed, chat_template=chat_template,
                            log_samples=log_samples, leaderboard=leaderboard)
    # Read the data before loading the model, so a bad file fails in a second, not after the model load.
    loaded = load_tasks(list(LEADERBOARD) if leaderboard else settings.tasks, settings.data_dir)
    backend, info = _load(model, rows_for(loaded))
    doc = report.finalize(run_eval(backend, None, settings, model_info=info, progress=progress))
    if out:
        report.write_json(doc, out)
    return report.markdown_table(doc)
