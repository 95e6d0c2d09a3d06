"""Slow: the default SmolLM2-135M-Instruct on fixture items, against transformers running the same GGUF."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eval_support import FIXTURES, backend_of
from llamaworks.eval import EvalSettings, FewshotSampler, build_prompt, load_tasks, run_eval
from llamaworks.eval.scorer import LoglikelihoodScorer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


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
def reference(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    kwargs = {"gguf_file": smollm2_gguf.name, "dtype": torch.float32}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), **kwargs).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    return model, tok


def reference_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """The harness's hf backend rule, done with transformers' own tokenizer and model."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    cont = whole[len(ctx):]
    with torch.no_grad():
        logits = model(torch.tensor([(ctx + cont)[:-1]])).logits[0, len(ctx) - 1:]
    return float(F.log_softmax(logits.double(), -1).gather(-1, torch.tensor(cont)[:, None]).sum())


def test_loglikelihoods_match_transformers_on_fixture_items(ours, reference):
    backend, tokenizer = ours
    scorer = LoglikelihoodScorer(backend, tokenizer)
    tasks = [*load_tasks(["arc_challenge"], FIXTURES / "arc"), *load_tasks(["mmlu_astronomy"], FIXTURES / "mmlu"),
             *load_tasks(["truthfulqa_mc1"], FIXTURES / "truthfulqa")]
    for task in tasks:
        sampler = FewshotSampler(task)
        for doc in task.docs[: 2 if task.name == "arc_challenge" else 1]:
            prompt = build_prompt(task, doc, sampler.sample(1 if task.fewshot_docs else 0, doc))
            got = [s.logprob for s in scorer.score(prompt.context, prompt.continuations)]
            want = [reference_loglikelihood(*reference, prompt.context, c) for c in prompt.continuations]
            assert got == pytest.approx(want, abs=2e-3), task.name
            assert max(range(len(got)), key=got.__getitem__) == max(range(len(want)), key=want.__getitem__)


def test_run_eval_with_the_default_model(ours, reference, tmp_path):
    """The reported accuracy is transformers' argmax over the same prompts against the gold answers."""
    backend, tokenizer = ours
    settings = EvalSettings(tasks=["arc_challenge", "mmlu_astronomy"], data_dir=FIXTURES, limit=2, log_samples=True)
    doc = run_eval(backend, tokenizer, settings, progress=False)
    assert doc["results"]["arc_challenge"]["n"] == 2
    assert doc["timing"]["items"] == 4
    for task in ("arc_challenge", "mmlu_astronomy"):
        hits = []
        for sample in doc["samples"][task]:
            want = [reference_loglikelihood(*reference, sample["context"], c) for c in sample["continuations"]]
            hits.append(float(max(range(len(want)), key=want.__getitem__) == sample["gold"]))
        assert doc["results"][task]["acc"] == pytest.approx(sum(hits) / len(hits)), task
