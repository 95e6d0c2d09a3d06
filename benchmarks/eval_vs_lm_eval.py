"""Items/s of `llamaworks eval` vs lm-evaluation-harness's transformers ("hf") backend, same model, same items.

    python benchmarks/eval_vs_lm_eval.py --data-dir /path/with/ARC-Challenge-Test.jsonl --limit 20 --num-fewshot 25

Both sides read the same ARC-Challenge items from local files (lm-eval through a local task YAML with the
stock arc_challenge prompt, so it builds its own prompts and few-shot contexts) and score them in float32 on
the CPU; the model is the same GGUF file (ours via llamaworks.checkpoints, lm-eval via transformers'
GGUF loader). Reported: items/s each (model loading excluded), the speed-up, and whether the per-item
predictions (acc and acc_norm argmax) are identical, with the largest log-likelihood difference. CPU time
(process_time, all threads) is reported too: on a shared machine it is the fairer of the two figures.

Few-shot examples come from a train file. Without ARC-Challenge-Train.jsonl in --data-dir, pass
--fewshot-file (any ARC jsonl, e.g. ARC-Easy-Test.jsonl) to stand in as the train split for both sides.
lm-eval is an optional extra: pip install lm-eval torch==<the installed torch>.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def ai2_to_hf(src: Path, dst: Path) -> None:
    """AI2's jsonl -> the Hugging Face ai2_arc schema lm-eval's arc yaml expects."""
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            q = r["question"]
            out.write(json.dumps({"id": r["id"], "question": q["stem"], "answerKey": r["answerKey"],
                                  "choices": {"text": [c["text"] for c in q["choices"]],
                                              "label": [c["label"] for c in q["choices"]]}}) + "\n")


TASK_YAML = """task: arc_challenge_local
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
output_type: multiple_choice
training_split: train
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def run_ours(model_path: str | None, data_dir: Path, limit: int, shots: int) -> dict:
    import torch

    from llamaworks.checkpoints import load_model
    from llamaworks.eval import EvalSettings, run_eval

    torch.manual_seed(0)
    model, tokenizer, _ = load_model(model_path)
    settings = EvalSettings(tasks=["arc_challenge"], data_dir=data_dir, num_fewshot=shots, limit=limit,
                            log_samples=True)
    start, cpu = time.perf_counter(), time.process_time()
    doc = run_eval(model, tokenizer, settings, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    samples = doc["samples"]["arc_challenge"]
    return {"seconds": seconds, "cpu": cpu, "lls": [s["loglikelihoods"] for s in samples],
            "pred": [s["pred"] for s in samples], "pred_norm": [s["pred_norm"] for s in samples],
            "contexts": [s["context"] for s in samples], "result": doc["results"]["arc_challenge"]}


def run_lm_eval(model_path: Path, work: Path, limit: int, shots: int, batch_size: int) -> dict:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model_path.parent), gguf_file=model_path.name, dtype="float32", device="cpu",
              batch_size=batch_size)
    manager = TaskManager(include_path=str(work))
    start, cpu = time.perf_counter(), time.process_time()
    out = simple_evaluate(model=lm, tasks=["arc_challenge_local"], num_fewshot=shots, limit=limit,
                          log_samples=True, task_manager=manager, bootstrap_iters=0)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    samples = sorted(out["samples"]["arc_challenge_local"], key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    choices = [s["doc"]["choices"]["text"] for s in samples]
    return {"seconds": seconds, "cpu": cpu, "lls": lls, "pred": [int(np.argmax(x)) for x in lls],
            "pred_norm": [int(np.argmax(np.array(x) / np.array([len(c) for c in ch]))) for x, ch in zip(lls, choices)],
            "contexts": [s["arguments"]["gen_args_0"]["arg_0"] if isinstance(s["arguments"], dict)
                         else s["arguments"][0][0] for s in samples],
            "result": out["results"]["arc_challenge_local"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with ARC-Challenge-Test.jsonl")
    parser.add_argument("--fewshot-file", type=Path, help="jsonl standing in for ARC-Challenge-Train.jsonl")
    parser.add_argument("--model", type=Path, help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--num-fewshot", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=1, help="lm-eval's batch size (its default is 1)")
    parser.add_argument("--threads", type=int, help="torch threads for both sides (default: torch's choice)")
    parser.add_argument("--skip-lm-eval", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import torch

    from llamaworks.assets import default_model_path

    if args.threads:
        torch.set_num_threads(args.threads)

    model_path = args.model or default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        test = args.data_dir / "ARC-Challenge-Test.jsonl"
        train = args.fewshot_file or args.data_dir / "ARC-Challenge-Train.jsonl"
        ours_dir = work / "data"
        ours_dir.mkdir()
        (ours_dir / "ARC-Challenge-Test.jsonl").symlink_to(test.resolve())
        if train.exists():
            (ours_dir / "ARC-Challenge-Train.jsonl").symlink_to(train.resolve())
        elif args.num_fewshot:
            parser.error(f"{train} not found: pass --fewshot-file or --num-fewshot 0")
        ours = run_ours(str(model_path), ours_dir, args.limit, args.num_fewshot)
        figures = {"items": args.limit, "num_fewshot": args.num_fewshot, "model": str(model_path),
                   "threads": torch.get_num_threads(),
                   "ours_seconds": ours["seconds"], "ours_items_per_s": args.limit / ours["seconds"],
                   "ours_cpu_seconds": ours["cpu"],
                   "ours_acc": ours["result"]["acc"], "ours_acc_norm": ours["result"]["acc_norm"]}
        print(f"llamaworks: {args.limit} items in {ours['seconds']:.1f} s (CPU {ours['cpu']:.1f} s) = "
              f"{figures['ours_items_per_s']:.3f} items/s "
              f"(acc {ours['result']['acc']:.4f}, acc_norm {ours['result']['acc_norm']:.4f})", flush=True)
        if not args.skip_lm_eval:
            ai2_to_hf(test, work / "test.jsonl")
            ai2_to_hf(train if train.exists() else test, work / "train.jsonl")
            (work / "arc_challenge_local.yaml").write_text(
                TASK_YAML.format(train=work / "train.jsonl", test=work / "test.jsonl"))
            theirs = run_lm_eval(model_path, work, args.limit, args.num_fewshot, args.batch_size)
            diff = max(abs(a - b) for x, y in zip(ours["lls"], theirs["lls"]) for a, b in zip(x, y))
            same_ctx = sum(a == b for a, b in zip(ours["contexts"], theirs["contexts"]))
            figures.update({
                "lm_eval_seconds": theirs["seconds"], "lm_eval_items_per_s": args.limit / theirs["seconds"],
                "lm_eval_cpu_seconds": theirs["cpu"], "lm_eval_batch_size": args.batch_size,
                "speedup": theirs["seconds"] / ours["seconds"], "speedup_cpu_time": theirs["cpu"] / ours["cpu"],
                "lm_eval_acc": theirs["result"]["acc,none"], "lm_eval_acc_norm": theirs["result"]["acc_norm,none"],
                "identical_pred": ours["pred"] == theirs["pred"],
                "identical_pred_norm": ours["pred_norm"] == theirs["pred_norm"],
                "identical_contexts": f"{same_ctx}/{args.limit}", "max_abs_loglikelihood_diff": diff,
            })
            print(f"lm-eval hf (batch {args.batch_size}): {theirs['seconds']:.1f} s (CPU {theirs['cpu']:.1f} s) = "
                  f"{figures['lm_eval_items_per_s']:.3f} items/s (acc {figures['lm_eval_acc']:.4f}, "
                  f"acc_norm {figures['lm_eval_acc_norm']:.4f})")
            print(f"speed-up {figures['speedup']:.2f}x wall, {figures['speedup_cpu_time']:.2f}x CPU time; "
                  f"identical predictions: acc {figures['identical_pred']}, "
                  f"acc_norm {figures['identical_pred_norm']}; identical prompts {same_ctx}/{args.limit}; "
                  f"max |Δ loglikelihood| {diff:.2e}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
