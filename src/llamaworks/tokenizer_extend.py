"""`llamaworks tokenizer extend` and `tokenizer stats`: grow a model's vocabulary for a language or a domain.

    ext = extend_model("default", ["corpus/"], add=2000, out="smollm2-ko")   # HF dir + GGUF, new rows initialised
    print(format_stats(tokenizer_stats(load_tokenizer("smollm2-ko"), texts)))

How new tokens are learned: BPE is *continued* from the base vocabulary. Every corpus word (the base
tokenizer's own pre-tokenizer split) is first cut exactly as the base tokenizer cuts it; then the most frequent
adjacent pair whose concatenation the base lacks becomes a new token and a new merge, N times. New merges rank
after all base merges (new SentencePiece pieces score below all base pieces), so base merges still fire first and
a new merge only joins what the base tokenizer left apart: old ids never move, text that no new token covers
keeps its ids, and every new token is reachable (a BPE trained from scratch and merged in can add tokens the
base's own cuts never produce). SentencePiece (`llama`) vocabularies first gain the corpus' frequent characters
that fell back to <0xNN> byte pieces (a Hangul syllable in LLaMA 2 is often 3 byte pieces), then merges.

New embedding (and untied output) rows are the mean of the base rows of the pieces the base tokenizer gives for
the new token's text (as the Chinese/Korean LLaMA projects did), so the extended model's logits for old ids are
those of the base model on any text that tokenizes as before.
"""

from __future__ import annotations

import heapq
import json
import re
import sys
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from .errors import ConfigError, FormatError
from .tokenizer import GGUF_PREFIX, Tokenizer
from .tokenizer_engines import SPM_SPACE, TOKEN_NORMAL

__all__ = ["ExtendResult", "VocabExtension", "extend_model", "extend_state", "extend_tokenizer",
           "fit_new_output_rows", "fit_windows", "format_stats", "learn_extension", "new_embedding_rows", "read_corpus",
           "script_of", "tokenizer_stats"]

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SCRIPTS = ("hangul", "latin", "digit")
EXTENSION_FILE = "vocab_extension.json"  # in the extended model's folder: where the new ids start


# ---- corpus ---------------------------------------------------------------------------------------------------
def read_corpus(sources: Sequence[str | Path], text_field: str = "text") -> list[str]:
    """The documents of text/JSONL/Parquet files or directories, read as `data prepare` reads them."""
    from .data.prepare import _files, iter_documents

    bad: list[Any] = []
    texts = [doc.text for _, doc in iter_documents(_files(sources), text_field, bad)]
    if bad:
        raise FormatError(f"{bad[0]} ({len(bad)} malformed record(s) in the corpus)")
    if not any(t.strip() for t in texts):
        raise FormatError(f"{', '.join(map(str, sources))}: the corpus holds no text")
    return texts


# ---- learning new tokens ----------------------------------------------------------------------------------------
@dataclass
class VocabExtension:
    """What `learn_extension` found: tokens to append (in order), and their merges or scores."""

    tokens: list[str]
    merges: list[tuple[str, str]] = field(default_factory=list)  # byte-level BPE: one per token
    scores: list[float] = field(default_factory=list)  # SentencePiece: one per token
    corpus_tokens_before: int = 0  # the corpus' word tokens with the base vocabulary ...
    corpus_tokens_after: int = 0  # ... and with the extended one (as the learner cut it)


def _words(tok: Tokenizer, texts: Iterable[str]) -> Counter[str]:
    """Corpus words as the tokenizer's model sees them (after its normalizer and pre-tokenizer)."""
    engine = tok.engine
    counts: Counter[str] = Counter()
    for text in texts:
        if engine.normalizer is not None:
            text = engine.normalizer.normalize_str(text)
        if engine.pre_tokenizer is not None:
            counts.update(piece for piece, _ in engine.pre_tokenizer.pre_tokenize_str(text))
        else:  # SentencePiece: no pre-tokenizer; pieces never cross a "▁" except at their start
            counts.update(re.findall(f"{SPM_SPACE}*[^{SPM_SPACE}]+|{SPM_SPACE}+", text))
    return counts


