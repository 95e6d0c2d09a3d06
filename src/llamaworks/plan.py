"""`llamaworks plan`: how big a model and how many tokens for a compute budget (formulas in docs/plan.md).

Every number says which Chinchilla estimate (Hoffmann et al. 2022) it comes from:

- **20 tokens per parameter** — the rule of thumb of approaches 1-2 (Table 3: 20.0-21.6 tokens/parameter at
  every size): D = 20 N, C = 6 N D = 120 N².
- **loss-optimal** — approach 3: the argmin over C = 6 N D of the fitted loss L(N, D) = E + A/N^α + B/D^β, in
  closed form N_opt = G (C/6)^a, D_opt = C / (6 N_opt), G = (αA / (βB))^(1/(α+β)), a = β/(α+β) (their eq. 4).
- **inference-aware** — Sardana et al. 2024, "Beyond Chinchilla-Optimal": the N, D that reach the loss-optimal
  model's loss with the least training + inference compute 6 N D + 2 N T, under the same fit. With T = 0 it is the
  loss-optimal model itself, so it never trains with less compute than that model at the same loss.

The fit is approach 3's E = 1.69, A = 406.4, B = 410.7 with the unrounded exponents α = 0.336, β = 0.283 that
Sardana et al. use (their App. A); the exponents printed in Hoffmann et al. eq. 10, 0.34 and 0.28, are
`HOFFMANN_PRINTED` (see docs/plan.md for why they are not the default).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from .errors import ConfigError

TOKENS_PER_PARAM = 20.0


@dataclass(frozen=True)
class LossFit:
    """A Chinchilla parametric loss L(N, D) = E + A / N^alpha + B / D^beta (nats/token on MassiveText)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str

    @property
    def a(self) -> float:
        """Exponent of N_opt ∝ C^a on the loss-optimal frontier."""
        return self.beta / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    def loss(self, n_params: float, n_tokens: float) -> float:
        return self.E + self.A / n_params**self.alpha + self.B / n_tokens**self.beta

    def tokens_for_loss(self, n_params: float, loss: float) -> float:
        """D such that L(N, D) = loss; inf when N is too small to ever reach it."""
        gap = loss - self.E - self.A / n_params**self.alpha
        return (self.B / gap) ** (1 / self.beta) if gap > 0 else math.inf

    def optimal_params(self, flops: float) -> float:
        """argmin_N L(N, C / 6N): N_opt = G (C/6)^a."""
        return self.G * (flops / 6) ** self.a

    def optimal_flops(self, n_params: float) -> float:
        """The budget C for which N is the loss-optimal size (the inverse of `optimal_params`)."""
        return 6 * (n_params / self.G) ** (1 / self.a)


# Hoffmann et al. 2022 approach 3 with the exponents Sardana et al. 2024 use (App. A): reproduces Chinchilla's own
# approach-3 projections (40B at Gopher's 5.76e23 FLOPs, Fig. 4; Table A3) and Sardana et al.'s reported sizes.
APPROACH3 = LossFit(1.69, 406.4, 410.7, 0.336, 0.283,
                    "Chinchilla approach 3 (Hoffmann et al. 2022 eq. 10; exponents as Sardana et al. 2024 App. A)")
# The same fit with the exponents rounded as printed in Hoffmann et al. eq. 10.
HOFFMANN_PRINTED = LossFit(1.69, 406.4, 410.7, 0.34, 0.28, "Hoffmann et al. 2022 eq. 10 as printed")

RULE_METHOD = "20 tokens/param (Chinchilla approaches 1-2)"
OPTIMAL_METHOD = "loss-optimal (approach 3 fit)"
AWARE_METHOD = "inference-aware (approach 3 fit)"


def chinchilla_loss(n_params: float, n_tokens: float, fit: LossFit = APPROACH3) -> float:
    """Predicted pretraining loss (nats/token on MassiveText) of N parameters trained on D tokens."""
    return fit.loss(n_params, n_tokens)


def tokens_for_loss(n_params: float, loss: float, fit: LossFit = APPROACH3) -> float:
    """D such that L(N, D) = loss; inf when N is too small to ever reach it."""
    return fit.tokens_for_loss(n_params, loss)


