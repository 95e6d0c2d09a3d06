"""Ghost Attention (GAtt) data, as the LLaMA 2 paper (Touvron et al. 2023, sec. 3.3) describes it.

Given multi-turn conversations (only their user turns are used) and a set of instructions ("end every reply with
🦙", "act as a pirate"):
1. each conversation gets one instruction (seeded draw), attached to *every* user turn;
2. the assistant's replies are sampled turn by turn with the model, on the engine (`api.LLM` + the scheduler,
   all conversations of a turn decoded together);
3. for training the instruction is kept only in the first user turn, and every reply but the last carries
   `"weight": 0` (the loss is zero on the previous turns' tokens, as in the paper); `every_turn` also emits each
   shorter prefix, so every sampled reply is learned once, each behind its own history.

A weak model does not follow an instruction even when it is repeated every turn (SmolLM2-135M ends a reply with
🦙 in about 1 try in 8, docs/finetuning.md), so a rule (`Rule`: "ends-with:🦙", "starts-with:Ahoy",
"contains:TEXT", "regex:PATTERN") can be given: a reply failing it (or cut at max_new_tokens, or nothing but the
rule's text, see `acceptable`) is resampled up to `tries` times, and a conversation whose turn never passes is
cut before that turn. `repair` (for a model that cannot follow the instruction at all, as SmolLM2-135M) adds the
missing end/start text to a whole reply on the last try: the data then shows the behaviour the model lacks, the
content of every reply still being the model's own. The same rules measure adherence
(`benchmarks/gatt_adherence.py`).

Output: JSONL in the OpenAI messages layout `finetune` reads, one record per conversation (or prefix), with the
instruction under "instruction".
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, FormatError
from .instruct import Message, load_conversations, parse_json_records, report_bad
from .records import DatasetError, RecordInvalid
from .textfile import read_text

RULE_KINDS = ("ends-with", "starts-with", "contains", "regex")


@dataclass(frozen=True)
class Rule:
    """A check of one reply's text, written "KIND:VALUE" (KIND one of RULE_KINDS); surrounding whitespace of
    the reply is ignored."""

    kind: str
    value: str

    @classmethod
    def parse(cls, spec: str, where: str = "--check") -> Rule:
        kind, sep, value = spec.partition(":")
        if not sep or kind not in RULE_KINDS or not value:
            raise ConfigError(f"{where} {spec!r}: expected KIND:VALUE with KIND one of {', '.join(RULE_KINDS)} "
                              "(e.g. ends-with:🦙)")
        if kind == "regex":
            try:
                re.compile(value)
            except re.error as e:
                raise ConfigError(f"{where} {spec!r}: invalid regular expression: {e}") from None
        return cls(kind, value)

    def __call__(self, reply: str) -> bool:
        text = reply.strip()
        if self.kind == "ends-with":
            return text.endswith(self.value)
        if self.kind == "starts-with":
            return text.startswith(self.value)
        if self.kind == "contains":
            return self.value in text
        return re.search(self.value, text) is not None

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


@dataclass(frozen=True)
class Instruction:
    text: str
    rule: Rule | None = None


def read_instructions(path: str | Path, default_rule: Rule | None = None) -> list[Instruction]:
    """Instructions of a text file (one per line, blank lines and lines starting with # skipped) or a JSONL/JSON
    file of {"instruction": str, "check": "KIND:VALUE" (optional)} records. `default_rule` applies where a record
    names none."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such instructions file")
    out: list[Instruction] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        def parse(rec: Any) -> Instruction:
            text = rec.get("instruction") if isinstance(rec, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise RecordInvalid("expected {\"instruction\": non-empty string, \"check\": optional KIND:VALUE}")
            check = rec.get("check")
            if check is not None and not isinstance(check, str):
                raise RecordInvalid("'check' must be a string KIND:VALUE")
            try:
                return Instruction(text.strip(), Rule.parse(check, "check") if check else default_rule)
            except ConfigError as e:
                raise RecordInvalid(str(e)) from None

        out = parse_json_records(path, parse)
    else:
        text, _ = read_text(path)
        out = [Instruction(line.strip(), default_rule) for line in text.splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    if not out:
        raise FormatError(f"{path}: no instructions (one per line, or JSONL records with \"instruction\")")
    return out


def attach(instruction: str, user: str) -> str:
    """A user turn with the instruction in front (how GAtt's sampling prompt and the training turn 1 read)."""
    return f"{instruction}\n\n{user}" if instruction else user


def user_turns(messages: Sequence[Message]) -> tuple[str | None, list[str]]:
    """(system prompt or None, the user turns) of a conversation: each user message is a turn that gets a reply
    (so a file of user messages alone is a multi-turn chat); the conversation's own replies are not used."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    return system, [m["content"] for m in messages if m["role"] == "user" and m["content"].strip()]


@dataclass
class GattStats:
    conversations: int = 0  # read
    kept: int = 0  # with at least one reply
    replies: int = 0  # sampled and kept
    tries: int = 0  # replies sampled in all (retries included)
    cut: int = 0  # conversations cut before a turn whose replies never passed the rule (or did not fit)
    repaired: int = 0  # replies kept after adding the rule's missing text (repair)
    records: int = 0
    by_instruction: dict[str, int] = field(default_factory=dict)  # conversations kept per instruction

    def summary(self) -> str:
        rate = f", {self.replies / self.tries:.0%} of samples kept" if self.tries > self.replies else ""
        return (f"gatt: {self.conversations} conversation(s) -> {self.records} record(s); {self.replies} repl"
                f"{'y' if self.replies == 1 else 'ies'} sampled in {self.tries} tries{rate}; {self.cut} "
                f"conversation(s) cut short, {self.conversations - self.kept} without any reply"
                + (f"; {self.repaired} repl{'y' if self.repaired == 1 else 'ies'} repaired" if self.repaired else ""))


@dataclass
class _Chat:
    system: str | None
    turns: list[str]
    instruction: Instruction
    index: int = 0  # position in the input: part of each draw's seed
    replies: list[str] = field(default_factory=list)
    done: bool = False

    def prompt(self, attach_all: bool = True) -> list[Message]:
        """The history up to the next reply, the instruction on every user turn (attach_all) or the first."""
        out: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        for i, user in enumerate(self.turns[:len(self.replies) + 1]):
            out.append({"role": "user", "content": attach(self.instruction.text, user)
                        if attach_all or i == 0 else user})
            if i < len(self.replies):
                out.append({"role": "assistant", "content": self.replies[i]})
        return out


def training_records(chat: _Chat, every_turn: bool) -> list[dict[str, Any]]:
    """GAtt training records of a sampled chat: the instruction only in the first user turn, the loss only on
    the last reply (earlier replies `"weight": 0`); with every_turn one record per reply."""
    records = []
    ends = range(1, len(chat.replies) + 1) if every_turn else [len(chat.replies)]
    for end in ends:
        messages: list[Message] = [{"role": "system", "content": chat.system}] if chat.system else []
        for i in range(end):
            messages.append({"role": "user", "content": attach(chat.instruction.text, chat.turns[i])
                             if i == 0 else chat.turns[i]})
            reply: Message = {"role": "assistant", "content": chat.replies[i]}
            if i < end - 1:
                reply["weight"] = 0
            messages.append(reply)
        records.append({"messages": messages, "instruction": chat.instruction.text})
    return records


def sample_gatt(llm: Any, conversations: Sequence[Sequence[Message]], instructions: Sequence[Instruction], *,
                seed: int = 0, tries: int = 1, every_turn: bool = False, max_turns: int | None = None,
                repair: bool = False, progress: bool = True, **sampling: Any) -> tuple[list[dict[str, Any]], GattStats]:
    """GAtt records for `conversations` (their user turns) sampled with `llm` (an `api.LLM`); see the module
    docstring. sampling: the LLM's sampling keywords (temperature, max_new_tokens, ...); each try of each reply
    draws from its own seed derived from `seed`."""
    from tqdm.auto import tqdm

    from ..engine.scheduler import generate_batch
    from ..sampling import ContextLengthError

    if tries < 1:
        raise ConfigError(f"--tries {tries}: expected at least 1")
    if repair and any(i.rule is None or i.rule.kind not in ("ends-with", "starts-with") for i in instructions):
        raise ConfigError("--repair needs an ends-with: or starts-with: rule (--check) for every instruction")
    if not instructions:
        raise ConfigError("no instructions given")
    rng = random.Random(seed)
    stats = GattStats(conversations=len(conversations))
    chats = []
    for index, messages in enumerate(conversations):
        system, turns = user_turns(messages)
        chats.append(_Chat(system, turns[:max_turns] if max_turns else turns, rng.choice(list(instructions)),
                           index))
    chats = [c for c in chats if c.turns]
    bar = tqdm(total=sum(len(c.turns) for c in chats), desc="gatt replies", unit="reply", disable=not progress)
    turn = 0
    while True:
        pending = [c for c in chats if not c.done and turn < len(c.turns)]
        if not pending:
            break
        for attempt in range(tries):
            prompts, fitting = [], []
            for c in pending:
                ids = llm.encode_chat(c.prompt())
                if len(ids) < llm.context_size:
                    prompts.append(ids)
                    fitting.append(c)
                else:  # no room left for a reply: the conversation ends here
                    c.done = True
                    stats.cut += 1
            params = [llm.sampling(seed=hash_seed(seed, c.index, turn, attempt), **sampling)
                      for c in fitting]
            try:
                results = generate_batch(llm.scheduler, prompts, params)
            except ContextLengthError as e:  # guarded above; kept as a clear message should it happen
                raise ConfigError(f"gatt: {e}") from None
            stats.tries += len(results)
            pending = []
            for c, r in zip(fitting, results):
                kept = accept(r.text, r.finish_reason, c.instruction.rule, repair and attempt == tries - 1)
                stats.repaired += kept is not None and c.instruction.rule is not None and \
                    not c.instruction.rule(r.text)
                if kept is not None:
                    c.replies.append(kept)
                    bar.update(1)
                elif attempt == tries - 1:
                    c.done = True
                    stats.cut += 1
                    bar.update(len(c.turns) - turn)
                else:
                    pending.append(c)
            if not pending:
                break
        turn += 1
    bar.close()
    records = []
    for c in chats:
        if c.replies:
            stats.kept += 1
            stats.replies += len(c.replies)
            stats.by_instruction[c.instruction.text] = stats.by_instruction.get(c.instruction.text, 0) + 1
            records += training_records(c, every_turn)
    stats.records = len(records)
    return records, stats


def accept(reply: str, finish_reason: str, rule: Rule | None, repair: bool = False) -> str | None:
    """The reply as kept, or None to resample: not empty; and with a rule, also finished on its own (a reply cut
    at max_new_tokens is not a whole answer), with at least three word characters besides the rule's text (so
    "🦙🦙🦙" alone does not count), and passing the rule; with `repair` (the last try), a whole reply failing an
    ends-with/starts-with rule gets the missing text added."""
    reply = reply.strip()
    if not reply:
        return None
    if rule is None:
        return reply
    rest = reply.replace(rule.value, "") if rule.kind != "regex" else re.sub(rule.value, "", reply)
    if finish_reason != "stop" or len(re.findall(r"\w", rest)) < 3:
        return None
    if rule(reply):
        return reply
    if repair and rule.kind == "ends-with":
        return f"{reply} {rule.value}"
    if repair and rule.kind == "starts-with":
        return f"{rule.value} {reply}"
    return None


def hash_seed(*parts: int) -> int:
    """A seed per (run seed, conversation, turn, try): reproducible, yet every draw differs."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def gatt_main(*, conversations: Sequence[str], instructions: str, out: str, check: str | None = None,
              tries: int = 1, every_turn: bool = False, max_turns: int | None = None, seed: int = 0,
              repair: bool = False,
              rows: int = 8, skip_bad: bool = False, progress: bool = True, model_kwargs: dict[str, Any],
              sampling: dict[str, Any]) -> GattStats:
    """`llamaworks data gatt`: read, sample with the model, write the records (JSONL, atomically)."""
    from ..api import load
    from ..engine.backend import EngineOptions
    from ..files import atomic_write_text

    rule = Rule.parse(check) if check else None
    instrs = read_instructions(instructions, rule)
    convs, bad = load_conversations(list(conversations), need_reply=False)
    if bad and not skip_bad:
        raise DatasetError(bad)
    if bad:
        print(f"skipped {len(bad)} malformed record(s):\n{report_bad(bad)}")
    if not convs:
        raise FormatError(f"no conversations in {', '.join(conversations)}")
    kw = dict(model_kwargs)
    cpu_target = kw.pop("cpu_target", "native")
    kw["max_context"] = kw.get("max_context") or 2048  # KV rows of the model's full 8k context are not needed
    llm = load(kw.pop("model", None), **kw, options=EngineOptions.from_environment(cpu_target=cpu_target)
               .with_(max_rows=rows))
    records, stats = sample_gatt(llm, [c.messages for c in convs], instrs, seed=seed, tries=tries,
                                 every_turn=every_turn, max_turns=max_turns, repair=repair, progress=progress,
                                 **sampling)
    if not records:
        raise FormatError(f"gatt: no reply passed the rule in {tries} tries for any conversation; raise --tries "
                          "or give an instruction the model can follow")
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(stats.summary())
    print(f"wrote {out}")
    return stats


