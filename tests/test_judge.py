"""`eval judge`: the position-swap rule with scripted judges, the Wilson interval against published values, and
a run against `llamaworks serve` (uvicorn on 127.0.0.1, the default model) as the judge and answer endpoint."""

from __future__ import annotations

import json

import pytest

from llamaworks.eval.judge import (
    PAIR_SYSTEM,
    JudgePrompt,
    answer_all,
    combine,
    judge_pairs,
    parse_pair,
    parse_rating,
    read_prompts,
    wilson_interval,
)

pytestmark = pytest.mark.usefixtures("one_thread")

MARK = "GOOD-ANSWER"
PROMPTS = [JudgePrompt(str(i), [f"question {i}"]) for i in range(6)]


def _blocks(messages) -> tuple[str, str]:
    """The two answers' texts as the pairwise prompt shows them (first, second)."""
    text = messages[-1]["content"]
    a = text.split("[The Start of Assistant A's Conversation]")[1].split("[The End of Assistant A's")[0]
    b = text.split("[The Start of Assistant B's Conversation]")[1].split("[The End of Assistant B's")[0]
    return a, b


def always_first(batch):
    """A judge with total position bias: whatever it reads, the first answer wins; every answer gets a 5."""
    return ["The first one is clearly better. [[A]]" if m[0]["content"] == PAIR_SYSTEM else "Fine. Rating: [[5]]"
            for m in batch]


def prefers_marker(batch):
    """A judge that prefers the answer holding MARK, wherever it appears; grades 9 with it, 3 without."""
    out = []
    for m in batch:
        if m[0]["content"] == PAIR_SYSTEM:
            first, second = _blocks(m)
            out.append("[[A]]" if MARK in first and MARK not in second else
                       "[[B]]" if MARK in second and MARK not in first else "[[C]]")
        else:
            out.append("Rating: [[9]]" if MARK in m[-1]["content"] else "Rating: [[3]]")
    return out


def _answers(text):
    return lambda batch: [f"{text} to {msgs[-1]['content']}" for msgs in batch]


def test_position_biased_judge_yields_only_ties():
    answers_a = answer_all(_answers(f"{MARK} answer"), PROMPTS)
    answers_b = answer_all(_answers("plain answer"), PROMPTS)
    r = judge_pairs(always_first, PROMPTS, answers_a, answers_b)
    pw = r["pairwise"]
    assert (pw["wins_a"], pw["ties"], pw["wins_b"]) == (0, 6, 0)
    assert all(p["pairwise"]["a_first"]["verdict"] == "A" and p["pairwise"]["b_first"]["verdict"] == "A"
               and p["pairwise"]["winner"] == "tie" for p in r["per_prompt"])
    assert r["single"]["a"]["mean"] == r["single"]["b"]["mean"] == 5.0


@pytest.mark.parametrize("marked", ["a", "b"])
def test_content_judge_yields_wins_in_both_orders(marked):
    good, plain = answer_all(_answers(f"{MARK} answer"), PROMPTS), answer_all(_answers("plain answer"), PROMPTS)
    answers_a, answers_b = (good, plain) if marked == "a" else (plain, good)
    r = judge_pairs(prefers_marker, PROMPTS, answers_a, answers_b, names=("m1", "m2"))
    pw = r["pairwise"]
    wins = (6, 0, 0) if marked == "a" else (0, 0, 6)
    assert (pw["wins_a"], pw["ties"], pw["wins_b"]) == wins
    assert {p["pairwise"]["winner"] for p in r["per_prompt"]} == {"m1" if marked == "a" else "m2"}
    # The swap really swapped: the marked model was shown first in one order and second in the other.
    first = r["per_prompt"][0]["pairwise"]
    assert {first["a_first"]["verdict"], first["b_first"]["verdict"]} == {"A", "B"}
    assert r["single"][marked]["mean"] == 9.0 and r["single"]["b" if marked == "a" else "a"]["mean"] == 3.0
    win = pw["win_a_rate" if marked == "a" else "win_b_rate"]
    assert win["value"] == 1.0 and win["ci95"] == pytest.approx(list(wilson_interval(6, 6)))


def test_combine_needs_the_same_winner_in_both_orders():
    assert combine("A", "B") == "a" and combine("B", "A") == "b"
    for ab, ba in [("A", "A"), ("B", "B"), ("A", "tie"), ("tie", "B"), (None, "B"), ("A", None), ("tie", "tie")]:
        assert combine(ab, ba) == "tie"


def test_verdict_parsing():
    assert parse_pair("A is better than B... final: [[B]]") == "B"
    assert parse_pair("[[A]] hmm, no: [[C]]") == "tie"
    assert parse_pair("assistant A") is None
    assert parse_rating("Rating: [[7]]") == 7.0 and parse_rating("score [8.5]") == 8.5
    assert parse_rating("Rating: 4") == 4.0 and parse_rating("Rating: [[11]]") is None and parse_rating("?") is None


