"""Rejection sampling: n choices per prompt on the engine, the scorers (Python function, OpenAI-compatible judge),
and two chained rounds (`rejection-sample` -> `finetune`) raising the greedy answers' reward.

The cheap setting: a tiny random LLaMA with a small BPE vocabulary is first fine-tuned into an "SFT starting point"
that answers "No, ..." to 11 of its 14 questions and "Yes, ..." to the others, so its greedy answer is "No";
the scorer rewards "Yes". Best of 8 samples keeps "Yes" answers where the policy sampled one; after two rounds the
greedy answers to held-out questions say "Yes". The default model with a trained reward model is measured by
`python benchmarks/reward_rejection.py` (docs/finetuning.md).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from conftest import write_tiny_smol_model
from llamaworks.errors import ConfigError, FormatError
from llamaworks.train.rejection import (
    EndpointJudge,
    chat_completions_url,
    load_prompts,
    make_scorer,
    parse_rating,
    rejection_sample,
)
from train_helpers import build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_rating_and_endpoint_urls():
    assert parse_rating("Rating: [[7]]") == 7.0
    assert parse_rating("I would give it 8.5 out of 10") == 8.5
    assert parse_rating("[[ 3 ]] because it is rude") == 3.0
    assert parse_rating("no idea") is None
    assert parse_rating("[[42]]") is None
    assert chat_completions_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1/chat/completions"
    assert chat_completions_url("http://h/v1/") == "http://h/v1/chat/completions"
    with pytest.raises(ConfigError, match="http"):
        chat_completions_url("ftp://h")


def test_load_prompts_layouts_and_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Hi"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "Q"},
                                               {"role": "assistant", "content": "old answer"}]}) + "\n")
    assert load_prompts(path) == [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Q"}]]
    path.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(FormatError, match=r"p.jsonl:2: expected"):
        load_prompts(path)


class _ScriptedJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that rates a reply by how many times it says 'please' (capped at 10)."""

    seen: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        text = body["messages"][-1]["content"].split("[Assistant's reply to rate]")[1]
        reply = "no rating" if "confuse" in text else f"Rating: [[{min(10, 1 + text.count('please'))}]]"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_endpoint_judge_speaks_openai_chat_completions():
    server = HTTPServer(("127.0.0.1", 0), _ScriptedJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        judge = make_scorer(f"http://127.0.0.1:{server.server_port}/v1", judge_model="judge", api_key="k")
        assert isinstance(judge, EndpointJudge)
        msgs = [{"role": "user", "content": "Pass the salt"}]
        scores = judge([(msgs, "Here, please."), (msgs, "please, please take it"), (msgs, "confuse it")])
        assert scores == [2.0, 3.0, float("-inf")] and judge.unrated == 1
        request = _ScriptedJudge.seen[0]
        assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer k"
        assert request["body"]["model"] == "judge" and request["body"]["temperature"] == 0
        assert "Pass the salt" in request["body"]["messages"][-1]["content"]
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ConfigError, match="cannot reach the judge"):
        EndpointJudge(f"http://127.0.0.1:{server.server_port}")([(msgs, "x")])


def test_function_scorer_from_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_rules.py").write_text("def polite(messages, reply):\n    return reply.count('please')\n"
                                         "def broken(messages, reply):\n    return 'high'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    msgs = [{"role": "user", "content": "x"}]
    assert make_scorer("my_rules:polite")([(msgs, "please please"), (msgs, "no")]) == [2.0, 0.0]
    with pytest.raises(ConfigError, match="my_rules:broken returned 'high'; expected a number"):
        make_scorer("my_rules:broken")([(msgs, "x")])
    with pytest.raises(ConfigError, match="cannot import"):
        make_scorer("no_such_module_here:fn")


# -- n choices on the engine and two chained rounds ----------------------------------------------------

QUESTIONS = ["Is the sea big?", "Do cats fly?", "Is it late?", "Can you swim?", "Is this fun?", "Do you sing?",
             "Is water wet?", "Are you sure?", "Can birds talk?", "Is it cold?"]
HELD_OUT = ["Is the sun hot?", "Do fish run?", "Can you read?", "Is it early?"]
YES, NO = "Yes, I think so.", "No, I do not think so."