@dataclass
class Adherence:
    """How often replies kept an instruction given once, in the first user turn: passed/total per turn."""

    passed: list[int]
    total: list[int]
    replies: list[list[str]]  # per chat, its replies

    def rate(self, first: int = 2, last: int | None = None) -> float:
        """Share of replies passing the rule over turns first..last (1-based, inclusive)."""
        last = last or len(self.total)
        n = sum(self.total[first - 1:last])
        return sum(self.passed[first - 1:last]) / n if n else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"per_turn": [p / t if t else None for p, t in zip(self.passed, self.total)],
                "passed": self.passed, "total": self.total, "turns_2_plus": self.rate(2)}


def measure_adherence(llm: Any, chats: Sequence[Sequence[str]], instruction: str, rule: Rule, *,
                      progress: bool = False, **sampling: Any) -> Adherence:
    """Play each chat (a list of user turns) with `llm`, the instruction attached to the first user turn only
    (GAtt's test: does it still hold at later turns?), the model's own replies kept as history; check each reply
    with `rule`. Chats advance turn by turn, decoded together. sampling: e.g. temperature=0 (greedy)."""
    from tqdm.auto import tqdm

    from ..engine.scheduler import generate_batch

    state = [_Chat(None, list(turns), Instruction(instruction, rule), i) for i, turns in enumerate(chats)]
    n_turns = max(len(t) for t in chats)
    passed, total = [0] * n_turns, [0] * n_turns
    bar = tqdm(total=sum(len(t) for t in chats), desc="adherence", unit="reply", disable=not progress)
    for turn in range(n_turns):
        live = [c for c in state if turn < len(c.turns)]
        prompts = [llm.encode_chat(c.prompt(attach_all=False)) for c in live]
        params = [llm.sampling(seed=hash_seed(c.index, turn), **sampling) for c in live]
        for c, r in zip(live, generate_batch(llm.scheduler, prompts, params)):
            c.replies.append(r.text.strip())
            passed[turn] += rule(r.text)
            total[turn] += 1
        bar.update(len(live))
    bar.close()
    return Adherence(passed, total, [c.replies for c in state])
