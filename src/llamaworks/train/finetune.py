"""`llamaworks finetune full|lora|qlora|reward`: supervised fine-tuning (or DPO) of a pretrained model.

    model (GGUF / HF / Meta)  --checkpoints.load_model-->  Transformer (float)
      full:  every parameter trains
      lora:  LoRALinear on the chosen projections, base frozen
      qlora: the seven projections of every layer to frozen NF4, then LoRA on top
    data (alpaca / sharegpt / openai / kakaotalk, or {prompt, chosen, rejected} with --dpo)
      --data.instruct / dpo-->  token ids + loss masks  --data.loader-->  batches  --train.loop-->  trained model

What OUT holds at the end (so `llamaworks chat --model OUT` opens it, `llamaworks convert` exports it):
  OUT/config.json, model.safetensors, tokenizer files   the fine-tuned model as an HF directory
                                                       (for LoRA/QLoRA the adapters merged into the base)
  OUT/adapter/                                         LoRA/QLoRA only: the PEFT adapter
  OUT/checkpoints/step-N/                              resumable checkpoints (LoRA: adapter only)
  OUT/metrics.csv, loss.png, finetune.json             the run's record

`finetune reward` trains a reward model instead (train/reward.py): the body plus a scalar head on preference
pairs; OUT is then transformers' LlamaForSequenceClassification layout (`llamaworks score --model OUT`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..files import atomic_write_text, recover_dir, replace_dir
from .lora import (
    LoRAConfig,
    apply_lora,
    lora_modules,
    merged_state_dict,
    save_adapter,
    trainable_parameter_count,
)

METHODS = ("full", "lora", "qlora", "reward")
REWARD_METHODS = ("full", "lora")
# Learning rates that work for these recipes on small data (LoRA needs ~10x the full fine-tuning rate).
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}
DEFAULT_EPOCHS = 3.0
# Small data (issue 17): 12 examples pack into one row, so 3 epochs were 3 optimizer steps at 2e-4 and the persona's
# name was never learned, while 8 steps at 2e-3 learn it. When the epochs give fewer steps than MIN_STEPS (and no
# --max-steps/--epochs/--lr is given), the run takes MIN_STEPS steps and LoRA the higher rate below: about the
# same summed learning rate as those 8 steps at 2e-3 under warmup + cosine decay.
MIN_STEPS = 16
SMALL_DATA_LORA_LR = 1e-3


@dataclass
class FinetuneConfig:
    method: str = "lora"
    model: str | None = None  # path; None = the bundled SmolLM2-135M-Instruct
    data: list[str] = field(default_factory=list)
    out: str = "out"
    val_data: list[str] = field(default_factory=list)
    # LoRA / QLoRA
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "q,k,v,o,gate,up,down"
    quant_block_size: int = 64
    double_quant: bool = False
    # DPO
    dpo: bool = False
    dpo_beta: float = 0.1
    # reward model (method "reward"): what trains under the new scalar head, and LLaMA 2's margin term
    reward_method: str = "lora"
    margin: bool = False
    # data
    seq_len: int = 1024
    pack: bool = True
    train_on_prompt: bool = False
    skip_bad: bool = False
    system: str | None = None
    chat_template: str | None = None  # built-in name or Jinja file; default: the model's own
    kakao_assistant: str | list[str] | None = None  # the persona; aliases as a list or "나,홍길동"
    kakao_gap_minutes: float = 360.0  # a silence this long starts a new conversation
    scrub: str | None = None  # kinds of personal data to replace (None: phone,email,id,account in chat exports)
    scrub_names: list[str] = field(default_factory=list)  # more names to replace
    val_fraction: float = 0.0  # share of the conversations held out for validation (when no val_data)
    preview: bool = False  # read and report the data, then stop before loading the model
    # optimisation (None = recipe default)
    lr: float | None = None
    epochs: float | None = None  # used when max_steps is None; None: 3, raised on small data (see MIN_STEPS)
    max_steps: int | None = None
    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    save_every: int = 0
    keep_last: int = 2
    eval_every: int = 0
    log_every: int = 10
    precision: str = "auto"
    activation_checkpointing: bool = False
    seed: int = 1337
    device: str | None = None  # None/"auto": cuda if available, else cpu
    dtype: str | None = None  # weights' dtype (default float32; bf16 halves memory on GPUs)
    save_dtype: str | None = None  # dtype of the saved model (default: the training dtype)
    resume: bool = False
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"finetune method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.reward_method not in REWARD_METHODS:
            raise ConfigError(f"--reward-method must be one of {', '.join(REWARD_METHODS)}, got "
                              f"{self.reward_method!r}")
        if self.method == "reward" and self.dpo:
            raise ConfigError("finetune reward trains a reward model on preference pairs; --dpo is for a policy")
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        if isinstance(self.val_data, (str, Path)):
            self.val_data = [str(self.val_data)]
        if not self.data:
            raise ConfigError("--data: give at least one training file")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_fraction and self.val_data:
            raise ConfigError("--val-fraction and --val-data both choose validation data; give one")
        if self.val_fraction and self.pairs:
            raise ConfigError("--val-fraction is for SFT data; with preference pairs give --val-data FILE")
        if self.seq_len < 8:
            raise ConfigError(f"--seq-len must be >= 8, got {self.seq_len}")

    @property
    def pairs(self) -> bool:
        """Whether the data is preference pairs (DPO, reward model) rather than SFT conversations."""
        return self.dpo or self.method == "reward"

    @property
    def trains(self) -> str:
        """What trains: full, lora or qlora (a reward model's body trains as --reward-method says)."""
        return self.reward_method if self.method == "reward" else self.method

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=self.lora_targets)


