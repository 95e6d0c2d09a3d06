"""Direct Preference Optimization (Rafailov et al., 2023) on top of the one training loop.

loss = -log sigmoid(beta * [(log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))])

where log pi(y) sums the policy's log-probabilities of the response tokens (prompt tokens are masked out) and
`ref` is the frozen starting model: for LoRA/QLoRA the same model with its adapters switched off (no second
copy in memory), for full fine-tuning a frozen copy made before training.

Data: JSONL, one record per line, {"prompt": str | [messages], "chosen": str, "rejected": str}, or the Anthropic HH
and UltraFeedback layouts (`preference_record`; the reward model reads the same pairs). The prompt is
rendered with the model's chat template (a plain string becomes one user message) and each response as the
assistant's turn. A batch holds the chosen rows first and the rejected rows after them (2B rows), so it is an
ordinary {"input_ids", "labels", "attention_mask"} batch to the loop.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.instruct import BadRecord, read_json_records
from ..data.loader import rank_and_world_for
from ..errors import FormatError
from .lora import lora_disabled, lora_modules


def sequence_logprobs(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """(rows,) sum over positions with labels != -100 of log p(labels[t] | input_ids[:t+1])."""
    kwargs: dict[str, Tensor] = {}
    if batch.get("attention_mask") is not None:
        kwargs["key_mask"] = batch["attention_mask"].bool()
    if batch.get("positions") is not None:
        kwargs["positions"] = batch["positions"]
    logits = model(batch["input_ids"], **kwargs).float()
    labels = batch["labels"]
    mask = labels != -100
    token_lp = torch.gather(F.log_softmax(logits, dim=-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_lp * mask).sum(-1)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, chosen rewards, rejected rewards) from per-example summed log-probs.

    label_smoothing > 0 is the conservative DPO variant (the preference label is wrong with that probability).
    """
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    losses = -F.logsigmoid(margin) * (1 - label_smoothing) - F.logsigmoid(-margin) * label_smoothing
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses.mean(), chosen_rewards, rejected_rewards


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class DPOLoss:
    """A `loss_fn(model, batch)` for `run_training`: batch rows [:n] are chosen, [n:] rejected.

    reference: None = the policy's own base (adapters disabled; the model must have LoRA adapters);
    an nn.Module = that frozen model (for full fine-tuning: `frozen_reference(model)` before training).
    """

    def __init__(self, beta: float = 0.1, reference: nn.Module | None = None, label_smoothing: float = 0.0) -> None:
        self.beta, self.reference, self.label_smoothing = beta, reference, label_smoothing
        self.last_metrics: dict[str, float] = {}

    def reference_logprobs(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        ctx: AbstractContextManager
        if self.reference is not None:
            ref_model, ctx = self.reference, nullcontext()
        else:
            raw = _unwrap(model)
            if not lora_modules(raw):
                raise ValueError("DPO without a reference model needs LoRA adapters (the reference is the base)")
            ref_model, ctx = raw, lora_disabled(raw)
        with torch.no_grad(), ctx:
            return sequence_logprobs(ref_model, batch)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        n = batch["input_ids"].shape[0] // 2
        ref = self.reference_logprobs(model, batch)
        policy = sequence_logprobs(model, batch)
        loss, chosen_r, rejected_r = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], self.beta,
                                              self.label_smoothing)
        self.last_metrics = {"reward_margin": float((chosen_r - rejected_r).mean()),
                             "reward_accuracy": float((chosen_r > rejected_r).float().mean())}
        return loss


def frozen_reference(model: nn.Module) -> nn.Module:
    """A frozen deep copy of `model` in eval mode (the DPO reference for full fine-tuning)."""
    ref = copy.deepcopy(_unwrap(model)).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref



# -- data ------------------------------------------------------------------------------------------

@dataclass
class PreferencePair:
    """Token ids of prompt+chosen and prompt+rejected, and how many leading tokens are prompt (no loss)."""

    chosen: list[int]
    rejected: list[int]
    chosen_prompt_len: int
    rejected_prompt_len: int
    margin: float = 0.0  # how much better chosen is (reward models' margin term; DPO ignores it)


