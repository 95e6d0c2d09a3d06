"""Results JSON, markdown tables and `--compare`.

Results document layout (version 1):
    {"version": 1, "created": ISO time, "llamaworks": version,
     "model": {"path", "fingerprint": {"sha256"} or {"size", "mtime", "config_sha256"}, "config": {...}},
     "settings": {...}, "results": {task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "num_fewshot"}},
     "groups": {"mmlu": {...}}, "leaderboard": {...} (with --leaderboard), "timing": {...},
     "samples": {task: [per-item context, continuations, log-likelihoods, prediction, gold, metrics]} (--log-samples)}
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from ..errors import FormatError
from ..files import atomic_write

FORMAT_VERSION = 1
FULL_HASH_LIMIT = 2 * 1024**3  # hash files up to 2 GiB; bigger ones are fingerprinted by size+mtime+config


def model_fingerprint(path: str | Path | None, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """sha256 of the model file (small enough), else size + mtime + hash of the config."""
    config_hash = hashlib.sha256(json.dumps(config or {}, sort_keys=True, default=str).encode()).hexdigest()
    if path is None:
        return {"config_sha256": config_hash}
    p = Path(path)
    if p.is_file() and p.stat().st_size <= FULL_HASH_LIMIT:
        digest = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return {"sha256": digest.hexdigest(), "size": p.stat().st_size}
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else []
    return {"size": sum(q.stat().st_size for q in files),
            "mtime": max((q.stat().st_mtime for q in files), default=None), "config_sha256": config_hash}


def finalize(doc: dict[str, Any]) -> dict[str, Any]:
    from .. import __version__

    return {"version": FORMAT_VERSION, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "llamaworks": __version__, **doc}


def _clean(value: Any) -> Any:
    """NaN/inf are not JSON: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(doc: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a temp file in the same directory, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(_clean(doc), f, indent=2, ensure_ascii=False)
        f.write("\n")


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
        raise FormatError(f"{path}: not a llamaworks eval results file (no 'results' object)")
    return doc


def _fmt(value: float | None, pct: bool = True) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{100 * value:.2f}" if pct else f"{value:.4f}"


def _metric_rows(doc: dict[str, Any]) -> list[tuple[str, int | None, str, float, float | None, int]]:
    """(task, shots, metric, value, stderr, n); MMLU subjects fold into their group row when there are many."""
    rows = []
    groups = doc.get("groups") or {}
    for task, r in sorted(doc["results"].items()):
        if task.startswith("mmlu_") and "mmlu" in groups and groups["mmlu"].get("subtasks", 0) > 1:
            continue
        for metric in ("acc", "acc_norm"):
            if metric in r:
                rows.append((task, r.get("num_fewshot"), metric, r[metric], r.get(f"{metric}_stderr"), r.get("n")))
    for group, g in sorted(groups.items()):
        rows.append((group, g.get("num_fewshot"), "acc", g["acc"], g.get("acc_stderr"), g.get("n")))
        rows.append((group, g.get("num_fewshot"), "acc_subject_mean", g["acc_subject_mean"],
                     g.get("acc_subject_mean_stderr"), g.get("n")))
    return rows


def markdown_table(doc: dict[str, Any]) -> str:
    """Task | shots | metric | value | ± stderr | n, in percent, then the leaderboard block when present."""
    lines = ["| task | shots | metric | value (%) | ± stderr | n |", "|---|---:|---|---:|---:|---:|"]
    for task, shots, metric, value, stderr, n in _metric_rows(doc):
        lines.append(f"| {task} | {shots} | {metric} | {_fmt(value)} | {_fmt(stderr)} | {n} |")
    board = doc.get("leaderboard")
    if board:
        lines += ["", "| Open LLM Leaderboard (v1) | shots | metric | value (%) |", "|---|---:|---|---:|"]
        for task, s in board["scores"].items():
            lines.append(f"| {task} | {s['num_fewshot']} | {s['metric']} | {_fmt(s['value'])} |")
        lines.append(f"| **average** | | | {_fmt(board['average'])} |")
    return "\n".join(lines)


def compare(a: dict[str, Any], b: dict[str, Any], name_a: str = "A", name_b: str = "B") -> str:
    """Markdown table of every metric both files have: A, B, B-A and the difference in combined stderrs."""
    rows_a = {(t, m): (v, s) for t, _, m, v, s, _ in _metric_rows(a)}
    rows_b = {(t, m): (v, s) for t, _, m, v, s, _ in _metric_rows(b)}
    lines = [f"| task | metric | {name_a} (%) | {name_b} (%) | Δ (points) | Δ / stderr |",
             "|---|---|---:|---:|---:|---:|"]
    for key in sorted(set(rows_a) | set(rows_b)):
        va, sa = rows_a.get(key, (None, None))
        vb, sb = rows_b.get(key, (None, None))
        delta = z = None
        if va is not None and vb is not None:
            delta = vb - va
            if sa and sb and math.isfinite(sa) and math.isfinite(sb):
                z = delta / math.sqrt(sa**2 + sb**2)
        lines.append(f"| {key[0]} | {key[1]} | {_fmt(va)} | {_fmt(vb)} | "
                     f"{'—' if delta is None else f'{100 * delta:+.2f}'} | {'—' if z is None else f'{z:+.2f}'} |")
    la, lb = a.get("leaderboard"), b.get("leaderboard")
    if la and lb and la.get("average") is not None and lb.get("average") is not None:
        lines.append(f"| leaderboard | average | {_fmt(la['average'])} | {_fmt(lb['average'])} | "
                     f"{100 * (lb['average'] - la['average']):+.2f} | — |")
    fa, fb = (a.get("model") or {}).get("fingerprint"), (b.get("model") or {}).get("fingerprint")
    if fa and fb and fa == fb:
        lines.append("\nBoth files were produced by the same model file.")
    return "\n".join(lines)
