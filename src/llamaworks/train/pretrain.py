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
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

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


TRAIN_PARTS = ("all", "new-rows", "lora-embeddings")


def update_only_seen_rows(model: nn.Module, first_row: int = 0) -> None:
    """Embedding (and untied output) rows >= `first_row` of tokens absent from a micro-batch's input get no gradient;
    rows below `first_row` never do.

    Why: the softmax gives every row a tiny push-down gradient, and Adam normalises it per coordinate, so with small
    continued-pretraining batches every one of 50K rows moves by about the learning rate at every step whether its
    token occurred or not; through tied embeddings that also corrupts the rarely seen inputs (the loss rises). Rows
    of tokens in the batch train as usual. With no weight decay, rows never seen stay bit for bit."""
    seen: dict[str, Tensor] = {}

    def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled():
            seen["ids"] = args[0].detach().flatten().unique()

    def mask(grad: Tensor) -> Tensor:
        keep = torch.zeros(grad.shape[0], 1, dtype=grad.dtype, device=grad.device)
        if "ids" in seen:
            keep[seen["ids"]] = 1
        keep[:first_row] = 0
        return grad * keep

    model.tok_embeddings.register_forward_pre_hook(record)
    for w in [model.tok_embeddings.weight] + ([model.output.weight] if model.output is not None else []):
        if w.requires_grad:
            w.register_hook(mask)


def freeze_to_new_rows(model: nn.Module, first_new: int) -> int:
    """Stage 1 of vocabulary extension: only the embedding (and untied output) rows >= `first_new` train.

    Every other parameter stops requiring gradients; the old rows (and new rows whose token is not in the batch:
    `update_only_seen_rows`) get zero gradients, so with no weight decay AdamW leaves them bit for bit as they were.
    Returns the number of trainable values."""
    rows = model.tok_embeddings.weight.shape[0]
    if not 0 < first_new < rows:
        raise ConfigError(f"new rows start at id {first_new}, but the embedding has {rows} rows: nothing new to train")
    for p in model.parameters():
        p.requires_grad_(False)
    heads = [model.tok_embeddings.weight] + ([model.output.weight] if model.output is not None else [])
    for w in heads:
        w.requires_grad_(True)
    update_only_seen_rows(model, first_new)
    return sum((w.shape[0] - first_new) * w.shape[1] for w in heads)


def _init_model(init: str | Path, vocab: int, dev: torch.device) -> tuple[nn.Module, ModelConfig, Any, dict]:
    """(model, config, tokenizer, vocab_extension.json or {}) of a checkpoint to continue pretraining."""
    from ..checkpoints import load_model
    from ..files import read_json
    from ..tokenizer_extend import EXTENSION_FILE

    model, tokenizer, ckpt = load_model(init, device=dev)
    if ckpt.config.vocab_size != vocab:
        raise ConfigError(f"--init {init}: the model has {ckpt.config.vocab_size} embedding rows but the data was "
                          f"tokenized with a {vocab}-token vocabulary; run `llamaworks data prepare --tokenizer "
                          f"{init}` first")
    marker = Path(init) / EXTENSION_FILE
    extension = read_json(marker) if marker.is_file() else {}
    return model, ckpt.config, tokenizer, extension if isinstance(extension, dict) else {}


