"""`llamaworks eval persona`: does a fine-tuned model talk like the persona it learned, and not just parrot it?

Held-out prompts: the conversations of `--data` that fine-tuning held out (`--val-fraction`, the same seeded split
as `finetune`; read from the run's `finetune.json` when MODEL is a run folder). Every persona reply in them is a
prompt: the messages before it (the last `context_messages`) go to each model (the fine-tuned one and `--base`),
greedy by default; the persona's real reply is kept as the reference column.

Metrics, over the replies of one model:
- marker rates: share of replies using a persona marker. Markers are learned from the training chat: the
  sentence-final syllables ("용", "당") most over-represented in the persona's messages against the other
  speakers', and the word n-grams the persona uses and the others do not (catchphrases); or given with
  `--marker` ("ㅋㅋ" anywhere, "용$" at the end of a sentence). "any ending" is the share with at least one
  sentence ending in a learned/given ending.
- distinct-1 / distinct-2 (Li et al., 2016, "A Diversity-Promoting Objective Function for Neural Conversation
  Models"): distinct n-grams over all n-grams of all replies, words split at whitespace. A model that answers
  "아니용?" to most prompts scores low; `top reply` shows that reply and how often it came.
- copy rates: replies identical to a persona reply (or one line of it) in the training chat, and replies sharing
  a run of `copy_ngram` words with any training message.
- reply length in characters and words.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, FormatError

Message = dict[str, str]

# A sentence ends at these (chat messages often have no punctuation; lines of one message are joined by "\n").
_SENTENCE_END = re.compile(r"[.!?~…\n]+|\s/\s")
# Trailing decoration after the last word: laughter/crying jamo, emoji, punctuation, spaces.
_TRAILING = re.compile(r"[\s\u3131-\u318e\W_]+$")
_HANGUL = re.compile(r"[\uac00-\ud7a3]")


# -- text pieces ------------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    """Whitespace-separated words (Korean eojeol)."""
    return text.split()


def normalize(text: str) -> str:
    return " ".join(text.split())


def sentence_endings(text: str) -> list[str]:
    """The ending of each sentence of `text`: its last Hangul syllable, or its last word (lowercased) when it does
    not end in Hangul. "귀엽당 ㅋㅋ\\n내일 봐용!" -> ["당", "용"]."""
    out = []
    for sentence in _SENTENCE_END.split(text):
        core = _TRAILING.sub("", sentence)
        if not core:
            continue
        if _HANGUL.fullmatch(core[-1]):
            out.append(core[-1])
        else:
            out.append(core.split()[-1].lower())
    return out


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(replies: Iterable[str], n: int) -> float:
    """Li et al. (2016): distinct n-grams / all n-grams over all replies (0.0 when there are no n-grams)."""
    grams = [g for r in replies for g in ngrams(words(r), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


# -- markers ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Marker:
    text: str
    ending: bool  # True: a sentence ends with it; False: it appears anywhere

    @classmethod
    def parse(cls, spec: str) -> Marker:
        """"용$" is a sentence ending, anything else a phrase found anywhere in the reply."""
        text = spec[:-1] if spec.endswith("$") else spec
        if not text.strip():
            raise ConfigError(f"--marker {spec!r}: expected text, e.g. --marker 'ㅋㅋ' or --marker '용$'")
        return cls(text.strip(), spec.endswith("$"))

    @property
    def label(self) -> str:
        return f"-{self.text}" if self.ending else f'"{self.text}"'

    def matches(self, reply: str) -> bool:
        if self.ending:
            return any(e.endswith(self.text) for e in sentence_endings(reply))
        return self.text in reply


def _log_odds(count: int, total: int, other: int, other_total: int) -> float:
    # Add-one smoothing keeps a marker the other speakers never use from scoring infinity.
    return math.log((count + 1) / (total + 1)) - math.log((other + 1) / (other_total + 1))


def learn_markers(persona: Sequence[str], others: Sequence[str], *, endings: int = 3, phrases: int = 2,
                  min_share: float = 0.05) -> list[Marker]:
    """The persona's most distinctive sentence endings and catchphrases (word 1-3-grams) in the training chat:
    used by at least `min_share` of the persona's sentences (endings) or messages (phrases), at least twice as
    often as by the other speakers, ranked by smoothed log-odds."""
    p_end = Counter(e for m in persona for e in sentence_endings(m))
    o_end = Counter(e for m in others for e in sentence_endings(m))
    np_, no = sum(p_end.values()), sum(o_end.values())
    scored = [(_log_odds(c, np_, o_end[e], no), e) for e, c in p_end.items() if c >= max(2, min_share * np_)]
    chosen = [Marker(e, True) for s, e in sorted(scored, key=lambda t: (-t[0], t[1])) if s > math.log(2)][:endings]

    def grams(msgs: Sequence[str]) -> Counter[tuple[str, ...]]:  # presence per message, not repeats
        return Counter(g for m in msgs for g in {g for n in (1, 2, 3) for g in ngrams(words(m), n)})

    p_g, o_g = grams(persona), grams(others)
    ending_texts = {m.text for m in chosen}
    scored_g = [(_log_odds(c, len(persona), o_g[g], len(others)), g) for g, c in p_g.items()
                if c >= max(2, min_share * len(persona))]
    picked: list[Marker] = []
    for s, g in sorted(scored_g, key=lambda t: (-t[0], -len(t[1]), t[1])):
        text = " ".join(g)
        if s <= math.log(3) or len(picked) >= phrases:
            break
        # A word that is only an ending marker again (e.g. "먹장" for "장"), or part of a chosen phrase, adds nothing.
        if text in ending_texts or any(text in m.text or m.text in text for m in picked):
            continue
        picked.append(Marker(text, False))
    return chosen + picked


# -- metrics ----------------------------------------------------------------------------------------
@dataclass
class PersonaMetrics:
    n: int
    marker_rates: dict[str, float]  # marker label -> share of replies
    any_ending: float  # share of replies with a sentence ending in any ending marker
    distinct_1: float
    distinct_2: float
    exact_copy: float  # share of replies identical to a training persona reply (or one line of it)
    ngram_copy: float  # share of replies sharing `copy_ngram` consecutive words with the training chat
    mean_chars: float
    mean_words: float
    top_reply: str
    top_count: int


def persona_metrics(replies: Sequence[str], markers: Sequence[Marker], train_replies: Sequence[str],
                    train_texts: Sequence[str], copy_ngram: int = 4) -> PersonaMetrics:
    """The metrics of the module docstring for `replies` against the training chat."""
    n = len(replies)
    if n == 0:
        raise ConfigError("no replies to measure")
    share = lambda pred: sum(1 for r in replies if pred(r)) / n
    known = {normalize(t) for r in train_replies for t in (r, *r.split("\n")) if normalize(t)}
    train_grams = {g for t in train_texts for g in ngrams(words(t), copy_ngram)}
    endings = [m for m in markers if m.ending]
    top, count = Counter(normalize(r) for r in replies).most_common(1)[0]
    return PersonaMetrics(
        n=n, marker_rates={m.label: share(m.matches) for m in markers},
        any_ending=share(lambda r: any(m.matches(r) for m in endings)) if endings else 0.0,
        distinct_1=distinct_n(replies, 1), distinct_2=distinct_n(replies, 2),
        exact_copy=share(lambda r: normalize(r) in known),
        ngram_copy=share(lambda r: any(g in train_grams for g in ngrams(words(r), copy_ngram))),
        mean_chars=sum(len(r.strip()) for r in replies) / n, mean_words=sum(len(words(r)) for r in replies) / n,
        top_reply=top, top_count=count)


# -- prompts ----------------------------------------------------------------------------------------
@dataclass
class Prompt:
    messages: list[Message]  # ends with a user turn
    reference: str  # the persona's real reply
    source: str  # file:line of the conversation


def held_out_prompts(conversations: Iterable[Any], *, limit: int | None = None,
                     context_messages: int = 6) -> list[Prompt]:
    """One prompt per persona reply in `conversations` (records.Conversation): the last `context_messages`
    messages before it (a leading system message is kept). Replies to an empty user turn (a conversation the
    persona opened) are skipped: there is nothing to answer."""
    out: list[Prompt] = []
    for conv in conversations:
        msgs = conv.messages
        head = msgs[:1] if msgs and msgs[0]["role"] == "system" else []
        body = msgs[len(head):]
        for i, m in enumerate(body):
            if m["role"] != "assistant" or i == 0 or not body[i - 1]["content"].strip():
                continue
            context = body[max(0, i - context_messages):i]
            while context and context[0]["role"] != "user":  # templates expect a user turn first
                context = context[1:]
            out.append(Prompt(head + context, m["content"], f"{conv.file}:{conv.line}"))
            if limit is not None and len(out) >= limit:
                return out
    return out


# -- the command ------------------------------------------------------------------------------------
# Settings of the fine-tuning run that decide how --data is read and split (finetune.json "config"), with the
# types a hostile file must not get past.
_NUMBER = (int, float)
_RUN_FIELDS: dict[str, tuple[type, ...]] = {
    "val_fraction": _NUMBER, "seed": (int,), "kakao_assistant": (str, list, type(None)), "kakao_gap_minutes": _NUMBER,
    "scrub": (str, type(None)), "scrub_names": (list,), "seq_len": (int,), "system": (str, type(None)),
    "train_on_prompt": (bool,), "skip_bad": (bool,)}


@dataclass
class PersonaSettings:
    val_fraction: float | None = None  # None: the run's, else 0.1
    limit: int | None = 40
    context_messages: int = 6
    markers: list[str] = field(default_factory=list)
    copy_ngram: int = 4
    temperature: float = 0.0
    seed: int = 0
    max_new_tokens: int = 48


def run_record(model: str | Path | None) -> tuple[Path | None, dict[str, Any]]:
    """(finetune.json path, its contents) when `model` is a fine-tuning run folder, else (None, {})."""
    if model is None or not Path(model).is_dir() or not (Path(model) / "finetune.json").is_file():
        return None, {}
    from ..files import read_json

    path = Path(model) / "finetune.json"
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise FormatError(f"{path}: expected a finetune.json with a 'config' object")
    return path, doc


def _finetune_config(model: str | Path | None, data: Sequence[str], recorded: dict[str, Any], record: Path | None,
                     overrides: dict[str, Any]) -> Any:
    """A FinetuneConfig reading `data` as the run did (its split settings; never a path the record names)."""
    from ..train.finetune import FinetuneConfig

    kwargs = {k: recorded[k] for k in _RUN_FIELDS if k in recorded}
    for k, v in kwargs.items():
        listed = v if isinstance(v, list) else []
        if not isinstance(v, _RUN_FIELDS[k]) or (isinstance(v, bool) and bool not in _RUN_FIELDS[k]) \
                or not all(isinstance(x, str) for x in listed):
            wanted = " or ".join(t.__name__ for t in _RUN_FIELDS[k])
            raise FormatError(f"{record}: config.{k} is {repr(v)[:40]}; expected {wanted}")
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return FinetuneConfig(model=str(model) if model is not None else None, data=list(data), preview=True,
                              **kwargs)
    except (TypeError, ValueError) as e:
        where = f"{record}: config: " if record else ""
        raise ConfigError(f"{where}{e}") from None


def generate_replies(model: str | Path | None, prompts: Sequence[Prompt], settings: PersonaSettings, *,
                     label: str, progress: bool = True, threads: int | None = None) -> list[str]:
    """Each prompt's reply from `model` on the engine (greedy unless settings.temperature > 0, then seeded)."""
    import sys

    from tqdm import tqdm

    from ..api import load

    llm = load(model, threads=threads)
    replies = []
    for p in tqdm(prompts, desc=label, unit="prompt", disable=not progress, file=sys.stderr, dynamic_ncols=True):
        replies.append(llm.chat(p.messages, temperature=settings.temperature, seed=settings.seed,
                                max_new_tokens=settings.max_new_tokens).strip())
    return replies


