"""`llamaworks plan`: how big a model and how many tokens for a compute budget (formulas in docs/plan.md).

- Compute-optimal (Chinchilla, Hoffmann et al. 2022): training FLOPs C ~= 6 N D and D ~= 20 N, so
  N = sqrt(C / 120), D = 20 N.
- Inference-aware (the trade LLaMA made; Sardana & Frankle 2023): a smaller model trained on more tokens that
  reaches the *same loss* — by the Chinchilla parametric fit L(N, D) = E + A / N^alpha + B / D^beta — and
  minimises training + inference FLOPs 6 N D + 2 N T for T tokens served.
- Time on this machine: FLOPs / the FLOP/s a measured training step of a small model achieves.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from .errors import ConfigError

# Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", section 3.3 / appendix D.2 (approach 3).
CHINCHILLA_E = 1.69
CHINCHILLA_A = 406.4
CHINCHILLA_B = 410.7
CHINCHILLA_ALPHA = 0.34
CHINCHILLA_BETA = 0.28
TOKENS_PER_PARAM = 20.0


def chinchilla_loss(n_params: float, n_tokens: float) -> float:
    """Predicted pretraining loss (nats/token on MassiveText) of N parameters trained on D tokens."""
    return CHINCHILLA_E + CHINCHILLA_A / n_params**CHINCHILLA_ALPHA + CHINCHILLA_B / n_tokens**CHINCHILLA_BETA


def tokens_for_loss(n_params: float, loss: float) -> float:
    """D such that L(N, D) = loss; inf when N is too small to ever reach it."""
    gap = loss - CHINCHILLA_E - CHINCHILLA_A / n_params**CHINCHILLA_ALPHA
    if gap <= 0:
        return math.inf
    return (CHINCHILLA_B / gap) ** (1 / CHINCHILLA_BETA)


@dataclass
class Allocation:
    params: float
    tokens: float
    train_flops: float
    inference_flops: float
    loss: float

    @property
    def total_flops(self) -> float:
        return self.train_flops + self.inference_flops

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


def compute_optimal(*, params: float | None = None, flops: float | None = None,
                    inference_tokens: float = 0.0) -> Allocation:
    """The Chinchilla 20-tokens-per-parameter allocation for a model size or a training FLOP budget."""
    if (params is None) == (flops is None):
        raise ConfigError("give exactly one of --params or --flops")
    if params is not None:
        n = float(params)
    else:
        n = math.sqrt(float(flops) / (6 * TOKENS_PER_PARAM))
    if not n > 0:
        raise ConfigError("--params / --flops must be positive")
    d = TOKENS_PER_PARAM * n
    return Allocation(n, d, 6 * n * d, 2 * n * inference_tokens, chinchilla_loss(n, d))


def inference_aware(reference: Allocation, inference_tokens: float) -> Allocation:
    """The model size minimising 6ND + 2N*T among models that reach `reference.loss` (the Chinchilla-optimal
    model's predicted loss). Search over log N below the reference size (a larger model is never cheaper)."""
    target = reference.loss

    def total(log_n: float) -> float:
        n = math.exp(log_n)
        d = tokens_for_loss(n, target)
        return 6 * n * d + 2 * n * inference_tokens

    # Smallest N that can reach the target at all (D -> infinity), with a margin.
    n_floor = (CHINCHILLA_A / (target - CHINCHILLA_E)) ** (1 / CHINCHILLA_ALPHA)
    lo, hi = math.log(n_floor * 1.0001), math.log(reference.params * 1.5)
    grid = [lo + (hi - lo) * i / 400 for i in range(401)]
    best = min(grid, key=total)
    step = (hi - lo) / 400
    a, b = max(lo, best - step), min(hi, best + step)
    for _ in range(100):  # golden-section refinement of the grid minimum
        c, d = b - (b - a) / 1.618034, a + (b - a) / 1.618034
        if total(c) < total(d):
            b = d
        else:
            a = c
    n = math.exp((a + b) / 2)
    d = tokens_for_loss(n, target)
    return Allocation(n, d, 6 * n * d, 2 * n * inference_tokens, chinchilla_loss(n, d))


def measure_training_flops(preset: str = "tiny-12m", seq_len: int = 256, batch: int = 4, steps: int = 3,
                           device: str | None = None) -> dict[str, Any]:
    """FLOP/s achieved by real training steps (forward, backward, AdamW) of a small preset on this machine."""
    import torch

    from .config import get_preset
    from .model import Transformer
    from .train.loop import TrainConfig, build_optimizer, causal_lm_loss
    from .train.metrics import flops_per_token

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = get_preset(preset)
    model = Transformer(config).to(dev)
    model.reset_parameters()
    opt = build_optimizer(model, TrainConfig())
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=gen).to(dev)
    batch_d = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def step() -> None:
        causal_lm_loss(model, batch_d).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    step()  # warm-up
    best = math.inf
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    fpt = flops_per_token(model, seq_len)
    return {"preset": preset, "device": str(dev), "threads": torch.get_num_threads(), "seq_len": seq_len,
            "batch": batch, "step_s": best, "tokens_per_s": batch * seq_len / best,
            "flops_per_s": fpt * batch * seq_len / best}