def pretrain(model_config: str | Path | ModelConfig | None, data: str | Path, out: str | Path, *,
             seq_len: int | None = None, device: str | torch.device | None = "auto", resume: bool = False,
             init_std: float = 0.02, save_dtype: torch.dtype | None = None, init: str | Path | None = None,
             train: str = "all", mix_data: str | Path | None = None, mix_ratio: float = 0.0,
             lora: Any = None, **train_options: Any) -> TrainResult:
    """Pretrain from scratch, or continue pretraining `init` (a checkpoint). `train_options` are TrainConfig
    fields (lr, max_steps, micro_batch_size, ...); seq_len defaults to min(model max_seq_len, 1024).

    `train="new-rows"` (with `init` from `llamaworks tokenizer extend`) trains only the new embedding/output
    rows; `train="lora-embeddings"` trains LoRA adapters (`lora`: a LoRAConfig; default rank 8 on every
    projection) plus the whole embedding (and untied output) matrix, PEFT's `modules_to_save`, and saves the merged
    model with the adapter in `final/adapter`; `mix_data` (another `data prepare` output, same tokenizer) supplies
    a `mix_ratio` share of the rows, e.g. English text while continuing on Korean, to limit forgetting."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(train_options) - known
    if unknown:
        raise ConfigError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    if train not in TRAIN_PARTS:
        raise ConfigError(f"--train must be one of {', '.join(TRAIN_PARTS)}, got {train!r}")
    if train != "all" and init is None:
        raise ConfigError(f"--train {train} continues a model: give --init MODEL")
    if not 0 <= mix_ratio < 1 or (mix_ratio > 0) != (mix_data is not None):
        raise ConfigError(f"--mix-ratio {mix_ratio}: give --mix-data DIR with a ratio in (0, 1)")
    if (model_config is None) == (init is None):
        raise ConfigError("give either --model-config PRESET (from scratch) or --init MODEL (continue a model)")
    if train == "new-rows":
        train_options["weight_decay"] = 0.0  # decay would move the frozen old rows (they get zero gradients)
    rank, world = init_distributed()
    prepared = load_prepared(data)
    vocab = int(prepared.manifest["vocab_size"])
    mixed = load_prepared(mix_data) if mix_data is not None else None
    if mixed is not None and int(mixed.manifest["vocab_size"]) != vocab:
        raise ConfigError(f"--mix-data {mix_data}: tokenized with {mixed.manifest['vocab_size']} tokens, --data "
                          f"with {vocab}: prepare both with the same --tokenizer")
    dev = resolve_device(device)
    extension: dict = {}
    if init is not None:
        model, config, init_tokenizer, extension = _init_model(init, vocab, dev)
    else:
        config = resolve_model_config(model_config)  # type: ignore[arg-type]
    if init is None and config.vocab_size != vocab:
        if rank == 0:
            print(f"model vocab_size {config.vocab_size} -> {vocab} (the data's tokenizer)", flush=True)
        config = config.replace(vocab_size=vocab)
    seq_len = seq_len or min(config.max_seq_len, 1024)
    if seq_len > config.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    cfg = TrainConfig(out_dir=str(out), **train_options)

    tokenizer = None
    if prepared.tokenizer_path is not None:
        from ..tokenizer import load_tokenizer

        tokenizer = load_tokenizer(prepared.tokenizer_path)

    if init is None:
        model = build_model(config, cfg.seed, dev, init_std)
    else:
        tokenizer = init_tokenizer or tokenizer  # the model's own (chat template, stops) goes with it
        model.train()
        if train == "new-rows":
            first_new = extension.get("base_vocab")
            if not isinstance(first_new, int):
                raise ConfigError(f"--init {init}: no vocab_extension.json with base_vocab (written by `llamaworks "
                                  "tokenizer extend`): cannot tell the new rows apart")
            n_new = freeze_to_new_rows(model, first_new)
            if rank == 0:
                print(f"training only the {config.vocab_size - first_new} new embedding rows (ids {first_new}+; "
                      f"{n_new:,} values)", flush=True)
        else:
            if train == "lora-embeddings":
                from .lora import LoRAConfig, apply_lora, embedding_modules, trainable_parameter_count

                base = lora if lora is not None else LoRAConfig()
                apply_lora(model, replace(base, modules_to_save=embedding_modules(model)))
                if rank == 0:
                    n_train, n_all = trainable_parameter_count(model)
                    print(f"training LoRA (rank {base.rank} on {','.join(base.targets)}) and the embeddings "
                          f"({', '.join(embedding_modules(model))}): {n_train:,} of {n_all:,} values", flush=True)
            update_only_seen_rows(model)
    train_src: Any = TokenWindowSource(prepared.arrays("train"), seq_len, cfg.micro_batch_size, seed=cfg.seed)
    if mixed is not None:
        from ..data.loader import MixedWindowSource

        train_src = MixedWindowSource(prepared.arrays("train"), mixed.arrays("train"), mix_ratio, seq_len,
                                      cfg.micro_batch_size, seed=cfg.seed)
    val_src = None
    if prepared.tokens("val") > seq_len:
        val_src = TokenWindowSource(prepared.arrays("val"), seq_len, cfg.micro_batch_size, shuffle=False)
    elif rank == 0:
        print("no validation split long enough for one window: validation is skipped", flush=True)

    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        verb = "continuing" if init is not None else "pretraining"
        print(f"{verb} {config.name} ({n / 1e6:.2f}M parameters) on {prepared.tokens('train'):,} tokens; "
              f"{world} process(es) x micro-batch {cfg.micro_batch_size} x accum {cfg.grad_accum_steps} x "
              f"{seq_len} tokens = {world * cfg.micro_batch_size * cfg.grad_accum_steps * seq_len:,} tokens/step",
              flush=True)
        Path(out).mkdir(parents=True, exist_ok=True)
        run = {"model_config": config.to_dict(), "data": str(data), "seq_len": seq_len, "world_size": world,
               "init": str(init) if init is not None else None, "train_part": train,
               "lora": lcfg.to_peft(str(init)) if (lcfg := getattr(model, "lora_config", None)) else None,
               "mix_data": str(mix_data) if mix_data is not None else None, "mix_ratio": mix_ratio,
               "train": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}}
        atomic_write_text(Path(out) / "run.json", json.dumps(run, indent=2) + "\n")

    def save_fn(m: nn.Module, directory: Path) -> None:
        from ..checkpoints.hf import write_hf  # into the folder the loop swaps in
        from .lora import lora_modules, merged_state_dict, save_adapter

        if lora_modules(m):  # the merged model (chat, convert) and the PEFT adapter over the --init model
            save_adapter(m, Path(directory) / "adapter", base_model=str(init), dtype=save_dtype)
            write_hf(Path(directory), merged_state_dict(m), config, tokenizer, dtype=save_dtype)
        else:
            write_hf(Path(directory), m.state_dict(), config, tokenizer, dtype=save_dtype)

    return run_training(model, train_data=train_src, val_data=val_src, cfg=cfg, save_fn=save_fn, resume=resume)


def run_pretrain_cli(model_config: str | None, data: str, out: str, **kwargs: Any) -> int:
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
