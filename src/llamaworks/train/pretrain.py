"""`llamaworks pretrain`: a LLaMA from random init on token shards written by `llamaworks data prepare`.

    pretrain("tiny-12m", "data/", "out/", max_steps=2000)   # -> out/final (HF dir + tokenizer), out/checkpoints

The model's vocabulary size is taken from the prepared data's tokenizer (a preset's own vocab_size is replaced),
initialisation follows the LLaMA papers (`Transformer.reset_parameters`: N(0, 0.02), residual projections scaled
by 1/sqrt(2 * n_layers), norms at 1), and every checkpoint and `out/final` is an HF directory with the tokenizer,
so `llamaworks chat --model out/final` opens it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig, get_preset
from ..data.loader import TokenWindowSource
from ..data.prepare import load_prepared
from ..errors import ConfigError
from ..files import atomic_write_text
from .loop import TrainConfig, TrainResult, init_distributed, run_training


def resolve_model_config(spec: str | Path | ModelConfig) -> ModelConfig:
    """A preset name (see `llamaworks models`) or a JSON/YAML file of ModelConfig fields."""
    if isinstance(spec, ModelConfig):
        return spec
    path = Path(spec)
    if path.suffix in (".json", ".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"{path}: no such model config file")
        return ModelConfig.from_file(path)
    return get_preset(str(spec))


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(device)


def build_model(config: ModelConfig, seed: int, device: torch.device, init_std: float = 0.02) -> nn.Module:
    """A randomly initialised Transformer; the same seed gives the same weights on every rank."""
    from ..model import Transformer

    torch.manual_seed(seed)
    model = Transformer(config)
    model.reset_parameters(std=init_std)
    return model.to(device)


def pretrain(model_config: str | Path | ModelConfig, data: str | Path, out: str | Path, *,
             seq_len: int | None = None, device: str | torch.device | None = "auto", resume: bool = False,
             init_std: float = 0.02, save_dtype: torch.dtype | None = None, **train_options: Any) -> TrainResult:
    """Pretrain from scratch. `train_options` are TrainConfig fields (lr, max_steps, micro_batch_size, ...);
    seq_len defaults to min(model max_seq_len, 1024)."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(train_options) - known
    if unknown:
        raise ConfigError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    rank, world = init_distributed()
    prepared = load_prepared(data)
    config = resolve_model_config(model_config)
    vocab = int(prepared.manifest["vocab_size"])
    if config.vocab_size != vocab:
        if rank == 0:
            print(f"model vocab_size {config.vocab_size} -> {vocab} (the data's tokenizer)", flush=True)
        config = config.replace(vocab_size=vocab)
    seq_len = seq_len or min(config.max_seq_len, 1024)
    if seq_len > config.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    cfg = TrainConfig(out_dir=str(out), **train_options)
    dev = resolve_device(device)

    tokenizer = None
    if prepared.tokenizer_path is not None:
        from ..tokenizer import load_tokenizer

        tokenizer = load_tokenizer(prepared.tokenizer_path)

    model = build_model(config, cfg.seed, dev, init_std)
    train_src = TokenWindowSource(prepared.arrays("train"), seq_len, cfg.micro_batch_size, seed=cfg.seed)
    val_src = None
    if prepared.tokens("val") > seq_len:
        val_src = TokenWindowSource(prepared.arrays("val"), seq_len, cfg.micro_batch_size, shuffle=False)
    elif rank == 0:
        print("no validation split long enough for one window: validation is skipped", flush=True)

    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"pretraining {config.name} ({n / 1e6:.2f}M parameters) on {prepared.tokens('train'):,} tokens; "
              f"{world} process(es) x micro-batch {cfg.micro_batch_size} x accum {cfg.grad_accum_steps} x "
              f"{seq_len} tokens = {world * cfg.micro_batch_size * cfg.grad_accum_steps * seq_len:,} tokens/step",
              flush=True)
        Path(out).mkdir(parents=True, exist_ok=True)
        run = {"model_config": config.to_dict(), "data": str(data), "seq_len": seq_len, "world_size": world,
               "train": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}}
        atomic_write_text(Path(out) / "run.json", json.dumps(run, indent=2) + "\n")

    def save_fn(m: nn.Module, directory: Path) -> None:
        from ..checkpoints.hf import write_hf  # into the folder the loop swaps in

        write_hf(Path(directory), m.state_dict(), config, tokenizer, dtype=save_dtype)

    return run_training(model, train_data=train_src, val_data=val_src, cfg=cfg, save_fn=save_fn, resume=resume)


def run_pretrain_cli(model_config: str, data: str, out: str, **kwargs: Any) -> int:
    """CLI entry: prints where the result is and how to chat with it."""
    import torch.distributed as dist

    try:
        result = pretrain(model_config, data, out, **kwargs)
        rank, _ = init_distributed()
        if rank == 0:
            val = f", val loss {result.val_loss:.4f} (ppl {result.val_ppl:.2f})" if result.val_loss is not None else ""
            print(f"done: {result.step} steps{val}. Model: {result.final_dir}  Metrics: {result.out_dir}/metrics.csv, "
                  f"{result.out_dir}/loss.png\nchat with it: llamaworks chat --model {result.final_dir}")
    finally:
        if dist.is_available() and dist.is_initialized():  # torchrun: leave cleanly
            dist.destroy_process_group()
    return 0