def format_table(columns: dict[str, PersonaMetrics], markers: Sequence[Marker],
                 extra: Sequence[tuple[str, dict[str, str]]] = ()) -> str:
    """A markdown table: one row per metric, one column per model (and the persona's held-out replies); `extra`
    rows (label, {column: cell}) go first."""
    names = list(columns)
    rows: list[tuple[str, list[str]]] = [(label, [cells.get(c, "") for c in names]) for label, cells in extra]
    pct = lambda v: f"{100 * v:.0f}%"
    for m in markers:
        rows.append((f"marker {m.label}", [pct(columns[c].marker_rates.get(m.label, 0.0)) for c in names]))
    if any(m.ending for m in markers):
        rows.append(("any ending marker", [pct(columns[c].any_ending) for c in names]))
    rows += [("distinct-1", [f"{columns[c].distinct_1:.3f}" for c in names]),
             ("distinct-2", [f"{columns[c].distinct_2:.3f}" for c in names]),
             ("copied reply (exact)", [pct(columns[c].exact_copy) for c in names]),
             ("copied n-gram", [pct(columns[c].ngram_copy) for c in names]),
             ("mean length (chars / words)", [f"{columns[c].mean_chars:.1f} / {columns[c].mean_words:.1f}"
                                              for c in names]),
             ("top reply", [f"{columns[c].top_reply[:24]!r} x{columns[c].top_count}" for c in names])]
    header = "| metric | " + " | ".join(names) + " |"
    lines = [header, "|" + "---|" * (len(names) + 1)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines)


