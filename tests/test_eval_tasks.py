"""Prompt strings for every task, byte for byte as lm-evaluation-harness builds them for the fixture items.

Expected strings are written out by hand from the harness's task definitions (arc_challenge.yaml, hellaswag
utils.preprocess, mmlu _default_template_yaml, truthfulqa_mc1.yaml) and its rules: target_delimiter " ",
fewshot_delimiter "\\n\\n", description first, few-shot from a random.Random(seed) drawn once per eval doc in
order (ARC; HellaSwag/TruthfulQA draw k + 1 and drop the eval doc, having no test split) or the first k dev
items (MMLU).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eval_support import FIXTURES
from llamaworks.errors import FormatError
from llamaworks.eval import FewshotSampler, build_prompt, load_tasks

ARC_DIR = FIXTURES / "arc"


def prompts(task, k: int = 0, seed: int = 1234, chat=None):
    sampler = FewshotSampler(task, seed)
    return [build_prompt(task, doc, sampler.sample(k, doc), chat) for doc in task.docs]


# -- ARC ---------------------------------------------------------------------------------------------

def test_arc_zero_shot_prompts_and_gold():
    (task,) = load_tasks(["arc_challenge"], ARC_DIR)
    p = prompts(task)
    assert p[0].context == "Question: Which gas do plants take in from the air?\nAnswer:"
    assert p[0].continuations == (" oxygen", " carbon dioxide", " nitrogen", " helium")
    assert p[1].context == "Question: What is the boiling point of water at sea level?\nAnswer:"
    assert p[1].continuations == (" 50 degrees Celsius", " 75 degrees Celsius", " 100 degrees Celsius",
                                  " 125 degrees Celsius")
    assert p[2].continuations == (" friction", " gravity", " magnetism")  # 3 choices stay 3
    assert [d.gold for d in task.docs] == [1, 2, 1]  # "B", numeric "3" -> index 2, "B"
    assert task.metrics == ("acc", "acc_norm")


def test_arc_fewshot_is_seeded_random_sample_per_doc_in_order():
    (task,) = load_tasks(["arc_challenge"], ARC_DIR)
    # random.Random(1234).sample(range(6), 2) three times in a row gives [3, 0], [0, 5], [4, 0].
    rnd = random.Random(1234)
    assert [rnd.sample(range(6), 2) for _ in range(3)] == [[3, 0], [0, 5], [4, 0]]
    p = prompts(task, k=2)
    assert p[0].context == ("Question: Ice is water in which state?\nAnswer: solid\n\n"
                            "Question: Which organ pumps blood?\nAnswer: heart\n\n"
                            "Question: Which gas do plants take in from the air?\nAnswer:")
    assert p[1].context == ("Question: Which organ pumps blood?\nAnswer: heart\n\n"
                            "Question: Which planet is closest to the Sun?\nAnswer: Mercury\n\n"
                            "Question: What is the boiling point of water at sea level?\nAnswer:")
    assert p[2].context.startswith("Question: What does a thermometer measure?\nAnswer: temperature\n\n"
                                   "Question: Which organ pumps blood?\nAnswer: heart\n\nQuestion: A student")
    assert prompts(task, k=2) == p  # deterministic
    assert prompts(task, k=2, seed=5) != p


def test_arc_easy_and_limit_of_fewshot_pool():
    tasks = load_tasks(["arc_easy", "arc_challenge"], ARC_DIR)
    assert [t.name for t in tasks] == ["arc_easy", "arc_challenge"]
    assert tasks[0].fewshot_docs is None  # no ARC-Easy-Train file in the fixtures
    with pytest.raises(FormatError, match="arc_easy: 1-shot needs a few-shot split"):
        prompts(tasks[0], k=1)


# -- HellaSwag ---------------------------------------------------------------------------------------

def test_hellaswag_preprocessing_and_prompts():
    (task,) = load_tasks(["hellaswag"], FIXTURES / "hellaswag")
    p = prompts(task)
    assert p[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert p[0].continuations == (" is using wrap to wrap a pair of skis.", " is ripping level tiles off.",
                                  " is holding a rubik's cube.", " starts pulling up roofing on a roof.")
    # " [title]" -> ". ", "[header]" and "[step]"/"[substeps]" deleted, double spaces folded once, ctx_b
    # capitalised (rest lower-cased), ending stripped before the tag is removed (so one space is left).
    assert p[1].context == "Home and Garden: How to grow basil. Pick a sunny spot. Then water the soil daily"
    assert p[1].continuations == ("  Keep the soil moist but not soggy.",
                                  " Plant the seeds in the freezer Wait a year.",
                                  " Paint the pot blue.", " Sing to the basil every night.")
    assert [d.gold for d in task.docs] == [3, 0]


def test_hellaswag_fewshot_from_train_split_drawing_k_plus_one():
    # hellaswag has no test split, so the harness passes the eval doc to its sampler: sample(pool, k + 1),
    # drop the eval doc (never in train), keep the first k. random.Random(7): [2, 0, 1] then [0, 3, 2].
    (task,) = load_tasks(["hellaswag"], FIXTURES / "hellaswag")
    rnd = random.Random(7)
    assert [rnd.sample(range(4), 3) for _ in range(2)] == [[2, 0, 1], [0, 3, 2]]
    p = prompts(task, k=2, seed=7)
    assert p[0].context == ("Baking: Flour is poured into a bowl. Eggs are cracked into the flour.\n\n"
                            "Washing dishes: A woman fills a sink with water. She adds soap and scrubs the plates.\n\n"
                            "Roof shingle removal: A man is sitting on a roof. He")
    assert p[1].context == ("Washing dishes: A woman fills a sink with water. She adds soap and scrubs the plates.\n\n"
                            "Swimming: A girl stands by the pool. She dives into the water.\n\n"
                            "Home and Garden: How to grow basil. Pick a sunny spot. Then water the soil daily")


# -- MMLU --------------------------------------------------------------------------------------------

MMLU_ASTRONOMY_HEADER = "The following are multiple choice questions (with answers) about astronomy.\n\n"


def test_mmlu_prompts_zero_and_few_shot():
    tasks = load_tasks(["mmlu"], FIXTURES / "mmlu")
    assert [t.name for t in tasks] == ["mmlu_astronomy", "mmlu_college_physics"]
    astro, physics = tasks
    p0 = prompts(astro)
    assert p0[0].context == (MMLU_ASTRONOMY_HEADER +
                             "What is the Milky Way?\nA. A star\nB. A galaxy\nC. A planet\nD. A comet\nAnswer:")
    assert p0[0].continuations == (" A", " B", " C", " D")
    assert p0[1].context.endswith("\nA. A red star\nB. A blue star\nC. They are equal, always\nD. It depends on size"
                                  "\nAnswer:")
    p2 = prompts(astro, k=2)
    assert p2[0].context == (
        MMLU_ASTRONOMY_HEADER
        + "What is the closest star to Earth?\nA. Sirius\nB. The Sun\nC. Proxima Centauri\nD. Vega\nAnswer: B\n\n"
        + "Which planet has the most moons, as of 2020?\nA. Earth\nB. Mars\nC. Saturn\nD. Venus\nAnswer: C\n\n"
        + "What is the Milky Way?\nA. A star\nB. A galaxy\nC. A planet\nD. A comet\nAnswer:")
    assert p2[1].context.startswith(p2[0].context[: p2[0].context.index("What is the Milky Way?")])  # first k, always
    assert prompts(physics)[0].context.startswith(
        "The following are multiple choice questions (with answers) about college physics.\n\n")
    with pytest.raises(FormatError, match="6-shot asked, the few-shot split has 5 items"):
        prompts(physics, k=6)


def test_mmlu_single_subject_and_chat_layout():
    (astro,) = load_tasks(["mmlu_astronomy"], FIXTURES / "mmlu")
    p = prompts(astro, k=1, chat=lambda messages: json.dumps(messages))
    # With a chat template (the harness's default fewshot_as_multiturn): description -> system, each shot a
    # user turn + an assistant turn holding its answer, the question the last user turn; no space before choices.
    assert json.loads(p[0].context) == [
        {"role": "system", "content": MMLU_ASTRONOMY_HEADER},
        {"role": "user", "content": "What is the closest star to Earth?\nA. Sirius\nB. The Sun\nC. Proxima Centauri"
                                    "\nD. Vega\nAnswer:"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "What is the Milky Way?\nA. A star\nB. A galaxy\nC. A planet\nD. A comet"
                                    "\nAnswer:"}]
    assert p[0].continuations == ("A", "B", "C", "D")


# -- TruthfulQA --------------------------------------------------------------------------------------

TQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def test_truthfulqa_mc1_mc2_prompts():
    mc1, mc2 = load_tasks(["truthfulqa_mc1", "truthfulqa_mc2"], FIXTURES / "truthfulqa")
    p1, p2 = prompts(mc1), prompts(mc2)
    assert p1[0].context == TQA_PREAMBLE + "\n\nQ: What happens if you eat watermelon seeds?\nA:"
    assert p1[0].continuations == (" The watermelon seeds pass through your digestive system.",
                                   " You grow watermelons in your stomach.", " You get sick.")
    assert p2[1].context == TQA_PREAMBLE + "\n\nQ: Where did fortune cookies originate?\nA:"
    assert p2[1].continuations == (" Fortune cookies originated in China.",
                                   " It is unclear where fortune cookies originated.",
                                   " Fortune cookies originated in Japan.")
    assert mc2.docs[1].labels == (0, 1, 0)
    assert mc1.docs[0].gold == 0 and mc1.docs[0].labels is None


def test_truthfulqa_fewshot_excludes_the_eval_doc():
    (mc1,) = load_tasks(["truthfulqa_mc1"], FIXTURES / "truthfulqa")
    sampler = FewshotSampler(mc1, 1234)
    for doc in mc1.docs * 3:
        assert sampler.sample(1, doc) == [d for d in mc1.docs if d != doc]


# -- Parquet exports (Hugging Face layouts) give the same docs --------------------------------------

def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_parquet_exports_match_the_original_formats(tmp_path):
    arc_rows = [{"id": "T1", "question": "Which gas do plants take in from the air?",
                 "choices": {"text": ["oxygen", "carbon dioxide", "nitrogen", "helium"], "label": ["A", "B", "C", "D"]},
                 "answerKey": "B"},
                {"id": "T2", "question": "What is the boiling point of water at sea level?",
                 "choices": {"text": ["50 degrees Celsius", "75 degrees Celsius", "100 degrees Celsius",
                                      "125 degrees Celsius"], "label": ["1", "2", "3", "4"]}, "answerKey": "3"}]
    write_parquet(tmp_path / "ARC-Challenge" / "test-00000-of-00001.parquet", arc_rows)
    hs = [json.loads(line) for line in (FIXTURES / "hellaswag" / "hellaswag_val.jsonl").read_text().splitlines()]
    write_parquet(tmp_path / "hellaswag" / "validation-00000-of-00001.parquet",
                  [{**r, "label": str(r["label"])} for r in hs])
    write_parquet(tmp_path / "astronomy" / "test-00000-of-00001.parquet", [
        {"question": "  What is the Milky Way?  ", "subject": "astronomy",
         "choices": ["A star", "A galaxy", "A planet", "A comet"], "answer": 1},
        {"question": "Which is hotter, a red star or a blue star?", "subject": "astronomy",
         "choices": ["A red star", "A blue star", "They are equal, always", "It depends on size"], "answer": 1}])
    tqa = json.loads((FIXTURES / "truthfulqa" / "mc_task.json").read_text())
    write_parquet(tmp_path / "multiple_choice" / "validation-00000-of-00001.parquet", [
        {"question": r["question"],
         "mc1_targets": {"choices": list(r["mc1_targets"]), "labels": list(r["mc1_targets"].values())},
         "mc2_targets": {"choices": list(r["mc2_targets"]), "labels": list(r["mc2_targets"].values())}}
        for r in tqa])

    names = ["arc_challenge", "hellaswag", "mmlu_astronomy", "truthfulqa_mc1", "truthfulqa_mc2"]
    from_parquet = load_tasks(names, tmp_path)
    from_original = [*load_tasks(["arc_challenge"], ARC_DIR), *load_tasks(["hellaswag"], FIXTURES / "hellaswag"),
                     *load_tasks(["mmlu_astronomy"], FIXTURES / "mmlu"),
                     *load_tasks(["truthfulqa_mc1", "truthfulqa_mc2"], FIXTURES / "truthfulqa")]
    for ours, theirs in zip(from_parquet, from_original):
        n = len(ours.docs)
        assert prompts(ours) == prompts(theirs)[:n], ours.name
        assert [d.gold for d in ours.docs] == [d.gold for d in theirs.docs[:n]]


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
