"""Reward models (LLaMA 2-Chat's recipe, Touvron et al. 2023, section 3.2.2) on the one training loop.

    reward(conversation) = score . h_last       h_last: the body's final-norm hidden state at the last non-pad token

The body is model.py's Transformer (its LM head unused); `score` is one bias-free linear row, as in Hugging Face's
`LlamaForSequenceClassification` with num_labels 1, whose layout the model is saved in: config.json says
`architectures: [LlamaForSequenceClassification]`, `num_labels: 1` and `pad_token_id`, the weights are the body's
`model.*` tensors plus `score.weight` (1, hidden). transformers loads that folder and gives the same rewards;
`load_reward_model` loads it back here.

Pooling is transformers' rule: the rightmost token that is not `pad_token_id` (so both agree even where the pad
token also ends a turn). Training is the binary ranking loss on preference pairs (the DPO pair loader, every
layout it reads), optionally with LLaMA 2's margin: loss = -log sigmoid(r_chosen - r_rejected - margin).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import FormatError
from ..model import Transformer

SEQ_CLS_ARCH = "LlamaForSequenceClassification"


class RewardModel(nn.Module):
    """The LLaMA body plus a scalar head on the last non-pad token; forward gives one reward per row."""

    def __init__(self, body: Transformer, pad_id: int | None, score: nn.Linear | None = None) -> None:
        super().__init__()
        self.body = body
        self.pad_id = pad_id
        if score is None:
            weight = next(body.parameters())
            score = nn.Linear(body.config.dim, 1, bias=False, device=weight.device, dtype=weight.dtype)
            # transformers' initialisation of a new head (initializer_range 0.02).
            nn.init.normal_(score.weight, std=0.02)
        self.score = score

    # The training loop and its metrics read these off the model it trains.
    @property
    def config(self) -> Any:
        return self.body.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.body.layers

    @property
    def activation_checkpointing(self) -> bool:
        return self.body.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self.body.activation_checkpointing = value

    def last_token_index(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B,) index of each row's last non-pad token (transformers' rule: rightmost id != pad_token_id)."""
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        if self.pad_id is not None:
            return (positions * (input_ids != self.pad_id)).argmax(-1)
        if attention_mask is not None:
            return (positions * attention_mask.to(torch.long)).argmax(-1)
        return torch.full((input_ids.shape[0],), T - 1, device=input_ids.device, dtype=torch.long)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        key_mask = attention_mask.bool() if attention_mask is not None else None
        hidden = self.body(input_ids, key_mask=key_mask, return_hidden=True)
        last = self.last_token_index(input_ids, attention_mask)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.score(pooled).squeeze(-1).float()


def ranking_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None) -> Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin) (margin 0: the binary ranking loss)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff)
    return -F.logsigmoid(diff).mean()


class RewardLoss:
    """A `loss_fn(model, batch)` for `run_training` on `PreferenceBatchSource` batches (rows [:n] chosen, [n:]
    rejected, "margin" per pair); use_margin=False drops the margin term."""

    def __init__(self, use_margin: bool = False) -> None:
        self.use_margin = use_margin
        self.last_metrics: dict[str, float] = {}

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        n = batch["input_ids"].shape[0] // 2
        rewards = model(batch["input_ids"], batch.get("attention_mask"))
        chosen, rejected = rewards[:n], rewards[n:]
        margin = batch.get("margin") if self.use_margin else None
        gap = (chosen - rejected).detach()
        self.last_metrics = {"accuracy": float((gap > 0).float().mean()), "reward_gap": float(gap.mean())}
        return ranking_loss(chosen, rejected, margin)


