"""Prompt strings and gold answers for every task against lm-evaluation-harness's own.

The expectation is what the harness itself builds: its stock task files (arc_easy.yaml, arc_challenge.yaml,
hellaswag.yaml with its utils.process_docs, mmlu_<subject>.yaml, truthfulqa_mc1/mc2.yaml) run by
`simple_evaluate` on the fixture items (written as Parquet in the Hugging Face layouts), with a model that only
records the (context, continuation) pairs it is asked to score. Ours reads the same items from the fixture files
in their original formats.
"""

from __future__ import annotations

import json
import shutil

import pytest

from eval_support import FIXTURES, harness_tasks, write_hf_exports
from llamaworks.errors import FormatError
from llamaworks.eval import FewshotSampler, build_prompt, load_tasks

ARC_DIR = FIXTURES / "arc"
ALL_TASKS = ["arc_easy", "arc_challenge", "hellaswag", "mmlu_astronomy", "mmlu_college_physics", "truthfulqa_mc1",
             "truthfulqa_mc2"]


def prompts(task, k: int = 0, seed: int = 1234, chat=None):
    sampler = FewshotSampler(task, seed)
    return [build_prompt(task, doc, sampler.sample(k, doc), chat) for doc in task.docs]


# -- the harness's prompts ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def harness_prompts(tmp_path_factory):
    """harness_prompts(k, seed, chat=False, names=ALL_TASKS) -> {task: [sample]}: the harness's per-sample log,
    in doc order."""
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM

    class PromptRecorder(LM):
        """Answers every log-likelihood request with 0: only the requests (the harness's strings) are used."""

        tokenizer_name = "json"

        def loglikelihood(self, requests):
            return [(0.0, False) for _ in requests]

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            raise NotImplementedError

        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            return json.dumps(chat_history)

    work = tmp_path_factory.mktemp("harness")
    files = write_hf_exports(work / "data")

    def run(k: int, seed: int, chat: bool = False, names: list[str] = ALL_TASKS) -> dict[str, list[dict]]:
        out = simple_evaluate(model=PromptRecorder(), tasks=names, num_fewshot=k, fewshot_random_seed=seed,
                              log_samples=True, task_manager=harness_tasks(files, work, k), bootstrap_iters=0,
                              apply_chat_template=chat, fewshot_as_multiturn=chat)
        return {name: sorted(samples, key=lambda s: s["doc_id"]) for name, samples in out["samples"].items()}

    return run


@pytest.mark.slow  # the harness's import and datasets: ~15 s once for the module
@pytest.mark.parametrize(("k", "seed"), [(0, 1234), (2, 1234), (2, 7), (3, 5)])
def test_prompts_and_gold_match_the_harness(harness_prompts, k, seed):
    # k=3 leaves TruthfulQA out: its few-shot pool is its own 3 items, and the harness draws k + 1 of them.
    names = [n for n in ALL_TASKS if k < 3 or not n.startswith("truthfulqa")]
    theirs = harness_prompts(k, seed, names=names)
    for task in load_tasks(names, FIXTURES):
        samples = theirs[task.name]
        assert len(samples) == len(task.docs) > 0, task.name
        for doc, prompt, s in zip(task.docs, prompts(task, k, seed), samples):
            assert [tuple(a) for a in s["arguments"]] == [(prompt.context, c) for c in prompt.continuations], task.name
            assert doc.gold == s["target"], task.name
            if task.name == "truthfulqa_mc2":
                assert list(doc.labels) == list(s["doc"]["mc2_targets"]["labels"])
        assert task.metrics == tuple(m for m in ("acc", "acc_norm") if m in samples[0]), task.name


@pytest.mark.slow
def test_chat_layout_matches_the_harness(harness_prompts):
    """--chat-template against the harness's --apply_chat_template --fewshot_as_multiturn: the same messages
    (here rendered as JSON by both sides), continuations without the leading space."""
    theirs = harness_prompts(2, 1234, chat=True)
    for task in load_tasks(ALL_TASKS, FIXTURES):
        for prompt, s in zip(prompts(task, 2, 1234, chat=json.dumps), theirs[task.name]):
            assert [tuple(a) for a in s["arguments"]] == [(prompt.context, c) for c in prompt.continuations], task.name


# -- few-shot pools that are too small ---------------------------------------------------------------

def test_missing_or_small_fewshot_pool_is_a_format_error(tmp_path):
    shutil.copy(ARC_DIR / "ARC-Easy-Test.jsonl", tmp_path)
    (task,) = load_tasks(["arc_easy"], tmp_path)
    assert task.fewshot_docs is None  # no ARC-Easy-Train file
    with pytest.raises(FormatError, match="arc_easy: 1-shot needs a few-shot split"):
        prompts(task, k=1)
    (physics,) = load_tasks(["mmlu_college_physics"], FIXTURES / "mmlu")
    with pytest.raises(FormatError, match="6-shot asked, the few-shot split has 5 items"):
        prompts(physics, k=6)


# -- Parquet exports (Hugging Face layouts) give the same docs --------------------------------------

def test_parquet_exports_match_the_original_formats(tmp_path):
    write_hf_exports(tmp_path)
    from_parquet, from_original = load_tasks(ALL_TASKS, tmp_path), load_tasks(ALL_TASKS, FIXTURES)
    assert [t.name for t in from_parquet] == [t.name for t in from_original] == ALL_TASKS
    for ours, theirs in zip(from_parquet, from_original):
        assert len(ours.docs) == len(theirs.docs) > 0, ours.name
        assert prompts(ours, k=2) == prompts(theirs, k=2), ours.name
        assert [(d.gold, d.labels) for d in ours.docs] == [(d.gold, d.labels) for d in theirs.docs], ours.name


# -- bad input ---------------------------------------------------------------------------------------

def test_missing_and_malformed_files_are_one_line_format_errors(tmp_path):
    with pytest.raises(FormatError, match="no ARC-Challenge test file found"):
        load_tasks(["arc_challenge"], tmp_path)
    with pytest.raises(FormatError, match="data directory not found"):
        load_tasks(["hellaswag"], tmp_path / "nope")
    bad = tmp_path / "ARC-Challenge-Test.jsonl"
    bad.write_text((ARC_DIR / "ARC-Challenge-Test.jsonl").read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(FormatError, match=r"ARC-Challenge-Test.jsonl:2: not valid JSON") as e:
        load_tasks(["arc_challenge"], tmp_path)
    assert "\n" not in str(e.value)
    bad.write_text('{"id": "x", "question": {"stem": "q", "choices": [{"label": "A", "text": "a"}]}, '
                   '"answerKey": "C"}\n')
    with pytest.raises(FormatError, match=r":1: answerKey 'C' is not one of the labels"):
        load_tasks(["arc_challenge"], tmp_path)
    (tmp_path / "hellaswag_val.jsonl").write_text('{"activity_label": "a", "ctx_a": "b", "endings": []}\n')
    with pytest.raises(FormatError, match=r"hellaswag_val.jsonl:1: missing field 'ctx_b'"):
        load_tasks(["hellaswag"], tmp_path)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "anatomy_test.csv").write_text("q,a,b,c,d,A\nq,a,b,c,E\n")
    with pytest.raises(FormatError, match=r"anatomy_test.csv:2: expected 6 columns"):
        load_tasks(["mmlu"], tmp_path)
    (tmp_path / "mc_task.json").write_text('[{"question": "q", "mc1_targets": {"a": 0}}]')
    with pytest.raises(FormatError, match=r"mc_task.json:1: mc1_targets needs answers with 0/1 labels"):
        load_tasks(["truthfulqa_mc1"], tmp_path)
