"""`llamaworks eval` (the engine) vs lm-evaluation-harness's transformers ("hf") backend: same model, same items.

    python benchmarks/eval_vs_lm_eval.py --data-dir /work/shared/evaldata/arc --task arc_easy \\
        --limit 500 --num-fewshot 0 --threads 2 --repeats 3

Ours runs exactly what `llamaworks eval` runs: `eval.runner._load` (the native backend for a GGUF on the CPU,
float32 activations and KV cache, one cache row per choice plus the context's) and `run_eval`, in this process.
lm-eval runs in its own virtualenv (`--lm-eval-python`, default /root/lmeval-venv/bin/python; any python with
`lm_eval`, torch, transformers and gguf works, e.g. this project's test venv) as a subprocess running this file in
worker mode: `simple_evaluate` with the "hf" model made as `simple_evaluate(model="hf", model_args="pretrained=DIR,
gguf_file=FILE,dtype=float32", batch_size=..., device="cpu")` makes it (`HFLM.create_from_arg_string`), float32 on
the CPU, the same GGUF file dequantized by transformers' GGUF loader, and the harness's *stock* task file
(tasks/arc/arc_easy.yaml or arc_challenge.yaml, `include`d by absolute path; the override only points it at local
json files): it builds its own prompts and few-shot contexts (its default few-shot seed 1234 is ours).

Both sides read the same items (AI2's ARC jsonl; lm-eval's copy converted to the Hugging Face schema) and use the
same thread count. Timed per side: the evaluation call only (model load and, for lm-eval, the task's dataset
preparation excluded), wall and CPU seconds (process_time: every thread of the process; on a shared machine the
fairer figure), `--repeats` times each (the model loaded once); the speed-up is the ratio of the median wall times.

Compared per item, from the harness's own per-sample output (`log_samples`): the (context, continuation) strings it
scored, its log-likelihoods, and its per-item `acc` and `acc_norm` values, against ours. Nothing of the harness's
is recomputed here. The log-likelihoods come from one more (untimed) run of the harness with its own
`softmax_dtype=float64` option: by default it takes the log-softmax of float32 logits in float32, which alone moves
a per-item log-likelihood by up to ~2e-4 (ours, like the float64 truth, is in float64; docs/eval.md). The stock
run's differences are printed beside.

Few-shot examples come from a train file: without <Set>-Train.jsonl in --data-dir pass --fewshot-file (any ARC
jsonl, e.g. ARC-Challenge-Test.jsonl) to stand in as the train split for both sides.

Exit status: 1 when any item's prompt, acc or acc_norm differs from the harness's, when any per-item
log-likelihood differs by more than --tolerance, when a repeat of either side gives other log-likelihoods than its
first run, or (with --min-speedup X) when the median wall-clock speed-up is below X; 0 otherwise.
--profile FILE writes a cProfile of our (first) evaluation call and prints where its time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETS = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}
DEFAULT_LM_EVAL_PYTHON = "/root/lmeval-venv/bin/python"


# The default bound comes from what the harness varies by on its own: SmolLM2-135M Q4_1, 20 ARC-Easy items, 0-shot,
# its hf model at batch 1 against batch 8: at most 1.7e-5; eager against sdpa attention: 3.1e-5 (docs/eval.md).
# About 3x the larger. It holds against the harness's float64 log-softmax run; its stock float32 log-softmax is
# itself up to ~2e-4 off (see compare and docs/eval.md).
DEFAULT_TOLERANCE = 1e-4


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


# -- ours (the project's venv) -------------------------------------------------------------------------

def run_ours(model_path: str | None, data_dir: Path, task: str, limit: int, shots: int, threads: int | None,
             repeats: int, profile: Path | None) -> dict:
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
    seconds, cpus, runs = [], [], []
    for i in range(repeats):
        profiler = None
        if profile and i == 0:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        start, cpu = time.perf_counter(), time.process_time()
        doc = run_eval(backend, None, settings, model_info=info, progress=False)
        seconds.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
        if profiler:
            profiler.disable()
            profiler.dump_stats(str(profile))
        runs.append(doc)
    samples = runs[0]["samples"][task]
    lls = [s["loglikelihoods"] for s in samples]
    return {"seconds": seconds, "cpu": cpus, "lls": lls,
            "repeats_identical": all([s["loglikelihoods"] for s in d["samples"][task]] == lls for d in runs),
            "acc_items": [s["acc"] for s in samples], "acc_norm_items": [s["acc_norm"] for s in samples],
            "arguments": [[[s["context"], c] for c in s["continuations"]] for s in samples],
            "acc": runs[0]["results"][task]["acc"], "acc_norm": runs[0]["results"][task]["acc_norm"],
            "backend": backend.describe(), "rows": rows, "tokens_computed": runs[0]["timing"]["tokens_computed"]}


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
    import lm_eval.tasks
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    # The stock task file, included by absolute path; only the data location is overridden.
    name = spec["task"]
    work = Path(spec["work"])
    stock = Path(lm_eval.tasks.__file__).parent / "arc" / f"{name}.yaml"
    override = {"include": str(stock), "task": name, "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"train": spec["train"], "test": spec["test"]},
                                   "cache_dir": str(work / "datasets-cache")}}
    (work / "tasks").mkdir(exist_ok=True)
    (work / "tasks" / f"{name}.yaml").write_text(json.dumps(override))  # JSON is YAML
    manager = TaskManager(include_path=str(work / "tasks"), include_defaults=False)

    model = Path(spec["model"])
    model_args = f"pretrained={model.parent},gguf_file={model.name},dtype=float32"
    if spec.get("attn"):
        model_args += f",attn_implementation={spec['attn']}"
    # What simple_evaluate(model="hf", model_args=..., batch_size=..., device="cpu") does first, done before
    # the clock starts so the model load is not timed.
    lm = get_model("hf").create_from_arg_string(model_args, {"batch_size": spec["batch_size"],
                                                             "max_batch_size": None, "device": "cpu"})
    seconds, cpus, loading, runs = [], [], [], []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        tasks = manager.load([name])["tasks"]  # the local json dataset prepared before the clock too
        loading.append(time.perf_counter() - start)
        start, cpu = time.perf_counter(), time.process_time()
        out = simple_evaluate(model=lm, tasks=list(tasks.values()), num_fewshot=spec["shots"], limit=spec["limit"],
                              log_samples=True, task_manager=manager, bootstrap_iters=0)
        seconds.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
        runs.append(out)
    # One more run, untimed, with the harness's own `softmax_dtype=float64` option (the model argument sets this
    # attribute): its default log-softmax in float32 over the 49,152-entry vocabulary moves a per-item
    # log-likelihood by up to ~2e-4 (docs/eval.md), more than the two models' logits differ by.
    if not hasattr(lm, "softmax_dtype"):
        raise SystemExit(f"lm-eval {_version('lm_eval')} has no softmax_dtype option (0.4.13 has): a float64 "
                         "log-softmax run is needed for the log-likelihood comparison")
    lm.softmax_dtype = torch.float64
    exact = simple_evaluate(model=lm, tasks=list(manager.load([name])["tasks"].values()), num_fewshot=spec["shots"],
                            limit=spec["limit"], log_samples=True, task_manager=manager, bootstrap_iters=0)
    lm.softmax_dtype = None
    samples = sorted(runs[0]["samples"][name], key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    lls64 = [[float(r[0]) for r in s["filtered_resps"]]
             for s in sorted(exact["samples"][name], key=lambda s: s["doc_id"])]
    again = [[[float(r[0]) for r in s["filtered_resps"]] for s in sorted(o["samples"][name], key=lambda s: s["doc_id"])]
             for o in runs]
    result = runs[0]["results"][name]
    Path(spec["out"]).write_text(json.dumps({
        "seconds": seconds, "cpu": cpus, "dataset_seconds": loading, "lls": lls, "lls_float64_softmax": lls64,
        "repeats_identical": all(x == lls for x in again),
        "acc_items": [float(s["acc"]) for s in samples], "acc_norm_items": [float(s["acc_norm"]) for s in samples],
        "arguments": [[list(a) for a in s["arguments"]] for s in samples],
        "acc": result["acc,none"], "acc_norm": result["acc_norm,none"],
        "threads": torch.get_num_threads(), "versions": {"torch": torch.__version__,
                                                         "lm_eval": _version("lm_eval"),
                                                         "transformers": _version("transformers")}}))
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def run_lm_eval(python: str, model_path: Path, work: Path, name: str, train: Path, test: Path, limit: int,
                shots: int, batch_size: int, threads: int, repeats: int, attn: str | None = None) -> dict:
    spec = {"model": str(model_path), "work": str(work), "task": name, "train": str(train), "test": str(test),
            "limit": limit, "shots": shots, "batch_size": batch_size, "threads": threads, "repeats": repeats,
            "attn": attn, "out": str(work / "lm_eval_out.json")}
    (work / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # lm-eval's venv must not see the project's sources
    subprocess.run([python, str(Path(__file__).resolve()), "--lm-eval-worker", str(work / "spec.json")],
                   check=True, env=env)
    return json.loads((work / "lm_eval_out.json").read_text())


# -- the comparison ------------------------------------------------------------------------------------

def cpu_name() -> str:
    from llamaworks.hardware import cpu_description  # (not at the top: the harness's worker runs this file too)

    return cpu_description()["model"]


def _item_diffs(a: list[list[float]], b: list[list[float]]) -> list[float]:
    return [max(abs(x - y) for x, y in zip(p, q)) for p, q in zip(a, b)]


def compare(ours: dict, theirs: dict, tolerance: float) -> dict:
    """Per-item differences between the two sides, the harness's own per-sample values against ours: prompts, acc
    and acc_norm against its stock run, log-likelihoods against its run with its log-softmax in float64 (ours is
    in float64; the stock run's float32 one is reported beside)."""
    n = len(ours["lls"])
    if any(len(t) != n or any(len(x) != len(y) for x, y in zip(ours["lls"], t))
           for t in (theirs["lls"], theirs["lls_float64_softmax"])):
        return {"same_items": False}
    diffs = _item_diffs(ours["lls"], theirs["lls_float64_softmax"])
    stock = _item_diffs(ours["lls"], theirs["lls"])
    return {
        "same_items": True,
        "prompts_differ": [i for i in range(n) if ours["arguments"][i] != theirs["arguments"][i]],
        "acc_differ": [i for i in range(n) if ours["acc_items"][i] != theirs["acc_items"][i]],
        "acc_norm_differ": [i for i in range(n) if ours["acc_norm_items"][i] != theirs["acc_norm_items"][i]],
        "loglikelihood_beyond_tolerance": [i for i in range(n) if diffs[i] > tolerance],
        "max_abs_loglikelihood_diff": max(diffs),
        "stock_softmax_max_abs_loglikelihood_diff": max(stock),
        "stock_softmax_items_beyond_tolerance": sum(d > tolerance for d in stock),
        "harness_float32_vs_float64_softmax_max_diff": max(_item_diffs(theirs["lls"], theirs["lls_float64_softmax"])),
    }


def harness_variation(args: argparse.Namespace, model_path: Path, test: Path, train: Path, threads: int) -> int:
    """The harness's per-item log-likelihoods at --batch-size against its own other CPU paths."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ai2_to_hf(test, work / "test.jsonl")
        ai2_to_hf(train if train.exists() else test, work / "train.jsonl")
        runs = {}
        for label, batch, attn in ((f"batch {args.batch_size}", args.batch_size, None), ("batch 1", 1, None),
                                   (f"batch {args.batch_size}, eager attention", args.batch_size, "eager")):
            runs[label] = run_lm_eval(args.lm_eval_python, model_path, work, args.task, work / "train.jsonl",
                                      work / "test.jsonl", args.limit, args.num_fewshot, batch, threads, 1, attn)
        first, *others = runs
        for label in others:
            for key, what in (("lls", "stock float32 log-softmax"), ("lls_float64_softmax", "float64 log-softmax")):
                diff = max(_item_diffs(runs[first][key], runs[label][key]))
                print(f"harness {label} against {first} ({what}): {len(runs[first]['lls'])} items, "
                      f"max |Δ log-likelihood| {diff:.2e}")
        for label, run in runs.items():
            print(f"harness {label}: float32 against float64 log-softmax, "
                  f"max |Δ log-likelihood| {max(_item_diffs(run['lls'], run['lls_float64_softmax'])):.2e}")
    return 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--lm-eval-worker":
        return lm_eval_worker(Path(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with <Set>-Test.jsonl (AI2 schema)")
    parser.add_argument("--task", choices=sorted(SETS), default="arc_easy")
    parser.add_argument("--fewshot-file", type=Path, help="ARC jsonl standing in for <Set>-Train.jsonl")
    parser.add_argument("--model", type=Path, help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch size")
    parser.add_argument("--threads", type=int, default=2, help="threads for both sides (0: each side's default)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per side; the speed-up is of the medians")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest per-item log-likelihood difference accepted (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--lm-eval-python", default=DEFAULT_LM_EVAL_PYTHON,
                        help="python of the virtualenv holding lm_eval, torch, transformers, gguf")
    parser.add_argument("--skip-lm-eval", action="store_true")
    parser.add_argument("--harness-variation", action="store_true",
                        help="instead: the harness against itself (batch 1, eager attention) on the same items, the "
                             "reference's own spread that --tolerance should be set from")
    parser.add_argument("--min-speedup", type=float, help="exit 1 when the median wall-clock speed-up is below this")
    parser.add_argument("--profile", type=Path, help="cProfile our evaluation call into this file and summarize it")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.repeats < 1 or args.limit < 1:
        parser.error("--repeats and --limit must be at least 1")

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
          + (f" (few-shot pool {train.name})" if args.num_fewshot else "") + f"; {args.repeats} run(s) per side",
          flush=True)
    med = statistics.median
    if args.harness_variation:
        return harness_variation(args, model_path, test, train, threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ours_dir = work / "data"
        ours_dir.mkdir()
        (ours_dir / test.name).symlink_to(test.resolve())
        if train.exists():
            (ours_dir / f"{set_name}-Train.jsonl").symlink_to(train.resolve())
        ours = run_ours(str(model_path), ours_dir, args.task, args.limit, args.num_fewshot,
                        threads if args.threads else None, args.repeats, args.profile)
        n = len(ours["lls"])
        figures = {"cpu": cpu_name(), "threads": threads, "items": n, "task": args.task, "repeats": args.repeats,
                   "num_fewshot": args.num_fewshot, "model": str(model_path), "ours_backend": ours["backend"],
                   "ours_seconds": ours["seconds"], "ours_median_seconds": med(ours["seconds"]),
                   "ours_items_per_s": n / med(ours["seconds"]), "ours_cpu_seconds": ours["cpu"],
                   "ours_acc": ours["acc"], "ours_acc_norm": ours["acc_norm"],
                   "ours_tokens_computed": ours["tokens_computed"], "ours_repeats_identical": ours["repeats_identical"]}
        b = ours["backend"]
        print(f"llamaworks eval ({b.get('kernel_isa')}, {b.get('threads')} threads, {ours['rows']} rows): {n} items "
              f"in {' / '.join(f'{x:.1f}' for x in ours['seconds'])} s wall (median {med(ours['seconds']):.1f} s, "
              f"{med(ours['cpu']):.1f} s CPU) = {n / med(ours['seconds']):.2f} items/s (acc {ours['acc']:.4f}, "
              f"acc_norm {ours['acc_norm']:.4f}; {ours['tokens_computed']} positions computed)", flush=True)
        if args.profile:
            print_profile(args.profile)
        failures = [] if ours["repeats_identical"] else ["our repeats gave different log-likelihoods"]
        if not args.skip_lm_eval:
            ai2_to_hf(test, work / "test.jsonl")
            ai2_to_hf(train if train.exists() else test, work / "train.jsonl")
            theirs = run_lm_eval(args.lm_eval_python, model_path, work, args.task, work / "train.jsonl",
                                 work / "test.jsonl", args.limit, args.num_fewshot, args.batch_size, threads,
                                 args.repeats)
            diff = compare(ours, theirs, args.tolerance)
            if not diff["same_items"]:
                print("the two sides scored different items or choices")
                return 1
            speedup = med(theirs["seconds"]) / med(ours["seconds"])
            figures.update({
                "lm_eval_versions": theirs["versions"], "lm_eval_threads": theirs["threads"],
                "lm_eval_seconds": theirs["seconds"], "lm_eval_median_seconds": med(theirs["seconds"]),
                "lm_eval_items_per_s": n / med(theirs["seconds"]), "lm_eval_cpu_seconds": theirs["cpu"],
                "lm_eval_batch_size": args.batch_size, "lm_eval_dataset_seconds_untimed": theirs["dataset_seconds"],
                "lm_eval_acc": theirs["acc"], "lm_eval_acc_norm": theirs["acc_norm"],
                "lm_eval_repeats_identical": theirs["repeats_identical"],
                "speedup_median_wall": speedup, "speedup_median_cpu_time": med(theirs["cpu"]) / med(ours["cpu"]),
                "tolerance": args.tolerance, **{k: v for k, v in diff.items() if k != "same_items"},
            })
            v = theirs["versions"]
            print(f"lm-eval {v['lm_eval']} hf (torch {v['torch']}, transformers {v['transformers']}, batch "
                  f"{args.batch_size}, {theirs['threads']} threads): {n} items in "
                  f"{' / '.join(f'{x:.1f}' for x in theirs['seconds'])} s wall (median {med(theirs['seconds']):.1f} s, "
                  f"{med(theirs['cpu']):.1f} s CPU) = {n / med(theirs['seconds']):.2f} items/s "
                  f"(acc {theirs['acc']:.4f}, acc_norm {theirs['acc_norm']:.4f})")
            print(f"median speed-up {speedup:.2f}x wall, {figures['speedup_median_cpu_time']:.2f}x CPU time")
            print(f"per item, the harness's own values against ours: prompts identical "
                  f"{n - len(diff['prompts_differ'])}/{n}, acc {n - len(diff['acc_differ'])}/{n}, "
                  f"acc_norm {n - len(diff['acc_norm_differ'])}/{n}; "
                  f"max |Δ log-likelihood| {diff['max_abs_loglikelihood_diff']:.2e} against its float64 log-softmax "
                  f"(tolerance {args.tolerance:g}, {len(diff['loglikelihood_beyond_tolerance'])} items beyond); "
                  f"against its stock float32 log-softmax {diff['stock_softmax_max_abs_loglikelihood_diff']:.2e} "
                  f"({diff['stock_softmax_items_beyond_tolerance']} items beyond), which is off its own float64 one "
                  f"by up to {diff['harness_float32_vs_float64_softmax_max_diff']:.2e}")
            for key, what in (("prompts_differ", "prompts differ"), ("acc_differ", "acc differs"),
                              ("acc_norm_differ", "acc_norm differs"),
                              ("loglikelihood_beyond_tolerance", "log-likelihood beyond tolerance")):
                if diff[key]:
                    failures.append(f"{what} on items {diff[key][:20]}")
            if not theirs["repeats_identical"]:
                failures.append("lm-eval's repeats gave different log-likelihoods")
            if args.min_speedup and speedup < args.min_speedup:
                failures.append(f"median speed-up {speedup:.2f}x is below --min-speedup {args.min_speedup}")
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    figures["failures"] = failures
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    for f in failures:
        print(f"FAIL: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
