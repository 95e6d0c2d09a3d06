"""Training metrics: FLOPs per token, measured peak FLOP/s (for MFU), CSV + TensorBoard logging, loss plot."""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

METRIC_FIELDS = ["step", "lr", "loss", "grad_norm", "tokens", "tokens_per_s", "mfu", "val_loss", "val_ppl",
                 "elapsed_s"]


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in a matrix multiply per token: every >=2-D weight except the input
    embedding table (a lookup, no FLOPs). A tied output head multiplies by the embedding matrix, so it counts."""
    total = 0
    embedding_ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            embedding_ids.add(id(module.weight))
    for p in model.parameters():
        if p.ndim >= 2 and id(p) not in embedding_ids:
            total += p.numel()
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_embeddings", False):
        total += config.vocab_size * config.dim
    return total


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) following PaLM (Chowdhery et al. 2022, appendix B):
    6N for the weight matmuls plus 12 * n_layers * n_heads * head_dim * seq_len for attention scores and
    the weighted sum of values (no saving counted for the causal mask)."""
    n = matmul_params(model)
    attention = 0.0
    config = getattr(model, "config", None)
    if config is not None:
        attention = 12.0 * config.n_layers * config.n_heads * config.head_size * seq_len
    return 6.0 * n + attention


_PEAK_CACHE: dict[tuple[str, str], float] = {}


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Peak matmul FLOP/s of `device` in `dtype`, measured with a square matmul for ~0.3 s (the best of a
    few runs). Set LLAMAWORKS_PEAK_FLOPS to use a datasheet figure instead. Measured once per process."""
    override = os.environ.get("LLAMAWORKS_PEAK_FLOPS")
    if override:
        return float(override)
    key = (str(device), str(dtype))
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    n = 2048 if device.type == "cuda" else 512
    # Constant operands: matmul speed does not depend on values, and the global RNG must stay untouched
    # (a resumed run replays the random stream from its checkpoint).
    a = torch.full((n, n), 0.01, device=device, dtype=dtype)
    b = torch.full((n, n), 0.02, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b  # warm-up
    sync()
    best = 0.0
    deadline = time.perf_counter() + 0.3
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        dt = time.perf_counter() - t0
        best = max(best, 4 * 2 * n**3 / dt)
    _PEAK_CACHE[key] = best
    return best


class MetricsLogger:
    """Appends one row per logged step to metrics.csv and mirrors it to TensorBoard (out_dir/tensorboard).

    On resume the CSV is truncated to rows at or before the resumed step, so a killed-and-resumed run has
    the same file as an uninterrupted one."""

    def __init__(self, out_dir: str | Path, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        if resume_step and self.csv_path.exists():
            with self.csv_path.open(newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            self.rows = [{k: _num(v) for k, v in r.items()} for r in self.rows]
        self._rewrite()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=resume_step or None)
            except ImportError:  # tensorboard is optional at runtime; the CSV has everything
                self.writer = None

    def _rewrite(self) -> None:
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: r.get(k, "") for k in METRIC_FIELDS})
        os.replace(tmp, self.csv_path)

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.csv_path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_FIELDS).writerow({k: row.get(k, "") for k in METRIC_FIELDS})
        if self.writer is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"train/{k}" if not k.startswith("val") else f"val/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _num(v: str) -> Any:
    if v == "":
        return ""
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v else f


def plot_loss(csv_path: str | Path, png_path: str | Path) -> Path | None:
    """Train and validation loss against step, written with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with Path(csv_path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    train = [(int(r["step"]), float(r["loss"])) for r in rows if r.get("loss")]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