def evaluate_persona(model: str | Path, data: Sequence[str], *, base: str | Path | None = None,
                     settings: PersonaSettings | None = None, kakao_assistant: Any = None,
                     progress: bool = True, threads: int | None = None,
                     generate: Callable[..., list[str]] = generate_replies) -> dict[str, Any]:
    """Measure `model` (and `base`) on the held-out prompts of `data`; returns the results document."""
    from ..chat_template import template_for
    from ..data.prepare import resolve_tokenizer
    from ..train.finetune import load_sft_data

    settings = settings or PersonaSettings()
    given = [Marker.parse(m) for m in settings.markers]
    record, run_doc = run_record(model)
    recorded: dict[str, Any] = run_doc.get("config", {})
    notes: list[str] = []
    val_fraction = settings.val_fraction
    if val_fraction is None:
        val_fraction = float(recorded.get("val_fraction") or 0.0) if isinstance(
            recorded.get("val_fraction"), (int, float)) else 0.0
        if not val_fraction:
            val_fraction = 0.1
            notes.append(("the run held nothing out (--val-fraction 0): " if record else "")
                         + "prompts are a seeded 10% of the conversations of --data"
                         + (", which the model was trained on" if record else ""))
    cfg = _finetune_config(model, data, recorded, record,
                           {"val_fraction": val_fraction, "kakao_assistant": kakao_assistant})
    tokenizer = resolve_tokenizer(model)
    ds = load_sft_data(cfg.data, tokenizer, template_for(tokenizer, None), cfg, quiet=True)
    train_ds, val_ds = ds.split(cfg.val_fraction, cfg.seed)
    train_convs = [ds.parsed[i] for i in sorted(set(train_ds.groups))]
    val_convs = [ds.parsed[i] for i in sorted(set(val_ds.groups))]
    ran_on = run_doc.get("data", {}).get("conversations") if isinstance(run_doc.get("data"), dict) else None
    if isinstance(ran_on, int) and ran_on != ds.report.conversations:
        notes.append(f"--data has {ds.report.conversations} conversation(s), the run read {ran_on}: not the run's "
                     "data, so the held-out prompts may have been trained on")
    prompts = held_out_prompts(val_convs, limit=settings.limit, context_messages=settings.context_messages)
    if not prompts:
        raise FormatError(f"{', '.join(map(str, data))}: the held-out conversations have no persona reply to a "
                          "user message; raise --val-fraction")
    persona_msgs = [m["content"] for c in train_convs for m in c.messages if m["role"] == "assistant"]
    other_msgs = [m["content"] for c in train_convs for m in c.messages if m["role"] == "user" and m["content"]]
    markers = given or learn_markers(persona_msgs, other_msgs)
    if not markers:
        notes.append("no distinctive persona marker found in the training chat; give some with --marker")
    train_texts = persona_msgs + other_msgs

    def measure(replies: list[str]) -> PersonaMetrics:
        return persona_metrics(replies, markers, persona_msgs, train_texts, settings.copy_ngram)

    replies: dict[str, list[str]] = {}
    if base is not None or (record is not None and recorded.get("model") is None):
        # A base the run recorded as a path is not opened (a path read from a file never decides what is
        # opened); the bundled model (recorded as null) is safe.
        replies["base"] = generate(base, prompts, settings, label="base", progress=progress, threads=threads)
    elif record is not None:
        notes.append(f"base not measured: give --base PATH (the run's base was {recorded.get('model')})")
    replies["fine-tuned"] = generate(model, prompts, settings, label="fine-tuned", progress=progress,
                                     threads=threads)
    replies["persona (held out)"] = [p.reference for p in prompts]
    metrics = {name: measure(r) for name, r in replies.items()}
    extra = []
    before, after = run_doc.get("val_loss_before"), run_doc.get("val_loss")
    if isinstance(after, (int, float)):  # the run's own figures on the same held-out conversations
        cells = {"fine-tuned": f"{after:.3f}"}
        if isinstance(before, (int, float)) and "base" in replies:
            cells["base"] = f"{before:.3f}"
        extra.append(("validation loss (finetune)", cells))
    return {"model": str(model), "base": str(base) if base is not None else recorded.get("model"),
            "data": [str(d) for d in data], "settings": asdict(settings) | {"val_fraction": cfg.val_fraction,
                                                                            "split_seed": cfg.seed},
            "prompts": len(prompts), "held_out_conversations": len(val_convs),
            "training_conversations": len(train_convs), "markers": [m.label for m in markers],
            "metrics": {k: asdict(v) for k, v in metrics.items()},
            "table": format_table(metrics, markers, extra), "notes": notes,
            "samples": [{"source": p.source, "prompt": p.messages[-1]["content"], "reference": p.reference,
                         **{k: v[i] for k, v in replies.items() if k != "persona (held out)"}}
                        for i, p in enumerate(prompts)]}