@dataclass
class Allocation:
    params: float
    tokens: float
    train_flops: float
    inference_flops: float
    loss: float
    method: str

    @property
    def total_flops(self) -> float:
        return self.train_flops + self.inference_flops

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


def _allocation(n: float, d: float, inference_tokens: float, fit: LossFit, method: str) -> Allocation:
    return Allocation(n, d, 6 * n * d, 2 * n * inference_tokens, fit.loss(n, d), method)


def _one_of(params: float | None, flops: float | None) -> tuple[float | None, float | None]:
    if (params is None) == (flops is None):
        raise ConfigError("give exactly one of --params or --flops")
    value = float(params if params is not None else flops)
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError("--params / --flops must be a positive number")
    return (value, None) if params is not None else (None, value)


def rule_of_thumb(*, params: float | None = None, flops: float | None = None, inference_tokens: float = 0.0,
                  fit: LossFit = APPROACH3) -> Allocation:
    """The 20-tokens-per-parameter allocation (D = 20 N, so N = sqrt(C / 120)); its loss is `fit`'s prediction."""
    params, flops = _one_of(params, flops)
    n = params if params is not None else math.sqrt(flops / (6 * TOKENS_PER_PARAM))
    return _allocation(n, TOKENS_PER_PARAM * n, inference_tokens, fit, RULE_METHOD)


def compute_optimal(*, params: float | None = None, flops: float | None = None, inference_tokens: float = 0.0,
                    fit: LossFit = APPROACH3) -> Allocation:
    """The argmin of `fit` under C = 6ND: for a budget C, N = G (C/6)^a; for a size N, the budget at which N is
    that argmin and D = C / 6N."""
    params, flops = _one_of(params, flops)
    if flops is None:
        flops = fit.optimal_flops(params)
    n = params if params is not None else fit.optimal_params(flops)
    return _allocation(n, flops / (6 * n), inference_tokens, fit, OPTIMAL_METHOD)


