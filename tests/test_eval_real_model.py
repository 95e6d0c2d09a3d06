"""Slow: the default SmolLM2-135M-Instruct on the fixture items, against lm-evaluation-harness running the same
GGUF through its hf (transformers) model and its stock task files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval_support import FIXTURES, backend_of, harness_tasks, write_hf_exports
from llamaworks.eval import EvalSettings, run_eval

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TASKS = ["arc_challenge", "mmlu_astronomy", "truthfulqa_mc1"]
SHOTS = 1
# Ours reads the Q4_1 blocks as they are (native) or dequantized (torch); transformers dequantizes the same blocks
# to float32. What is left is float32 summation order over 30 layers.
LOGLIK_TOL = 2e-3


@pytest.fixture(scope="module", params=["torch", "native"])
def ours(smollm2_gguf, request):
    """(backend, tokenizer): the torch float reference, and the native backend as `llamaworks eval` runs it on a
    GGUF (the blocks as they are, float32 activations and KV cache)."""
    from llamaworks.checkpoints import load_model
    from llamaworks.eval.runner import _load

    if request.param == "torch":
        model, tokenizer, _ = load_model(smollm2_gguf, dtype=torch.float32)
        return backend_of(model.eval()), tokenizer
    backend, info = _load(str(smollm2_gguf), 6)
    assert backend.name == info["backend"] == "native"
    return backend, backend.tokenizer


@pytest.fixture(scope="module")
def harness(smollm2_gguf, smollm2_transformers, tmp_path_factory):
    """The harness's per-sample log: simple_evaluate with its hf model wrapping transformers' model of the GGUF."""
    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    work = tmp_path_factory.mktemp("harness")
    manager = harness_tasks(write_hf_exports(work / "data"), work, SHOTS)
    lm = HFLM(pretrained=smollm2_transformers, tokenizer=tokenizer, batch_size=4, device="cpu")
    out = simple_evaluate(model=lm, tasks=TASKS, num_fewshot=SHOTS, log_samples=True, task_manager=manager,
                          bootstrap_iters=0)
    return {task: sorted(samples, key=lambda s: s["doc_id"]) for task, samples in out["samples"].items()}


def test_loglikelihoods_predictions_and_accuracy_match_the_harness(ours, harness):
    backend, tokenizer = ours
    settings = EvalSettings(tasks=TASKS, data_dir=FIXTURES, num_fewshot=SHOTS, log_samples=True)
    doc = run_eval(backend, tokenizer, settings, progress=False)
    for task in TASKS:
        mine, theirs = doc["samples"][task], harness[task]
        assert len(mine) == len(theirs) > 0, task
        for m, s in zip(mine, theirs):
            assert [tuple(a) for a in s["arguments"]] == [(m["context"], c) for c in m["continuations"]], task
            lls = [float(r[0]) for r in s["filtered_resps"]]
            assert np.max(np.abs(np.subtract(m["loglikelihoods"], lls))) <= LOGLIK_TOL, task
            assert m["pred"] == int(np.argmax(lls)), task
            metrics = ["acc", "acc_norm"] if task == "arc_challenge" else ["acc"]
            assert s["metrics"] == metrics, task
            assert [m[k] for k in metrics] == [s[k] for k in metrics], task
        assert doc["results"][task]["acc"] == pytest.approx(np.mean([s["acc"] for s in theirs]))