def write_results(doc: dict[str, Any], model: str | Path, out: str | Path | None) -> list[Path]:
    """The results JSON to `out` (default: MODEL/persona_eval.json for a run folder) and the summary into the
    run's finetune.json under "persona_eval"; both written atomically."""
    import json

    from ..files import atomic_write_text, read_json
    from .report import write_json

    written = []
    record, _ = run_record(model)
    target = Path(out) if out else (Path(model) / "persona_eval.json" if record else None)
    if target is not None:
        write_json(doc, target)
        written.append(target)
    if record is not None:
        run = read_json(record)
        run["persona_eval"] = {k: doc[k] for k in ("base", "data", "prompts", "markers", "metrics", "settings",
                                                   "table")}
        atomic_write_text(record, json.dumps(run, indent=2, ensure_ascii=False, default=str) + "\n")
        written.append(record)
    return written


def persona_main(*, model: str, data: Sequence[str], base: str | None = None, out: str | None = None,
                 kakao_assistant: Any = None, progress: bool = True, threads: int | None = None,
                 **settings: Any) -> str:
    """CLI entry: measure, write, and return the printed report."""
    doc = evaluate_persona(model, data, base=base, settings=PersonaSettings(**settings),
                           kakao_assistant=kakao_assistant, progress=progress, threads=threads)
    written = write_results(doc, model, out)
    lines = [f"persona eval: {doc['prompts']} held-out prompt(s) from {doc['held_out_conversations']} "
             f"conversation(s) (--val-fraction {doc['settings']['val_fraction']}); markers learned from "
             f"{doc['training_conversations']} training conversation(s): {', '.join(doc['markers']) or 'none'}",
             "", doc["table"]]
    lines += [f"note: {n}" for n in doc["notes"]]
    if written:
        lines.append(f"wrote {', '.join(map(str, written))}")
    return "\n".join(lines)


__all__ = ["Marker", "PersonaMetrics", "PersonaSettings", "Prompt", "distinct_n", "evaluate_persona",
           "format_table", "held_out_prompts", "learn_markers", "persona_main", "persona_metrics",
           "sentence_endings", "write_results"]
