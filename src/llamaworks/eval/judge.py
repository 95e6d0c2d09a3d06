"""`llamaworks eval judge`: LLM-as-a-judge on a prompt set, MT-Bench style (Zheng et al. 2023).

Two models answer every prompt; a judge model then
- grades each answer alone from 1 to 10 ("single-answer grading", the verdict written as "Rating: [[7]]"), and
- compares the two answers, once with A shown first and once with B first ("pairwise", "[[A]]" / "[[B]]" /
  "[[C]]" for a tie). As in MT-Bench, a model wins a prompt only if it is preferred in both orders; any other
  pair of verdicts (a swap, a tie, an unreadable verdict) is a tie, so a judge that favours a position cancels.

Answers and judgments come from a local model (any `--model` path, on the engine) or any OpenAI-compatible
endpoint (`/v1/chat/completions`, e.g. `llamaworks serve`). Results: win/tie/loss counts and rates with 95%
Wilson score intervals, mean grades with 95% normal-approximation intervals, and every prompt's answers,
judgments and verdicts.

Prompt files (JSONL or a JSON array): {"prompt": str} or {"question": str} (one turn), {"turns": [str, ...]}
(MT-Bench's question.jsonl: each turn answered in turn, the judge sees the whole dialogue), or {"messages": [...]}
(its user messages); optional "id"/"question_id" and "category".
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.instruct import parse_json_records
from ..data.records import RecordInvalid
from ..errors import ConfigError, FormatError, LlamaworksError

Message = dict[str, str]
# A chat model as the judge code sees it: a batch of conversations in, one reply per conversation out.
ChatFn = Callable[[Sequence[Sequence[Message]]], list[str]]

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile

SINGLE_SYSTEM = (
    "You are an impartial judge. Rate the quality of the AI assistant's answers in the conversation below: "
    "consider helpfulness, relevance, accuracy, depth and level of detail. Begin with a short explanation, "
    "then give your rating from 1 to 10 strictly in this format: \"Rating: [[5]]\".")
PAIR_SYSTEM = (
    "You are an impartial judge. Compare the answers of two AI assistants to the user's questions below and "
    "decide which assistant answered better: consider helpfulness, relevance, accuracy, depth and level of "
    "detail. Do not let the order in which the answers appear, their length or the assistants' names influence "
    "you. Begin with a short explanation, then give your verdict strictly in this format: \"[[A]]\" if "
    "assistant A is better, \"[[B]]\" if assistant B is better, \"[[C]]\" for a tie.")


@dataclass
class JudgePrompt:
    id: str
    turns: list[str]
    category: str | None = None


def read_prompts(path: str | Path) -> list[JudgePrompt]:
    """The prompts of a JSONL / JSON file (see the module docstring); DatasetError lists malformed records."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such prompts file")
    def parse(rec: Any) -> JudgePrompt:
        turns: Any = None
        if isinstance(rec, dict):
            if isinstance(rec.get("turns"), list):
                turns = rec["turns"]
            elif isinstance(rec.get("messages"), list):
                turns = [m.get("content") for m in rec["messages"] if isinstance(m, dict) and m.get("role") == "user"]
            elif "prompt" in rec or "question" in rec:
                turns = [rec.get("prompt", rec.get("question"))]
        if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise RecordInvalid("expected \"prompt\": non-empty string, \"turns\": [strings] or \"messages\" with "
                                "user messages")
        count[0] += 1
        ident = rec.get("id", rec.get("question_id", count[0]))
        category = rec.get("category")
        return JudgePrompt(str(ident), list(turns), category if isinstance(category, str) else None)

    count = [0]  # the default id: the prompt's 1-based number among the well-formed ones
    out = parse_json_records(path, parse)
    if not out:
        raise FormatError(f"{path}: no prompts")
    return out


# -- chat models: local (the engine) or an OpenAI-compatible endpoint --------------------------------------------

def local_chat(llm: Any, **sampling: Any) -> ChatFn:
    """A ChatFn over an `api.LLM`: the batch decoded together in the scheduler's rows (seeded per position)."""
    from ..engine.scheduler import generate_batch

    def chat(batch: Sequence[Sequence[Message]]) -> list[str]:
        prompts = [llm.encode_chat(list(messages)) for messages in batch]
        return [r.text.strip() for r in generate_batch(llm.scheduler, prompts, llm.sampling(**sampling))]

    return chat


