"""Reward models: the ranking loss by hand, transformers' LlamaForSequenceClassification on our output, the
preference layouts (Anthropic HH, UltraFeedback), `finetune reward` + `score` through the CLI.

The accuracy figure on the default model (>= 90% held-out pairwise accuracy on a synthetic polite/rude
preference) is `python benchmarks/reward_rejection.py` (docs/finetuning.md): a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_smol_model
from llamaworks.config import get_preset
from llamaworks.errors import FormatError
from llamaworks.model import Transformer
from llamaworks.train.reward import (
    RewardModel,
    RewardScorer,
    load_reward_model,
    ranking_loss,
    save_reward_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ranking_loss_equals_hand_computation():
    chosen, rejected = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    # -log sigmoid(x) = log(1 + exp(-x)); differences 1.5 and -2.0
    expected = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(2.0))) / 2
    assert ranking_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)
    # LLaMA 2's margin term moves the decision point: differences 1.5 - 1 and -2.0 - 0.5
    with_margin = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(2.5))) / 2
    assert ranking_loss(chosen, rejected, torch.tensor([1.0, 0.5])).item() == pytest.approx(with_margin, abs=1e-6)


def tiny_reward_model(preset: str, pad_id: int, seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    body = Transformer(get_preset(preset))
    body.reset_parameters(std=0.1)
    model = RewardModel(body, pad_id)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # rewards of order 1, so 1e-4 is a real bound
    return model.eval()


@pytest.mark.parametrize("preset", ["tiny-llama2", "tiny-tied"])
def test_transformers_sequence_classifier_gives_our_rewards(tmp_path, preset):
    transformers = pytest.importorskip("transformers")
    pad = 0
    model = tiny_reward_model(preset, pad)
    gen = torch.Generator().manual_seed(1)
    lengths = [12, 7, 3, 12]
    ids = torch.full((4, 12), pad, dtype=torch.long)
    mask = torch.zeros((4, 12), dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, 256, (n,), generator=gen)
        mask[i, :n] = True
    with torch.no_grad():
        ours = model(ids, mask)
    save_reward_model(tmp_path / "rm", model)

    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["num_labels"] == 1 and config["pad_token_id"] == pad
    theirs_model = transformers.LlamaForSequenceClassification.from_pretrained(
        str(tmp_path / "rm"), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids, attention_mask=mask.long()).logits.squeeze(-1)
    assert ours.abs().max() > 0.1  # not a degenerate comparison of zeros
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # A row scored alone gives the reward it has in the padded batch (the head reads the last real token).
    with torch.no_grad():
        alone = model(ids[2:3, :3])
    torch.testing.assert_close(alone, ours[2:3], atol=1e-5, rtol=0)

    back, _, _ = load_reward_model(tmp_path / "rm")
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask), ours, atol=1e-6, rtol=0)


def test_a_causal_lm_folder_is_not_a_reward_model(tmp_path):
    from llamaworks.checkpoints import save_hf

    body = Transformer(get_preset("tiny-llama2"))
    save_hf(tmp_path / "lm", body, body.config)
    with pytest.raises(FormatError, match=r"not a reward model .*score\.weight"):
        load_reward_model(tmp_path / "lm")


# -- preference layouts --------------------------------------------------------------------------------

def test_anthropic_hh_and_ultrafeedback_layouts_read_as_prompt_and_replies():
    from llamaworks.train.dpo import preference_record

    hh = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke"
                    "\n\nAssistant: Why did the llama cross the road?",
          "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke"
                      "\n\nAssistant: No."}
    messages, chosen, rejected, margin = preference_record(hh, "hh.jsonl:1")
    assert messages == [{"role": "user", "content": "Hi there"},
                        {"role": "assistant", "content": "Hello! How can I help?"},
                        {"role": "user", "content": "Tell me a joke"}]
    assert (chosen, rejected, margin) == ("Why did the llama cross the road?", "No.", 0.0)

    uf = {"prompt": "2+2?", "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
          "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
          "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
          "score_chosen": 9.0, "score_rejected": 2.5}
    assert preference_record(uf, "uf.jsonl:1") == ([{"role": "user", "content": "2+2?"}], "4", "5", 6.5)

    plain = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
             "chosen": "Hello.", "rejected": "What?", "margin": 1}
    assert preference_record(plain, "p.jsonl:1")[1:] == ("Hello.", "What?", 1.0)

    bad = dict(hh, rejected="\n\nHuman: Something else\n\nAssistant: No.")
    with pytest.raises(FormatError, match=r"hh.jsonl:3: 'chosen' and 'rejected' differ before"):
        preference_record(bad, "hh.jsonl:3")
    with pytest.raises(FormatError, match=r"x.jsonl:2: 'margin' must be a number"):
        preference_record(dict(plain, margin="big"), "x.jsonl:2")


# -- finetune reward + score through the CLI -----------------------------------------------------------

POLITE = ["Of course, happy to help: {a}", "Sure, thank you for asking! {a}", "Certainly. {a} Hope this helps!"]
RUDE = ["Ugh, obviously {a}", "Whatever. {a} Stop asking.", "Figure it out yourself. {a}"]
QUESTIONS = [("What is the capital of France?", "Paris."), ("How many legs does a cat have?", "Four."),
             ("What color is the sky?", "Blue."), ("What is 2 + 3?", "Five."),
             ("Which planet do we live on?", "Earth."), ("What do bees make?", "Honey."),
             ("How many days are in a week?", "Seven."), ("What is frozen water called?", "Ice.")]


def write_polite_pairs(path: Path, questions: list[tuple[str, str]], shift: int = 1) -> Path:
    """A synthetic preference: the polite answer is chosen over the rude one (same fact); every template of
    each kind appears with every question."""
    with path.open("w") as f:
        for q, a in questions:
            for j in range(len(POLITE)):
                f.write(json.dumps({"prompt": q, "chosen": POLITE[j].format(a=a),
                                    "rejected": RUDE[(j + shift) % len(RUDE)].format(a=a)}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, smollm2_gguf) -> Path:
    from llamaworks.tokenizer import load_tokenizer

    return write_tiny_smol_model(tmp_path_factory.mktemp("tiny") / "base", load_tokenizer(smollm2_gguf), 256)


def cli(*args: object) -> None:
    from llamaworks.cli import main

    # One thread: main() would set the physical core count, and tiny models on a busy machine crawl with two.
    assert main(["--threads", "1", *map(str, args)]) == 0


@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetune_reward_learns_a_preference_and_score_reads_it(tmp_path, tiny_base, method):
    train = write_polite_pairs(tmp_path / "train.jsonl", QUESTIONS[:6])
    val = write_polite_pairs(tmp_path / "val.jsonl", QUESTIONS[6:], shift=2)
    out = tmp_path / "rm"
    cli("finetune", "reward", "--reward-method", method, "--model", tiny_base, "--data", train, "--val-data", val,
        "--out", out, "--seq-len", "64", "--batch-size", "4", "--max-steps", "16", "--lr", "5e-3",
        "--warmup-steps", "0", "--log-every", "10", "--no-progress", "--seed", "0")
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["val_pairs"] == 6 and summary["val_accuracy"] == 1.0, summary
    assert (out / "metrics.csv").is_file() and (out / "loss.png").is_file()

    # `score` on the held-out pairs' replies renders them as training did: every chosen reply above its rejected one.
    pairs = [json.loads(line) for line in val.read_text().splitlines()]
    records = []
    for p in pairs:
        records.append({"prompt": p["prompt"], "response": p["chosen"]})
        records.append({"messages": [{"role": "user", "content": p["prompt"]},
                                     {"role": "assistant", "content": p["rejected"]}]})
    conv = tmp_path / "conv.jsonl"
    conv.write_text("".join(json.dumps(r) + "\n" for r in records))
    cli("score", "--model", out, conv, "--out", tmp_path / "scored.jsonl", "--no-progress")
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in s.items() if k != "reward"} for s in scored] == records
    rewards = [s["reward"] for s in scored]
    assert all(rewards[i] > rewards[i + 1] for i in range(0, len(rewards), 2)), rewards
    # The Python scorer gives the same numbers (batched with padding or not).
    scorer = RewardScorer.load(out, batch_size=3)
    again = scorer([([{"role": "user", "content": pairs[0]["prompt"]}], pairs[0]["chosen"])])
    assert again[0] == pytest.approx(rewards[0], abs=1e-5)


def test_score_names_the_bad_line(tmp_path, tiny_base, capsys):
    from llamaworks.cli import main

    bad = tmp_path / "conv.jsonl"
    bad.write_text('{"prompt": "hi", "response": "hello"}\n{"messages": [{"role": "user", "content": "x"}]}\n')
    assert main(["--threads", "1", "score", "--model", str(tiny_base), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "conv.jsonl:2: expected 'messages'" in err
    # A plain language model is refused in one line too.
    bad.write_text('{"prompt": "hi", "response": "hello"}\n')
    assert main(["--threads", "1", "score", "--model", str(tiny_base), str(bad)]) == 2
    assert "not a reward model" in capsys.readouterr().err
