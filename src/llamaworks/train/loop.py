"""The one training loop shared by pretraining, full fine-tuning, LoRA/QLoRA and DPO.

    result = run_training(model, train_data=src, val_data=val_src, cfg=TrainConfig(...), save_fn=save)

Contract
- `train_data` / `val_data`: resumable batch sources. `iter(source)` yields dicts of tensors
  {"input_ids" (B,T) long, "labels" (B,T) long, optional "segment_ids" (B,T), "positions" (B,T),
  "attention_mask" (B,T) bool/0-1}; `source.state_dict()` / `source.load_state_dict(d)` save and restore the
  position (the loop calls load_state_dict *before* iter() on resume). Labels are already shifted:
  `labels[b, t]` is the token that should follow `input_ids[b, :t+1]`; -100 means "no loss here".
  A training source should be endless (loop over epochs itself); if it stops, the loop calls iter() again.
  Under torchrun every rank iterates its own source; the sources in `llamaworks.data.loader` give each
  rank its slice of every global batch by themselves. `val_data` is iterated from the start at each
  evaluation (the first `eval_batches` batches), so it must be deterministic.
- `loss_fn(model, batch) -> scalar`: default = next-token cross-entropy over labels != -100, normalised by
  the number of target tokens in the whole optimizer step (all micro-batches, all ranks), so padding and
  prompt masking never re-weight examples. A custom loss_fn (DPO) returns a per-micro-batch mean; the loop
  divides it by grad_accum_steps. `model` may be DDP/FSDP-wrapped: use `unwrap_model(model)` for attributes.
- Trainable parameters are those with requires_grad. AdamW with decoupled weight decay on >=2-D tensors only.
- `save_fn(model, dir)`: writes the model artifact (HF dir, PEFT adapter, ...) into `dir`; called on rank 0
  with the unwrapped model for every checkpoint and for `out_dir/final`. The loop adds its own
  `trainer_state.pt` (trainable weights in fp32, optimizer, schedule, step), `rank{r}.pt` (RNG + data
  position) and `trainer_state.json` next to it. See `train/checkpointing.py`.
- `resume=True`: continue from the newest complete `out_dir/checkpoints/step-XXXXXX`; a run killed at any
  moment and resumed reproduces the uninterrupted run's losses (same process count).

Precision "auto": bf16 autocast on CUDA devices that support it, fp32 everywhere else. On CPU, bf16 autocast
is only a win on CPUs with AMX/AVX512-BF16; without them it is slower than fp32 and adds noise, so CPU
users opt in with precision="bf16". Master weights and optimizer state stay fp32 in every mode.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..files import remove_dir, replace_dir, swap_in
from . import checkpointing as ckpt
from .metrics import MetricsLogger, flops_per_token, peak_flops, plot_loss

Batch = dict[str, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]
SaveFn = Callable[[nn.Module, Path], None]


@dataclass
class TrainConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    max_steps: int = 1000
    micro_batch_size: int = 8  # per process; read by whoever builds the batch sources
    grad_accum_steps: int = 1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 100  # 0 disables periodic evaluation (the last step is still evaluated)
    eval_batches: int = 10
    save_every: int = 500  # 0: only the final checkpoint
    keep_last: int = 2
    log_every: int = 10
    precision: str = "auto"  # "auto" | "bf16" | "fp32"
    activation_checkpointing: bool = False
    seed: int = 1337
    out_dir: str | Path = "out"
    strategy: str = "ddp"  # under torchrun: "ddp" (replicated weights) or "fsdp" (FSDP2 fully_shard)
    eps: float = 1e-8
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = True
    plot: bool = True  # loss.png at the end
    save_final: bool = True  # save_fn(model, out_dir/final) at the end

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.max_steps < 1 or self.grad_accum_steps < 1 or self.micro_batch_size < 1:
            raise ValueError("max_steps, grad_accum_steps and micro_batch_size must be >= 1")
        self.betas = tuple(self.betas)  # type: ignore[assignment]


@dataclass
class TrainResult:
    step: int  # optimizer steps done (== cfg.max_steps when the run completed)
    train_loss: float | None  # mean loss over the last logged window
    val_loss: float | None  # last evaluation
    val_ppl: float | None
    tokens: int  # input tokens processed, all ranks
    tokens_per_s: float | None  # last logged window, all ranks
    mfu: float | None  # last logged window
    out_dir: Path
    final_dir: Path | None
    last_checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)


# -- distributed helpers -------------------------------------------------------------------------

def init_distributed() -> tuple[int, int]:
    """(rank, world_size). Initialises the process group when started by torchrun (WORLD_SIZE > 1):
    nccl when CUDA is available, gloo otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _all_reduce_sum(t: Tensor, world: int) -> Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# -- pieces --------------------------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to lr * min_lr_ratio at max_steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def model_inputs(batch: Batch) -> dict[str, Tensor]:
    """Keyword arguments for Transformer.forward from a batch's optional fields."""
    kwargs: dict[str, Tensor] = {}
    if batch.get("positions") is not None:
        kwargs["positions"] = batch["positions"]
    if batch.get("segment_ids") is not None:
        kwargs["segment_ids"] = batch["segment_ids"]
    if batch.get("attention_mask") is not None:
        kwargs["key_mask"] = batch["attention_mask"].bool()
    return kwargs


