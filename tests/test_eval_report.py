"""End to end on the fixtures with a tiny random model: results JSON, samples, table, --compare, CLI errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from eval_support import FIXTURES, backend_of, default_tokenizer, tiny_model
from llamaworks import cli
from llamaworks.eval import EvalSettings, run_eval
from llamaworks.eval import report as report_mod

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def results_doc(tmp_path_factory):
    model, tokenizer = tiny_model(), default_tokenizer()
    data = tmp_path_factory.mktemp("data")
    for sub in ("arc", "mmlu", "truthfulqa"):
        (data / sub).symlink_to(FIXTURES / sub)
    settings = EvalSettings(tasks=["arc_challenge", "mmlu", "truthfulqa_mc2"], data_dir=data, num_fewshot=1,
                            limit=2, log_samples=True)
    info = {"path": "tiny", "fingerprint": report_mod.model_fingerprint(None, model.config.to_dict())}
    doc = report_mod.finalize(run_eval(backend_of(model), tokenizer, settings, model_info=info, progress=False))
    return doc, model, tokenizer


def test_results_have_metrics_stderr_settings_and_samples(results_doc):
    doc, model, _ = results_doc
    r = doc["results"]
    assert set(r) == {"arc_challenge", "mmlu_astronomy", "mmlu_college_physics", "truthfulqa_mc2"}
    assert r["arc_challenge"]["n"] == 2 and r["arc_challenge"]["num_fewshot"] == 1
    assert set(r["arc_challenge"]) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert "acc_norm" not in r["mmlu_astronomy"]
    assert r["mmlu_college_physics"]["n"] == 1  # the fixture has one test item
    g = doc["groups"]["mmlu"]
    assert g["n"] == 3 and g["subtasks"] == 2
    assert g["acc"] == pytest.approx((2 * r["mmlu_astronomy"]["acc"] + r["mmlu_college_physics"]["acc"]) / 3)
    assert doc["settings"]["seed"] == 1234 and doc["settings"]["limit"] == 2
    assert doc["version"] == 1 and doc["model"]["fingerprint"]["config_sha256"]

    # Every logged sample against log-likelihoods computed by hand, not by our scorer: the harness's rule
    # (trailing context space moves to the continuation; encode the whole string, split at the context's length)
    # with transformers' tokenizer read from the same GGUF, then log_softmax of the model's logits, summed.
    from transformers import AutoTokenizer

    from llamaworks.assets import default_model_path

    path = default_model_path()
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    def by_hand(context: str, continuation: str) -> float:
        n = len(context) - len(context.rstrip(" "))
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = hf.encode(context, add_special_tokens=False)
        cont = hf.encode(context + continuation, add_special_tokens=False)[len(ctx):]
        with torch.no_grad():
            rows = F.log_softmax(model(torch.tensor([(ctx + cont)[:-1]])).double()[0, len(ctx) - 1:], -1)
        return float(rows.gather(-1, torch.tensor(cont)[:, None]).sum())

    for task, samples in doc["samples"].items():
        values = [s["acc"] for s in samples]
        assert r[task]["acc"] == pytest.approx(sum(values) / len(values))
        for s in samples:
            lls = [by_hand(s["context"], c) for c in s["continuations"]]
            assert s["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
            if task != "truthfulqa_mc2":
                assert s["pred"] == max(range(len(lls)), key=lambda i: (lls[i], -i))
                assert s["acc"] == float(s["pred"] == s["gold"])
    # TruthfulQA mc2 as published (Lin et al.; lm-eval's process_results): the probability mass of the true
    # answers, normalised over all answers.
    assert doc["samples"]["truthfulqa_mc2"][0]["labels"] == [1, 1, 0, 0]
    for tqa in doc["samples"]["truthfulqa_mc2"]:
        p = [math.exp(by_hand(tqa["context"], c)) for c in tqa["continuations"]]
        true = [x for x, label in zip(p, tqa["labels"]) if label == 1]
        assert tqa["acc"] == pytest.approx(sum(true) / sum(p), rel=1e-4)
    arc0 = doc["samples"]["arc_challenge"][0]
    assert arc0["context"].endswith("Question: Which gas do plants take in from the air?\nAnswer:")
    assert arc0["context"].count("Question:") == 2  # one shot


def test_json_roundtrip_table_and_compare(results_doc, tmp_path):
    doc, _, _ = results_doc
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    report_mod.write_json(doc, a)
    changed = json.loads(json.dumps(doc))
    changed["results"]["arc_challenge"]["acc"] = doc["results"]["arc_challenge"]["acc"] + 0.5
    report_mod.write_json(changed, b)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file
    loaded = report_mod.read_json(a)
    assert loaded["results"]["arc_challenge"]["acc"] == doc["results"]["arc_challenge"]["acc"]

    table = report_mod.markdown_table(loaded)
    assert table.splitlines()[0] == "| task | shots | metric | value (%) | ± stderr | n |"
    assert "| arc_challenge | 1 | acc_norm |" in table
    assert "| mmlu | 1 | acc |" in table and "mmlu_astronomy" not in table  # subjects fold into the group

    text = report_mod.compare(loaded, report_mod.read_json(b), "a.json", "b.json")
    row = next(line for line in text.splitlines() if line.startswith("| arc_challenge | acc |"))
    assert "+50.00" in row
    same = next(line for line in text.splitlines() if line.startswith("| arc_challenge | acc_norm |"))
    assert "+0.00" in same


def test_cli_compare_and_one_line_errors(results_doc, tmp_path, capsys):
    doc, _, _ = results_doc
    report_mod.write_json(doc, tmp_path / "a.json")
    assert cli.main(["eval", "--compare", str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 0
    assert "| arc_challenge | acc |" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{\n  oops")
    assert cli.main(["eval", "--compare", str(tmp_path / "a.json"), str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.json:2: not valid JSON" in err and err.count("\n") == 1
    assert cli.main(["eval", "--tasks", "arc_challenge,nope", "--data-dir", str(tmp_path)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert cli.main(["eval", "--tasks", "hellaswag", "--data-dir", str(tmp_path)]) == 2
    assert "no HellaSwag validation file found" in capsys.readouterr().err


def test_fingerprint_hashes_small_files(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"abc")
    fp = report_mod.model_fingerprint(f, {"dim": 1})
    assert fp == {"sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "size": 3}


def test_chat_template_mode_wraps_prompts_and_drops_the_space(results_doc):
    _, model, tokenizer = results_doc
    assert tokenizer.chat_template  # SmolLM2's GGUF carries one
    settings = EvalSettings(tasks=["mmlu_astronomy"], data_dir=FIXTURES / "mmlu", limit=1, chat_template=True,
                            log_samples=True)
    doc = run_eval(backend_of(model), tokenizer, settings, progress=False)
    (sample,) = doc["samples"]["mmlu_astronomy"]
    # SmolLM2's ChatML template: the MMLU description is the system turn, the question the user turn.
    assert sample["context"] == (
        "<|im_start|>system\nThe following are multiple choice questions (with answers) about astronomy.\n\n"
        "<|im_end|>\n<|im_start|>user\nWhat is the Milky Way?\nA. A star\nB. A galaxy\nC. A planet\nD. A comet\n"
        "Answer:<|im_end|>\n<|im_start|>assistant\n")
    assert sample["continuations"] == ["A", "B", "C", "D"]