def plan(*, params: float | None = None, flops: float | None = None, inference_tokens: float = 0.0,
         measure: bool = True, machine_flops: float | None = None) -> dict[str, Any]:
    """Both allocations and, with a measured (or given) FLOP/s, the wall-clock time each would take here."""
    chin = compute_optimal(params=params, flops=flops, inference_tokens=inference_tokens)
    result: dict[str, Any] = {"compute_optimal": asdict(chin), "inference_tokens": inference_tokens}
    alt = inference_aware(chin, inference_tokens) if inference_tokens > 0 else None
    if alt is not None:
        result["inference_aware"] = asdict(alt)
    speed = None
    if machine_flops:
        speed = {"flops_per_s": float(machine_flops), "source": "given"}
    elif measure:
        speed = measure_training_flops() | {"source": "measured"}
    if speed:
        result["machine"] = speed
        result["compute_optimal"]["train_seconds"] = chin.train_flops / speed["flops_per_s"]
        if alt is not None:
            result["inference_aware"]["train_seconds"] = alt.train_flops / speed["flops_per_s"]
    return result


def _si(x: float) -> str:
    for unit, scale in (("e24", 1e24), ("e21", 1e21), ("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if unit.startswith("e") and x >= scale * 1000:
            return f"{x:.3g}"
        if not unit.startswith("e") and x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    for unit, scale in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= scale:
            return f"{seconds / scale:,.1f} {unit}"
    return f"{seconds:.0f} s"


def format_plan(result: dict[str, Any]) -> str:
    rows = [("", "compute-optimal (Chinchilla)")]
    cols = [result["compute_optimal"]]
    if "inference_aware" in result:
        rows[0] = (*rows[0], "inference-aware")
        cols.append(result["inference_aware"])

    def line(label: str, f) -> tuple[str, ...]:
        return (label, *(f(c) for c in cols))

    rows += [
        line("parameters N", lambda c: _si(c["params"])),
        line("training tokens D", lambda c: _si(c["tokens"])),
        line("tokens per parameter", lambda c: f"{c['tokens'] / c['params']:.1f}"),
        line("training FLOPs 6ND", lambda c: f"{c['train_flops']:.3g}"),
        line("predicted loss L(N,D)", lambda c: f"{c['loss']:.3f}"),
    ]
    if result["inference_tokens"]:
        rows += [line(f"inference FLOPs 2N x {_si(result['inference_tokens'])}",
                      lambda c: f"{c['inference_flops']:.3g}"),
                 line("total FLOPs", lambda c: f"{c['train_flops'] + c['inference_flops']:.3g}")]
    if "machine" in result:
        rows.append(line("training time here", lambda c: _duration(c["train_seconds"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    m = result.get("machine")
    if m:
        if m["source"] == "measured":
            out.append(f"\nthis machine: {m['flops_per_s'] / 1e9:.2f} GFLOP/s achieved by a {m['preset']} training "
                       f"step (batch {m['batch']} x {m['seq_len']} tokens, {m['device']}, {m['threads']} threads: "
                       f"{m['tokens_per_s']:,.0f} tokens/s)")
        else:
            out.append(f"\nthis machine: {m['flops_per_s'] / 1e9:.2f} GFLOP/s (given)")
    if "inference_aware" in result:
        c, a = result["compute_optimal"], result["inference_aware"]
        total_c = c["train_flops"] + c["inference_flops"]
        total_a = a["train_flops"] + a["inference_flops"]
        out.append(f"inference-aware: {a['params'] / c['params']:.2f}x the parameters, "
                   f"{a['tokens'] / c['tokens']:.2f}x the tokens, same predicted loss, "
                   f"{100 * (1 - total_a / total_c):.1f}% fewer total FLOPs")
    return "\n".join(out)


def run_plan_cli(params: float | None, flops: float | None, inference_tokens: float, measure: bool,
                 machine_flops: float | None, as_json: bool) -> int:
    result = plan(params=params, flops=flops, inference_tokens=inference_tokens, measure=measure,
                  machine_flops=machine_flops)
    if as_json:
        import json

        print(json.dumps(result, indent=2))
    else:
        print(format_plan(result))
    return 0


def parse_number(text: str) -> float:
    """'7e9', '7B', '135M', '1.4T', '2K' -> float."""
    s = text.strip().replace("_", "").replace(",", "")
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(s[-1:].upper())
    try:
        return float(s[:-1]) * scale if scale else float(s)
    except ValueError:
        raise ConfigError(f"{text!r}: expected a number like 7e9, 135M, 1.4T") from None
