"""Rejection-sampling fine-tuning's data step (LLaMA 2-Chat, Touvron et al. 2023, section 3.2.3).

For each prompt the policy samples K replies on the engine (the K choices share the prompt, read once), a scorer
ranks them, and the best becomes an SFT record in the chat JSONL `finetune` reads:

    {"messages": [...prompt, {"role": "assistant", "content": BEST}], "reward": r_best, "rewards": [r_1..r_K]}

A round is this step followed by `llamaworks finetune` on its output; the next round samples from the model that
round wrote. -k 1 --temperature 0 scores the policy's greedy answers (the figure a round should raise).

Scorers: a reward model folder (`finetune reward` output, or any transformers LlamaForSequenceClassification
with one label), a Python function `module:fn` called as fn(messages, reply) -> float, or an OpenAI-compatible
endpoint URL asked to grade each reply 1-10 (an LLM judge; `--judge-model` names the model it serves).
"""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, FormatError

Item = tuple[list[dict], str]  # (prompt messages, reply)
Scorer = Callable[[Sequence[Item]], list[float]]


# -- prompts ---------------------------------------------------------------------------------------

def load_prompts(path: str | Path) -> list[list[dict]]:
    """Prompt conversations of a JSONL file: {"prompt": str | messages} or {"messages": [...]} (a trailing
    assistant message, as in SFT data, is dropped: its reply is what gets sampled)."""
    from ..data.instruct import read_json_records
    from ..data.records import BadRecord

    prompts: list[list[dict]] = []
    for item in read_json_records(Path(path)):
        if isinstance(item, BadRecord):
            raise FormatError(str(item))
        lineno, rec = item
        where = f"{path}:{lineno}"
        value = rec.get("prompt", rec.get("messages")) if isinstance(rec, dict) else None
        if isinstance(value, str):
            messages = [{"role": "user", "content": value}]
        elif isinstance(value, list) and value and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value):
            messages = [{"role": m["role"], "content": m["content"]} for m in value]
            if messages[-1]["role"] == "assistant":
                messages = messages[:-1]
        else:
            raise FormatError(f"{where}: expected {{\"prompt\": str or messages}} or {{\"messages\": [...]}}")
        if not messages or messages[-1]["role"] != "user":
            raise FormatError(f"{where}: the prompt must end with a user message")
        prompts.append(messages)
    if not prompts:
        raise FormatError(f"{path}: no prompts")
    return prompts


# -- scorers ---------------------------------------------------------------------------------------

def function_scorer(fn: Callable[[list[dict], str], float], name: str = "the scorer") -> Scorer:
    """A Scorer from fn(messages, reply) -> number."""
    def score(items: Sequence[Item]) -> list[float]:
        out = []
        for messages, reply in items:
            value = fn(messages, reply)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ConfigError(f"{name} returned {value!r:.60}; expected a number")
            out.append(float(value))
        return out

    return score


JUDGE_SYSTEM = ("You are a strict, impartial judge of an AI assistant's replies. Rate how helpful, correct, "
                "harmless and polite the assistant's last reply is, on a scale of 1 to 10.")
JUDGE_TEMPLATE = ("[Conversation]\n{conversation}\n\n[Assistant's reply to rate]\n{reply}\n\n"
                  "Answer with the rating only, in the form [[N]] where N is 1 to 10.")
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_NUMBER = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)(?![\d.])")


def parse_rating(text: str) -> float | None:
    """The judge's 1-10 rating: "[[N]]" (MT-Bench's form), else the first number in 1..10; None without one."""
    m = _RATING.search(text)
    if m is None:
        m = next((x for x in _NUMBER.finditer(text) if 1 <= float(x.group(1)) <= 10), None)
    if m is None:
        return None
    value = float(m.group(1))
    return value if 1 <= value <= 10 else None


def chat_completions_url(url: str) -> str:
    """The chat completions address of an OpenAI-compatible base URL (http://host:port, .../v1 or the route)."""
    if not re.match(r"^https?://", url):
        raise ConfigError(f"{url!r}: expected an http:// or https:// URL")
    base = url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


class EndpointJudge:
    """An OpenAI-compatible chat endpoint grading each reply 1-10 at temperature 0. A reply with no rating in it
    scores -inf (never the best) and is counted in `unrated`."""

    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None,
                 timeout: float = 120.0) -> None:
        self.url = chat_completions_url(url)
        self.model, self.api_key, self.timeout = model or "default", api_key, timeout
        self.unrated = 0

    def request(self, messages: list[dict], reply: str) -> str:
        conversation = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        body = {"model": self.model, "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "system", "content": JUDGE_SYSTEM},
                             {"role": "user", "content": JUDGE_TEMPLATE.format(conversation=conversation,
                                                                               reply=reply)}]}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = json.loads(resp.read(1 << 20))
        except urllib.error.HTTPError as e:
            raise ConfigError(f"{self.url}: the judge answered HTTP {e.code} ({e.reason})") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise ConfigError(f"{self.url}: cannot reach the judge ({getattr(e, 'reason', e)})") from None
        except json.JSONDecodeError:
            raise FormatError(f"{self.url}: the judge's answer is not JSON") from None
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise FormatError(f"{self.url}: expected an OpenAI chat completion (choices[0].message.content)") from None
        return content if isinstance(content, str) else ""

    def __call__(self, items: Sequence[Item]) -> list[float]:
        out = []
        for messages, reply in items:
            rating = parse_rating(self.request(messages, reply))
            if rating is None:
                self.unrated += 1
            out.append(rating if rating is not None else float("-inf"))
        return out


