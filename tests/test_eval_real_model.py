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
# The harness runs with its own softmax_dtype=float64: by default it takes the log-softmax of float32 logits in
# float32, which alone is up to ~2e-4 off per item on this model (docs/eval.md). What is left is two float32 forward
# passes over 30 layers; the bound is the one issue #18 sets (~3x what the harness differs from itself by: batch
# 1 against 8, eager against sdpa attention, docs/eval.md).
LOGLIK_TOL = 1e-4
# Against the float64 reference (below): the same bound; measured on these items: native 2.3e-5, torch 2.6e-5.
EXACT_TOL = 1e-4


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
    lm = HFLM(pretrained=smollm2_transformers, tokenizer=tokenizer, batch_size=4, device="cpu",
              softmax_dtype="float64")
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


@pytest.fixture(scope="module")
def exact_model(smollm2_transformers):  # -> (context ids, continuation ids) -> log-likelihood
    """transformers' model of the GGUF in float64 throughout: a near-exact value of the dequantized model (the two
    places where transformers stays in float32 even in a float64 model, RMSNorm and the rotary angles, run in
    float64 here). model.py patched the same way agrees with it within 3e-10 per item (docs/eval.md)."""
    import copy
    import types

    model = copy.deepcopy(smollm2_transformers).double()

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(self, x, position_ids):
        angles = position_ids[..., None].double() * self.inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    patched = {"norm": 0, "rotary": 0}
    for module in model.modules():
        name = type(module).__name__
        if name == "LlamaRMSNorm":
            module.forward = types.MethodType(rms_norm, module)
            patched["norm"] += 1
        elif name == "LlamaRotaryEmbedding":
            dim = module.inv_freq.numel() * 2
            base = model.config.rope_parameters["rope_theta"]
            module.inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
            module.forward = types.MethodType(rotary, module)
            patched["rotary"] += 1
    assert patched == {"norm": 2 * model.config.num_hidden_layers + 1, "rotary": 1}, patched
    cache: dict[tuple[tuple[int, ...], tuple[int, ...]], float] = {}  # both backends ask for the same pairs

    def loglikelihood(context: list[int], cont: list[int]) -> float:
        key = (tuple(context), tuple(cont))
        if key not in cache:
            with torch.no_grad():
                logits = model(torch.tensor([(context + cont)[:-1]])).logits[0, len(context) - 1:]
            cache[key] = float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum())
        return cache[key]

    return loglikelihood


def test_loglikelihoods_within_1e4_of_a_float64_reference(ours, exact_model):
    """Per continuation, ours against the float64 value of the same dequantized model."""
    from llamaworks.eval.scorer import LoglikelihoodScorer

    backend, tokenizer = ours
    settings = EvalSettings(tasks=TASKS, data_dir=FIXTURES, num_fewshot=SHOTS, log_samples=True, limit=4)
    doc = run_eval(backend, tokenizer, settings, progress=False)
    scorer = LoglikelihoodScorer(backend, tokenizer)
    worst = 0.0
    for task in TASKS:
        for sample in doc["samples"][task]:
            for continuation, ll in zip(sample["continuations"], sample["loglikelihoods"]):
                worst = max(worst, abs(ll - exact_model(*scorer.encode_pair(sample["context"], continuation))))
    assert worst <= EXACT_TOL, worst