def test_wilson_interval_matches_newcombe_1998():
    # Newcombe, Statistics in Medicine 17:857-872 (1998), Table I, method 3 (score interval without continuity
    # correction): the published limits to 4 decimals.
    published = {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611),
                 (1, 29): (0.0061, 0.1718)}
    for (k, n), (lo, hi) in published.items():
        got = wilson_interval(k, n)
        assert got[0] == pytest.approx(lo, abs=5e-5) and got[1] == pytest.approx(hi, abs=5e-5), (k, n, got)


def test_prompt_files_and_their_errors(tmp_path):
    from llamaworks.data.records import DatasetError

    good = tmp_path / "q.jsonl"
    good.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["Hi", "More?"]}) + "\n"
                    + json.dumps({"prompt": "One turn"}) + "\n", encoding="utf-8")
    items = read_prompts(good)
    assert [(p.id, p.turns, p.category) for p in items] == [("81", ["Hi", "More?"], "writing"),
                                                            ("2", ["One turn"], None)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"turns": []}) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: expected \"prompt\"") as err:
        read_prompts(bad)
    assert "skip" not in str(err.value)  # `eval judge` has no --skip-bad to suggest


def test_multi_turn_answers_carry_history():
    seen = []

    def chat(batch):
        seen.extend(batch)
        return [f"reply {len(msgs)}" for msgs in batch]

    answers = answer_all(chat, [JudgePrompt("1", ["first", "second"]), JudgePrompt("2", ["only"])])
    assert answers == [["reply 1", "reply 3"], ["reply 1"]]
    assert seen[-1] == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "reply 1"},
                        {"role": "user", "content": "second"}]


# -- against `llamaworks serve` -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(smollm2_gguf):
    """(base URL, model name) of the serve app over the default SmolLM2-135M-Instruct on the native backend (the
    server's default), a key required."""
    from llamaworks.engine.backend import EngineOptions
    from llamaworks.engine.native import NativeBackend
    from llamaworks.engine.scheduler import Scheduler
    from llamaworks.serve.app import create_app
    from serve_testutil import running_server

    backend = NativeBackend.load(smollm2_gguf, EngineOptions(max_rows=2, max_context=1024, threads=1))
    with running_server(create_app(Scheduler(backend), api_key="k-1", model_name="smol-judge")) as url:
        yield url, "smol-judge"


@pytest.mark.slow  # ~15 s alone, ~50 s on a busy 2-core machine
def test_judge_cli_against_serve_endpoint(served, tmp_path):
    """The whole verb with answers and judgments from the server: each judgment recorded is the text the official
    openai client gets for the same request, and the verdicts follow from those texts."""
    import openai

    from llamaworks.cli import main
    from llamaworks.eval.judge import pair_messages, single_messages

    url, name = served
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Name a colour."}) + "\n", encoding="utf-8")
    out = tmp_path / "judge.json"
    code = main(["eval", "judge", "--prompts", str(prompts), "--url-a", f"{url}/v1", "--model-a", name,
                 "--url-b", f"{url}/v1", "--model-b", name, "--judge-url", f"{url}/v1", "--judge", name,
                 "--api-key", "k-1", "--max-tokens", "24", "--judge-max-tokens", "40", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    r = json.loads(out.read_text(encoding="utf-8"))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k-1", max_retries=0, timeout=60)

    def reference(messages, max_tokens):
        return client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=max_tokens,
                                              seed=0).choices[0].message.content.strip()

    pw = r["pairwise"]
    assert pw["wins_a"] + pw["ties"] + pw["wins_b"] == 1 == r["prompts"]
    for row, q in zip(r["per_prompt"], ["Name a colour."]):
        assert row["answer_a"] == [reference([{"role": "user", "content": q}], 24)] and row["answer_a"][0]
        p = JudgePrompt(row["id"], row["turns"])
        ab = reference(pair_messages(p, row["answer_a"], row["answer_b"]), 40)
        assert row["pairwise"]["a_first"] == {"judgment": ab, "verdict": parse_pair(ab)}
        assert row["grade_b"]["judgment"] == reference(single_messages(p, row["answer_b"]), 40) != ""
        expected = combine(parse_pair(ab), row["pairwise"]["b_first"]["verdict"])
        assert row["pairwise"]["winner"] == {"a": r["model_a"], "b": r["model_b"]}.get(expected, "tie")


def test_judge_endpoint_errors_are_one_line(served, tmp_path, capsys):
    from llamaworks.cli import main

    url, _ = served
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n", encoding="utf-8")
    args = ["eval", "judge", "--prompts", str(prompts), "--url-a", f"{url}/v1", "--url-b", f"{url}/v1",
            "--judge-url", f"{url}/v1", "--no-progress"]
    assert main([*args, "--api-key", "wrong"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "HTTP 401" in err and "\n" not in err
    assert main(["eval", "judge", "--prompts", str(prompts), "--url-a", "http://127.0.0.1:9/v1", "--url-b",
                 f"{url}/v1", "--judge-url", f"{url}/v1", "--api-key", "k-1", "--no-progress"]) == 2
    assert "cannot reach the endpoint" in capsys.readouterr().err