def _spm_symbols(pieces: list[str], new_chars: set[str]) -> list[str]:
    """A SentencePiece cut with the byte-fallback runs of `new_chars` replaced by the characters themselves."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if not run:
            return
        raw = bytes(int(p[3:5], 16) for p in run)
        text = raw.decode("utf-8", errors="replace")
        if "\ufffd" in text:  # not whole characters: leave the bytes alone
            out.extend(run)
        else:
            at = 0
            for ch in text:
                width = len(ch.encode("utf-8"))
                out.extend([ch] if ch in new_chars else run[at:at + width])
                at += width
        run.clear()

    for p in pieces:
        if _BYTE_PIECE.fullmatch(p):
            run.append(p)
        else:
            flush()
            out.append(p)
    flush()
    return out


def _continue_bpe(words: list[list[str]], counts: list[int], known: set[str], n: int, min_frequency: int,
                  allowed: Callable[[str, str], bool], progress: bool) -> list[tuple[str, str]]:
    """Up to `n` merges of the most frequent adjacent pair (ties: smallest pair), each creating a string not in
    `known`; `words` are updated in place to the merged cuts. Pair counts are kept incrementally (only the words
    holding the merged pair are revisited), so a corpus of millions of words takes seconds per thousand merges."""
    from tqdm.auto import tqdm

    pair_counts: defaultdict[tuple[str, str], int] = defaultdict(int)
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for wi, (syms, c) in enumerate(zip(words, counts)):
        for pair in pairwise(syms):
            pair_counts[pair] += c
            where[pair].add(wi)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    banned: set[tuple[str, str]] = set()
    bar = tqdm(total=n, desc="learning merges", unit="token", disable=not progress, file=sys.stderr)
    while len(merges) < n and heap:
        negc, a, b = heapq.heappop(heap)
        pair = (a, b)
        current = pair_counts.get(pair, 0)
        if pair in banned or current <= 0:
            continue
        if current != -negc:  # counts only fall outside new pairs: re-queue with the current count
            heapq.heappush(heap, (-current, a, b))
            continue
        if current < min_frequency:
            break
        new = a + b
        if new in known or not allowed(a, b):
            banned.add(pair)
            continue
        merges.append(pair)
        known.add(new)
        bar.update(1)
        touched: set[tuple[str, str]] = set()
        for wi in where.pop(pair, ()):
            syms, c = words[wi], counts[wi]
            if len(syms) < 2:
                continue
            merged: list[str] = []
            i = 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(syms[i])
                    i += 1
            if len(merged) == len(syms):
                continue
            for p in pairwise(syms):
                pair_counts[p] -= c
            for p in pairwise(merged):
                pair_counts[p] += c
                where[p].add(wi)
                if new in p:
                    touched.add(p)
            words[wi] = merged
        pair_counts.pop(pair, None)
        for p in touched:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p[0], p[1]))
    bar.close()
    return merges


def learn_extension(tok: Tokenizer, texts: Iterable[str], add: int, *, min_frequency: int = 2,
                    progress: bool = False) -> VocabExtension:
    """Up to `add` tokens the base vocabulary lacks, learned from `texts` (see the module docstring)."""
    if add < 1:
        raise ConfigError(f"--add must be a positive number of tokens, got {add}")
    if tok.kind not in ("gpt2", "llama"):
        raise ConfigError(f"{tok.source}: extending needs a byte-level BPE (gpt2) or SentencePiece (llama) "
                          f"vocabulary, this one is {tok.kind!r}")
    word_counts = _words(tok, texts)
    model = tok.engine.model
    vocab = tok.engine.get_vocab(with_added_tokens=True)
    known = set(vocab)
    cuts = [[t.value for t in model.tokenize(w)] for w in word_counts]
    counts = list(word_counts.values())
    before = sum(len(c) * n for c, n in zip(cuts, counts))
    new_chars: list[str] = []
    if tok.kind == "llama":
        # Characters the vocabulary lacks (they fall back to byte pieces), most frequent first.
        char_counts: Counter[str] = Counter()
        for w, n in word_counts.items():
            for ch in w:
                # Whitespace and control characters keep their byte pieces (as LLaMA's own "\n" = <0x0A>).
                if ch not in known and ch != SPM_SPACE and ch.isprintable() and not ch.isspace():
                    char_counts[ch] += n
        new_chars = [ch for ch, n in sorted(char_counts.items(), key=lambda kv: (-kv[1], kv[0]))
                     if n >= min_frequency][:add]
        chars = set(new_chars)
        known |= chars
        cuts = [_spm_symbols(c, chars) for c in cuts]

    def allowed(a: str, b: str) -> bool:
        # SentencePiece never joins byte-fallback pieces or <unk>; byte-level BPE joins any two tokens.
        if tok.kind == "gpt2":
            return True
        return not (_BYTE_PIECE.fullmatch(a) or _BYTE_PIECE.fullmatch(b) or a == tok.unk_token
                    or b == tok.unk_token)

    merges = _continue_bpe(cuts, counts, known, add - len(new_chars), min_frequency, allowed, progress)
    after = sum(len(c) * n for c, n in zip(cuts, counts))
    tokens = new_chars + [a + b for a, b in merges]
    ext = VocabExtension(tokens=tokens, corpus_tokens_before=before, corpus_tokens_after=after)
    if tok.kind == "gpt2":
        ext.merges = merges
    else:
        base_scores = tok.to_gguf_metadata()[GGUF_PREFIX + "scores"]
        floor = min(base_scores) if base_scores else 0.0
        ext.scores = [floor - 1.0 - i for i in range(len(tokens))]  # below every base piece, in learned order
    return ext


def extend_tokenizer(base: Tokenizer, ext: VocabExtension) -> Tokenizer:
    """`base` with `ext.tokens` appended (ids base.vocab_size, ...), everything else as it was."""
    meta = base.to_gguf_metadata()
    tokens = list(meta[GGUF_PREFIX + "tokens"])
    clash = set(ext.tokens) & set(tokens)
    if clash:
        raise ConfigError(f"{base.source}: tokens already in the vocabulary cannot be added: {sorted(clash)[:5]}")
    meta[GGUF_PREFIX + "tokens"] = tokens + list(ext.tokens)
    meta[GGUF_PREFIX + "token_type"] = list(meta[GGUF_PREFIX + "token_type"]) + [TOKEN_NORMAL] * len(ext.tokens)
    if base.kind == "gpt2":
        meta[GGUF_PREFIX + "merges"] = list(meta[GGUF_PREFIX + "merges"]) + [f"{a} {b}" for a, b in ext.merges]
    else:
        meta[GGUF_PREFIX + "scores"] = list(meta[GGUF_PREFIX + "scores"]) + list(ext.scores)
    extended = Tokenizer.from_gguf_metadata(meta, source=f"{base.source} + {len(ext.tokens)} tokens")
    extended.stop_ids |= base.stop_ids  # generation_config's extra stops are not GGUF tokenizer keys
    return extended


# ---- the model ------------------------------------------------------------------------------------------------
def new_embedding_rows(base: Tokenizer, tokens: Sequence[str], matrix: Any) -> Any:
    """Rows for `tokens`: each the mean of `matrix`'s rows of the pieces the base tokenizer cuts its text into."""
    import torch

    model = base.engine.model
    rows = []
    for t in tokens:
        ids = [p.id for p in model.tokenize(t)]
        if not ids:
            raise ConfigError(f"new token {t!r}: the base tokenizer gives no pieces for it")
        rows.append(matrix[ids].float().mean(dim=0))
    return torch.stack(rows).to(matrix.dtype) if rows else matrix[:0].clone()