def _render_ids(render: Callable[[list[dict], bool], str], tokenizer: Any, messages: list[dict],
                response: str) -> tuple[list[int], int]:
    """(ids of prompt + response, number of prompt ids), tokenized piecewise as `data.instruct` does so the
    boundary falls exactly between the generation prompt and the reply (with its end-of-turn marker)."""
    prompt_text = render(messages, True)
    full_text = render([*messages, {"role": "assistant", "content": response}], False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template does not render the reply as a continuation of the prompt")
    ids: list[int] = []
    bos_token = getattr(tokenizer, "bos_token", None) or ""
    if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None and not (
            bos_token and prompt_text.startswith(bos_token)):
        ids.append(tokenizer.bos_id)
    ids += tokenizer.encode(prompt_text, add_bos=False, add_eos=False)
    prompt_len = len(ids)
    ids += tokenizer.encode(full_text[len(prompt_text):], add_bos=False, add_eos=False)
    return ids, prompt_len


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def _hh_messages(text: str) -> list[dict] | None:
    """Messages of an Anthropic HH transcript ("\n\nHuman: ...\n\nAssistant: ..."), None if it is not one."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def _response(value: Any, key: str, where: str) -> tuple[list[dict] | None, str]:
    """(the conversation before the reply if `value` carries one, the reply text) of a chosen/rejected field:
    a string, {"content": str}, an Anthropic HH transcript, or a message list ending with the assistant's turn
    (UltraFeedback)."""
    if isinstance(value, dict) and "content" in value:
        value = value["content"]
    if isinstance(value, str) and value.startswith("\n\nHuman:"):
        msgs = _hh_messages(value)
        if not msgs or msgs[-1]["role"] != "assistant":
            raise FormatError(f"{where}: {key!r} looks like an Anthropic HH transcript but does not end with an "
                              "'\\n\\nAssistant: ' turn")
        return msgs[:-1], msgs[-1]["content"]
    if isinstance(value, list):
        if not value or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                and isinstance(m.get("content"), str) for m in value):
            raise FormatError(f"{where}: {key!r} as a list must hold {{role, content}} messages")
        if value[-1]["role"] != "assistant":
            raise FormatError(f"{where}: {key!r} must end with an assistant message, got {value[-1]['role']!r}")
        return [{"role": m["role"], "content": m["content"]} for m in value[:-1]], value[-1]["content"]
    if not isinstance(value, str):
        raise FormatError(f"{where}: {key!r} must be a string, a message list or an HH transcript")
    return None, value


def preference_record(rec: Any, where: str) -> tuple[list[dict], str, str, float]:
    """(prompt messages, chosen reply, rejected reply, margin) of one preference record in any of the layouts:
    {"prompt" | "messages", "chosen", "rejected"} (prompt a string or messages; replies strings), Anthropic HH
    ({"chosen", "rejected"} full transcripts), UltraFeedback ({"prompt", "chosen", "rejected"} with message
    lists). margin: the record's "margin", else score_chosen - score_rejected (UltraFeedback), else 0."""
    if not isinstance(rec, dict):
        raise FormatError(f"{where}: expected a JSON object with prompt, chosen, rejected")
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise FormatError(f"{where}: missing field {key!r} (expected prompt, chosen, rejected)")
    (chosen_ctx, chosen), (rejected_ctx, rejected) = (_response(rec[k], k, where) for k in ("chosen", "rejected"))
    if chosen_ctx is not None and rejected_ctx is not None and chosen_ctx != rejected_ctx:
        raise FormatError(f"{where}: 'chosen' and 'rejected' differ before their last assistant turn")
    prompt = rec.get("prompt", rec.get("messages"))
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in prompt):
        messages = [dict(m) for m in prompt]
    elif prompt is None and (chosen_ctx or rejected_ctx):
        messages = []
    else:
        raise FormatError(f"{where}: missing field 'prompt' (a string or a list of {{role, content}}), or "
                          "'messages'; expected prompt, chosen, rejected")
    context = chosen_ctx or rejected_ctx
    if context:
        # UltraFeedback repeats the prompt as the first user message of chosen/rejected: the lists win.
        messages = [m for m in messages if m["role"] == "system" and not any(c["role"] == "system"
                                                                              for c in context)] + context
    if not messages or messages[-1]["role"] != "user":
        raise FormatError(f"{where}: the prompt must end with a user message")
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text:
            raise FormatError(f"{where}: {key!r} must be a non-empty string")
    margin = rec.get("margin")
    if margin is None and isinstance(rec.get("score_chosen"), (int, float)) \
            and isinstance(rec.get("score_rejected"), (int, float)):
        margin = rec["score_chosen"] - rec["score_rejected"]
    if margin is None:
        margin = 0.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise FormatError(f"{where}: 'margin' must be a number, got {margin!r}")
    return messages, chosen, rejected, float(margin)