def make_scorer(spec: str | Any, *, judge_model: str | None = None, api_key: str | None = None,
                device: str | None = None, batch_size: int = 8) -> Scorer:
    """A Scorer from a reward model path, "module:fn", an http(s) URL, a loaded RewardScorer / EndpointJudge, or
    a Python function fn(messages, reply) -> float."""
    from .reward import RewardScorer

    if isinstance(spec, (RewardScorer, EndpointJudge)):
        return spec
    if callable(spec):
        return function_scorer(spec, getattr(spec, "__name__", "the scorer"))
    if re.match(r"^https?://", spec):
        return EndpointJudge(spec, model=judge_model, api_key=api_key)
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec) and not Path(spec).exists():
        module_name, fn_name = spec.split(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"--reward {spec}: cannot import it ({e})") from None
        if not callable(fn):
            raise ConfigError(f"--reward {spec}: not a function")
        return function_scorer(fn, spec)
    return RewardScorer.load(spec, device=device, batch_size=batch_size)


# -- sampling --------------------------------------------------------------------------------------

@dataclass
class RejectionResult:
    records: list[dict]  # the SFT records written (best reply per prompt, with its rewards)
    mean_best: float  # mean reward of the kept replies
    mean_all: float  # mean reward of every sample (what one sample per prompt would get on average)
    seconds: float


def best_of_k(llm: Any, prompts: Sequence[list[dict]], scorer: Scorer, k: int, *, params: Any = None,
              progress: bool = True) -> RejectionResult:
    """K replies per prompt from `llm` (an api.LLM), scored, the best kept (ties: the first sampled)."""
    from tqdm.auto import tqdm

    from ..engine.scheduler import generate_batch

    if k < 1:
        raise ConfigError(f"-k {k}: expected at least one sample per prompt")
    params = params or llm.sampling()
    # Requests wait in the scheduler's queue: submit as many prompts at once as it holds choices.
    per_call = max(1, llm.scheduler.queue_size // k)
    if k > llm.scheduler.queue_size:
        raise ConfigError(f"-k {k}: more samples than the engine queues at once ({llm.scheduler.queue_size})")
    t0 = time.perf_counter()
    records: list[dict] = []
    all_rewards: list[float] = []
    bar = tqdm(total=len(prompts), desc=f"best of {k}", unit="prompt", disable=not progress, file=sys.stderr)
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start:start + per_call]
        results = generate_batch(llm.scheduler, [llm.encode_chat(m) for m in chunk], params, n=k)
        for i, messages in enumerate(chunk):
            replies = [r.text.strip() for r in results[i * k:(i + 1) * k]]
            rewards = scorer([(messages, reply) for reply in replies])
            best = max(range(k), key=lambda j: rewards[j])
            records.append({"messages": [*messages, {"role": "assistant", "content": replies[best]}],
                            "reward": rewards[best], "rewards": rewards})
            all_rewards += rewards
        bar.update(len(chunk))
    bar.close()
    finite = [r for r in all_rewards if math.isfinite(r)]
    best_values = [rec["reward"] for rec in records if math.isfinite(rec["reward"])]
    return RejectionResult(records, sum(best_values) / max(1, len(best_values)), sum(finite) / max(1, len(finite)),
                           time.perf_counter() - t0)


def write_records(path: str | Path, records: Sequence[dict]) -> None:
    from ..files import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def rejection_sample(policy: str | Any, reward: str | Any, prompts: str | Sequence[list[dict]], k: int = 4, *,
                     out: str | Path | None = None, temperature: float = 1.0, top_p: float = 1.0,
                     max_new_tokens: int = 128, seed: int | None = 0, judge_model: str | None = None,
                     api_key: str | None = None, device: str | None = None, max_rows: int = 16,
                     progress: bool = True) -> RejectionResult:
    """One round's data: best of `k` replies of `policy` (a path, "default", or a loaded api.LLM) to each prompt
    (a JSONL path or message lists) by `reward` (see make_scorer); written to `out` as chat JSONL if given."""
    from ..api import LLM, load
    from ..engine.backend import EngineOptions

    prompt_list = load_prompts(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
    scorer = make_scorer(reward, judge_model=judge_model, api_key=api_key, device=device)
    if isinstance(policy, LLM):
        llm = policy
    else:
        path = None if policy in (None, "default") else policy
        llm = load(path, device=device, options=EngineOptions(max_rows=max(1, min(max_rows, 4 * k))))
    params = llm.sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    result = best_of_k(llm, prompt_list, scorer, k, params=params, progress=progress)
    if out is not None:
        write_records(out, result.records)
    unrated = getattr(scorer, "unrated", 0)
    if unrated:
        print(f"warning: the judge gave no rating for {unrated} repl(ies); they scored -inf", file=sys.stderr)
    return result


def run_rejection_sampling(**kwargs: Any) -> RejectionResult:
    """CLI entry: prints the round's figures."""
    result = rejection_sample(**kwargs)
    print(f"{len(result.records)} prompt(s), best of {kwargs.get('k', 4)}: mean reward of the kept replies "
          f"{result.mean_best:.4f}, of all samples {result.mean_all:.4f} ({result.seconds:.1f} s); wrote "
          f"{kwargs['out']} (train on it: llamaworks finetune lora --data {kwargs['out']} ...)", flush=True)
    return result


__all__ = ["EndpointJudge", "RejectionResult", "best_of_k", "chat_completions_url", "function_scorer",
           "load_prompts", "make_scorer", "parse_rating", "rejection_sample", "run_rejection_sampling",
           "write_records"]