def extend_state(state: dict[str, Any], config: Any, base: Tokenizer, ext: VocabExtension) -> tuple[dict, Any]:
    """(state dict, config) with the embedding and untied output matrices grown by `ext.tokens` rows."""
    import torch

    state = dict(state)
    emb = state["tok_embeddings.weight"]
    state["tok_embeddings.weight"] = torch.cat([emb, new_embedding_rows(base, ext.tokens, emb)])
    if "output.weight" in state:  # untied head: its own rows, initialised the same way
        head = state["output.weight"]
        state["output.weight"] = torch.cat([head, new_embedding_rows(base, ext.tokens, head)])
    return state, config.replace(vocab_size=config.vocab_size + len(ext.tokens))


def fit_new_output_rows(model: Any, windows: Any, first_new: int, *, steps: int = 400, lr: float = 3e-3,
                        batch_tokens: int = 4096, val_fraction: float = 0.1, seed: int = 0,
                        progress: bool = True) -> dict[str, float]:
    """Fit the new rows (ids >= `first_new`) of an UNTIED output matrix to the model's next-token targets in
    `windows` (n, T) ids; the input embeddings, the network and the old output rows stay as they are.

    Why: a mean-of-pieces row is a fair input but a poor output: at a syllable start the hidden state points at
    the syllable's first byte piece, not at its 2nd/3rd, so the new token's logit is far too low and the extended
    model starts much worse than the base on the very text its tokens came from (7.7 nats per new token on
    held-out Korean, SmolLM2-135M + 1,000 tokens). Training those rows through the network costs a forward and a
    backward of the whole model per step; here the final hidden states are computed once (the inputs do not
    change: the output is untied), the old rows' log-sum-exp once, and only the new rows' logits are recomputed,
    so hundreds of steps take seconds. A `val_fraction` of the windows is held back and the rows of the step
    with the lowest loss on it are kept (early stopping: 1,000 rows of 576 values overfit 30K positions).
    Returns losses (nats per token): train/val before and after."""
    import torch
    from tqdm.auto import tqdm

    if model.output is None:
        raise ConfigError("fitting new output rows needs an untied output matrix (tied rows are also the inputs)")
    weight = model.output.weight
    hidden, targets = [], []
    with torch.no_grad():
        for chunk in tqdm(list(torch.split(windows, 4)), desc="hidden states", disable=not progress,
                          file=sys.stderr):
            hidden.append(model(chunk[:, :-1], return_hidden=True).reshape(-1, weight.shape[1]).float())
            targets.append(chunk[:, 1:].reshape(-1))
        h, y = torch.cat(hidden), torch.cat(targets)
        old = weight[:first_new].float()
        lse_old = torch.cat([torch.logsumexp(part @ old.T, dim=-1) for part in torch.split(h, 1024)])
        old_target = (h * old[y.clamp(max=first_new - 1)]).sum(-1)  # used where the target is an old token
    new = torch.nn.Parameter(weight[first_new:].detach().float().clone())
    is_new = y >= first_new
    new_index = (y - first_new).clamp(min=0)

    def loss_of(idx: Any) -> Any:
        logits = h[idx] @ new.T
        lse = torch.logaddexp(lse_old[idx], torch.logsumexp(logits, dim=-1))
        target = torch.where(is_new[idx], logits.gather(1, new_index[idx, None])[:, 0], old_target[idx])
        return (lse - target).mean()

    per_window = windows.shape[1] - 1
    n_val = int(len(windows) * val_fraction)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    positions = [torch.cat([torch.arange(w * per_window, (w + 1) * per_window) for w in ws.tolist()])
                 if len(ws) else torch.zeros(0, dtype=torch.long) for ws in (order[n_val:], order[:n_val])]
    train_pos, val_pos = positions
    with torch.no_grad():
        result = {"train_before": float(loss_of(train_pos)),
                  "val_before": float(loss_of(val_pos)) if n_val else float("nan")}
    best, best_rows = result["val_before"], new.detach().clone()
    opt = torch.optim.Adam([new], lr=lr)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="fitting new output rows", disable=not progress, file=sys.stderr)
    for step in bar:
        pick = train_pos[torch.randint(0, len(train_pos), (min(batch_tokens, len(train_pos)),), generator=g)]
        loss = loss_of(pick)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if n_val and (step % 10 == 9 or step == steps - 1):
            with torch.no_grad():
                val = float(loss_of(val_pos))
            bar.set_postfix(val=f"{val:.3f}")
            if val < best:
                best, best_rows = val, new.detach().clone()
    if not n_val:
        best_rows = new.detach()
    with torch.no_grad():
        new.copy_(best_rows)
        result.update(train_after=float(loss_of(train_pos)), val_after=best)
        weight[first_new:] = best_rows.to(weight.dtype)
    return result