@dataclass
class FinetuneResult:
    out_dir: Path
    adapter_dir: Path | None
    steps: int
    train_loss: float | None
    val_loss: float | None
    trainable_params: int
    total_params: int
    seconds: float
    steps_per_s: float
    peak_memory_bytes: int | None
    history: list[dict[str, Any]]


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16}


def parse_dtype(name: str | None, option: str = "--dtype") -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"{option}: unknown dtype {name!r}; expected one of {', '.join(_DTYPES)}") from None


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare_model(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """Make `model` trainable for the recipe: all weights (full), LoRA adapters, or NF4 base + LoRA; a reward
    model's body as `cfg.reward_method` says, its score head always."""
    from .reward import RewardModel

    if isinstance(model, RewardModel):
        prepare_model(model.body, cfg)
        model.score.weight.requires_grad_(True)
        return model
    if cfg.trains == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.trains == "qlora":
        from ..quant.nf4 import quantize_model_nf4

        quantize_model_nf4(model, block_size=cfg.quant_block_size, double_quant=cfg.double_quant)
    # Adapters are initialised from the run's seed so a resumed run rebuilds identical modules before loading.
    torch.manual_seed(cfg.seed)
    return apply_lora(model, cfg.lora_config())


def _template(tokenizer: Any, override: str | None) -> Any:
    from ..chat_template import template_for

    return template_for(tokenizer, override)


def load_sft_data(paths: list[str], tokenizer: Any, template: Any, cfg: FinetuneConfig, *,
                  quiet: bool = False) -> Any:
    """The SFTDataset of `paths` as this run reads it; prints what was dropped, split, cut and scrubbed."""
    from ..data.instruct import load_sft_dataset, report_bad

    ds = load_sft_dataset(paths, tokenizer, template=template, train_on_prompt=cfg.train_on_prompt,
                          skip_bad=cfg.skip_bad, max_seq_len=cfg.seq_len, kakao_assistant=cfg.kakao_assistant,
                          system=cfg.system, kakao_gap_minutes=cfg.kakao_gap_minutes, scrub=cfg.scrub,
                          scrub_names=cfg.scrub_names)
    if ds.bad and not quiet:
        print(f"skipped {len(ds.bad)} malformed record(s):\n{report_bad(ds.bad)}", flush=True)
    if not quiet:
        print(ds.report.summary(), flush=True)
    return ds


def _example_source(ds: Any, tokenizer: Any, cfg: FinetuneConfig, *, train: bool) -> Any:
    from ..data.loader import ExampleBatchSource

    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    src = ExampleBatchSource(ds.examples, cfg.seq_len, cfg.micro_batch_size, pack=cfg.pack, pad_id=pad,
                             shuffle=train, seed=cfg.seed)
    src.n_examples = len(ds.examples)  # for the summary line
    return src


def _sft_source(paths: list[str], tokenizer: Any, template: Any, cfg: FinetuneConfig, *, train: bool) -> Any:
    src = _example_source(load_sft_data(paths, tokenizer, template, cfg), tokenizer, cfg, train=train)
    return src, src.rows_per_epoch


def _dpo_source(paths: list[str], tokenizer: Any, template: Any, cfg: FinetuneConfig, *, train: bool) -> Any:
    from .dpo import PreferenceBatchSource, load_preferences

    pairs = [p for path in paths for p in load_preferences(path, tokenizer, template, system=cfg.system)]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    src = PreferenceBatchSource(pairs, cfg.seq_len, cfg.micro_batch_size, pad_id=pad, shuffle=train, seed=cfg.seed,
                                whole=cfg.method == "reward")
    src.n_examples = len(pairs)
    return src, len(pairs)


def make_save_fn(cfg: FinetuneConfig, config: Any, tokenizer: Any, chat_template: str | None,
                 generation_config: dict, *, merged: bool) -> Any:
    """save_fn(model, dir): the HF model (LoRA merged in) when `merged`, and the PEFT adapter for LoRA recipes."""
    from ..checkpoints.hf import write_hf

    save_dtype = parse_dtype(cfg.save_dtype, "--save-dtype")
    base_name = cfg.model or "SmolLM2-135M-Instruct"

    def save(model: nn.Module, directory: Path) -> None:
        directory = Path(directory)
        if cfg.method == "reward":  # always the whole reward model (adapters folded in): score.weight needs a body
            from .reward import write_reward_model

            write_reward_model(directory, model, tokenizer, chat_template=chat_template, dtype=save_dtype)
            return
        has_lora = bool(lora_modules(model))
        if has_lora:
            save_adapter(model, directory / "adapter" if merged else directory, base_model=base_name)
        if merged or not has_lora:
            sd = merged_state_dict(model) if has_lora else model.state_dict()
            write_hf(directory, sd, config, tokenizer, chat_template=chat_template, dtype=save_dtype,
                     generation_config=generation_config or None)

    return save


def _final_output(name: str) -> bool:
    """What finetune's final save writes into OUT (replaced whole, never kept from an earlier run)."""
    from ..checkpoints.hf import is_hf_model_file

    return is_hf_model_file(name) or name in ("adapter", "finetune.json")


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Run one fine-tuning recipe end to end and write OUT (see the module docstring)."""
    from ..checkpoints import load_model
    from .loop import TrainConfig, run_training

    if cfg.preview:
        preview(cfg)
        return FinetuneResult(Path(cfg.out), None, 0, None, None, 0, 0, 0.0, 0.0, None, [])
    out = Path(cfg.out)
    recover_dir(out)  # a run killed in the middle of swapping in its final model (systems without renameat2)
    device = resolve_device(cfg.device)
    model, tokenizer, ckpt = load_model(cfg.model, dtype=parse_dtype(cfg.dtype), device=device)
    if tokenizer is None:
        raise ConfigError(f"{ckpt.path}: the checkpoint has no tokenizer; fine-tuning needs one to read the data")
    template = _template(tokenizer, cfg.chat_template)
    chat_template_source = getattr(template, "source", None) or ckpt.chat_template

    data_report: dict[str, Any] = {}
    if cfg.val_fraction and not cfg.pairs:
        train_ds, val_ds = load_sft_data(cfg.data, tokenizer, template, cfg).split(cfg.val_fraction, cfg.seed)
        print(f"validation: {val_ds.conversations} of {train_ds.conversations + val_ds.conversations} "
              f"conversation(s) held out ({len(val_ds.examples)} example(s), --val-fraction {cfg.val_fraction})",
              flush=True)
        train_src = _example_source(train_ds, tokenizer, cfg, train=True)
        rows = train_src.rows_per_epoch
        val_src = _example_source(val_ds, tokenizer, cfg, train=False)
        data_report = _report_dict(train_ds.report, val_examples=len(val_ds.examples))
    elif cfg.pairs:
        train_src, rows = _dpo_source(cfg.data, tokenizer, template, cfg, train=True)
        val_src = _dpo_source(cfg.val_data, tokenizer, template, cfg, train=False)[0] if cfg.val_data else None
    else:
        train_ds = load_sft_data(cfg.data, tokenizer, template, cfg)
        data_report = _report_dict(train_ds.report)
        train_src = _example_source(train_ds, tokenizer, cfg, train=True)
        rows = train_src.rows_per_epoch
        val_src = _sft_source(cfg.val_data, tokenizer, template, cfg, train=False)[0] if cfg.val_data else None

    if cfg.method == "reward":
        from .reward import RewardModel, default_pad_id

        torch.manual_seed(cfg.seed)  # the new head's initialisation
        model = RewardModel(model, default_pad_id(tokenizer))
    prepare_model(model, cfg)
    trainable, total = trainable_parameter_count(model)
    from .loop import rank_and_world

    schedule = choose_schedule(cfg, rows, train_src.n_examples, world=rank_and_world()[1])
    max_steps, micro_batch = schedule.steps, schedule.micro_batch_size
    train_src.micro_batch_size = micro_batch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(100, max_steps // 10)
    if schedule.note:
        print(schedule.note, flush=True)
    recipe = f"reward ({cfg.trains})" if cfg.method == "reward" else cfg.method + (" + DPO" if cfg.dpo else "")
    print(f"finetune {recipe}: {ckpt.config.name} on {device}, "
          f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%), "
          f"{train_src.n_examples} examples, {max_steps} steps at lr {schedule.lr:g}", flush=True)

    loss_fn = None
    if cfg.method == "reward":
        from .reward import RewardLoss

        loss_fn = RewardLoss(use_margin=cfg.margin)
    elif cfg.dpo:
        from .dpo import DPOLoss, frozen_reference

        loss_fn = DPOLoss(beta=cfg.dpo_beta, reference=frozen_reference(model) if cfg.method == "full" else None)

    lora = cfg.trains != "full"
    tcfg = TrainConfig(lr=schedule.lr, warmup_steps=warmup, max_steps=max_steps,
                       micro_batch_size=micro_batch, grad_accum_steps=cfg.grad_accum_steps,
                       weight_decay=cfg.weight_decay, eval_every=cfg.eval_every, save_every=cfg.save_every,
                       keep_last=cfg.keep_last, log_every=cfg.log_every, precision=cfg.precision,
                       activation_checkpointing=cfg.activation_checkpointing, seed=cfg.seed, out_dir=out,
                       progress=cfg.progress, tensorboard=cfg.tensorboard, plot=cfg.plot, save_final=False,
                       eval_batches=0 if val_src is not None and not cfg.dpo else 10)  # SFT/reward: all of it
    generation_config = dict(ckpt.generation_config or {})
    # Intermediate checkpoints of LoRA runs hold only the adapter (MBs, not the whole model again).
    ckpt_save = make_save_fn(cfg, ckpt.config, tokenizer, chat_template_source, generation_config, merged=not lora)
    final_save = make_save_fn(cfg, ckpt.config, tokenizer, chat_template_source, generation_config, merged=True)

    val_before = None
    if val_src is not None and not cfg.dpo and not cfg.resume:
        # The same held-out rows before any step (a fresh LoRA adapter changes nothing): the report's "before".
        from .loop import evaluate

        val_before = evaluate(model, val_src, 0, loss_fn=loss_fn)[0]
        print(f"validation loss before training {val_before:.4f} (perplexity {math.exp(min(val_before, 50)):.2f})",
              flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = run_training(model, train_data=train_src, val_data=val_src, loss_fn=loss_fn, cfg=tcfg,
                          save_fn=ckpt_save, resume=cfg.resume)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss()

    if rank_and_world()[0] == 0:
        model.eval()
        summary = {"config": asdict(cfg), "steps": result.step, "train_loss": result.train_loss,
                   "val_loss": result.val_loss, "val_ppl": result.val_ppl, "val_loss_before": val_before,
                   "trainable_params": trainable, "total_params": total, "seconds": seconds, "data": data_report,
                   "schedule": asdict(schedule)}
        if cfg.method == "reward" and val_src is not None:
            from .reward import pairwise_accuracy

            accuracy, n_pairs = pairwise_accuracy(model, val_src)
            summary.update(val_accuracy=accuracy, val_pairs=n_pairs)
            print(f"held-out pairwise accuracy {accuracy:.4f} ({n_pairs} pairs)", flush=True)
        # OUT is rebuilt beside itself and swapped in whole: a kill leaves the old model or the new one, never
        # new weights beside an old config.json. Checkpoints, metrics and logs are carried over (hard links).
        with replace_dir(out, drop=_final_output) as stage:
            final_save(model, stage)
            atomic_write_text(stage / "finetune.json", json.dumps(summary, indent=2, default=str) + "\n")
        if result.val_loss is not None and cfg.method != "reward":
            print(f"validation loss {result.val_loss:.4f} (perplexity {result.val_ppl:.2f}) after {result.step} "
                  "steps", flush=True)
        if cfg.method == "reward":
            print(f"saved the reward model to {out}; score with: llamaworks score --model {out} FILE", flush=True)
        else:
            where = f"{out}" + (f" (adapter: {out / 'adapter'})" if lora else "")
            print(f"saved the fine-tuned model to {where}; chat with: llamaworks chat --model {out}", flush=True)
    done_steps = max(0, result.step)
    has_adapter = lora and cfg.method != "reward"
    return FinetuneResult(out_dir=out, adapter_dir=out / "adapter" if has_adapter else None, steps=done_steps,
                          train_loss=result.train_loss, val_loss=result.val_loss, trainable_params=trainable,
                          total_params=total, seconds=seconds, steps_per_s=done_steps / seconds if seconds else 0.0,
                          peak_memory_bytes=peak, history=result.history)


@dataclass
class Schedule:
    steps: int
    lr: float
    micro_batch_size: int
    note: str = ""  # why the defaults were changed (printed and kept in finetune.json)


def choose_schedule(cfg: FinetuneConfig, rows: int, examples: int, world: int = 1) -> Schedule:
    """Optimizer steps, learning rate and micro-batch for `rows` training rows per epoch.

    What the user set is kept. Otherwise, on small data (DEFAULT_EPOCHS giving fewer than MIN_STEPS steps): the
    micro-batch is cut to the rows there are (a batch of copies of one row only costs time), the run takes
    MIN_STEPS steps, and LoRA/QLoRA train at SMALL_DATA_LORA_LR."""
    micro = cfg.micro_batch_size
    lr = cfg.lr or DEFAULT_LR[cfg.trains]
    per_step = lambda mb: mb * cfg.grad_accum_steps * world
    steps_per_epoch = max(1, math.ceil(rows / per_step(micro)))
    if cfg.max_steps:
        return Schedule(cfg.max_steps, lr, micro)
    if cfg.epochs is not None:
        return Schedule(max(1, round(cfg.epochs * steps_per_epoch)), lr, micro)
    steps = max(1, round(DEFAULT_EPOCHS * steps_per_epoch))
    if steps >= MIN_STEPS:
        return Schedule(steps, lr, micro)
    before = (steps, lr)
    micro = max(1, min(micro, math.ceil(rows / (cfg.grad_accum_steps * world))))
    steps_per_epoch = max(1, math.ceil(rows / per_step(micro)))
    steps = max(MIN_STEPS, round(DEFAULT_EPOCHS * steps_per_epoch))
    if cfg.lr is None and cfg.trains != "full":
        lr = SMALL_DATA_LORA_LR
    note = (f"small data: {examples} example(s) fill {rows} row(s) of {cfg.seq_len} tokens, so {DEFAULT_EPOCHS:g} "
            f"epochs would be {before[0]} optimizer step(s) at lr {before[1]:g}, too few to learn anything; "
            f"training {steps} steps ({steps / steps_per_epoch:.0f} epochs) at lr {lr:g}, micro-batch {micro} "
            "(--max-steps, --epochs, --lr choose otherwise)")
    return Schedule(steps, lr, micro, note)


def _report_dict(report: Any, **extra: Any) -> dict[str, Any]:
    """The numbers of a DataReport for finetune.json."""
    return {"conversations": report.conversations, "examples": report.examples,
            "split_conversations": report.split_conversations, "windows": report.windows,
            "truncated_examples": report.truncated, "truncated_tokens": report.truncated_tokens,
            "dropped_examples": report.dropped_examples, "dropped_tokens": report.dropped_tokens,
            "dropped_messages": dict(report.kakao.dropped), "duplicate_conversations": report.duplicates,
            "scrubbed": dict(report.scrubbed), **extra}


def preview(cfg: FinetuneConfig) -> str:
    """`finetune --preview`: read the data exactly as training would (tokenizer only, no weights), print the
    `data inspect` report with token counts, and stop."""
    from ..data.inspect import format_report
    from ..data.prepare import resolve_tokenizer

    tokenizer = resolve_tokenizer(cfg.model or "default")
    template = _template(tokenizer, cfg.chat_template)
    ds = load_sft_data(cfg.data, tokenizer, template, cfg, quiet=True)
    text = format_report(ds.report, ds.parsed, dataset=ds, bad=ds.bad)
    if cfg.val_fraction:
        train_ds, val_ds = ds.split(cfg.val_fraction, cfg.seed)
        text += (f"\nvalidation: {val_ds.conversations} conversation(s) held out, {train_ds.conversations} "
                 "for training")
    print(text, flush=True)
    print("preview only: nothing was trained (drop --preview to train)", flush=True)
    return text


def _peak_rss() -> int | None:
    """Peak resident memory of this process in bytes (None where unknown)."""
    from ..memory_stats import peak_rss_bytes

    return peak_rss_bytes()


def run_finetune(**kwargs: Any) -> int:
    """CLI entry: FinetuneConfig fields as keyword arguments."""
    finetune(FinetuneConfig(**kwargs))
    return 0


__all__ = ["DEFAULT_LR", "METHODS", "MIN_STEPS", "SMALL_DATA_LORA_LR", "FinetuneConfig", "FinetuneResult", "Schedule",
           "choose_schedule", "finetune", "make_save_fn", "prepare_model", "run_finetune"]
