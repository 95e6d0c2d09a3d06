"""`llamaworks <verb>`: argument parsing only; each verb calls one function elsewhere.

Adding a verb: write one `_add_<verb>(subparsers)` function that creates its parser, adds options
(reuse `add_model_options` / `add_sampling_options`) and sets `run=` to a function that imports the
implementation lazily and calls it; then append `_add_<verb>` to `VERBS`. `run` returns an exit code
(None means 0). Bad input raised as LlamaworksError / ValueError / FileNotFoundError is printed as one
`error: ...` line with exit code 2 (set LLAMAWORKS_DEBUG=1 for the traceback).
`--threads` is added to every verb automatically; verbs that never touch torch set `needs_torch=False` (or a
function of the parsed arguments: chat/generate/serve/bench on the native backend never import torch).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from . import __version__
from .hardware import physical_cores

Subparsers = Any  # argparse's _SubParsersAction is private


# -- shared option groups ----------------------------------------------------------------------------
def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype, --chat-template, --max-context, --reference, --mmap, --backend."""
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", metavar="PATH", default=None,
                   help="GGUF file, Hugging Face or Meta checkpoint directory (default: bundled SmolLM2-135M-Instruct)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                   help="compute dtype (default: chosen by the checkpoint loader)")
    g.add_argument("--chat-template", metavar="NAME|FILE", default=None,
                   help="built-in template (llama-2, llama-3, chatml, alpaca, vicuna) or a Jinja file; "
                        "default: the model's own")
    g.add_argument("--max-context", type=int, metavar="N", default=None,
                   help="use at most N context positions (default: the model's maximum)")
    g.add_argument("--reference", action="store_true",
                   help="dequantize a GGUF to float and run the float reference on the torch backend")
    g.add_argument("--mmap", action="store_true",
                   help="keep a GGUF's quantized weights memory-mapped from the file (the OS may evict them under "
                        "memory pressure) instead of reading them into huge pages (faster decode)")
    add_backend_options(g)
    p.set_defaults(needs_torch=_needs_torch)


def add_backend_options(g: Any) -> None:
    """--backend and --cpu-target (a parser or an argument group)."""
    g.add_argument("--backend", choices=["auto", "native", "torch"], default="auto",
                   help="native: the C++ kernels, torch never imported (GGUF on the CPU); torch: model.py on torch "
                        "(CUDA, other formats, the float reference); auto (default): native where it applies")
    g.add_argument("--cpu-target", default="native", metavar="MARCH",
                   help="native backend: build its kernels for another CPU class to measure or test them here, a "
                        "-march value such as x86-64-v3 (AVX2+FMA+F16C) or x86-64-v2 (the scalar reference); "
                        "default: native (this CPU)")


def _needs_torch(args: argparse.Namespace) -> bool:
    """Whether this run loads a model on the torch backend (else torch is never imported)."""
    from .api import choose_backend

    return choose_backend(args.backend, args.model, args.device, args.dtype, reference=args.reference) == "torch"


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.model, "device": args.device, "dtype": args.dtype,
            "chat_template": args.chat_template, "max_context": args.max_context, "reference": args.reference,
            "mmap": True if args.mmap else None, "backend": args.backend, "threads": args.threads,
            "cpu_target": args.cpu_target}


def add_sampling_options(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """Sampling flags; unset flags keep the model's defaults (generation_config, else temperature 0.7)."""
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", "-t", type=float, default=None, help="0 = greedy (default 0.7)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (1 = off)")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below MIN_P x the best probability")
    g.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (1 = off)")
    g.add_argument("--presence-penalty", type=float, default=None, help="subtract from seen tokens' logits")
    g.add_argument("--frequency-penalty", type=float, default=None, help="subtract count x value from logits")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=max_tokens, dest="max_new_tokens",
                   help=f"maximum tokens per reply (default {max_tokens})")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when TEXT is generated (repeatable; \\n and \\t are understood)")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "seed", "max_new_tokens", "stop")
    out = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if "stop" in out:  # shells make a literal newline awkward to type
        out["stop"] = [s.replace("\\n", "\n").replace("\\t", "\t") for s in out["stop"]]
    return out


# -- verbs -------------------------------------------------------------------------------------------
def _add_chat(sub: Subparsers) -> None:
    p = sub.add_parser("chat", help="talk to a model in the terminal (or pipe one message per line)",
                       description="Multi-turn chat with streaming output. Commands: /reset, /system TEXT, "
                                   "/help, /exit. With piped stdin each line is one user turn.")
    add_model_options(p)
    add_sampling_options(p, max_tokens=512)
    p.add_argument("--system", "-s", default=None, help="system prompt")

    def run(a: argparse.Namespace) -> int:
        from .chat import run_chat

        return run_chat(**model_kwargs(a), system=a.system, **sampling_kwargs(a))

    p.set_defaults(run=run)