@torch.no_grad()
def pairwise_accuracy(model: RewardModel, source: Any) -> tuple[float, int]:
    """(share of pairs whose chosen reply scores higher, number of pairs) over a non-shuffled pair source."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right = total = 0
    for batch in source:
        n = batch["input_ids"].shape[0] // 2
        rewards = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        right += int((rewards[:n] > rewards[n:]).sum())
        total += n
    model.train(was_training)
    return (right / total if total else float("nan")), total


# -- saving and loading ----------------------------------------------------------------------------

def reward_state(model: RewardModel) -> tuple[dict[str, Tensor], Tensor]:
    """(the body's plain Transformer state dict with any LoRA adapters folded in, the score weight (1, dim))."""
    from .lora import lora_modules, merged_state_dict

    sd = merged_state_dict(model) if lora_modules(model) else model.state_dict()
    body = {k.removeprefix("body."): v for k, v in sd.items() if k.startswith("body.")}
    return body, sd["score.weight"]


def write_reward_model(directory: Path, model: RewardModel, tokenizer: Any = None, *,
                       chat_template: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `model` into `directory` (an existing folder being built) in transformers' sequence-classifier layout."""
    from ..checkpoints.hf import write_hf

    body, score = reward_state(model)
    # The LM head is not part of a sequence classifier: saved as tied, the body loads here as a plain model.
    config = model.config.replace(tie_embeddings=True)
    extra = {"architectures": [SEQ_CLS_ARCH], "num_labels": 1, "id2label": {"0": "LABEL_0"},
             "label2id": {"LABEL_0": 0}, "pad_token_id": model.pad_id}
    return write_hf(Path(directory), body, config, tokenizer, chat_template=chat_template, dtype=dtype,
                    extra_tensors={"score.weight": score.detach()}, config_extra=extra)


def save_reward_model(directory: str | os.PathLike, model: RewardModel, tokenizer: Any = None, *,
                      chat_template: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """`write_reward_model` into a folder built beside `directory` and swapped in whole."""
    from ..checkpoints.hf import is_hf_model_file
    from ..files import replace_dir

    with replace_dir(directory, drop=is_hf_model_file) as stage:
        write_reward_model(stage, model, tokenizer, chat_template=chat_template, dtype=dtype)
    return Path(directory)


def default_pad_id(tokenizer: Any) -> int | None:
    """The id reward batches are padded with: the tokenizer's pad token, else its EOS."""
    if tokenizer is None:
        return None
    return tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id


def load_reward_model(path: str | os.PathLike | None, *, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None,
                      new_head: bool = False) -> tuple[RewardModel, Any, Any]:
    """(RewardModel.eval(), tokenizer, checkpoint). A folder in the sequence-classifier layout brings its head;
    new_head=True starts a fresh head on any checkpoint's body (to train one)."""
    from ..checkpoints import load_model

    body, tokenizer, ckpt = load_model(path, dtype=dtype, device=device)
    hf_config = ckpt.metadata.get("config.json") or {}
    if new_head:
        return RewardModel(body, default_pad_id(tokenizer)).eval(), tokenizer, ckpt
    weight = (ckpt.metadata.get("extra_tensors") or {}).get("score.weight")
    if weight is None:
        raise FormatError(f"{ckpt.path}: not a reward model (no 'score.weight'; expected a folder written by "
                          f"`llamaworks finetune reward`, transformers' {SEQ_CLS_ARCH} with num_labels 1)")
    if tuple(weight.shape) != (1, ckpt.config.dim):
        raise FormatError(f"{ckpt.path}: 'score.weight' has shape {list(weight.shape)}, expected "
                          f"[1, {ckpt.config.dim}] (one reward from hidden size {ckpt.config.dim})")
    pad = hf_config.get("pad_token_id")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < ckpt.config.vocab_size):
        raise FormatError(f"{ckpt.path / 'config.json'}: pad_token_id must be a token id in "
                          f"0..{ckpt.config.vocab_size - 1}, got {pad!r}")
    ref = next(body.parameters())
    score = nn.Linear(ckpt.config.dim, 1, bias=False, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        score.weight.copy_(weight.to(ref))
    return RewardModel(body, pad, score).eval(), tokenizer, ckpt


# -- scoring ---------------------------------------------------------------------------------------

def conversation_record(rec: Any, where: str) -> tuple[list[dict], str]:
    """(prompt messages, reply) of a record to score: {"messages": [..., assistant]} or {"prompt", "response"}
    (prompt a string or messages)."""
    if not isinstance(rec, dict):
        raise FormatError(f"{where}: expected a JSON object with 'messages' or 'prompt' and 'response'")
    if "response" in rec:
        prompt, response = rec.get("prompt"), rec["response"]
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                         and isinstance(m.get("content"), str) for m in prompt):
            messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        else:
            raise FormatError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages")
        if not isinstance(response, str):
            raise FormatError(f"{where}: 'response' must be a string")
        return messages, response
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or len(msgs) < 2 or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        raise FormatError(f"{where}: expected 'messages' (a list of {{role, content}} ending with the assistant's "
                          "reply) or 'prompt' and 'response'")
    if msgs[-1]["role"] != "assistant":
        raise FormatError(f"{where}: the last message must be the assistant's reply, got {msgs[-1]['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]], msgs[-1]["content"]


class RewardScorer:
    """Scores (prompt messages, reply) pairs with a reward model, rendered with its chat template as it trained.

        scorer = RewardScorer.load("rm/")
        scorer([( [{"role": "user", "content": "Hi"}], "Hello! How can I help?" )])  -> [reward]
    """

    def __init__(self, model: RewardModel, tokenizer: Any, template: Any, *, batch_size: int = 8,
                 max_len: int | None = None) -> None:
        self.model, self.tokenizer, self.template = model.eval(), tokenizer, template
        self.batch_size = batch_size
        self.max_len = max_len or model.config.max_seq_len
        self.pad = default_pad_id(tokenizer) or 0

    @classmethod
    def load(cls, path: str | os.PathLike, *, chat_template: str | None = None, device: str | None = None,
             batch_size: int = 8) -> RewardScorer:
        from ..chat_template import template_for

        model, tokenizer, ckpt = load_reward_model(path, device=device)
        if tokenizer is None:
            raise FormatError(f"{ckpt.path}: the reward model carries no tokenizer")
        return cls(model, tokenizer, template_for(tokenizer, chat_template), batch_size=batch_size)

    def ids(self, messages: list[dict], reply: str, where: str = "conversation") -> list[int]:
        """Token ids of the conversation as training rendered it (a FormatError naming `where` if the template
        refuses it)."""
        from .dpo import _render_ids

        def render(msgs: list[dict], add_generation_prompt: bool) -> str:
            return self.template.render(msgs, add_generation_prompt=add_generation_prompt)

        try:
            ids, _ = _render_ids(render, self.tokenizer, messages, reply)
        except Exception as e:  # the template raising on this conversation (e.g. roles not alternating)
            raise FormatError(f"{where}: chat template failed: {e}") from None
        return ids[-self.max_len:]  # a conversation longer than the context keeps its end (the reply)

    def __call__(self, items: Sequence[tuple[list[dict], str]], progress: bool = False) -> list[float]:
        return self.score_ids([self.ids(m, r) for m, r in items], progress)

    @torch.no_grad()
    def score_ids(self, rows: Sequence[list[int]], progress: bool = False) -> list[float]:
        """Rewards of token id rows (batched, right-padded)."""
        from tqdm.auto import tqdm

        device = next(self.model.parameters()).device
        out: list[float] = []
        starts = range(0, len(rows), self.batch_size)
        for start in tqdm(starts, desc="score", unit="batch", disable=not progress or len(starts) < 2):
            chunk = rows[start:start + self.batch_size]
            T = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), T), self.pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), T), dtype=torch.bool)
            for i, r in enumerate(chunk):
                ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = True
            out += self.model(ids.to(device), mask.to(device)).tolist()
        return out


