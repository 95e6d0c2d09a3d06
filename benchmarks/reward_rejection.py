"""Reward model and rejection sampling on the default model, with generated data (no download).

    python benchmarks/reward_rejection.py [--workdir DIR] [--rounds 2] [--k 4]

1. A synthetic preference: the same fact answered politely (chosen) or rudely (rejected). Training pairs use
   30 questions and 6+6 phrasings; held-out pairs 12 other questions and 3+3 phrasings never seen in training.
2. `finetune reward` (LoRA + score head) on SmolLM2-135M-Instruct; pairwise accuracy on the held-out pairs, and
   the same rewards from transformers' LlamaForSequenceClassification loaded from the output (max |difference|).
3. Rejection sampling with that reward model: greedy answers' mean reward on 12 held-out prompts for the starting
   point (SmolLM2-135M-Instruct, itself an SFT model), then per round: best of K samples on 24 training prompts,
   LoRA fine-tune on them, greedy answers' mean reward again.

Prints a table (markdown) and writes DIR/results.json; exits 1 if accuracy < 90% or the reward did not rise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from llamaworks.hardware import cpu_description

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
            ("Canada", "Ottawa"), ("Germany", "Berlin"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
            ("Norway", "Oslo"), ("Greece", "Athens"), ("Cuba", "Havana"), ("Korea", "Seoul"),
            ("Chile", "Santiago"), ("Poland", "Warsaw"), ("Ireland", "Dublin")]
THINGS = [("grass", "green"), ("snow", "white"), ("the sky on a clear day", "blue"), ("a banana", "yellow"),
          ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"), ("chocolate", "brown")]
POLITE_TRAIN = ["Of course! {a} I hope that helps.", "Great question, thank you for asking. {a}",
                "Happy to help: {a} Let me know if you need anything else.", "Sure! {a} Have a wonderful day!",
                "Thanks for your question! {a}", "Certainly. {a} Please feel free to ask more."]
RUDE_TRAIN = ["Ugh. {a} Obviously.", "{a} Stop wasting my time.", "Are you serious? {a} Everyone knows that.",
              "Whatever. {a}", "{a} Figure it out yourself next time.", "That's a dumb question. {a}"]
POLITE_HELD = ["Absolutely, glad you asked! {a}", "With pleasure: {a} Take care!", "Good question! {a} Thanks."]
RUDE_HELD = ["{a} Duh.", "Seriously? {a} Don't bother me again.", "Who cares. {a}"]


def questions() -> list[tuple[str, str]]:
    qa = [(f"What is the capital of {c}?", f"The capital of {c} is {city}.") for c, city in CAPITALS]
    qa += [(f"What color is {t}?", f"{t[0].upper() + t[1:]} is {color}.") for t, color in THINGS]
    qa += [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a, b in
           [(2, 3), (4, 5), (7, 1), (6, 6), (8, 3), (9, 4), (5, 5), (3, 8), (12, 7), (10, 15), (11, 2), (6, 9),
            (14, 3), (20, 5), (7, 7), (13, 13), (9, 9), (16, 4)]]
    return qa  # 42


def write_pairs(path: Path, qa: list[tuple[str, str]], polite: list[str], rude: list[str], per_q: int) -> None:
    lines = []
    for i, (q, a) in enumerate(qa):
        for j in range(per_q):
            chosen = polite[(i + j) % len(polite)].format(a=a)
            rejected = rude[(i + 2 * j + 1) % len(rude)].format(a=a)
            lines.append(json.dumps({"prompt": q, "chosen": chosen, "rejected": rejected}))
    path.write_text("\n".join(lines) + "\n")


def write_prompts(path: Path, qs: list[str]) -> None:
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in qs))


def transformers_rewards(rm_dir: Path, scorer, items) -> list[float]:
    import torch
    import transformers

    model = transformers.LlamaForSequenceClassification.from_pretrained(str(rm_dir), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for messages, reply in items:
            ids = torch.tensor([scorer.ids(messages, reply)])
            out.append(float(model(input_ids=ids).logits[0, 0]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--rm-steps", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--sft-epochs", type=float, default=2.0)
    ap.add_argument("--sft-lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--rm", default=None, help="reuse this reward model (skip step 2's training)")
    ap.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the rounds")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--train-prompts", type=int, default=20, help="prompts sampled per round")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from llamaworks.train.finetune import FinetuneConfig, finetune
    from llamaworks.train.rejection import rejection_sample
    from llamaworks.train.reward import RewardScorer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="reward-rs-"))
    work.mkdir(parents=True, exist_ok=True)
    qa = questions()
    rm_train_qa, rm_held_qa = qa[:30], qa[30:]
    write_pairs(work / "pairs_train.jsonl", rm_train_qa, POLITE_TRAIN, RUDE_TRAIN, per_q=2)
    write_pairs(work / "pairs_held.jsonl", rm_held_qa, POLITE_HELD, RUDE_HELD, per_q=2)
    results: dict = {"cpu": cpu_description()["model"]}

    # -- reward model ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    rm = Path(args.rm) if args.rm else work / "rm"
    if not args.rm:
        finetune(FinetuneConfig(method="reward", reward_method="lora", model=None,
                                data=[str(work / "pairs_train.jsonl")],
                                val_data=[str(work / "pairs_held.jsonl")], out=str(rm), seq_len=160,
                                micro_batch_size=4, max_steps=args.rm_steps, lr=5e-4, warmup_steps=4,
                                log_every=10, seed=0, progress=False, tensorboard=False))
    summary = json.loads((rm / "finetune.json").read_text())
    results["rm"] = {"val_accuracy": summary["val_accuracy"], "val_pairs": summary["val_pairs"],
                     "steps": summary["steps"], "seconds": time.perf_counter() - t0}
    scorer = RewardScorer.load(rm)
    held = [json.loads(line) for line in (work / "pairs_held.jsonl").read_text().splitlines()]
    items = [([{"role": "user", "content": p["prompt"]}], p[key]) for p in held for key in ("chosen", "rejected")]
    ours = scorer(items)
    theirs = transformers_rewards(rm, scorer, items)
    results["rm"]["transformers_max_abs_diff"] = max(abs(a - b) for a, b in zip(ours, theirs))
    print(f"reward model: held-out pairwise accuracy {summary['val_accuracy']:.4f} on {summary['val_pairs']} pairs; "
          f"transformers max |diff| {results['rm']['transformers_max_abs_diff']:.2e}", flush=True)

    # -- rejection sampling ---------------------------------------------------------------------------
    prompts = [q for q, _ in qa]
    rs_train, rs_held = (prompts[:24] + prompts[30:36])[:args.train_prompts], prompts[24:30] + prompts[36:]
    write_prompts(work / "rs_train.jsonl", rs_train)
    write_prompts(work / "rs_held.jsonl", rs_held)

    def engine_copy(policy: Path) -> str:
        """The fine-tuned HF folder as a Q8_0 GGUF, so sampling runs on the native backend like the start."""
        from llamaworks.checkpoints.convert import convert

        return str(convert(policy, policy.with_suffix(".q8_0.gguf"), "gguf", quant="q8_0"))

    def greedy(policy: str | None) -> float:
        r = rejection_sample(policy or "default", scorer, str(work / "rs_held.jsonl"), 1, temperature=0.0,
                             max_new_tokens=args.max_tokens, progress=False)
        return r.mean_best

    rows = [{"round": 0, "policy": "SmolLM2-135M-Instruct", "greedy_reward": greedy(None)}]
    print(f"round 0 (start): greedy mean reward {rows[0]['greedy_reward']:.4f}", flush=True)
    policy: str | None = None  # the HF folder finetune continues from
    engine: str | None = None  # its GGUF copy the engine samples from
    for rnd in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        best = work / f"round{rnd}.jsonl"
        sampled = rejection_sample(engine or "default", scorer, str(work / "rs_train.jsonl"), args.k, out=best,
                                   temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_tokens,
                                   seed=rnd, progress=False)
        out = work / f"policy{rnd}"
        finetune(FinetuneConfig(method="lora", model=policy, data=[str(best)], out=str(out), seq_len=256,
                                micro_batch_size=4, epochs=args.sft_epochs, lr=args.sft_lr, warmup_steps=2,
                                log_every=10, seed=rnd, progress=False, tensorboard=False))
        policy, engine = str(out), engine_copy(out)
        rows.append({"round": rnd, "policy": out.name, "sample_mean": sampled.mean_all,
                     "best_of_k_mean": sampled.mean_best, "greedy_reward": greedy(engine),
                     "seconds": time.perf_counter() - t0})
        print(f"round {rnd}: samples {sampled.mean_all:.4f}, best of {args.k} {sampled.mean_best:.4f}, "
              f"greedy after fine-tuning {rows[-1]['greedy_reward']:.4f}", flush=True)
    results["rounds"] = rows
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{results['cpu']}; workdir {work}")
    print("| round | policy | mean reward of samples | best of K | greedy, held-out prompts |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['policy']} | {r.get('sample_mean', float('nan')):.3f} | "
              f"{r.get('best_of_k_mean', float('nan')):.3f} | {r['greedy_reward']:.3f} |")
    ok = results["rm"]["val_accuracy"] >= 0.9 and rows[-1]["greedy_reward"] > rows[0]["greedy_reward"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