def _add_generate(sub: Subparsers) -> None:
    p = sub.add_parser("generate", help="complete a prompt (raw text unless --chat)")
    add_model_options(p)
    add_sampling_options(p, max_tokens=128)
    p.add_argument("--prompt", "-p", required=True, help="the prompt text ('-' reads stdin)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")

    def run(a: argparse.Namespace) -> int:
        from .chat import run_generate

        prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
        return run_generate(prompt, **model_kwargs(a), chat=a.chat, system=a.system, stream=a.stream,
                            stats=a.stats, **sampling_kwargs(a))

    p.set_defaults(run=run)


def format_param_count(n: int) -> str:
    """135M, 1.1B, 7.0B."""
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e7:
        return f"{n / 1e6:.0f}M"
    return f"{n / 1e6:.1f}M"


def print_presets() -> int:
    from .config import PRESETS

    rows = [("name", "params", "layers", "dim", "heads", "kv", "context", "vocab")]
    for name, c in PRESETS.items():
        rows.append((name, format_param_count(c.n_params), str(c.n_layers), str(c.dim), str(c.n_heads),
                     str(c.kv_heads), str(c.max_seq_len), str(c.vocab_size)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))))
    return 0


def _add_models(sub: Subparsers) -> None:
    p = sub.add_parser("models", help="list the built-in model shapes (presets) with parameter counts")
    p.set_defaults(run=lambda a: print_presets(), needs_torch=False)


def _add_convert(sub: Subparsers) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between GGUF, Hugging Face and Meta formats")
    p.add_argument("src", help="source checkpoint (GGUF file, HF or Meta directory)")
    p.add_argument("dst", help="destination file (gguf) or directory (hf, meta)")
    p.add_argument("--to", required=True, choices=["hf", "gguf", "meta"], help="output format")
    p.add_argument("--dtype", default=None, help="output float dtype f32, f16 or bf16 (default: the source's "
                   "precision; GGUF output keeps a GGUF's own types and writes float weights as F16/BF16)")
    p.add_argument("--quant", default=None, help="GGUF quantization mix as llama.cpp's llama-quantize makes it: "
                   "q4_k_m, q5_k_m, q6_k, q8_0 (also q4_0, q4_1, q5_0, q5_1)")

    def run(a: argparse.Namespace) -> int:
        from .checkpoints.convert import convert

        print(f"wrote {convert(a.src, a.dst, a.to, dtype=a.dtype, quant=a.quant)}")
        return 0

    p.set_defaults(run=run)