def load_preferences(path: str | os.PathLike, tokenizer: Any, chat_template: Any,
                     system: str | None = None) -> list[PreferencePair]:
    """Read preference JSONL (any layout `preference_record` knows) and render each pair with `chat_template`."""
    path = Path(path)

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return chat_template.render(messages, add_generation_prompt=add_generation_prompt)

    records: list[tuple[int, list[dict], str, str, float]] = []
    for item in read_json_records(path):  # JSONL or a JSON array; bad JSON names its line
        if isinstance(item, BadRecord):
            raise FormatError(str(item))
        lineno, rec = item
        messages, chosen, rejected, margin = preference_record(rec, f"{path}:{lineno}")
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        records.append((lineno, messages, chosen, rejected, margin))
    if not records:
        raise FormatError(f"{path}: no preference records")
    # Render only once every record is known to be well formed.
    pairs: list[PreferencePair] = []
    for lineno, messages, chosen_text, rejected_text, margin in records:
        try:
            chosen, cp = _render_ids(render, tokenizer, messages, chosen_text)
            rejected, rp = _render_ids(render, tokenizer, messages, rejected_text)
        except Exception as e:  # the template raising on this record (e.g. roles not alternating)
            raise FormatError(f"{path}:{lineno}: chat template failed: {e}") from None
        pairs.append(PreferencePair(chosen, rejected, cp, rp, margin))
    return pairs


class PreferenceBatchSource:
    """Resumable, endless (shuffle=True) batches of `micro_batch_size` pairs: 2B right-padded rows.

    whole=False (DPO): rows are next-token inputs (the last token only a label), cut at seq_len from the start;
    whole=True (reward models): rows are the whole conversations a scorer sees, the last seq_len tokens."""

    def __init__(self, pairs: Sequence[PreferencePair], seq_len: int, micro_batch_size: int, *, pad_id: int = 0,
                 shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, whole: bool = False) -> None:
        if not pairs:
            raise ValueError("no preference pairs")
        self.pairs, self.seq_len, self.micro_batch_size = list(pairs), seq_len, micro_batch_size
        self.pad_id, self.shuffle, self.seed, self.whole = pad_id, shuffle, seed, whole
        self._rank, self._world = rank, world_size
        self._cached: tuple[int, np.ndarray] | None = None
        self.batches = 0

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = int(state["batches"])

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs)) if self.shuffle
                     else np.arange(len(self.pairs)))
            self._cached = (epoch, order)
        return self._cached[1]

    def _row(self, ids: list[int], prompt_len: int) -> tuple[list[int], list[int]]:
        if self.whole:  # labels only mark the reply for the loop's token counts
            cut = max(0, len(ids) - self.seq_len)
            return ids[cut:], [tok if t >= prompt_len else -100 for t, tok in enumerate(ids)][cut:]
        ids = ids[: self.seq_len + 1]
        labels = [tok if t + 1 >= prompt_len else -100 for t, tok in enumerate(ids[1:])]
        return ids[:-1], labels

    def collate(self, pairs: Sequence[PreferencePair]) -> dict[str, Tensor]:
        rows = [self._row(p.chosen, p.chosen_prompt_len) for p in pairs]
        rows += [self._row(p.rejected, p.rejected_prompt_len) for p in pairs]
        T = max(len(r[0]) for r in rows)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), T), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.bool)
        for i, (inp, lab) in enumerate(rows):
            input_ids[i, : len(inp)] = torch.tensor(inp)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(inp)] = True
        margin = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "margin": margin}

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        B, n = self.micro_batch_size, len(self.pairs)
        rank, world = rank_and_world_for(self._rank, self._world)
        if not self.shuffle:  # validation: every pair once, rank r takes every world-th batch
            for k, start in enumerate(range(0, n, B)):
                if k % world == rank:
                    yield self.collate([self.pairs[i] for i in range(start, min(n, start + B))])
            return
        while True:  # rank r of W takes rows [r*B, (r+1)*B) of every global batch of W*B pairs
            first = (self.batches * world + rank) * B
            chosen = [self.pairs[self._order(g // n)[g % n]] for g in range(first, first + B)]
            self.batches += 1
            yield self.collate(chosen)


__all__ = ["DPOLoss", "PreferenceBatchSource", "PreferencePair", "dpo_loss", "frozen_reference",
           "load_preferences", "preference_record", "sequence_logprobs"]