@dataclass
class ExtendResult:
    out: Path
    gguf: Path | None
    base_vocab: int
    vocab: int
    added: int
    corpus_tokens_before: int
    corpus_tokens_after: int


def fit_windows(tok: Tokenizer, texts: Sequence[str], max_tokens: int, seq_len: int = 256) -> Any:
    """(n, seq_len + 1) id windows side by side over `texts` (each ended by EOS), at most `max_tokens` ids,
    spread over the whole corpus (every k-th window) so a large corpus is sampled, not just its head."""
    import torch

    ids: list[int] = []
    for text in texts:
        ids += tok.encode(text, add_bos=False) + ([tok.eos_id] if tok.eos_id is not None else [])
    width = seq_len + 1
    n = len(ids) // width
    if n == 0:
        raise ConfigError(f"--fit-output: the corpus gives {len(ids)} tokens, fewer than one window of {width}")
    windows = torch.tensor(ids[:n * width]).view(n, width)
    keep = max(1, min(n, max_tokens // width))
    return windows[torch.linspace(0, n - 1, keep).round().long().unique()]


def extend_model(model: str | Path | None, corpus: Sequence[str | Path], add: int, out: str | Path, *,
                 min_frequency: int = 2, gguf_type: str | None = "f16", text_field: str = "text",
                 progress: bool = True, fit_output: int = 0, fit_tokens: int = 65536,
                 fit_corpus: Sequence[str | Path] = ()) -> ExtendResult:
    """Learn `add` tokens from `corpus`, append them to `model`'s vocabulary, resize its embedding (and untied
    output) matrix with mean-initialised rows, and write an HF directory `out` (+ `out/model.gguf`).

    `fit_output` > 0: the output is untied (a tied model gains its own output matrix, a copy of the embeddings,
    so old-token logits are unchanged) and the new output rows are fitted for that many steps on up to
    `fit_tokens` corpus tokens (`fit_new_output_rows`); the input rows stay the mean of their pieces.
    `fit_corpus` (e.g. English text) adds other text to the fit only, a quarter of its windows (no tokens are learned
    from it): there the new tokens are never the target, so the fit keeps them from taking probability
    from the old language."""
    from .checkpoints import load_model, save_gguf, save_hf

    if add < 1:
        raise ConfigError(f"--add must be a positive number of tokens, got {add}")
    texts = read_corpus(corpus, text_field)
    net, base, ckpt = load_model(model)
    if base is None:
        raise ConfigError(f"{ckpt.path}: the checkpoint has no tokenizer to extend")
    rows = net.tok_embeddings.weight.shape[0]
    if base.vocab_size != rows:
        raise ConfigError(f"{ckpt.path}: the tokenizer has {base.vocab_size} tokens but the embedding {rows} rows; "
                          "new ids would collide with padding rows (only unpadded vocabularies are supported)")
    ext = learn_extension(base, texts, add, min_frequency=min_frequency, progress=progress)
    if not ext.tokens:
        raise ConfigError(f"the corpus has no pair of pieces seen {min_frequency}+ times that the vocabulary "
                          "lacks: nothing to add")
    tok = extend_tokenizer(base, ext)
    state, config = extend_state(dict(net.state_dict()), ckpt.config, base, ext)
    fitted: dict[str, float] = {}
    if fit_output > 0:
        from .model import Transformer

        if config.tie_embeddings:  # the input rows keep the mean of their pieces; the output gets its own rows
            state["output.weight"] = state["tok_embeddings.weight"].clone()
            config = config.replace(tie_embeddings=False)
        fit_net = Transformer(config)
        fit_net.load_state_dict({k: v.float() for k, v in state.items()})
        fit_net.eval()
        windows = fit_windows(tok, texts, fit_tokens)
        if fit_corpus:
            import torch

            other = fit_windows(tok, read_corpus(fit_corpus, text_field), windows.numel() // 3)  # a quarter of all
            windows = torch.cat([windows, other])
        fitted = fit_new_output_rows(fit_net, windows, base.vocab_size, steps=fit_output, progress=progress)
        state["output.weight"] = fit_net.output.weight.detach().to(state["output.weight"].dtype)
        del fit_net
    out = Path(out)
    template = ckpt.chat_template or base.chat_template
    save_hf(out, state, config, tok, chat_template=template, generation_config=ckpt.generation_config or None,
            progress=progress)
    # Where the new ids start, for `pretrain --init OUT --train new-rows` (stage 1 trains only those rows).
    from .files import atomic_write_text

    record = {"base_model": str(ckpt.path), "base_vocab": base.vocab_size, "added": len(ext.tokens),
              "corpus": [str(c) for c in corpus], "min_frequency": min_frequency,
              "corpus_tokens_before": ext.corpus_tokens_before, "corpus_tokens_after": ext.corpus_tokens_after,
              "fit_output": {"steps": fit_output, "max_tokens": fit_tokens, "fit_corpus": [str(c) for c in fit_corpus],
                             **fitted} if fit_output else None}
    atomic_write_text(out / EXTENSION_FILE, json.dumps(record, indent=2) + "\n")
    gguf = None
    if gguf_type:
        gguf = save_gguf(out / "model.gguf", state, config, tok, chat_template=template, tensor_type=gguf_type,
                         progress=progress)
    return ExtendResult(out, gguf, base.vocab_size, tok.vocab_size, len(ext.tokens), ext.corpus_tokens_before,
                        ext.corpus_tokens_after)


def run_extend_cli(model: str | None, corpus: list[str], add: int, out: str, *, min_frequency: int,
                   gguf_type: str, text_field: str, progress: bool, fit_output: int = 0,
                   fit_tokens: int = 65536, fit_corpus: Sequence[str] = ()) -> int:
    r = extend_model(model, corpus, add, out, min_frequency=min_frequency,
                     gguf_type=None if gguf_type == "none" else gguf_type, text_field=text_field, progress=progress,
                     fit_output=fit_output, fit_tokens=fit_tokens, fit_corpus=fit_corpus)
    saved = 100 * (1 - r.corpus_tokens_after / max(1, r.corpus_tokens_before))
    print(f"added {r.added} tokens ({r.base_vocab} -> {r.vocab}); the corpus: {r.corpus_tokens_before:,} -> "
          f"{r.corpus_tokens_after:,} tokens ({saved:.1f}% fewer)")
    print(f"wrote {r.out} (HF){f' and {r.gguf}' if r.gguf else ''}; compare: llamaworks tokenizer stats "
          f"--model {r.out} FILES")
    return 0


# ---- stats ----------------------------------------------------------------------------------------------------
def script_of(ch: str) -> str | None:
    """"hangul", "latin", "digit" or None (spaces, punctuation, other scripts)."""
    cp = ord(ch)
    if 0xAC00 <= cp <= 0xD7A3 or 0x1100 <= cp <= 0x11FF or 0x3130 <= cp <= 0x318F or 0xA960 <= cp <= 0xA97F \
            or 0xD7B0 <= cp <= 0xD7FF:
        return "hangul"
    if unicodedata.category(ch) == "Nd":  # decimal digits; circled numbers and the like are "other"
        return "digit"
    if ch.isalpha() and unicodedata.name(ch, "").startswith("LATIN"):
        return "latin"
    return None


def tokenizer_stats(tok: Tokenizer, texts: Iterable[str]) -> dict[str, dict[str, float]]:
    """Per script: characters, words (maximal runs of the script's characters), UTF-8 bytes and tokens, and
    tokens per character / per word and bytes per token ("all": the whole text, whitespace-separated words).
    A token counts for the script of the first character it covers that has one (byte pieces of one syllable
    each count), "other" if none."""
    stats = {s: Counter() for s in (*SCRIPTS, "other", "all")}
    for text in texts:
        enc = tok.engine.encode(text, add_special_tokens=False)
        stats["all"]["tokens"] += len(enc.ids)
        stats["all"]["chars"] += len(text)
        stats["all"]["bytes"] += len(text.encode("utf-8"))
        stats["all"]["words"] += len(text.split())
        scripts = [script_of(ch) for ch in text]
        prev = None
        for ch, s in zip(text, scripts):
            if s is not None:
                stats[s]["chars"] += 1
                stats[s]["bytes"] += len(ch.encode("utf-8"))
                if s != prev:
                    stats[s]["words"] += 1
            prev = s
        for start, end in enc.offsets:
            owner = next((scripts[i] for i in range(start, min(end, len(text))) if scripts[i] is not None), None)
            stats[owner or "other"]["tokens"] += 1
    out: dict[str, dict[str, float]] = {}
    for s, c in stats.items():
        row = {k: float(c[k]) for k in ("chars", "words", "bytes", "tokens")}
        row["tokens_per_char"] = c["tokens"] / c["chars"] if c["chars"] else 0.0
        row["tokens_per_word"] = c["tokens"] / c["words"] if c["words"] else 0.0
        row["bytes_per_token"] = c["bytes"] / c["tokens"] if c["tokens"] else 0.0
        out[s] = row
    return out


def format_stats(stats: dict[str, dict[str, float]], label: str = "") -> str:
    head = f"{'script':<8} {'chars':>9} {'words':>8} {'tokens':>9} {'tok/char':>9} {'tok/word':>9} {'bytes/tok':>9}"
    lines = [label, head] if label else [head]
    for s, r in stats.items():
        if not r["tokens"] and not r["chars"]:
            continue
        lines.append(f"{s:<8} {int(r['chars']):>9,} {int(r['words']):>8,} {int(r['tokens']):>9,} "
                     f"{r['tokens_per_char']:>9.3f} {r['tokens_per_word']:>9.3f} {r['bytes_per_token']:>9.3f}")
    return "\n".join(lines)


def run_stats_cli(models: list[str | None], files: list[str], as_json: bool, text_field: str) -> int:
    import json

    from .data.prepare import resolve_tokenizer

    texts = read_corpus(files, text_field)
    results, sizes = {}, {}
    for m in models:
        tok = resolve_tokenizer(m or "default")
        results[str(m or "default")] = tokenizer_stats(tok, texts)
        sizes[str(m or "default")] = tok.vocab_size
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        print("\n\n".join(format_stats(s, f"{name} (vocabulary {sizes[name]:,})") for name, s in results.items()))
    return 0
