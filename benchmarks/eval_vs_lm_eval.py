"""`llamaworks eval` (the engine) vs lm-evaluation-harness's transformers ("hf") backend: same model, same items.

    python benchmarks/eval_vs_lm_eval.py --data-dir /work/shared/evaldata/arc --task arc_easy \\
        --limit 300 --num-fewshot 0 --threads 2 --min-speedup 3

Ours runs exactly what `llamaworks eval` runs: `eval.runner._load` (the native backend for a GGUF on the CPU,
float32 activations and KV cache, one cache row per choice plus the context's) and `run_eval`, in this process.
lm-eval runs in its own virtualenv (`--lm-eval-python`, default /root/lmeval-venv/bin/python; set it up with
`python3 -m venv /root/lmeval-venv && /root/lmeval-venv/bin/pip install torch==<cpu wheel> lm_eval transformers
gguf sentencepiece`) as a subprocess running this file in worker mode: `simple_evaluate` with the "hf" model
made as `simple_evaluate(model="hf", model_args="pretrained=DIR,gguf_file=FILE,dtype=float32", batch_size=...,
device="cpu")` makes it (`HFLM.create_from_arg_string`), float32 on the CPU, the same GGUF file dequantized by
transformers' GGUF loader, and a local task YAML with the stock ARC prompt (it builds its own prompts and
few-shot contexts; its default few-shot seed 1234 is ours).

Both sides read the same items (AI2's ARC jsonl; lm-eval's copy converted to the Hugging Face schema) and use the
same thread count. Timed per side: the evaluation call only (model load and, for lm-eval, the task's dataset
preparation excluded), wall and CPU seconds (process_time: every thread of the process; on a shared machine the
fairer figure). Reported: items/s, acc and acc_norm, whether the per-item predictions (argmax of log-likelihood,
and of log-likelihood per character as acc_norm) are identical, the largest per-item log-likelihood difference,
and the speed-up (lm-eval seconds / ours).

Few-shot examples come from a train file: without <Set>-Train.jsonl in --data-dir pass --fewshot-file (any ARC
jsonl, e.g. ARC-Challenge-Test.jsonl) to stand in as the train split for both sides.

Exit status: 0 when the predictions are identical (and, with --min-speedup X, the wall-clock speed-up is at
least X); 1 otherwise. --profile FILE writes a cProfile of our evaluation call and prints where its time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETS = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}
DEFAULT_LM_EVAL_PYTHON = "/root/lmeval-venv/bin/python"


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


# The stock lm-eval arc_easy / arc_challenge YAML (tasks/arc/arc_easy.yaml) with local data files.
TASK_YAML = """task: {name}
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


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first of equal maxima, as numpy's argmax


# -- ours (the project's venv) -------------------------------------------------------------------------

def run_ours(model_path: str | None, data_dir: Path, task: str, limit: int, shots: int, threads: int | None,
             profile: Path | None) -> dict:
    from functools import partial
    from unittest import mock

    from llamaworks.engine.backend import EngineOptions
    from llamaworks.eval import EvalSettings, load_tasks, rows_for, run_eval, runner

    settings = EvalSettings(tasks=[task], data_dir=data_dir, num_fewshot=shots, limit=limit, log_samples=True)
    rows = rows_for(load_tasks(settings.tasks, settings.data_dir))  # as eval_main
    if threads:  # `llamaworks eval` takes the physical cores; the same load with the threads asked
        with mock.patch.object(runner, "EngineOptions", partial(EngineOptions, threads=threads)):
            backend, info = runner._load(model_path, rows)
    else:
        backend, info = runner._load(model_path, rows)
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
    start, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    doc = run_eval(backend, None, settings, model_info=info, progress=False)
    if profiler:
        profiler.disable()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if profiler:
        profiler.dump_stats(str(profile))
    samples = doc["samples"][task]
    return {"seconds": seconds, "cpu": cpu, "lls": [s["loglikelihoods"] for s in samples],
            "pred": [s["pred"] for s in samples], "pred_norm": [s["pred_norm"] for s in samples],
            "contexts": [s["context"] for s in samples], "acc": doc["results"][task]["acc"],
            "acc_norm": doc["results"][task]["acc_norm"], "backend": backend.describe(), "rows": rows,
            "tokens_computed": doc["timing"]["tokens_computed"]}


def print_profile(path: Path, top: int = 25) -> None:
    import pstats

    print(f"\n-- cProfile of our evaluation call ({path}), by cumulative time --")
    pstats.Stats(str(path)).sort_stats("cumulative").print_stats(top)
    print("-- by own time --")
    pstats.Stats(str(path)).sort_stats("tottime").print_stats(15)