def score_file(model: str, path: str, out: str | None = None, *, chat_template: str | None = None,
               device: str | None = None, batch_size: int = 8, progress: bool = True) -> list[float]:
    """`llamaworks score`: each record of `path` with a "reward" field added, as JSONL to `out` (or stdout)."""
    import sys

    from ..data.instruct import read_json_records
    from ..data.records import BadRecord
    from ..files import atomic_write_text

    records: list[tuple[str, dict, tuple[list[dict], str]]] = []
    for item in read_json_records(Path(path)):
        if isinstance(item, BadRecord):
            raise FormatError(str(item))
        lineno, rec = item
        records.append((f"{path}:{lineno}", rec, conversation_record(rec, f"{path}:{lineno}")))
    if not records:
        raise FormatError(f"{path}: no records to score")
    scorer = RewardScorer.load(model, chat_template=chat_template, device=device, batch_size=batch_size)
    rewards = scorer.score_ids([scorer.ids(*item, where=where) for where, _, item in records], progress=progress)
    text = "".join(json.dumps({**rec, "reward": r}, ensure_ascii=False) + "\n"
                   for (_, rec, _), r in zip(records, rewards))
    if out:
        atomic_write_text(out, text)
        mean = sum(rewards) / len(rewards)
        print(f"scored {len(rewards)} record(s), mean reward {mean:.4f}: {out}", file=sys.stderr, flush=True)
    else:
        sys.stdout.write(text)
    return rewards


Scorer = Callable[[Sequence[tuple[list[dict], str]]], list[float]]

__all__ = ["SEQ_CLS_ARCH", "RewardLoss", "RewardModel", "RewardScorer", "Scorer", "conversation_record",
           "load_reward_model", "pairwise_accuracy", "ranking_loss", "save_reward_model", "score_file",
           "write_reward_model"]