def endpoint_chat(url: str, model: str | None = None, api_key: str | None = None, *, timeout: float = 600.0,
                  **sampling: Any) -> ChatFn:
    """A ChatFn over an OpenAI-compatible server: `url` is its base (".../v1") or the full chat-completions URL;
    `model` defaults to the first id the server lists under /models. sampling: temperature, max_tokens, seed."""
    base = url.rstrip("/")
    if base.endswith("/chat/completions"):
        base = base[: -len("/chat/completions")]
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    body_extra = {k: v for k, v in sampling.items() if v is not None}

    def request(path: str, payload: dict[str, Any] | None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(base + path, data=data, headers=headers, method="GET" if data is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300]
            with contextlib.suppress(ValueError, KeyError, TypeError):
                detail = json.loads(detail)["error"]["message"]
            raise LlamaworksError(f"{base}{path}: HTTP {e.code}: {' '.join(str(detail).split())}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise LlamaworksError(f"{base}{path}: cannot reach the endpoint ({reason})") from None
        except ValueError:
            raise LlamaworksError(f"{base}{path}: the answer is not JSON") from None

    name = model
    if name is None:
        listed = request("/models", None)
        try:
            name = str(listed["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise LlamaworksError(f"{base}/models: no model listed; name one (--judge NAME)") from None

    def chat(batch: Sequence[Sequence[Message]]) -> list[str]:
        out = []
        for messages in batch:
            reply = request("/chat/completions", {"model": name, "messages": list(messages), **body_extra})
            try:
                out.append(str(reply["choices"][0]["message"]["content"] or "").strip())
            except (KeyError, IndexError, TypeError):
                raise LlamaworksError(f"{base}/chat/completions: no choices[0].message.content in the answer") \
                    from None
        return out

    return chat


# -- verdicts --------------------------------------------------------------------------------------------------

def dialogue(turns: Sequence[str], answers: Sequence[str], who: str = "Assistant") -> str:
    """A conversation as the judge reads it."""
    parts = []
    for i, (q, a) in enumerate(zip(turns, answers), start=1):
        tag = f" (turn {i})" if len(turns) > 1 else ""
        parts.append(f"### User{tag}:\n{q}\n\n### {who}{tag}:\n{a}")
    return "\n\n".join(parts)


def single_messages(prompt: JudgePrompt, answers: Sequence[str]) -> list[Message]:
    return [{"role": "system", "content": SINGLE_SYSTEM},
            {"role": "user", "content": f"[The Start of the Conversation]\n{dialogue(prompt.turns, answers)}\n"
                                        "[The End of the Conversation]"}]


def pair_messages(prompt: JudgePrompt, first: Sequence[str], second: Sequence[str]) -> list[Message]:
    return [{"role": "system", "content": PAIR_SYSTEM},
            {"role": "user", "content": f"[The Start of Assistant A's Conversation]\n"
                                        f"{dialogue(prompt.turns, first, 'Assistant A')}\n"
                                        "[The End of Assistant A's Conversation]\n\n"
                                        "[The Start of Assistant B's Conversation]\n"
                                        f"{dialogue(prompt.turns, second, 'Assistant B')}\n"
                                        "[The End of Assistant B's Conversation]"}]


def parse_pair(text: str) -> str | None:
    """"A", "B" or "tie" from a pairwise judgment (its last [[A]]/[[B]]/[[C]]), None when there is none."""
    found = re.findall(r"\[\[\s*([ABC])\s*\]\]", text)
    return None if not found else {"A": "A", "B": "B", "C": "tie"}[found[-1]]


def parse_rating(text: str) -> float | None:
    """The 1-10 rating of a single-answer judgment ("[[7]]", else "[7]" or "Rating: 7"), None when absent."""
    for pattern in (r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", r"\[\s*(\d+(?:\.\d+)?)\s*\]", r"[Rr]ating:\s*(\d+(?:\.\d+)?)"):
        found = re.findall(pattern, text)
        if found:
            value = float(found[-1])
            return value if 1 <= value <= 10 else None
    return None


def combine(ab: str | None, ba: str | None) -> str:
    """The prompt's outcome from the verdict with model A shown first (`ab`) and with B shown first (`ba`, its
    "A" meaning model B): "a" or "b" when both orders prefer the same model, else "tie" (MT-Bench)."""
    first = {"A": "a", "B": "b"}.get(ab or "")
    second = {"A": "b", "B": "a"}.get(ba or "")
    return first if first is not None and first == second else "tie"


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion k/n (Wilson 1927; Newcombe 1998, method 3)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float, float] | None:
    """(mean, low, high): a 95% normal-approximation interval of the mean (sample standard deviation)."""
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return (mean, mean - z * sd / math.sqrt(n), mean + z * sd / math.sqrt(n))


# -- the run -------------------------------------------------------------------------------------------------

def answer_all(chat: ChatFn, prompts: Sequence[JudgePrompt]) -> list[list[str]]:
    """Each prompt's answers, turn by turn (the answer to turn t is history for turn t + 1)."""
    answers: list[list[str]] = [[] for _ in prompts]
    for turn in range(max(len(p.turns) for p in prompts)):
        live = [i for i, p in enumerate(prompts) if turn < len(p.turns)]
        batch = []
        for i in live:
            history: list[Message] = []
            for q, a in zip(prompts[i].turns, answers[i]):
                history += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            batch.append([*history, {"role": "user", "content": prompts[i].turns[turn]}])
        for i, reply in zip(live, chat(batch)):
            answers[i].append(reply)
    return answers


def judge_pairs(judge: ChatFn, prompts: Sequence[JudgePrompt], answers_a: Sequence[Sequence[str]],
                answers_b: Sequence[Sequence[str]], *, mode: str = "both", batch_size: int = 8,
                progress: bool = False, names: tuple[str, str] = ("model_a", "model_b")) -> dict[str, Any]:
    """Judge every prompt (mode "pairwise", "single" or "both") and summarise; returns the results dict."""
    from tqdm.auto import tqdm

    if mode not in ("pairwise", "single", "both"):
        raise ConfigError(f"--mode {mode!r}: expected pairwise, single or both")
    jobs: list[tuple[int, str, list[Message]]] = []
    for i, p in enumerate(prompts):
        if mode in ("pairwise", "both"):
            jobs.append((i, "ab", pair_messages(p, answers_a[i], answers_b[i])))
            jobs.append((i, "ba", pair_messages(p, answers_b[i], answers_a[i])))
        if mode in ("single", "both"):
            jobs.append((i, "a", single_messages(p, answers_a[i])))
            jobs.append((i, "b", single_messages(p, answers_b[i])))
    texts: dict[tuple[int, str], str] = {}
    bar = tqdm(total=len(jobs), desc="judging", unit="call", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        for (i, kind, _), text in zip(chunk, judge([m for _, _, m in chunk])):
            texts[(i, kind)] = text
        bar.update(len(chunk))
    bar.close()

    rows = []
    outcomes = {"a": 0, "tie": 0, "b": 0}
    unparsed = 0
    scores: dict[str, list[float]] = {"a": [], "b": []}
    for i, p in enumerate(prompts):
        row: dict[str, Any] = {"id": p.id, "category": p.category, "turns": p.turns,
                               "answer_a": answers_a[i], "answer_b": answers_b[i]}
        if mode in ("pairwise", "both"):
            ab, ba = parse_pair(texts[(i, "ab")]), parse_pair(texts[(i, "ba")])
            unparsed += (ab is None) + (ba is None)
            verdict = combine(ab, ba)
            outcomes[verdict] += 1
            row["pairwise"] = {"a_first": {"judgment": texts[(i, "ab")], "verdict": ab},
                               "b_first": {"judgment": texts[(i, "ba")], "verdict": ba},
                               "winner": {"a": names[0], "b": names[1]}.get(verdict, "tie")}
        if mode in ("single", "both"):
            for side in ("a", "b"):
                rating = parse_rating(texts[(i, side)])
                if rating is None:
                    unparsed += 1
                else:
                    scores[side].append(rating)
                row[f"grade_{side}"] = {"judgment": texts[(i, side)], "rating": rating}
        rows.append(row)

    results: dict[str, Any] = {"model_a": names[0], "model_b": names[1], "prompts": len(prompts), "mode": mode,
                               "unparsed_judgments": unparsed}
    if mode in ("pairwise", "both"):
        n = len(prompts)
        results["pairwise"] = {
            "rule": "a model wins a prompt only if the judge prefers it in both orders; anything else is a tie",
            "ci": "95% Wilson score interval",
            "wins_a": outcomes["a"], "ties": outcomes["tie"], "wins_b": outcomes["b"],
            **{f"{key}_rate": {"value": outcomes[o] / n, "ci95": list(wilson_interval(outcomes[o], n))}
               for key, o in (("win_a", "a"), ("tie", "tie"), ("win_b", "b"))}}
    if mode in ("single", "both"):
        results["single"] = {"ci": "95% normal approximation of the mean"}
        for side in ("a", "b"):
            m = mean_interval(scores[side])
            results["single"][side] = {"graded": len(scores[side]), "mean": m[0] if m else None,
                                       "ci95": [m[1], m[2]] if m else None}
    results["per_prompt"] = rows
    return results


def summary(results: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    a, b = results["model_a"], results["model_b"]
    lines = [f"judge: {results['prompts']} prompt(s), {a} (A) vs {b} (B)"]
    if "pairwise" in results:
        pw = results["pairwise"]

        def rate(key: str) -> str:
            r = pw[f"{key}_rate"]
            return f"{r['value']:.1%} [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]"

        lines.append(f"  pairwise (both orders): A wins {pw['wins_a']} {rate('win_a')}, ties {pw['ties']} "
                     f"{rate('tie')}, B wins {pw['wins_b']} {rate('win_b')} (95% Wilson)")
    if "single" in results:
        for side, name in (("a", a), ("b", b)):
            s = results["single"][side]
            if s["mean"] is not None:
                lines.append(f"  grade {side.upper()} ({name}): {s['mean']:.2f} / 10 [{s['ci95'][0]:.2f}, "
                             f"{s['ci95'][1]:.2f}] over {s['graded']} graded")
            else:
                lines.append(f"  grade {side.upper()} ({name}): no readable rating")
    if results["unparsed_judgments"]:
        lines.append(f"  {results['unparsed_judgments']} judgment(s) without a readable verdict (counted as ties / "
                     "left out of the grades)")
    return "\n".join(lines)


def _chat_for(model: str | None, url: str | None, api_key: str | None, loaded: dict[str, Any],
              model_kwargs: dict[str, Any], rows: int, **sampling: Any) -> tuple[ChatFn, str]:
    """A ChatFn for a local model path (loaded once per path) or an endpoint; and the name results use."""
    if url:
        return endpoint_chat(url, model, api_key, temperature=sampling.get("temperature"),
                             max_tokens=sampling.get("max_new_tokens"), seed=sampling.get("seed")), \
            f"{model or 'default'} @ {url}"
    key = str(model)
    if key not in loaded:
        from ..api import load
        from ..engine.backend import EngineOptions

        kw = dict(model_kwargs)
        cpu_target = kw.pop("cpu_target", "native")
        kw["max_context"] = kw.get("max_context") or 4096  # judge prompts hold two answers; 8k rows are not needed
        loaded[key] = load(model, **kw, options=EngineOptions.from_environment(cpu_target=cpu_target)
                           .with_(max_rows=rows))
    return local_chat(loaded[key], **sampling), model or "default"


def judge_main(*, prompts: str, model_a: str | None, model_b: str | None, judge: str | None,
               url_a: str | None = None, url_b: str | None = None, judge_url: str | None = None,
               api_key: str | None = None, mode: str = "both", out: str | None = None, max_tokens: int = 256,
               judge_max_tokens: int = 512, temperature: float = 0.0, seed: int = 0, rows: int = 4,
               limit: int | None = None, progress: bool = True,
               model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """`llamaworks eval judge`: answer with A and B, judge, write the results JSON (atomically) and return it."""
    from ..files import atomic_write_text

    items = read_prompts(prompts)[:limit] if limit else read_prompts(prompts)
    loaded: dict[str, Any] = {}
    kw = model_kwargs or {}
    answer = {"temperature": temperature, "max_new_tokens": max_tokens, "seed": seed}
    chat_a, name_a = _chat_for(model_a, url_a, api_key, loaded, kw, rows, **answer)
    chat_b, name_b = _chat_for(model_b, url_b, api_key, loaded, kw, rows, **answer)
    if name_a == name_b:
        name_a, name_b = f"{name_a} (A)", f"{name_b} (B)"
    judge_fn, judge_name = _chat_for(judge, judge_url, api_key, loaded, kw, rows, temperature=0.0,
                                     max_new_tokens=judge_max_tokens, seed=seed)
    answers_a = answer_all(chat_a, items)
    answers_b = answer_all(chat_b, items)
    results = judge_pairs(judge_fn, items, answers_a, answers_b, mode=mode, batch_size=rows, progress=progress,
                          names=(name_a, name_b))
    results = {"judge": judge_name, **results}
    if out:
        atomic_write_text(out, json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    return results