def says_yes(messages: list[dict], reply: str) -> float:
    return 1.0 if reply.startswith("Yes") else 0.0


def cli(*args: object) -> None:
    from llamaworks.cli import main

    # One thread: main() would set the physical core count, and tiny models on a busy machine crawl with two.
    assert main(["--threads", "1", *map(str, args)]) == 0


@pytest.fixture(scope="module")
def sft_start(tmp_path_factory) -> Path:
    """A tiny LLaMA taught to answer No (11 of 14 questions) or Yes: greedy says No, sampling sometimes Yes. Its
    byte-level BPE of 300 tokens (trained on these texts) keeps every step cheap on a busy machine."""
    from llamaworks.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("rs")
    texts = [f"user {q} assistant {a}" for q in QUESTIONS + HELD_OUT for a in (YES, NO)]
    tokenizer = load_tokenizer(build_tokenizer(root / "tok", texts, vocab_size=300, chat=True))
    base = write_tiny_smol_model(root / "random", tokenizer, 128)
    data = root / "sft.jsonl"
    with data.open("w") as f:
        for i, q in enumerate(QUESTIONS + HELD_OUT):  # held-out questions all No: the baseline is 0
            answer = YES if i in (2, 5, 8) else NO
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    cli("finetune", "full", "--model", base, "--data", data, "--out", root / "sft", "--seq-len", "48",
        "--batch-size", "7", "--max-steps", "40", "--lr", "3e-3", "--warmup-steps", "0", "--log-every", "20",
        "--no-progress", "--seed", "0")
    return root / "sft"


def test_n_choices_share_the_prompt(sft_start):
    from llamaworks.api import load
    from llamaworks.engine.backend import EngineOptions
    from llamaworks.engine.scheduler import generate, generate_batch

    llm = load(sft_start, options=EngineOptions(max_rows=4))
    prompts = [llm.encode_chat(q) for q in QUESTIONS[:2]]
    params = llm.sampling(temperature=1.0, seed=5, max_new_tokens=8)
    results = generate_batch(llm.scheduler, prompts, params, n=3)
    assert len(results) == 6
    # Choice j of a seeded request draws from seed + j, whatever else runs beside it.
    for i, prompt in enumerate(prompts):
        for j in range(3):
            alone = generate(llm.scheduler, prompt, llm.sampling(temperature=1.0, seed=5 + j, max_new_tokens=8))
            assert results[i * 3 + j].token_ids == alone.token_ids


@pytest.mark.slow  # ~40 s alone, minutes on a loaded machine: two sampling passes and two fine-tunings
def test_two_rounds_raise_the_greedy_reward(tmp_path, sft_start):
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in HELD_OUT))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))

    def greedy_reward(policy: Path) -> float:
        return rejection_sample(str(policy), says_yes, str(held), 1, temperature=0.0, max_new_tokens=8,
                                progress=False).mean_best

    before = greedy_reward(sft_start)
    assert before == 0.0  # the starting point says No
    policy, history = sft_start, []
    for rnd in (1, 2):
        best = tmp_path / f"round{rnd}.jsonl"
        result = rejection_sample(str(policy), says_yes, str(train), 8, out=best, temperature=1.0,
                                  max_new_tokens=8, seed=rnd, progress=False)
        records = [json.loads(line) for line in best.read_text().splitlines()]
        assert len(records) == len(QUESTIONS) and all(len(r["rewards"]) == 8 for r in records)
        assert result.mean_best >= result.mean_all  # the best of K is never below the average sample
        assert all(r["reward"] == max(r["rewards"]) for r in records)
        cli("finetune", "full", "--model", policy, "--data", best, "--out", tmp_path / f"policy{rnd}",
            "--seq-len", "48", "--batch-size", "5", "--max-steps", "12", "--lr", "2e-3", "--warmup-steps", "0",
            "--log-every", "12", "--no-progress", "--seed", str(rnd))
        policy = tmp_path / f"policy{rnd}"
        history.append((result.mean_all, result.mean_best, greedy_reward(policy)))
    print("round: (mean of samples, best of 8, greedy on held-out)", history)
    assert history[-1][2] > before, history
    assert history[-1][2] >= 0.75, history