def _add_serve(sub: Subparsers) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible API server with continuous batching and a web chat page")
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 route")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--queue-size", type=int, default=64, help="waiting requests before answering 503 (default 64)")
    p.add_argument("--model-name", default=None, help="model id clients use (default: the checkpoint's name)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                   help="largest request body accepted; larger ones get 413 (default 4194304 = 4 MiB)")

    def run(a: argparse.Namespace) -> int:
        from .serve.app import serve

        return serve(**model_kwargs(a), host=a.host, port=a.port, api_key=a.api_key, max_batch=a.max_batch,
                     queue_size=a.queue_size, model_name=a.model_name, max_body_bytes=a.max_body_bytes)

    p.set_defaults(run=run)


def _add_data(sub: Subparsers) -> None:
    p = sub.add_parser("data", help="prepare pretraining data (tokenize text into shards); inspect chat data")
    data_sub = p.add_subparsers(dest="data_command", metavar="<command>", required=True)
    q = data_sub.add_parser("prepare", help="text/JSONL/Parquet files -> tokenized train/val shards + manifest")
    q.add_argument("sources", nargs="+", metavar="SRC", help="files or directories (.txt, .jsonl, .json, .parquet)")
    q.add_argument("--tokenizer", required=True, metavar="MODEL",
                   help="tokenizer or model (GGUF file, HF dir, tokenizer.json/.model), or 'default'")
    q.add_argument("--out", "-o", required=True, metavar="DIR", help="output directory")
    q.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    q.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    q.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text (default: text)")
    q.add_argument("--no-eos", action="store_true", help="do not append EOS after each document")
    q.add_argument("--skip-bad", action="store_true", help="report malformed records and continue")
    q.add_argument("--shard-tokens", type=int, default=2**28, help="tokens per shard file")

    def run(a: argparse.Namespace) -> int:
        from .data.prepare import prepare_corpus

        prepare_corpus(a.sources, a.tokenizer, a.out, val_fraction=a.val_fraction, seed=a.seed,
                       text_field=a.text_field, add_eos=not a.no_eos, skip_bad=a.skip_bad,
                       shard_tokens=a.shard_tokens)
        return 0

    q.set_defaults(run=run, needs_torch=False)

    i = data_sub.add_parser("inspect", help="show how chat/instruction data will be read, before training",
                            description="Per file: format, encoding, messages per speaker; what is dropped and "
                                        "why, what is scrubbed, and the first conversations as they will be "
                                        "trained. With --tokenizer: token counts and what --seq-len splits or cuts.")
    i.add_argument("sources", nargs="+", metavar="FILE", help="KakaoTalk exports, JSONL/JSON files or directories")
    add_chat_data_options(i)
    i.add_argument("--system", default=None, help="system prompt added to every example")
    i.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="also count tokens with this tokenizer/model ('default': the bundled model)")
    i.add_argument("--seq-len", type=int, default=1024, help="row length to check against (with --tokenizer)")
    i.add_argument("--chat-template", default=None, metavar="NAME|FILE", help="default: the model's own")
    i.add_argument("--show", type=int, default=3, help="conversations to print (default 3)")

    def run_inspect(a: argparse.Namespace) -> int:
        from .data.inspect import inspect_main

        return inspect_main(paths=a.sources, kakao_assistant=a.kakao_assistant,
                            kakao_gap_minutes=a.kakao_gap_minutes, scrub=a.scrub, scrub_names=a.scrub_name,
                            tokenizer=a.tokenizer, seq_len=a.seq_len, chat_template=a.chat_template,
                            system=a.system, show=a.show)

    i.set_defaults(run=run_inspect, needs_torch=False)

    g = data_sub.add_parser("gatt", help="Ghost Attention data: replies sampled with an instruction on every user "
                                         "turn, trained with it on the first only (LLaMA 2 sec. 3.3)",
                            description="Samples the assistant's replies with --model, the instruction attached to "
                                        "every user turn, and writes finetune records with the instruction in the "
                                        "first user turn only and the loss on the last reply only. See "
                                        "docs/finetuning.md.")
    g.add_argument("--conversations", required=True, action="append", metavar="FILE",
                   help="multi-turn conversations (any format finetune reads; their user turns are used)")
    g.add_argument("--instructions", required=True, metavar="FILE",
                   help="one instruction per line, or JSONL {\"instruction\": ..., \"check\": \"KIND:VALUE\"}")
    g.add_argument("--out", "-o", required=True, metavar="FILE", help="output JSONL (OpenAI messages layout)")
    g.add_argument("--check", default=None, metavar="KIND:VALUE",
                   help="rule a reply must pass (ends-with:, starts-with:, contains:, regex:), else it is resampled")
    g.add_argument("--tries", type=int, default=1, help="samples per reply until --check passes (default 1)")
    g.add_argument("--repair", action="store_true",
                   help="on the last try, add an ends-with/starts-with rule's missing text to a whole reply (for a "
                        "model that cannot follow the instruction on its own)")
    g.add_argument("--every-turn", action="store_true",
                   help="one record per reply (each prefix), not only per conversation")
    g.add_argument("--max-turns", type=int, default=None, help="use at most N user turns of each conversation")
    g.add_argument("--rows", type=int, default=8, help="conversations decoded together (default 8)")
    g.add_argument("--skip-bad", action="store_true", help="report malformed records and continue")
    g.add_argument("--no-progress", action="store_true")
    add_model_options(g)
    add_sampling_options(g, max_tokens=128)

    def run_gatt(a: argparse.Namespace) -> int:
        from .data.gatt import gatt_main

        sampling = sampling_kwargs(a)
        gatt_main(conversations=a.conversations, instructions=a.instructions, out=a.out, check=a.check,
                  tries=a.tries, repair=a.repair, every_turn=a.every_turn, max_turns=a.max_turns,
                  seed=sampling.pop("seed", 0), rows=a.rows, skip_bad=a.skip_bad, progress=not a.no_progress,
                  model_kwargs=model_kwargs(a), sampling=sampling)
        return 0

    g.set_defaults(run=run_gatt)


def add_chat_data_options(p: argparse.ArgumentParser) -> None:
    """Options of chat exports and privacy, shared by `finetune` and `data inspect`."""
    p.add_argument("--kakao-assistant", action="append", default=None, metavar="NAME",
                   help="KakaoTalk speaker to imitate (you); repeat or comma-separate aliases across exports, "
                        "e.g. --kakao-assistant '나,회원님,홍길동'")
    p.add_argument("--kakao-gap-minutes", type=float, default=360.0, metavar="MIN",
                   help="a silence this long starts a new conversation (default 360; a new day always does)")
    p.add_argument("--scrub", default=None, metavar="KINDS",
                   help="personal data to replace: phone,email,id,account,name, 'all' or 'none' "
                        "(default: phone,email,id,account in chat exports, nothing in other files)")
    p.add_argument("--scrub-name", action="append", default=[], metavar="NAME",
                   help="a name to replace too (repeatable); other speakers' names: --scrub all")


def _add_lora_options(p: argparse.ArgumentParser, *, dropout: bool, when: str = "") -> None:
    """The LoRA adapter's options, shared by `finetune` and `pretrain --train lora-embeddings`."""
    p.add_argument("--lora-rank", type=int, default=8, help=f"{when}adapter rank")
    p.add_argument("--lora-alpha", type=float, default=16.0, help=f"{when}scale alpha / rank")
    if dropout:
        p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="q,k,v,o,gate,up,down",
                   help=f"{when}projections (default: all seven)")


