"""Ghost Attention end to end on generated chats: does an instruction given once still hold at turns 2-5?

    python benchmarks/gatt_adherence.py --work /tmp/gatt [--model PATH] [--train-chats 32] [--turns 3]
        [--heldout-chats 16] [--tries 16] [--steps 40] [--json]

1. Writes multi-turn user-only chats from templates over two disjoint topic lists (training / held out) and the
   instructions "Answer in one sentence, then write 🦙." (ends-with:🦙) and the same with 🌟 (ends-with:🌟).
2. `llamaworks data gatt` samples the replies with the instruction on every user turn (resampling a reply that
   breaks the rule, --tries) and writes the records: instruction in turn 1 only, loss on the last reply only
   (--every-turn: one record per reply).
3. `llamaworks finetune full` on those records, then `llamaworks quantize` the result to Q8_0.
4. Plays the held-out chats (5 user turns, the instruction in the first only, greedy replies) with the base
   model and the tuned one, and prints the share of replies that end as asked, per turn and over turns 2-5,
   plus how often a reply ends with the *other* instruction's emoji (a model that always appends one emoji would
   show it here) and with either emoji when no instruction is given.
Every command it runs is printed, so each step can be rerun by hand.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

TRAIN_TOPICS = ["cats", "the ocean", "bicycles", "coffee", "volcanoes", "chess", "rainbows", "bread", "owls",
                "trains", "the moon", "gardening", "honey", "snow", "guitars", "bees", "deserts", "tea", "robots",
                "forests", "pizza", "whales", "kites", "clocks", "mountains", "penguins", "soap", "rivers",
                "maps", "candles", "apples", "bridges"]
HELDOUT_TOPICS = ["dolphins", "libraries", "umbrellas", "pianos", "tigers", "cheese", "lighthouses", "butterflies",
                  "sailing", "mushrooms", "castles", "thunderstorms", "squirrels", "chocolate", "glaciers", "dragons"]
QUESTIONS = ["Tell me a fun fact about {t}.", "Why do people like {t}?", "Describe {t} in one sentence.",
             "What is the most surprising thing about {t}?", "Give me one tip about {t}.",
             "Write a short sentence about {t}.", "What color do you think of for {t}?",
             "Can you explain {t} to a child?"]
INSTRUCTIONS = {"🦙": "Answer in one sentence, then write 🦙.", "🌟": "Answer in one sentence, then write 🌟."}


def make_chats(topics: list[str], n: int, turns: int, rng: random.Random) -> list[list[str]]:
    """n chats of `turns` user turns, each about one topic drawn from `topics` (questions drawn without repeat)."""
    return [[q.format(t=rng.choice(topics)) for q in rng.sample(QUESTIONS, turns)] for _ in range(n)]


def run(cmd: list[str]) -> None:
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True)


def adherence(model: str | None, chats: list[list[str]], max_tokens: int, rows: int, threads: int | None) -> dict:
    from llamaworks import api
    from llamaworks.data.gatt import Rule, measure_adherence
    from llamaworks.engine.backend import EngineOptions

    llm = api.load(model, options=EngineOptions(max_rows=rows, max_context=2048, threads=threads))
    out: dict = {}
    for emoji, text in INSTRUCTIONS.items():
        other = next(e for e in INSTRUCTIONS if e != emoji)
        a = measure_adherence(llm, chats, text, Rule("ends-with", emoji), temperature=0, max_new_tokens=max_tokens)
        leak = sum(r.strip().endswith(other) for replies in a.replies for r in replies[1:])
        out[emoji] = {**a.to_dict(), "other_emoji_2_plus": leak / sum(a.total[1:])}
    # No instruction at all: how often does a reply end with either emoji anyway?
    none = measure_adherence(llm, chats, "", Rule("regex", "(🦙|🌟)$"), temperature=0, max_new_tokens=max_tokens)
    out["no_instruction"] = none.to_dict()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="folder for the data, the run and the results")
    ap.add_argument("--model", default=None, help="base model (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--train-chats", type=int, default=32)
    ap.add_argument("--turns", type=int, default=3, help="user turns per training chat")
    ap.add_argument("--heldout-chats", type=int, default=16)
    ap.add_argument("--heldout-turns", type=int, default=5)
    ap.add_argument("--tries", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repair", action="store_true", help="data gatt --repair (for a model that cannot follow)")
    ap.add_argument("--skip-base", action="store_true", help="do not measure the base model again")
    ap.add_argument("--reuse-data", action="store_true", help="keep an existing WORK/gatt.jsonl")
    ap.add_argument("--reuse-tuned", action="store_true", help="keep an existing WORK/tuned-q8_0.gguf")
    ap.add_argument("--base-only", action="store_true", help="only measure the base model")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of every step (default: all cores)")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    train = make_chats(TRAIN_TOPICS, a.train_chats, a.turns, rng)
    heldout = make_chats(HELDOUT_TOPICS, a.heldout_chats, a.heldout_turns, rng)
    with open(work / "chats.jsonl", "w", encoding="utf-8") as f:
        for turns in train:
            f.write(json.dumps({"messages": [{"role": "user", "content": t} for t in turns]}) + "\n")
    with open(work / "instructions.jsonl", "w", encoding="utf-8") as f:
        for emoji, text in INSTRUCTIONS.items():
            f.write(json.dumps({"instruction": text, "check": f"ends-with:{emoji}"}, ensure_ascii=False) + "\n")
    model = ["--model", a.model] if a.model else []
    py = [sys.executable, "-m", "llamaworks", *(["--threads", str(a.threads)] if a.threads else [])]
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if not (a.reuse_data and (work / "gatt.jsonl").exists()):
        run([*py, "data", "gatt", "--conversations", str(work / "chats.jsonl"), "--instructions",
             str(work / "instructions.jsonl"), "--out", str(work / "gatt.jsonl"), *model, "--tries", str(a.tries),
             "--every-turn", *(["--repair"] if a.repair else []), "--max-tokens", str(a.max_tokens), "--seed",
             str(a.seed), "--rows", str(a.rows), "--temperature", "0.7", "--max-context", "2048", "--no-progress"])
        timings["data_gatt_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if not a.base_only and not (a.reuse_tuned and (work / "tuned-q8_0.gguf").exists()):
        run([*py, "finetune", "full", "--data", str(work / "gatt.jsonl"), *model, "--out", str(work / "tuned"),
             "--max-steps", str(a.steps), "--lr", str(a.lr), "--seq-len", "512", "--batch-size", "2",
             "--log-every", "5", "--seed", str(a.seed), "--no-progress"])
        run([*py, "quantize", str(work / "tuned"), str(work / "tuned-q8_0.gguf"), "--to", "q8_0"])
        timings["finetune_s"] = time.perf_counter() - t
    # Runs may be split (--base-only now, the tuned model later): results accumulate in one file.
    previous = json.loads((work / "results.json").read_text(encoding="utf-8")) \
        if (work / "results.json").exists() else {}
    results: dict = {**previous, "settings": vars(a), "timings": {**previous.get("timings", {}), **timings}}
    if not a.skip_base:
        t = time.perf_counter()
        results["base"] = adherence(a.model, heldout, a.max_tokens, a.rows, a.threads)
        results["timings"]["base_adherence_s"] = time.perf_counter() - t
    if not a.base_only:
        t = time.perf_counter()
        results["gatt"] = adherence(str(work / "tuned-q8_0.gguf"), heldout, a.max_tokens, a.rows, a.threads)
        results["timings"]["gatt_adherence_s"] = time.perf_counter() - t
    (work / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    print(f"\n{'model':<6} {'instruction':<40} {'turn 1':>7} {'turns 2-5':>10} {'other emoji':>12}")
    for name in ("base", "gatt"):
        if name not in results:
            continue
        for emoji, text in INSTRUCTIONS.items():
            r = results[name][emoji]
            print(f"{name:<6} {text:<40} {r['per_turn'][0]:>7.0%} {r['turns_2_plus']:>10.0%} "
                  f"{r['other_emoji_2_plus']:>12.0%}")
        print(f"{name:<6} {'(none)':<40} {'':>7} {results[name]['no_instruction']['turns_2_plus']:>10.0%}")
    print(f"results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