def token_loss_sum(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """(sum of next-token cross-entropy over labels != -100, number of such tokens)."""
    logits = model(batch["input_ids"], **model_inputs(batch))
    labels = batch["labels"]
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, (labels != -100).sum()


def causal_lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Mean next-token cross-entropy of one batch (labels -100 ignored)."""
    total, count = token_loss_sum(model, batch)
    return total / count.clamp(min=1)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _state_has(source: Any) -> bool:
    return hasattr(source, "state_dict") and hasattr(source, "load_state_dict")


class _Progress:
    """tqdm bar on rank 0 (or nothing); messages go through it so they do not break the bar."""

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def update(self, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the loop ------------------------------------------------------------------------------------

def run_training(model: nn.Module, *, train_data: Any, val_data: Any = None, loss_fn: LossFn | None = None,
                 cfg: TrainConfig, save_fn: SaveFn, resume: bool = False) -> TrainResult:
    rank, world = init_distributed()
    main = rank == 0
    out_dir = Path(cfg.out_dir)
    ckpt_root = out_dir / "checkpoints"
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    _barrier(world)
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed + rank)

    raw_model = unwrap_model(model)
    if hasattr(raw_model, "activation_checkpointing"):
        raw_model.activation_checkpointing = cfg.activation_checkpointing
    raw_model.train()

    # Wrap for multi-process training. FSDP keeps an unsharded CPU copy on rank 0 for save_fn.
    fsdp = world > 1 and cfg.strategy == "fsdp"
    shadow: nn.Module | None = None
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        if main:
            shadow = copy.deepcopy(raw_model).to("cpu")
        for layer in getattr(raw_model, "layers", []):
            fully_shard(layer)
        fully_shard(raw_model)
        wrapped: nn.Module = raw_model
    elif world > 1:
        ddp_device = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(raw_model, device_ids=ddp_device)
    else:
        wrapped = raw_model

    optimizer = build_optimizer(raw_model, cfg)
    autocast_dtype = resolve_precision(cfg.precision, device)

    # -- resume ---------------------------------------------------------------------------------
    if main:
        ckpt.prune_checkpoints(ckpt_root, 0)  # only what killed runs left: `.tmp` builds, half-deleted folders
    start_step, tokens_seen, elapsed_before = 0, 0, 0.0
    last_val: tuple[float, float] | None = None
    if resume:
        latest = ckpt.latest_checkpoint(ckpt_root)
        if latest is None:
            if main:
                print(f"resume: no checkpoint in {ckpt_root}, starting from scratch", flush=True)
        else:
            shared, per_rank = ckpt.load_trainer_state(latest, rank)
            _load_trainable(raw_model, optimizer, shared, fsdp)
            start_step = int(shared["step"])
            tokens_seen = int(shared.get("tokens", 0))
            elapsed_before = float(shared.get("elapsed_s", 0.0))
            if shared.get("last_val") is not None:
                last_val = tuple(shared["last_val"])  # type: ignore[assignment]
            if per_rank is None:
                raise ValueError(f"{latest}: no rank{rank}.pt; resume with the process count the run used")
            ckpt.set_rng_state(per_rank["rng"])
            if per_rank.get("data") is not None and _state_has(train_data):
                train_data.load_state_dict(per_rank["data"])
            if main:
                print(f"resumed from {latest} at step {start_step}", flush=True)

    logger = MetricsLogger(out_dir, resume_step=start_step, tensorboard=cfg.tensorboard) if main else None
    history: list[dict[str, Any]] = list(logger.rows) if logger else []

    # Metrics denominators: tokens/s and MFU (against the peak of all ranks' devices).
    seq_len_seen = 0
    fpt_cache: dict[int, float] = {}
    peak = peak_flops(device, autocast_dtype or torch.float32) * world if main else 0.0

    progress = _Progress(main and cfg.progress, cfg.max_steps, start_step)
    data_iter: Iterator[Batch] = iter(train_data)

    def next_batch() -> Batch:
        nonlocal data_iter
        try:
            return next(data_iter)
        except StopIteration:
            data_iter = iter(train_data)
            return next(data_iter)

    def autocast() -> contextlib.AbstractContextManager:
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=autocast_dtype)

    window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
    last_row: dict[str, Any] = {}
    last_ckpt: Path | None = ckpt.latest_checkpoint(ckpt_root) if resume else None
    step = start_step
    try:
        for step in range(start_step, cfg.max_steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [_to_device(next_batch(), device) for _ in range(cfg.grad_accum_steps)]
            step_tokens = sum(int(b["input_ids"].numel()) for b in micro)
            seq_len_seen = int(micro[0]["input_ids"].shape[1])

            # Target-token count of the whole step across ranks: the default loss divides by it.
            local_targets = sum((b["labels"] != -100).sum() for b in micro).to(device, torch.float64)
            global_targets = _all_reduce_sum(local_targets.clone(), world).clamp(min=1)
            loss_report = torch.zeros((), device=device, dtype=torch.float64)
            for i, batch in enumerate(micro):
                sync_ctx = (wrapped.no_sync() if isinstance(wrapped, nn.parallel.DistributedDataParallel)
                            and i < len(micro) - 1 else contextlib.nullcontext())
                with sync_ctx:
                    with autocast():
                        if loss_fn is None:
                            loss_sum, _ = token_loss_sum(wrapped, batch)
                            # DDP/FSDP average gradients over ranks; multiply back so the step's gradient is
                            # d(sum of all ranks' token losses) / (all target tokens).
                            loss = loss_sum * (world / global_targets.float())
                            loss_report += loss_sum.detach().double()
                        else:
                            loss = loss_fn(wrapped, batch) / cfg.grad_accum_steps
                            loss_report += loss.detach().double()
                    loss.backward()
            if loss_fn is None:
                step_loss = float(_all_reduce_sum(loss_report, world) / global_targets)
            else:  # mean over micro-batches, then over ranks
                step_loss = float(_all_reduce_sum(loss_report, world) / world)

            grad_norm = _clip_grad(raw_model, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            tokens_seen += step_tokens * world
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            window_loss += step_loss
            window_steps += 1
            window_tokens += step_tokens * world
            window_time += dt

            is_last = done == cfg.max_steps
            val: tuple[float, float] | None = None
            if val_data is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or is_last):
                val = evaluate(wrapped, val_data, cfg.eval_batches, loss_fn, autocast)
                last_val = val

            if main:
                postfix = {"loss": f"{step_loss:.3f}", "lr": f"{lr:.2e}"}
                if last_val:
                    postfix["val"] = f"{last_val[0]:.3f}"
                progress.update(postfix)
            if (cfg.log_every and done % cfg.log_every == 0) or is_last or val is not None:
                tps = window_tokens / window_time if window_time > 0 else 0.0
                if seq_len_seen not in fpt_cache:
                    fpt_cache[seq_len_seen] = flops_per_token(raw_model if shadow is None else shadow, seq_len_seen)
                achieved = tps * fpt_cache[seq_len_seen]
                # A peak measured while other jobs held the cores can be below what the run later achieves:
                # the best rate seen is then the better estimate of what this machine can do (MFU <= 100%).
                peak = max(peak, achieved) if main else peak
                mfu = achieved / peak if peak > 0 else None
                row = {"step": done, "lr": lr, "loss": window_loss / max(1, window_steps), "grad_norm": grad_norm,
                       "tokens": tokens_seen, "tokens_per_s": tps, "mfu": mfu,
                       "val_loss": val[0] if val else "", "val_ppl": val[1] if val else "",
                       "elapsed_s": elapsed_before + window_time}
                elapsed_before += window_time
                window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
                last_row = row
                if main and logger is not None:
                    logger.log(row)
                    history.append(row)
                    msg = (f"step {done}/{cfg.max_steps} loss {row['loss']:.4f} lr {lr:.2e} "
                           f"grad_norm {grad_norm:.3f} tok/s {tps:,.0f}"
                           + (f" MFU {100 * mfu:.2f}%" if mfu is not None else ""))
                    if val:
                        msg += f" | val loss {val[0]:.4f} ppl {val[1]:.2f}"
                    progress.write(msg)

            if (cfg.save_every and done % cfg.save_every == 0) or is_last:
                last_ckpt = _save_checkpoint(
                    raw_model, shadow, optimizer, save_fn, train_data, ckpt_root, done, cfg,
                    {"tokens": tokens_seen, "elapsed_s": elapsed_before + window_time, "last_val": last_val,
                     "metrics": last_row}, fsdp, rank, world)
    finally:
        progress.close()

    final_dir = None
    if cfg.save_final:
        final_dir = out_dir / "final"
        _save_artifact(raw_model, shadow, save_fn, final_dir, fsdp, rank, world)
    if main and logger is not None:
        logger.close()
        if cfg.plot and logger.csv_path.exists():
            try:
                plot_loss(logger.csv_path, out_dir / "loss.png")
            except Exception as e:  # a missing font or backend must not fail a finished run
                print(f"warning: could not draw loss.png: {e}", file=sys.stderr)
    _barrier(world)
    return TrainResult(
        step=max(start_step, cfg.max_steps),
        train_loss=last_row.get("loss") if last_row else None,
        val_loss=last_val[0] if last_val else None, val_ppl=last_val[1] if last_val else None,
        tokens=tokens_seen, tokens_per_s=last_row.get("tokens_per_s") if last_row else None,
        mfu=last_row.get("mfu") if last_row else None, out_dir=out_dir, final_dir=final_dir,
        last_checkpoint=last_ckpt, history=history)


@torch.no_grad()
def evaluate(model: nn.Module, val_data: Any, max_batches: int, loss_fn: LossFn | None = None,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> tuple[float, float]:
    """(validation loss, perplexity) over the first `max_batches` batches of every rank's slice."""
    _, world = rank_and_world()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, count
    for i, batch in enumerate(val_data):
        if max_batches and i >= max_batches:
            break
        batch = _to_device(batch, device)
        with autocast():
            if loss_fn is None:
                loss_sum, count = token_loss_sum(model, batch)
                total[0] += loss_sum.double()
                total[1] += count.double()
            else:
                total[0] += loss_fn(model, batch).double()
                total[1] += 1
    model.train(was_training)
    _all_reduce_sum(total, world)
    loss = float(total[0] / total[1].clamp(min=1))
    return loss, math.exp(min(loss, 50.0))


def _clip_grad(model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def _full_state(raw_model: nn.Module, optimizer: torch.optim.Optimizer, shadow: nn.Module | None, fsdp: bool,
                rank: int) -> tuple[dict[str, Tensor], dict[str, Any], nn.Module]:
    """(trainable params on CPU, optimizer state, the module save_fn should see). Under FSDP this gathers the
    full tensors (a collective: every rank calls it) and rank 0 copies them into its unsharded shadow."""
    names = set(_trainable_names(raw_model))
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(raw_model, options=opts)
        optim_sd = get_optimizer_state_dict(raw_model, optimizer, options=opts)
        if rank == 0 and shadow is not None:
            shadow.load_state_dict(model_sd, strict=False)
            return {k: v for k, v in model_sd.items() if k in names}, optim_sd, shadow
        return {}, optim_sd, raw_model
    params = {n: p.detach().to("cpu", copy=True) for n, p in raw_model.named_parameters() if n in names}
    return params, optimizer.state_dict(), raw_model


def _load_trainable(raw_model: nn.Module, optimizer: torch.optim.Optimizer,
                    shared: dict[str, Any], fsdp: bool) -> None:
    params: dict[str, Tensor] = shared["trainable"]
    expected = set(_trainable_names(raw_model))
    if set(params) != expected:
        missing, extra = sorted(expected - set(params))[:3], sorted(set(params) - expected)[:3]
        raise ValueError(f"checkpoint trainable parameters differ from the model's (missing {missing}, "
                         f"unexpected {extra}): resume with the same model and recipe options")
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(raw_model, params, options=opts)
        set_optimizer_state_dict(raw_model, optimizer, shared["optimizer"], options=opts)
        return
    with torch.no_grad():
        for n, p in raw_model.named_parameters():
            if n in params:
                if params[n].shape != p.shape:
                    raise ValueError(f"checkpoint parameter {n} has shape {list(params[n].shape)}, the model's is "
                                     f"{list(p.shape)}: resume with the same model and recipe options")
                p.copy_(params[n])
    try:
        optimizer.load_state_dict(shared["optimizer"])
    except (KeyError, TypeError, RuntimeError, IndexError) as e:
        raise ValueError(f"checkpoint optimizer state does not fit this run ({str(e).splitlines()[0][:200]})") \
            from None


def _save_artifact(raw_model: nn.Module, shadow: nn.Module | None, save_fn: SaveFn, target: Path, fsdp: bool,
                   rank: int, world: int) -> None:
    """save_fn into `target` atomically (built in a sibling temp folder, then swapped in)."""
    model_for_save = raw_model
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0 and shadow is not None:
            shadow.load_state_dict(full, strict=False)
            model_for_save = shadow
    if rank == 0:
        with replace_dir(target) as stage:  # built beside `target`, swapped in whole
            _call_save_fn(save_fn, model_for_save, stage)
    _barrier(world)


def _call_save_fn(save_fn: SaveFn, model: nn.Module, target: Path) -> None:
    was_training = model.training
    model.eval()
    try:
        save_fn(model, target)
    finally:
        model.train(was_training)


def _save_checkpoint(raw_model: nn.Module, shadow: nn.Module | None, optimizer: torch.optim.Optimizer,
                     save_fn: SaveFn, train_data: Any, ckpt_root: Path, step: int, cfg: TrainConfig,
                     extra: dict[str, Any], fsdp: bool, rank: int, world: int) -> Path:
    final = ckpt_root / ckpt.step_dir_name(step)
    tmp = ckpt_root / (ckpt.step_dir_name(step) + ".tmp")
    params, optim_sd, model_for_save = _full_state(raw_model, optimizer, shadow, fsdp, rank)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(world)
    # Every rank writes its own RNG and data position; rank 0 the shared state and the model artifact.
    data_state = train_data.state_dict() if _state_has(train_data) else None
    ckpt.atomic_torch_save({"rng": ckpt.rng_state(), "data": data_state}, tmp / f"rank{rank}.pt")
    if rank == 0:
        _call_save_fn(save_fn, model_for_save, tmp)
        cfg_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
        shared = {"step": step, "trainable": params, "optimizer": optim_sd,
                  "scheduler": {"step": step, "kind": "warmup-cosine"}, "config": cfg_dict, "world_size": world,
                  **extra}
        ckpt.atomic_torch_save(shared, tmp / "trainer_state.pt")
        ckpt.write_json({"step": step, "world_size": world, "config": cfg_dict, "metrics": extra.get("metrics"),
                         "tokens": extra.get("tokens")}, tmp / "trainer_state.json")
    _barrier(world)
    if rank == 0:
        remove_dir(swap_in(tmp, final))  # a step saved again (resumed run): the old one leaves in one rename
        ckpt.prune_checkpoints(ckpt_root, cfg.keep_last)
    _barrier(world)
    return final


def load_train_config(path: str | Path) -> TrainConfig:
    """A TrainConfig from a JSON or YAML file (unknown keys are an error)."""
    path = Path(path)
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text) or {}
        else:
            d = json.loads(text)
    except Exception as e:  # YAML/JSON syntax errors, deep nesting
        raise ConfigError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of training options")
    known = set(TrainConfig.__dataclass_fields__)
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"{path}: unknown training option(s) {', '.join(sorted(unknown))}")
    try:
        return TrainConfig(**d)
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from None


__all__ = [
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "causal_lm_loss",
    "evaluate",
    "init_distributed",
    "load_train_config",
    "lr_at",
    "rank_and_world",
    "run_training",
    "token_loss_sum",
    "unwrap_model",
]