# -- lm-eval (its own venv; this file run with --lm-eval-worker) ---------------------------------------

def lm_eval_worker(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(spec["threads"])
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    model = Path(spec["model"])
    model_args = f"pretrained={model.parent},gguf_file={model.name},dtype=float32"
    # What simple_evaluate(model="hf", model_args=..., batch_size=..., device="cpu") does first, done before
    # the clock starts so the model load is not timed.
    lm = get_model("hf").create_from_arg_string(model_args, {"batch_size": spec["batch_size"],
                                                             "max_batch_size": None, "device": "cpu"})
    manager = TaskManager(include_path=spec["work"])
    loading = time.perf_counter()
    tasks = manager.load([spec["task"]])["tasks"]  # the local json dataset prepared before the clock too
    loading = time.perf_counter() - loading
    start, cpu = time.perf_counter(), time.process_time()
    out = simple_evaluate(model=lm, tasks=list(tasks.values()), num_fewshot=spec["shots"], limit=spec["limit"],
                          log_samples=True, task_manager=manager, bootstrap_iters=0)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    name = spec["task"]
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    chars = [[len(c) for c in s["doc"]["choices"]["text"]] for s in samples]
    args = [s["arguments"] for s in samples]
    contexts = [a["gen_args_0"]["arg_0"] if isinstance(a, dict) else a[0][0] for a in args]
    result = out["results"][name]
    Path(spec["out"]).write_text(json.dumps({
        "seconds": seconds, "cpu": cpu, "dataset_seconds": loading, "lls": lls,
        "pred": [_argmax(x) for x in lls],
        "pred_norm": [_argmax([a / n for a, n in zip(x, c)]) for x, c in zip(lls, chars)],
        "contexts": contexts, "acc": result["acc,none"], "acc_norm": result["acc_norm,none"],
        "threads": torch.get_num_threads(), "versions": {"torch": torch.__version__,
                                                         "lm_eval": _version("lm_eval"),
                                                         "transformers": _version("transformers")}}))
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def run_lm_eval(python: str, model_path: Path, work: Path, name: str, limit: int, shots: int, batch_size: int,
                threads: int) -> dict:
    spec = {"model": str(model_path), "work": str(work), "task": name, "limit": limit, "shots": shots,
            "batch_size": batch_size, "threads": threads, "out": str(work / "lm_eval_out.json")}
    (work / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # lm-eval's venv must not see the project's sources
    subprocess.run([python, str(Path(__file__).resolve()), "--lm-eval-worker", str(work / "spec.json")],
                   check=True, env=env)
    return json.loads((work / "lm_eval_out.json").read_text())


# -- the comparison ------------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--lm-eval-worker":
        return lm_eval_worker(Path(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with <Set>-Test.jsonl (AI2 schema)")
    parser.add_argument("--task", choices=sorted(SETS), default="arc_easy")
    parser.add_argument("--fewshot-file", type=Path, help="ARC jsonl standing in for <Set>-Train.jsonl")
    parser.add_argument("--model", type=Path, help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch size")
    parser.add_argument("--threads", type=int, default=2, help="threads for both sides (0: each side's default)")
    parser.add_argument("--lm-eval-python", default=DEFAULT_LM_EVAL_PYTHON,
                        help="python of the virtualenv holding lm_eval, torch, transformers, gguf")
    parser.add_argument("--skip-lm-eval", action="store_true")
    parser.add_argument("--min-speedup", type=float, help="exit 1 when the wall-clock speed-up is below this")
    parser.add_argument("--profile", type=Path, help="cProfile our evaluation call into this file and summarize it")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from llamaworks.assets import default_model_path
    from llamaworks.hardware import physical_cores

    threads = args.threads or physical_cores()
    model_path = Path(args.model or default_model_path())
    set_name = SETS[args.task]
    test = args.data_dir / f"{set_name}-Test.jsonl"
    train = args.fewshot_file or args.data_dir / f"{set_name}-Train.jsonl"
    if not test.exists():
        parser.error(f"{test} not found")
    if args.num_fewshot and not train.exists():
        parser.error(f"{train} not found: pass --fewshot-file or --num-fewshot 0")
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs); threads {threads} each side; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    print(f"model {model_path.name}; {args.task} ({test.name}), {args.limit} items, {args.num_fewshot}-shot"
          + (f" (few-shot pool {train.name})" if args.num_fewshot else ""), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ours_dir = work / "data"
        ours_dir.mkdir()
        (ours_dir / test.name).symlink_to(test.resolve())
        if train.exists():
            (ours_dir / f"{set_name}-Train.jsonl").symlink_to(train.resolve())
        ours = run_ours(str(model_path), ours_dir, args.task, args.limit, args.num_fewshot,
                        threads if args.threads else None, args.profile)
        n = len(ours["pred"])
        figures = {"cpu": cpu_name(), "threads": threads, "items": n, "task": args.task,
                   "num_fewshot": args.num_fewshot, "model": str(model_path), "ours_backend": ours["backend"],
                   "ours_seconds": ours["seconds"], "ours_items_per_s": n / ours["seconds"],
                   "ours_cpu_seconds": ours["cpu"], "ours_acc": ours["acc"], "ours_acc_norm": ours["acc_norm"],
                   "ours_tokens_computed": ours["tokens_computed"]}
        b = ours["backend"]
        print(f"llamaworks eval ({b.get('kernel_isa')}, {b.get('threads')} threads, {ours['rows']} rows): {n} items "
              f"in {ours['seconds']:.1f} s wall, {ours['cpu']:.1f} s CPU = {n / ours['seconds']:.2f} items/s "
              f"(acc {ours['acc']:.4f}, acc_norm {ours['acc_norm']:.4f}; {ours['tokens_computed']} positions "
              f"computed)", flush=True)
        if args.profile:
            print_profile(args.profile)
        status = 0
        if not args.skip_lm_eval:
            ai2_to_hf(test, work / "test.jsonl")
            ai2_to_hf(train if train.exists() else test, work / "train.jsonl")
            name = f"{args.task}_local"
            (work / f"{name}.yaml").write_text(
                TASK_YAML.format(name=name, train=work / "train.jsonl", test=work / "test.jsonl"))
            theirs = run_lm_eval(args.lm_eval_python, model_path, work, name, args.limit, args.num_fewshot,
                                 args.batch_size, threads)
            if len(theirs["lls"]) != n or any(len(x) != len(y) for x, y in zip(ours["lls"], theirs["lls"])):
                print("the two sides scored different items or choices")
                return 1
            diff = max(abs(a - b) for x, y in zip(ours["lls"], theirs["lls"]) for a, b in zip(x, y))
            same_ctx = sum(a == b for a, b in zip(ours["contexts"], theirs["contexts"]))
            differ = [i for i in range(n) if ours["pred"][i] != theirs["pred"][i]]
            differ_norm = [i for i in range(n) if ours["pred_norm"][i] != theirs["pred_norm"][i]]
            figures.update({
                "lm_eval_versions": theirs["versions"], "lm_eval_threads": theirs["threads"],
                "lm_eval_seconds": theirs["seconds"], "lm_eval_items_per_s": n / theirs["seconds"],
                "lm_eval_cpu_seconds": theirs["cpu"], "lm_eval_batch_size": args.batch_size,
                "lm_eval_dataset_seconds_untimed": theirs["dataset_seconds"],
                "lm_eval_acc": theirs["acc"], "lm_eval_acc_norm": theirs["acc_norm"],
                "speedup": theirs["seconds"] / ours["seconds"], "speedup_cpu_time": theirs["cpu"] / ours["cpu"],
                "identical_pred": not differ, "identical_pred_norm": not differ_norm,
                "items_pred_differ": differ, "items_pred_norm_differ": differ_norm,
                "identical_contexts": same_ctx, "max_abs_loglikelihood_diff": diff,
            })
            v = theirs["versions"]
            print(f"lm-eval {v['lm_eval']} hf (torch {v['torch']}, transformers {v['transformers']}, batch "
                  f"{args.batch_size}, {theirs['threads']} threads): {n} items in {theirs['seconds']:.1f} s wall, "
                  f"{theirs['cpu']:.1f} s CPU = {n / theirs['seconds']:.2f} items/s (acc {theirs['acc']:.4f}, "
                  f"acc_norm {theirs['acc_norm']:.4f})")
            print(f"speed-up {figures['speedup']:.2f}x wall, {figures['speedup_cpu_time']:.2f}x CPU time; "
                  f"identical predictions: acc {not differ} ({n - len(differ)}/{n}), acc_norm {not differ_norm} "
                  f"({n - len(differ_norm)}/{n}); identical prompts {same_ctx}/{n}; "
                  f"max per-item |Δ log-likelihood| {diff:.2e}")
            if differ or differ_norm:
                print(f"predictions differ on items {sorted(set(differ) | set(differ_norm))[:20]}")
                status = 1
            elif args.min_speedup and figures["speedup"] < args.min_speedup:
                print(f"speed-up {figures['speedup']:.2f}x is below --min-speedup {args.min_speedup}")
                status = 1
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
