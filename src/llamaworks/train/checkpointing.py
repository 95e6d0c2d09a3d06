"""Training checkpoints: `OUT/checkpoints/step-XXXXXX/`, written atomically, the last K kept.

A checkpoint directory holds
- whatever `save_fn(model, dir)` writes (an HF model directory, or a LoRA adapter in the PEFT layout) —
  the artifact a user opens with `llamaworks chat --model .../step-000100`;
- `trainer_state.pt`: the trainable parameters in full precision, optimizer state, step and scheduler
  position, plus `rank{r}.pt` per process with its RNG states and data position;
- `trainer_state.json`: step and metrics, for humans.

The directory is built as `step-XXXXXX.tmp` and renamed into place with os.replace, so a crash never
leaves a half-written checkpoint that `--resume` would pick up.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(ckpt_root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (never `.tmp` ones) sorted by step."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.pt").exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def prune_checkpoints(ckpt_root: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and stale `.tmp` leftovers."""
    root = Path(ckpt_root)
    if keep_last > 0:
        for _, p in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob("step-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def load_trainer_state(ckpt_dir: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The shared trainer state and this rank's RNG/data state (None if the checkpoint had fewer ranks)."""
    shared = torch.load(ckpt_dir / "trainer_state.pt", map_location="cpu", weights_only=False)
    rank_file = ckpt_dir / f"rank{rank}.pt"
    per_rank = torch.load(rank_file, map_location="cpu", weights_only=False) if rank_file.exists() else None
    return shared, per_rank
