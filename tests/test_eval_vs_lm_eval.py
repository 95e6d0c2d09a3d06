"""`llamaworks eval` against lm-evaluation-harness itself: its stock task files, its hf (transformers) model, the
same items and the same tiny model written by transformers.

Every expectation here comes from the harness's own per-sample output (`log_samples`): the prompt and
continuation strings it scored, its per-item log-likelihoods, and its per-item acc / acc_norm / mc2 values.
"""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
import transformers

from eval_support import FIXTURES, harness_tasks, write_hf_exports
from llamaworks import cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TASKS = ["arc_easy", "arc_challenge", "hellaswag", "mmlu_astronomy", "truthfulqa_mc1", "truthfulqa_mc2"]
METRICS = {task: ("acc", "acc_norm") if task.startswith(("arc", "hellaswag")) else ("acc",) for task in TASKS}
SHOTS = 2  # few-shot > 0 everywhere: the harness's sampling rule per task (seeded random, k + 1 minus the doc, first k)
# Both sides compute in float32 on the CPU; the harness batches and pads, we reuse a cached prefix, so sums of
# float32 log-softmax rows differ in the last bits. Measured: at most 2e-5 on these items (sums of up to ~100 nats).
LOGLIK_TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory):
    """A random 2-layer LlamaForCausalLM written by transformers, with the default model's tokenizer (read by
    transformers from the bundled GGUF). Weights wide enough (std 0.2) that choices get clearly different scores."""
    from llamaworks.assets import default_model_path

    gguf = default_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


WORDS = ("a", "an", "no", "yes", "it", "x", "ice", "red", "blue", "water", "energy", "the Sun", "plants", "gravity",
         "a large rock", "a small insect", "heat from the ground")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The fixture items plus generated ARC-Easy items whose choices range from one letter to a phrase, so that
    acc_norm's per-character normalisation decides predictions. Each question is asked once with every one of its
    choices as the answer: then a per-item acc (acc_norm) equal to the harness's on all copies means the same
    prediction, not merely the same right/wrong."""
    out = tmp_path_factory.mktemp("data")
    shutil.copytree(FIXTURES, out, dirs_exist_ok=True)
    rnd = random.Random(0)
    with open(out / "arc" / "ARC-Easy-Test.jsonl", "a", encoding="utf-8") as f:
        for i in range(12):
            texts = rnd.sample(WORDS, rnd.choice((3, 4, 5)))
            labels = "ABCDE"[: len(texts)] if i % 3 else "12345"[: len(texts)]
            question = {"stem": f"Which of these is {rnd.choice(WORDS)}?",
                        "choices": [{"label": label, "text": text} for label, text in zip(labels, texts)]}
            for answer in labels:
                f.write(json.dumps({"id": f"G{i}{answer}", "question": question, "answerKey": answer}) + "\n")
    return out


@pytest.fixture(scope="module")
def harness(tiny_hf_model, data_dir, tmp_path_factory):
    """The harness's results document: simple_evaluate with its hf model (float32, CPU, batches of 4)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    work = tmp_path_factory.mktemp("harness")
    manager = harness_tasks(write_hf_exports(work / "data", data_dir), work, SHOTS)
    lm = HFLM(pretrained=str(tiny_hf_model), dtype="float32", device="cpu", batch_size=4)
    return simple_evaluate(model=lm, tasks=TASKS, num_fewshot=SHOTS, log_samples=True, task_manager=manager,
                           bootstrap_iters=0)


@pytest.fixture(scope="module")
def ours(tiny_hf_model, data_dir, tmp_path_factory):
    """`llamaworks eval` on the same model folder, reading the same items from their original formats."""
    out = tmp_path_factory.mktemp("ours") / "results.json"
    assert cli.main(["eval", "--model", str(tiny_hf_model), "--tasks", ",".join(TASKS), "--data-dir", str(data_dir),
                     "--num-fewshot", str(SHOTS), "--log-samples", "--out", str(out), "--no-progress"]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("task", TASKS)
def test_per_item_prompts_loglikelihoods_and_predictions_match_the_harness(task, harness, ours):
    theirs = sorted(harness["samples"][task], key=lambda s: s["doc_id"])
    mine = ours["samples"][task]
    assert len(mine) == len(theirs) == ours["results"][task]["n"] > 0
    assert ours["results"][task]["num_fewshot"] == harness["n-shot"][task] == SHOTS
    for s, m in zip(theirs, mine):
        where = f"{task} item {s['doc_id']}"
        # the strings scored: one (context, continuation) pair per choice
        assert [tuple(a) for a in s["arguments"]] == [(m["context"], c) for c in m["continuations"]], where
        assert s["target"] == m["gold"], where
        lls = [float(r[0]) for r in s["filtered_resps"]]
        assert np.max(np.abs(np.subtract(m["loglikelihoods"], lls))) <= LOGLIK_TOL, where
        assert m["pred"] == int(np.argmax(lls)), where  # identical predictions...
        # ...and the harness's own per-item metric values (mc2 is a probability mass, the others 0 or 1)
        assert s["metrics"] == list(METRICS[task]), where
        for metric in METRICS[task]:
            assert m[metric] == pytest.approx(s[metric], abs=LOGLIK_TOL if task == "truthfulqa_mc2" else 0), where
    for metric in METRICS[task]:
        assert ours["results"][task][metric] == pytest.approx(harness["results"][task][f"{metric},none"], abs=1e-6)


def test_the_model_tells_choices_apart(harness):
    """Guard for the test above: identical predictions mean something only if the model's choices differ by far
    more than the tolerance, and if both right and wrong answers occur."""
    gaps, hits = [], []
    for task in TASKS:
        for s in harness["samples"][task]:
            lls = sorted(float(r[0]) for r in s["filtered_resps"])
            gaps.append(lls[-1] - lls[-2])
            if task != "truthfulqa_mc2":
                hits.append(s["acc"])
    assert np.median(gaps) > 100 * LOGLIK_TOL
    assert 0 < sum(hits) < len(hits)