def _add_pretrain(sub: Subparsers) -> None:
    p = sub.add_parser("pretrain", help="train a LLaMA from random init (or continue one) on prepared data")
    p.add_argument("--model-config", default=None, metavar="PRESET|FILE",
                   help="a preset name (see `llamaworks models`) or a JSON/YAML ModelConfig file")
    p.add_argument("--init", default=None, metavar="MODEL",
                   help="continue pretraining this checkpoint instead (e.g. the output of `tokenizer extend`)")
    p.add_argument("--train", default="all", choices=["all", "new-rows", "lora-embeddings"],
                   help="what trains with --init: all weights, only the new embedding rows of an extended "
                        "vocabulary (stage 1), or LoRA adapters plus the embeddings (PEFT modules_to_save)")
    _add_lora_options(p, dropout=False, when="with --train lora-embeddings: ")
    p.add_argument("--mix-data", default=None, metavar="DIR",
                   help="another `data prepare` output (same tokenizer) mixed in, e.g. English text")
    p.add_argument("--mix-ratio", type=float, default=0.0, help="share of rows from --mix-data (e.g. 0.25)")
    p.add_argument("--data", required=True, metavar="DIR", help="output of `llamaworks data prepare`")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="run directory (checkpoints, metrics, final)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default min(max_seq_len, 1024))")
    p.add_argument("--batch-size", type=int, default=8, dest="micro_batch_size", help="micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, dest="grad_accum_steps", help="micro-batches per step")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=10)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute activations (less memory)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp", help="multi-process strategy (torchrun)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")

    def run(a: argparse.Namespace) -> int:
        from .train.lora import LoRAConfig
        from .train.pretrain import run_pretrain_cli

        lora = LoRAConfig(rank=a.lora_rank, alpha=a.lora_alpha, targets=a.lora_targets)
        names = ("micro_batch_size", "grad_accum_steps", "max_steps", "lr", "min_lr_ratio", "warmup_steps",
                 "weight_decay", "grad_clip", "eval_every", "eval_batches", "save_every", "keep_last", "log_every",
                 "precision", "activation_checkpointing", "strategy", "seed")
        return run_pretrain_cli(a.model_config, a.data, a.out, seq_len=a.seq_len, device=a.device,
                                resume=a.resume, progress=not a.no_progress, init=a.init, train=a.train,
                                mix_data=a.mix_data, mix_ratio=a.mix_ratio, lora=lora,
                                **{n: getattr(a, n) for n in names})

    p.set_defaults(run=run)


def _add_plan(sub: Subparsers) -> None:
    p = sub.add_parser("plan", help="compute-optimal and inference-aware model size / tokens for a budget")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--params", metavar="N", help="model parameters (e.g. 7e9, 135M)")
    g.add_argument("--flops", metavar="F", help="training compute budget in FLOPs (e.g. 1e21)")
    p.add_argument("--inference-tokens", metavar="T", default="0",
                   help="tokens the model will process when served (adds the inference-aware plan)")
    p.add_argument("--machine-flops", metavar="F", default=None,
                   help="training FLOP/s of your machine (default: measured with a small training step)")
    p.add_argument("--no-measure", action="store_true", help="skip the time estimate")
    p.add_argument("--json", action="store_true", help="print JSON")

    def run(a: argparse.Namespace) -> int:
        from .plan import parse_number, run_plan_cli

        return run_plan_cli(parse_number(a.params) if a.params else None,
                            parse_number(a.flops) if a.flops else None, parse_number(a.inference_tokens),
                            not a.no_measure, parse_number(a.machine_flops) if a.machine_flops else None, a.json)

    p.set_defaults(run=run)


def _add_finetune(sub: Subparsers) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model on chat/instruction data: full, LoRA or QLoRA (+ DPO)",
                       description="OUT becomes a model directory `llamaworks chat --model OUT` opens (LoRA/QLoRA: "
                                   "adapters merged in, the PEFT adapter in OUT/adapter). See docs/finetuning.md.")
    p.add_argument("method", choices=["full", "lora", "qlora", "reward"],
                   help="what trains (qlora: 4-bit NF4 base + LoRA; reward: a reward model on preference pairs)")
    p.add_argument("--model", "-m", metavar="PATH", default=None, help="base model (default: bundled SmolLM2-135M)")
    p.add_argument("--data", required=True, action="append", metavar="FILE",
                   help="alpaca / sharegpt / openai-messages JSONL or a KakaoTalk export (repeatable); "
                        "with --dpo: {prompt, chosen, rejected} JSONL")
    p.add_argument("--val-data", action="append", default=[], metavar="FILE", help="validation file (repeatable)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this share of the conversations and report validation loss (e.g. 0.1)")
    p.add_argument("--preview", action="store_true",
                   help="read the data as training would, print what was kept/dropped/scrubbed, and stop")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output directory")
    _add_lora_options(p, dropout=True)
    p.add_argument("--double-quant", action="store_true", help="qlora: also quantize the NF4 block scales")
    p.add_argument("--dpo", action="store_true", help="preference tuning (DPO) instead of SFT")
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--reward-method", choices=["full", "lora"], default="lora",
                   help="reward: what trains under the new score head (default lora)")
    p.add_argument("--margin", action="store_true",
                   help="reward: LLaMA 2's margin term from each pair's 'margin' (or score_chosen - score_rejected)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per training row (default 1024)")
    p.add_argument("--no-pack", action="store_true", help="one example per row (padded) instead of packing")
    p.add_argument("--train-on-prompt", action="store_true", help="learn prompt tokens too, not only replies")
    p.add_argument("--skip-bad", action="store_true", help="report malformed records and continue")
    p.add_argument("--system", default=None, help="system prompt added to every example")
    p.add_argument("--chat-template", default=None, metavar="NAME|FILE", help="default: the model's own")
    add_chat_data_options(p)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: full 2e-5, lora 2e-4)")
    p.add_argument("--epochs", type=float, default=None,
                   help="passes over the data when --max-steps is not set (default 3; small data: at least 16 steps)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4, dest="micro_batch_size", help="micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, dest="grad_accum_steps")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of the steps (at most 100)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="weights' dtype while training (default float32)")
    p.add_argument("--save-dtype", default=None, help="dtype of the saved model (default: the training dtype)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")

    def run(a: argparse.Namespace) -> int:
        from .train.finetune import run_finetune

        names = ("method", "model", "data", "val_data", "out", "lora_rank", "lora_alpha", "lora_dropout",
                 "lora_targets", "double_quant", "dpo", "dpo_beta", "seq_len", "train_on_prompt", "skip_bad",
                 "system", "chat_template", "kakao_assistant", "lr", "epochs", "max_steps", "micro_batch_size",
                 "grad_accum_steps", "warmup_steps", "weight_decay", "save_every", "keep_last", "eval_every",
                 "log_every", "precision", "activation_checkpointing", "seed", "device", "dtype", "save_dtype",
                 "resume", "kakao_gap_minutes", "scrub", "val_fraction", "preview", "reward_method", "margin")
        return run_finetune(pack=not a.no_pack, progress=not a.no_progress, scrub_names=a.scrub_name,
                            **{n: getattr(a, n) for n in names})

    p.set_defaults(run=run)