def inference_aware(reference: Allocation, inference_tokens: float, fit: LossFit = APPROACH3) -> Allocation:
    """The N, D minimising 6 N D + 2 N T among models with `fit`-predicted loss equal to `reference.loss`.

    Along the equal-loss curve D(N) = (B / g)^(1/β), g = L - E - A/N^α, the derivative of the total with respect
    to ln N is 2N (3 D h + T), h = 1 - (α/β) A N^-α / g. h < 0 below N0 = (A (1 + α/β) / (L - E))^(1/α) (the
    loss-optimal size for L, h = 0 there) and D (-h) falls strictly from +inf to 0 on (N_floor, N0], so the total
    has exactly one minimum, where 3 D (-h) = T, at or below N0; bisection on ln N finds it to machine precision.
    """
    target, t = reference.loss, float(inference_tokens)
    if not target > fit.E:
        raise ConfigError(f"target loss {target:.4f} is not above the irreducible loss E = {fit.E}")
    if t < 0:
        raise ConfigError("--inference-tokens must be >= 0")
    ratio = fit.alpha / fit.beta
    lo = math.log(fit.A / (target - fit.E)) / fit.alpha          # ln N_floor: needs infinite data
    hi = math.log(fit.A * (1 + ratio) / (target - fit.E)) / fit.alpha  # ln N0: the loss-optimal size

    def excess(log_n: float) -> float:  # 3 D (-h) - T, strictly decreasing on (lo, hi]
        n = math.exp(log_n)
        gap = target - fit.E - fit.A / n**fit.alpha
        if gap <= 0:
            return math.inf
        return 3 * (fit.B / gap) ** (1 / fit.beta) * (ratio * fit.A / n**fit.alpha / gap - 1) - t

    if t > 0:
        for _ in range(200):
            mid = (lo + hi) / 2
            if mid in (lo, hi):
                break
            lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    n = math.exp(hi)
    return _allocation(n, fit.tokens_for_loss(n, target), t, fit, AWARE_METHOD)


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
         measure: bool = True, machine_flops: float | None = None, fit: LossFit = APPROACH3) -> dict[str, Any]:
    """The 20-tokens rule, the loss-optimal and (with inference tokens) the inference-aware allocation, and with a
    measured (or given) FLOP/s the wall-clock time each would take here."""
    rule = rule_of_thumb(params=params, flops=flops, inference_tokens=inference_tokens, fit=fit)
    best = compute_optimal(params=params, flops=flops, inference_tokens=inference_tokens, fit=fit)
    allocations = {"rule_of_thumb": rule, "compute_optimal": best}
    if inference_tokens > 0:
        allocations["inference_aware"] = inference_aware(best, inference_tokens, fit)
    result: dict[str, Any] = {"fit": asdict(fit), "given": "params" if params is not None else "flops",
                              "inference_tokens": inference_tokens}
    result |= {key: asdict(a) for key, a in allocations.items()}
    speed = None
    if machine_flops:
        speed = {"flops_per_s": float(machine_flops), "source": "given"}
    elif measure:
        speed = measure_training_flops() | {"source": "measured"}
    if speed:
        result["machine"] = speed
        for key, a in allocations.items():
            result[key]["train_seconds"] = a.train_flops / speed["flops_per_s"]
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
    keys = [k for k in ("rule_of_thumb", "compute_optimal", "inference_aware") if k in result]
    cols = [result[k] for k in keys]
    heads = [c["method"].split(" (", 1) for c in cols]
    rows = [("", *(h[0] for h in heads)), ("", *(f"({h[1]}" for h in heads))]

    def line(label: str, f) -> tuple[str, ...]:
        return (label, *(f(c) for c in cols))

    rows += [
        line("parameters N", lambda c: _si(c["params"])),
        line("training tokens D", lambda c: _si(c["tokens"])),
        line("tokens per parameter", lambda c: f"{c['tokens'] / c['params']:.1f}"),
        line("training FLOPs 6ND", lambda c: f"{c['train_flops']:.3g}"),
        line("predicted loss L(N,D)", lambda c: f"{c['loss']:.4f}"),
    ]
    if result["inference_tokens"]:
        rows += [line(f"inference FLOPs 2N x {_si(result['inference_tokens'])}",
                      lambda c: f"{c['inference_flops']:.3g}"),
                 line("total FLOPs", lambda c: f"{c['train_flops'] + c['inference_flops']:.3g}")]
    if "machine" in result:
        rows.append(line("training time here", lambda c: _duration(c["train_seconds"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    f = result["fit"]
    out.append(f"\nloss: L(N,D) = {f['E']} + {f['A']}/N^{f['alpha']} + {f['B']}/D^{f['beta']} nats/token on "
               f"MassiveText:\n  {f['source']}")
    if result.get("given") == "params":
        out.append("loss-optimal: N trained on the tokens that make it the argmin of that L(N,D) at its own budget")
    else:
        out.append("loss-optimal: the argmin of that L(N,D) for the same training FLOPs, N = G (C/6)^a")
    if "inference_aware" in result:
        c, a = result["compute_optimal"], result["inference_aware"]
        total_c = c["train_flops"] + c["inference_flops"]
        total_a = a["train_flops"] + a["inference_flops"]
        out.append("inference-aware (Sardana et al. 2024): the least training + inference FLOPs at the loss-optimal "
                   "model's loss:\n  "
                   f"{a['params'] / c['params']:.2f}x its parameters, {a['tokens'] / c['tokens']:.2f}x its tokens, "
                   f"{a['train_flops'] / c['train_flops']:.2f}x its training FLOPs, "
                   f"{100 * (1 - total_a / total_c):.1f}% fewer total FLOPs")
    m = result.get("machine")
    if m:
        if m["source"] == "measured":
            out.append(f"this machine: {m['flops_per_s'] / 1e9:.2f} GFLOP/s achieved by a {m['preset']} training "
                       f"step (batch {m['batch']} x {m['seq_len']} tokens, {m['device']}, {m['threads']} threads: "
                       f"{m['tokens_per_s']:,.0f} tokens/s)")
        else:
            out.append(f"this machine: {m['flops_per_s'] / 1e9:.2f} GFLOP/s (given)")
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
