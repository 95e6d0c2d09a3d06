"""Training checkpoints: `OUT/checkpoints/step-XXXXXX/`, written atomically, the last K kept.

A checkpoint directory holds
- whatever `save_fn(model, dir)` writes (an HF model directory, or a LoRA adapter in the PEFT layout) —
  the artifact a user opens with `llamaworks chat --model .../step-000100`;
- `trainer_state.pt`: the trainable parameters in full precision, optimizer state, step and scheduler
  position, plus `rank{r}.pt` per process with its RNG states and data position;
- `trainer_state.json`: step and metrics, for humans.

Training state is plain data (tensors, numbers, strings, None, lists, tuples and dicts of them: RNG states as
tensors and lists, never numpy or other objects), so it is read with `torch.load(weights_only=True)`: a
`.pt` file someone planted or shared cannot run code on `--resume`; it is refused with one line.

The directory is built as `step-XXXXXX.tmp` and renamed into place with os.replace, so a crash never
leaves a half-written checkpoint that `--resume` would pick up; pruning renames a checkpoint to a hidden
`.step-XXXXXX.<pid>-<random>.trash` name before deleting it, so a kill never leaves a half-deleted `step-N`.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FormatError
from ..files import atomic_write_text, atomic_write_with, clean_stale_temps, remove_dir

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
    """Delete all but the newest `keep_last` complete checkpoints, and the leftovers of killed runs
    (`step-*.tmp` being written, `.step-*.trash` being deleted, half-deleted folders of older versions)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return
    for p in root.glob("step-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():
        if STEP_DIR.match(p.name):
            if p.is_dir() and not (p / "trainer_state.pt").exists():
                remove_dir(p)  # half-deleted by an older version that removed it in place
        elif p.name.startswith(".step-") and p.name.endswith((".trash", ".old")):
            clean_stale_temps(root, p.name.split(".")[1])
    if keep_last > 0:
        for _, p in list_checkpoints(root)[:-keep_last]:
            remove_dir(p)


# -- plain training state ---------------------------------------------------------------------------
_SCALARS = (bool, int, float, str, type(None))


def to_plain(obj: Any, where: str = "state") -> Any:
    """`obj` as data that torch.load(weights_only=True) reads back: tensors, numbers, strings, None, and
    lists/tuples/dicts of them. numpy values become tensors or Python numbers, paths strings; anything
    else is a TypeError naming where it sits (the writer's bug, caught when saving, not when resuming)."""
    if isinstance(obj, (torch.Tensor, *_SCALARS)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; training state keys must be str or int")
            out[k] = to_plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__name__} cannot be stored in training "
                    f"state (plain tensors, numbers, strings, lists and dicts only)")


def rng_state() -> dict[str, Any]:
    """Every RNG the loop uses, as plain data: Python's Mersenne Twister as a list of ints, numpy's legacy
    global generator as a dict with a uint32 key tensor, torch's as its uint8 state tensors."""
    version, internal, gauss = random.getstate()
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": [int(x) for x in internal], "gauss": gauss},
        "numpy": {"bit_generator": str(bit_generator), "key": torch.from_numpy(key.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np.random.set_state((npy["bit_generator"], npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    plain = to_plain(obj, path.name)
    atomic_write_with(path, lambda tmp: torch.save(plain, tmp))


def write_json(obj: Any, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def load_plain(path: Path) -> Any:
    """torch.load(weights_only=True): plain data comes back; a pickle that would build other objects or call
    anything (os.system, ...) is refused with one FormatError line naming the file, and nothing runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FormatError(f"{path}: file is missing") from None
    except Exception as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "Unsupported global" in ln or "GLOBAL" in ln), lines[0] if lines else "")
        raise FormatError(f"{path}: not a plain training-state file, refusing to unpickle it ({reason[:200]})") \
            from None


def load_trainer_state(ckpt_dir: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The shared trainer state and this rank's RNG/data state (None if the checkpoint had fewer ranks)."""
    shared = load_plain(ckpt_dir / "trainer_state.pt")
    rank_file = ckpt_dir / f"rank{rank}.pt"
    per_rank = load_plain(rank_file) if rank_file.exists() else None
    _check_shared(shared, ckpt_dir / "trainer_state.pt")
    if per_rank is not None:
        _check_rank(per_rank, rank_file)
    return shared, per_rank


def _require(ok: bool, path: Path, what: str) -> None:
    if not ok:
        raise FormatError(f"{path}: not a training state this version wrote ({what})")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_shared(state: Any, path: Path) -> None:
    """The shape of trainer_state.pt, checked before the loop uses it (a wrong value is one line, not a traceback)."""
    _require(isinstance(state, dict), path, f"expected a dict, found {type(state).__name__}")
    _require(_is_int(state.get("step")) and state["step"] >= 0, path, "'step' must be a non-negative integer")
    trainable = state.get("trainable")
    _require(isinstance(trainable, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in trainable.items()), path,
             "'trainable' must map parameter names to tensors")
    optim = state.get("optimizer")
    _require(isinstance(optim, dict) and isinstance(optim.get("state"), dict)
             and isinstance(optim.get("param_groups"), list), path, "'optimizer' must be an optimizer state dict")
    for key in ("tokens", "elapsed_s"):
        _require(state.get(key) is None or isinstance(state[key], (int, float)), path, f"'{key}' must be a number")
    last_val = state.get("last_val")
    _require(last_val is None or (isinstance(last_val, (list, tuple)) and len(last_val) == 2
                                  and all(isinstance(x, (int, float)) for x in last_val)), path,
             "'last_val' must be a pair of numbers")


def _check_rank(state: Any, path: Path) -> None:
    """The shape of rank{r}.pt: every RNG state exactly as rng_state() writes it."""
    _require(isinstance(state, dict) and isinstance(state.get("rng"), dict), path, "expected a dict with 'rng'")
    rng = state["rng"]
    py, npy, tt = rng.get("python"), rng.get("numpy"), rng.get("torch")
    _require(isinstance(py, dict) and _is_int(py.get("version")) and isinstance(py.get("state"), (list, tuple))
             and len(py["state"]) == 625 and all(_is_int(x) and 0 <= x < 2**32 for x in py["state"])
             and (py.get("gauss") is None or isinstance(py["gauss"], float)), path, "bad Python RNG state")
    _require(isinstance(npy, dict) and npy.get("bit_generator") == "MT19937"
             and isinstance(npy.get("key"), torch.Tensor) and tuple(npy["key"].shape) == (624,)
             and _is_int(npy.get("pos")) and 0 <= npy["pos"] <= 624 and _is_int(npy.get("has_gauss"))
             and isinstance(npy.get("cached_gaussian"), float), path, "bad numpy RNG state")
    _require(isinstance(tt, torch.Tensor) and tt.dtype == torch.uint8 and tt.shape == torch.get_rng_state().shape,
             path, "bad torch RNG state")
    data = state.get("data")
    _require(data is None or (isinstance(data, dict) and _is_int(data.get("batches"))), path,
             "'data' must be a sampler position")