def _add_score(sub: Subparsers) -> None:
    p = sub.add_parser("score", help="score conversations with a reward model (adds a 'reward' field)",
                       description="FILE: JSONL of {messages: [..., assistant reply]} or {prompt, response}. "
                                   "See docs/finetuning.md#reward-models.")
    p.add_argument("file", metavar="FILE", help="conversations to score (JSONL)")
    p.add_argument("--model", "-m", required=True, metavar="DIR", help="reward model (`finetune reward` output)")
    p.add_argument("--out", "-o", default=None, metavar="FILE", help="output JSONL (default: stdout)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chat-template", default=None, metavar="NAME|FILE", help="default: the model's own")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")

    def run(a: argparse.Namespace) -> int:
        from .train.reward import score_file

        score_file(a.model, a.file, a.out, chat_template=a.chat_template, device=a.device,
                   batch_size=a.batch_size, progress=not a.no_progress)
        return 0

    p.set_defaults(run=run)


def _add_rejection_sample(sub: Subparsers) -> None:
    p = sub.add_parser("rejection-sample", help="K samples per prompt, keep the best by a reward: SFT data",
                       description="One round of rejection-sampling fine-tuning's data step (LLaMA 2-Chat): the "
                                   "best of K replies per prompt as chat JSONL for `finetune`. See "
                                   "docs/finetuning.md#rejection-sampling.")
    p.add_argument("--policy", required=True, metavar="PATH", help="the model that answers ('default': bundled)")
    p.add_argument("--reward", required=True, metavar="RM|module:fn|URL",
                   help="reward model folder, a Python function module:fn(messages, reply) -> float, or an "
                        "OpenAI-compatible endpoint (http://host:port/v1) used as a 1-10 judge")
    p.add_argument("--prompts", required=True, metavar="FILE", help="JSONL of {prompt} or {messages}")
    p.add_argument("-k", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="best replies as chat JSONL")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per reply (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge-model", default=None, help="URL scorer: the model id to ask")
    p.add_argument("--api-key", default=None, help="URL scorer: bearer token")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")

    def run(a: argparse.Namespace) -> int:
        from .train.rejection import run_rejection_sampling

        run_rejection_sampling(policy=a.policy, reward=a.reward, prompts=a.prompts, k=a.k, out=a.out,
                               temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_tokens,
                               seed=a.seed, judge_model=a.judge_model, api_key=a.api_key, device=a.device,
                               progress=not a.no_progress)
        return 0

    p.set_defaults(run=run)


def _add_merge_lora(sub: Subparsers) -> None:
    p = sub.add_parser("merge-lora", help="fold a LoRA adapter (PEFT layout) into its base model")
    p.add_argument("--base", "-m", default=None, metavar="PATH",
                   help="base model (default: the path the adapter records, else the bundled SmolLM2)")
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory (or a finetune OUT)")
    p.add_argument("--out", "-o", required=True, metavar="DIR|FILE.gguf", help="HF directory, or a .gguf file")
    p.add_argument("--dtype", default=None, help="HF output dtype (default: float32)")
    p.add_argument("--gguf-type", default="f16", help="GGUF tensor type: f32, f16, bf16 or a llama.cpp mix "
                   "(q4_k_m, q5_k_m, q6_k, q8_0, q4_0)")
    p.add_argument("--device", default=None)

    def run(a: argparse.Namespace) -> int:
        from .train.merge import run_merge_lora

        return run_merge_lora(base=a.base, adapter=a.adapter, out=a.out, dtype=a.dtype, gguf_type=a.gguf_type,
                              device=a.device)

    p.set_defaults(run=run)


def _add_eval(sub: Subparsers) -> None:
    p = sub.add_parser("eval", help="benchmarks scored like lm-evaluation-harness (ARC, HellaSwag, MMLU, TruthfulQA)",
                       description="Multiple-choice benchmarks from local files, scored as EleutherAI's "
                                   "lm-evaluation-harness does. See docs/eval.md.")
    p.add_argument("--model", "-m", metavar="PATH", default=None, help="model (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--tasks", default=None, help="comma-separated: arc_challenge, arc_easy, hellaswag, mmlu, "
                                                 "mmlu_<subject>, truthfulqa_mc1, truthfulqa_mc2")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="folder holding the benchmark files")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="few-shot examples (default 0)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N items of each task")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (default 1234, as the harness)")
    p.add_argument("--chat-template", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--log-samples", action="store_true", help="store every item's prompt and scores in --out")
    p.add_argument("--out", "-o", metavar="FILE", default=None, help="write the results JSON here")
    p.add_argument("--leaderboard", action="store_true",
                   help="Open LLM Leaderboard v1 set: ARC-c 25-shot, HellaSwag 10-shot, MMLU 5-shot, TruthfulQA mc2")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                   help="print the differences between two results files (no model needed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(a: argparse.Namespace) -> int:
        from .eval.runner import eval_main

        print(eval_main(model=a.model, tasks=a.tasks, data_dir=a.data_dir, num_fewshot=a.num_fewshot,
                        limit=a.limit, seed=a.seed, chat_template=a.chat_template, log_samples=a.log_samples,
                        out=a.out, leaderboard=a.leaderboard, compare=a.compare, progress=not a.no_progress))
        return 0

    p.set_defaults(run=run)

    # `eval persona`: style of a fine-tuned chat persona (docs/finetuning.md); `eval --tasks ...` stays as it was.
    sub_eval = p.add_subparsers(dest="eval_command", metavar="[persona|judge]", required=False)
    q = sub_eval.add_parser(
        "persona", help="does a fine-tuned model talk like its persona: markers, distinct-n, copy rate, length",
        description="Held-out prompts of --data (the run's --val-fraction split), replies of the model and --base, "
                    "and a before/after table written into the run folder. See docs/finetuning.md.")
    q.add_argument("--model", "-m", metavar="PATH", required=True, help="the fine-tuned model (a finetune OUT)")
    q.add_argument("--data", required=True, action="append", metavar="FILE", help="the chat data it was trained on")
    q.add_argument("--base", metavar="PATH", default=None,
                   help="the model before fine-tuning (default: the bundled model when the run used it)")
    q.add_argument("--kakao-assistant", action="append", default=None, metavar="NAME",
                   help="the persona in chat exports (default: the run's)")
    q.add_argument("--val-fraction", type=float, default=None, help="held-out share (default: the run's, else 0.1)")
    q.add_argument("--limit", type=int, default=40, help="at most N prompts (default 40)")
    q.add_argument("--marker", action="append", default=[], metavar="TEXT",
                   help="a persona marker instead of learned ones: 'ㅋㅋ' anywhere, '용$' ending a sentence")
    q.add_argument("--copy-ngram", type=int, default=4, help="words in a row that count as copied (default 4)")
    q.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    q.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    q.add_argument("--max-tokens", type=int, default=48, dest="max_new_tokens", help="per reply (default 48)")
    q.add_argument("--out", "-o", metavar="FILE", default=None, help="results JSON (default: MODEL/persona_eval.json)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run_persona(a: argparse.Namespace) -> int:
        from .eval.persona import persona_main

        print(persona_main(model=a.model, data=a.data, base=a.base, out=a.out, kakao_assistant=a.kakao_assistant,
                           progress=not a.no_progress, threads=a.threads, val_fraction=a.val_fraction,
                           limit=a.limit, markers=a.marker, copy_ngram=a.copy_ngram, temperature=a.temperature,
                           seed=a.seed, max_new_tokens=a.max_new_tokens))
        return 0

    q.set_defaults(run=run_persona)

    j = sub_eval.add_parser("judge", help="pairwise LLM-as-judge (MT-Bench style): grades 1-10 and A-vs-B in both "
                                          "orders, win/tie/loss with 95%% intervals",
                            description="Models A and B answer every prompt; the judge (a local model or an "
                                        "OpenAI-compatible endpoint) grades each answer and compares them in both "
                                        "orders: a win only if preferred in both. See docs/eval.md.")
    j.add_argument("--prompts", required=True, metavar="FILE",
                   help="JSONL: {\"prompt\": ...}, MT-Bench {\"turns\": [...]} or {\"messages\": [...]}")
    for side in ("a", "b"):
        j.add_argument(f"--model-{side}", default=None, metavar="PATH|NAME",
                       help=f"model {side.upper()}: a local path (default: bundled SmolLM2), or with --url-{side} "
                            "the endpoint's model name")
        j.add_argument(f"--url-{side}", default=None, metavar="URL",
                       help=f"OpenAI-compatible endpoint answering as model {side.upper()} (e.g. "
                            "http://127.0.0.1:8000/v1)")
    j.add_argument("--judge", default=None, metavar="PATH|NAME",
                   help="judge: a local path (default: bundled SmolLM2), or with --judge-url the endpoint's model name")
    j.add_argument("--judge-url", default=None, metavar="URL", help="OpenAI-compatible endpoint of the judge")
    j.add_argument("--api-key", default=None, help="bearer key sent to the endpoints")
    j.add_argument("--mode", choices=["both", "pairwise", "single"], default="both",
                   help="pairwise comparison, single-answer grading, or both (default)")
    j.add_argument("--max-tokens", type=int, default=256, help="tokens per answer (default 256)")
    j.add_argument("--judge-max-tokens", type=int, default=512, help="tokens per judgment (default 512)")
    j.add_argument("--temperature", type=float, default=0.0, help="answers' temperature (default 0, greedy)")
    j.add_argument("--seed", type=int, default=0)
    j.add_argument("--rows", type=int, default=4, help="local models: sequences decoded together (default 4)")
    j.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N prompts")
    j.add_argument("--out", "-o", metavar="FILE", default=None, help="write the results JSON here")
    j.add_argument("--no-progress", action="store_true")
    add_model_options(j)
    j.set_defaults(needs_torch=lambda a: any(
        _needs_torch(argparse.Namespace(**{**vars(a), "model": m}))
        for m, url in ((a.model_a, a.url_a), (a.model_b, a.url_b), (a.judge, a.judge_url)) if not url))

    def run_judge(a: argparse.Namespace) -> int:
        from .eval.judge import judge_main, summary

        results = judge_main(prompts=a.prompts, model_a=a.model_a, model_b=a.model_b, judge=a.judge, url_a=a.url_a,
                             url_b=a.url_b, judge_url=a.judge_url, api_key=a.api_key, mode=a.mode, out=a.out,
                             max_tokens=a.max_tokens, judge_max_tokens=a.judge_max_tokens,
                             temperature=a.temperature, seed=a.seed, rows=a.rows, limit=a.limit,
                             progress=not a.no_progress, model_kwargs=model_kwargs(a))
        print(summary(results))
        return 0

    j.set_defaults(run=run_judge)


def _add_perplexity(sub: Subparsers) -> None:
    p = sub.add_parser("perplexity", help="perplexity and bits per byte of text files (sliding window)")
    p.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files")
    p.add_argument("--model", "-m", metavar="PATH", default=None, help="model (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--max-length", type=int, default=None, help="window in tokens (default: the model's context)")
    p.add_argument("--stride", type=int, default=None, help="tokens scored per window (default: half the window)")
    p.add_argument("--out", "-o", metavar="FILE", default=None, help="also write the figures as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(a: argparse.Namespace) -> int:
        from .eval.perplexity import perplexity_main

        print(perplexity_main(model=a.model, files=a.files, max_length=a.max_length, stride=a.stride, out=a.out,
                              progress=not a.no_progress))
        return 0

    p.set_defaults(run=run)


def _add_bench(sub: Subparsers) -> None:
    p = sub.add_parser("bench", help="measure prefill/decode speed, time to first token and peak memory")
    p.add_argument("--model", "-m", metavar="PATH", default=None, help="GGUF file or checkpoint (default: bundled)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for the prefill figure")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens generated for the decode figure")
    p.add_argument("--ctx", type=int, default=1024, help="KV cache length")
    p.add_argument("--runs", type=int, default=3, help="repetitions (the median is reported)")
    p.add_argument("--weights", default="q8_0", help="format for float weights of non-GGUF checkpoints")
    p.add_argument("--mmap", action="store_true", help="keep GGUF weights memory-mapped (default: huge pages)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_backend_options(p)

    def run(a: argparse.Namespace) -> int:
        from .bench import main as bench_main

        return bench_main(a.model, prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens, ctx=a.ctx, runs=a.runs,
                          threads=a.threads, weights=a.weights, as_json=a.json, mmap=True if a.mmap else None,
                          backend=a.backend, cpu_target=a.cpu_target)

    def needs_torch(a: argparse.Namespace) -> bool:
        from .api import choose_backend

        return a.cpu_target == "native" and choose_backend(a.backend, a.model, "cpu") == "torch"

    p.set_defaults(run=run, needs_torch=needs_torch)


def _add_quantize(sub: Subparsers) -> None:
    p = sub.add_parser("quantize", help="quantize a checkpoint (e.g. your fine-tuned HF model) into one GGUF file")
    p.add_argument("src", help="Hugging Face or Meta directory, or a GGUF file")
    p.add_argument("dst", help="output .gguf file")
    p.add_argument("--to", default="q8_0", choices=["q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0", "int8", "int4"],
                   help="llama.cpp's mixes q4_k_m, q5_k_m, q6_k, q8_0 (=int8, near-lossless), q4_0; "
                        "int4 (=Q4_1, 4-bit with per-block minimum)")

    def run(a: argparse.Namespace) -> int:
        from .quantize import main as quantize_main

        return quantize_main(a.src, a.dst, a.to)

    p.set_defaults(run=run)


def _add_tokenizer(sub: Subparsers) -> None:
    p = sub.add_parser("tokenizer", help="extend a model's vocabulary from a corpus; token statistics per script")
    tok_sub = p.add_subparsers(dest="tokenizer_command", metavar="<command>", required=True)
    e = tok_sub.add_parser("extend", help="learn N new tokens from a corpus, append them, resize the embeddings",
                           description="Continues the base BPE on the corpus (byte-level BPE or SentencePiece), "
                                       "appends only tokens the base lacks (old ids unchanged) and initialises "
                                       "each new embedding/output row as the mean of its base pieces' rows. "
                                       "Writes an HF directory and OUT/model.gguf. See docs/tokenizers.md.")
    e.add_argument("--model", "-m", metavar="PATH", default=None, help="base model (default: bundled SmolLM2-135M)")
    e.add_argument("--corpus", required=True, nargs="+", metavar="FILE", help="text/JSONL/Parquet files or dirs")
    e.add_argument("--add", required=True, type=int, metavar="N", help="how many tokens to add (at most)")
    e.add_argument("--out", "-o", required=True, metavar="DIR", help="output model directory")
    e.add_argument("--min-frequency", type=int, default=2, help="a new token must occur this often (default 2)")
    e.add_argument("--gguf-type", default="f16", help="OUT/model.gguf tensor type (f32, f16, bf16, q8_0; none)")
    e.add_argument("--text-field", default="text", help="JSONL/Parquet text field")
    e.add_argument("--fit-output", type=int, default=0, metavar="STEPS",
                   help="untie the output and fit the new output rows to the corpus for STEPS steps (0: mean rows)")
    e.add_argument("--fit-tokens", type=int, default=65536, help="corpus tokens --fit-output uses (at most)")
    e.add_argument("--fit-corpus", nargs="+", default=(), metavar="FILE",
                   help="other text (e.g. English) added to the --fit-output fit, where new tokens must stay unlikely")
    e.add_argument("--no-progress", action="store_true")

    def run_extend(a: argparse.Namespace) -> int:
        from .tokenizer_extend import run_extend_cli

        return run_extend_cli(a.model, a.corpus, a.add, a.out, min_frequency=a.min_frequency,
                              gguf_type=a.gguf_type, text_field=a.text_field, progress=not a.no_progress,
                              fit_output=a.fit_output, fit_tokens=a.fit_tokens, fit_corpus=a.fit_corpus)

    e.set_defaults(run=run_extend)
    s = tok_sub.add_parser("stats", help="tokens per character/word and bytes per token, per script")
    s.add_argument("files", nargs="+", metavar="FILE", help="text/JSONL/Parquet files or directories")
    s.add_argument("--model", "-m", action="append", metavar="PATH", default=None,
                   help="tokenizer or model (repeat to compare; default: the bundled model)")
    s.add_argument("--text-field", default="text", help="JSONL/Parquet text field")
    s.add_argument("--json", action="store_true", help="print JSON")

    def run_stats(a: argparse.Namespace) -> int:
        from .tokenizer_extend import run_stats_cli

        return run_stats_cli(a.model or [None], a.files, a.json, a.text_field)

    s.set_defaults(run=run_stats, needs_torch=False)


# One entry per verb, in the order `llamaworks --help` lists them.
VERBS: list[Callable[[Subparsers], None]] = [
    _add_chat,
    _add_generate,
    _add_models,
    _add_convert,
    _add_serve,
    _add_data,
    _add_pretrain,
    _add_plan,
    _add_finetune,
    _add_merge_lora,
    _add_eval,
    _add_perplexity,
    _add_bench,
    _add_quantize,
    _add_score,
    _add_rejection_sample,
    _add_tokenizer,
]


# -- entry point -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamaworks", description="Run, train, evaluate and serve LLaMA-family models on your own machine.")
    parser.add_argument("--version", action="version", version=f"llamaworks {__version__}")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: number of physical cores)")
    parser.set_defaults(run=None, needs_torch=True)
    sub = parser.add_subparsers(dest="command", metavar="<verb>")
    for add in VERBS:
        add(sub)
    _add_threads_everywhere(sub)
    return parser


def _add_threads_everywhere(sub: Subparsers) -> None:
    """--threads also after the verb (and after nested sub-verbs); SUPPRESS keeps a value given before it."""
    for verb_parser in sub.choices.values():
        if "--threads" not in verb_parser._option_string_actions:
            verb_parser.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                                     help="CPU threads (default: number of physical cores)")
        for action in verb_parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_threads_everywhere(action)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.run is None:
        parser.print_help(sys.stderr)
        return 2
    from .errors import LlamaworksError

    try:
        if args.needs_torch(args) if callable(args.needs_torch) else args.needs_torch:
            import torch

            threads = args.threads or physical_cores()
            if threads < 1:
                raise ValueError(f"--threads {threads}: expected a positive number")
            torch.set_num_threads(threads)
        code = args.run(args)
    except (LlamaworksError, FileNotFoundError, ValueError) as e:
        if os.environ.get("LLAMAWORKS_DEBUG"):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
