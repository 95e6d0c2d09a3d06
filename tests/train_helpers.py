"""Shared by the data / training tests: a synthetic corpus with known structure and a tiny BPE tokenizer."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

NAMES = ["anna", "bert", "carl", "dora", "emil", "fay", "gus", "hana"]
VERBS = ["eats", "reads", "paints", "kicks", "drives", "plants", "wears", "feeds"]
ADJS = ["red", "big", "old", "new"]
# Each verb has exactly one object: the noun after the adjective is predictable from the verb.
OBJECTS = ["apple", "book", "wall", "ball", "car", "tree", "hat", "cat"]


def grammar_corpus(n_sentences: int, seed: int = 0) -> list[str]:
    """Sentences "NAME VERB the ADJ OBJECT(VERB) ." : 3 + 3 + 0 + 2 + 0 + 0 bits of choice over 6 words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        v = rng.randrange(len(VERBS))
        out.append(f"{rng.choice(NAMES)} {VERBS[v]} the {rng.choice(ADJS)} {OBJECTS[v]} .")
    return out


def write_corpus_files(directory: Path, n_files: int = 4, sentences_per_line: int = 8, lines: int = 200,
                       seed: int = 0) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    sentences = grammar_corpus(n_files * lines * sentences_per_line, seed)
    k = 0
    for i in range(n_files):
        rows = []
        for _ in range(lines):
            rows.append(" ".join(sentences[k:k + sentences_per_line]))
            k += sentences_per_line
        p = directory / f"part{i}.txt"
        p.write_text("\n\n".join(rows) + "\n")
        files.append(p)
    return files


def build_tokenizer(directory: Path, texts: list[str], vocab_size: int = 300, chat: bool = False) -> Path:
    """A byte-level BPE trained on `texts`, saved as tokenizer.json + tokenizer_config.json in `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<s>", "</s>", "<pad>"] + (["<|im_start|>", "<|im_end|>"] if chat else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "<|im_end|>" if chat else "</s>", "pad_token": "<pad>",
              "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat:
        config["chat_template"] = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def unigram_entropy(ids) -> float:
    """Entropy (nats) of the token frequency distribution: the best loss without any context."""
    counts = Counter(int(i) for i in ids)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())
