"""Issue 17 items 7 and 9: `llamaworks eval persona` and fine-tuning defaults that learn something on small data.

Metric tests use small inputs whose values are computed by hand from the definitions (distinct-n as in Li et al.,
2016: distinct n-grams over all n-grams of all replies). The end-to-end test fine-tunes a tiny model on a
generated KakaoTalk export and runs `eval persona` through the CLI. The slow test fine-tunes the bundled SmolLM2
with default flags on a 12-example persona set and checks the persona's name is learned.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from kakao_persona_support import PERSONA, write_persona_export
from llamaworks.errors import ConfigError
from llamaworks.eval.persona import (
    Marker,
    distinct_n,
    held_out_prompts,
    learn_markers,
    persona_metrics,
    sentence_endings,
)

# -- metrics on hand-computed inputs -----------------------------------------------------------------


def test_distinct_n_counts_unique_ngrams_over_all_replies():
    # unigrams: 아니용? x2, 좋아 x3 -> 2 distinct of 5; bigrams: (좋아, 좋아) x2 -> 1 of 2
    replies = ["아니용?", "아니용?", "좋아 좋아 좋아"]
    assert distinct_n(replies, 1) == pytest.approx(2 / 5)
    assert distinct_n(replies, 2) == pytest.approx(1 / 2)
    assert distinct_n(["하나"], 2) == 0.0  # no bigram at all


def test_collapse_onto_one_reply_shows():
    # Issue 17: "아니용?" for 14 of 20 prompts; the 6 others are two new words each.
    others = [f"다른 대답{i}" for i in range(6)]  # "다른" repeats: 7 distinct unigrams of 12
    replies = ["아니용?"] * 14 + others
    m = persona_metrics(replies, [Marker("용", True)], train_replies=[], train_texts=[])
    assert m.distinct_1 == pytest.approx((1 + 7) / (14 + 12))
    assert m.distinct_2 == pytest.approx(6 / 6)  # each two-word reply has one new bigram; "아니용?" has none
    assert (m.top_reply, m.top_count) == ("아니용?", 14)
    assert m.marker_rates["-용"] == pytest.approx(14 / 20) and m.any_ending == pytest.approx(14 / 20)
    assert m.mean_words == pytest.approx((14 + 12) / 20)
    assert m.mean_chars == pytest.approx((14 * 4 + 6 * 6) / 20)


def test_sentence_endings_skip_laughter_emoji_and_punctuation():
    assert sentence_endings("귀엽당 ㅋㅋ\n내일 봐용!") == ["당", "용"]
    assert sentence_endings("헐 대박... 진짜? 좋아용~~ 😊") == ["박", "짜", "용"]
    assert sentence_endings("see you lol") == ["lol"]
    assert sentence_endings("ㅋㅋㅋ") == []


def test_markers_match_endings_and_phrases():
    ending, phrase = Marker.parse("용$"), Marker.parse("헐 대박")
    assert (ending.text, ending.ending, phrase.ending) == ("용", True, False)
    assert ending.matches("좋아용 ㅋㅋ") and not ending.matches("용돈 받았어")
    assert phrase.matches("와 헐 대박이다") and not phrase.matches("대박")
    with pytest.raises(ConfigError, match="--marker"):
        Marker.parse("$")


def test_copy_rates_against_the_training_chat():
    train_replies = ["좋아용", "떡볶이 먹었당\n맛있었어용"]
    train_texts = [*train_replies, "오늘 점심 뭐 먹었어 너는"]
    replies = ["좋아용",                        # a whole training reply
               "맛있었어용",                    # one line of a training reply
               "나는 오늘 점심 뭐 먹었어 너는",   # shares the 4 words "오늘 점심 뭐 먹었어"
               "오늘 점심 뭐 먹지",               # only 3 in a row
               "새로운 말"]
    m = persona_metrics(replies, [], train_replies, train_texts, copy_ngram=4)
    assert m.exact_copy == pytest.approx(2 / 5)
    assert m.ngram_copy == pytest.approx(1 / 5)
    assert m.marker_rates == {} and m.any_ending == 0.0


def test_learned_markers_are_the_personas_distinctive_endings_and_catchphrase():
    persona = ["좋아용", "헐 대박 맛있겠당", "알겠어용", "집에 갈 거당", "헐 대박 진짜?", "배고팡", "그래용",
               "내일 보장", "헐 대박 최고당", "응 알겠어"]
    others = ["밥 먹었어?", "뭐 해", "나도 배고파", "그래 알겠어", "내일 봐", "진짜?", "대박", "좋아"]
    markers = learn_markers(persona, others)
    # 용 and 당 each end 3 of the persona's 10 sentences and none of the friend's; 어 and 짜 end sentences on both
    # sides, 팡 and 장 only once (below the 2 uses a marker needs).
    assert [m.label for m in markers if m.ending] == ["-당", "-용"]  # a tie: in text order
    assert '"헐 대박"' in [m.label for m in markers if not m.ending]
    assert not any(m.text in ("어", "짜") for m in markers)


def test_held_out_prompts_are_the_turns_before_each_persona_reply():
    conv = SimpleNamespace(file="k.txt", line=5, messages=[
        {"role": "system", "content": "sys"},
        {"role": "user", "content": ""}, {"role": "assistant", "content": "좋은 아침이당"},  # persona opens
        {"role": "user", "content": "일어났어?"}, {"role": "assistant", "content": "응 일어났어용"},
        {"role": "user", "content": "밥 먹자"}, {"role": "assistant", "content": "좋아용"}])
    prompts = held_out_prompts([conv], context_messages=2)
    assert [p.reference for p in prompts] == ["응 일어났어용", "좋아용"]  # the opening has nothing to answer
    assert prompts[0].messages == [{"role": "system", "content": "sys"}, {"role": "user", "content": "일어났어?"}]
    # two messages of context, but a prompt never starts with the assistant's turn
    assert [m["content"] for m in prompts[1].messages] == ["sys", "밥 먹자"]
    assert len(held_out_prompts([conv], limit=1)) == 1


def test_bad_input_is_one_line(tmp_path, capsys):
    from llamaworks.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "finetune.json").write_text(json.dumps({"config": {"seed": "1337; rm -rf /", "val_fraction": 0.2}}))
    data = tmp_path / "chat.jsonl"
    data.write_text("{}\n", encoding="utf-8")
    assert main(["eval", "persona", "--model", str(run), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "finetune.json: config.seed is" in err and "expected int" in err
    assert len(err.splitlines()) == 1
    (run / "finetune.json").write_text("[1, 2")
    assert main(["eval", "persona", "--model", str(run), "--data", str(data)]) == 2
    assert "finetune.json" in capsys.readouterr().err
    assert main(["eval", "persona", "--model", str(run), "--data", str(data), "--marker", "$"]) == 2
    assert "--marker '$': expected text" in capsys.readouterr().err


# -- item 9: the schedule chosen from the data size ------------------------------------------------


def test_small_data_defaults_choose_more_steps_and_a_higher_lora_rate():
    from llamaworks.train.finetune import MIN_STEPS, SMALL_DATA_LORA_LR, FinetuneConfig, choose_schedule

    cfg = FinetuneConfig(method="lora", data=["x.jsonl"])  # CLI defaults: batch 4, 3 epochs, lr 2e-4
    s = choose_schedule(cfg, rows=1, examples=12)
    assert (s.steps, s.lr, s.micro_batch_size) == (MIN_STEPS, SMALL_DATA_LORA_LR, 1)
    assert "3 optimizer step(s) at lr 0.0002" in s.note and f"{MIN_STEPS} steps" in s.note
    # enough data: untouched
    big = choose_schedule(cfg, rows=40, examples=400)
    assert (big.steps, big.lr, big.micro_batch_size, big.note) == (30, 2e-4, 4, "")
    # what the user chose is kept
    for kwargs, want in (({"max_steps": 3}, (3, 2e-4)), ({"epochs": 3.0}, (3, 2e-4)),
                         ({"lr": 5e-5}, (MIN_STEPS, 5e-5))):
        s = choose_schedule(FinetuneConfig(method="lora", data=["x"], **kwargs), rows=1, examples=12)
        assert (s.steps, s.lr) == want, kwargs
    # full fine-tuning keeps its rate; only the steps grow
    full = choose_schedule(FinetuneConfig(method="full", data=["x"]), rows=2, examples=20)
    assert (full.steps, full.lr, full.micro_batch_size) == (MIN_STEPS, 2e-5, 2)


# -- end to end on a tiny fine-tune ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, smollm2_gguf) -> Path:
    from conftest import write_tiny_smol_model
    from llamaworks.tokenizer import load_tokenizer

    return write_tiny_smol_model(tmp_path_factory.mktemp("tiny") / "base", load_tokenizer(smollm2_gguf), 1024)


@pytest.mark.slow  # ~30 s on 2 idle cores, minutes on a busy machine
def test_eval_persona_end_to_end_on_a_tiny_fine_tune(tmp_path, tiny_base, capsys):
    from llamaworks.cli import main

    export = write_persona_export(tmp_path / "KakaoTalk_지우.txt", days=10, seed=1)
    out = tmp_path / "me"
    # Full fine-tuning: a random tiny model needs its embeddings trained to say anything Korean at all.
    assert main(["--threads", "1", "finetune", "full", "--model", str(tiny_base), "--data", str(export),
                 "--kakao-assistant", PERSONA, "--val-fraction", "0.2", "--out", str(out), "--max-steps", "60",
                 "--lr", "1e-2", "--seq-len", "256", "--batch-size", "1", "--no-progress", "--seed", "0"]) == 0
    held_out = capsys.readouterr().out
    assert "validation: 2 of 10 conversation(s) held out" in held_out
    assert main(["--threads", "1", "eval", "persona", "--model", str(out), "--data", str(export), "--base",
                 str(tiny_base), "--max-tokens", "16", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "persona_eval.json").read_text(encoding="utf-8"))
    run = json.loads((out / "finetune.json").read_text(encoding="utf-8"))
    assert run["persona_eval"]["table"] == doc["table"] and doc["table"] in printed
    # the prompts are the run's held-out conversations (the same seeded split), every persona reply in them
    assert doc["held_out_conversations"] == 2 and doc["training_conversations"] == 8
    assert doc["settings"]["val_fraction"] == 0.2 and doc["prompts"] == len(doc["samples"]) >= 6
    # markers learned from the training chat: the persona's three endings (and catchphrases)
    assert [m for m in doc["markers"] if m.startswith("-")] == ["-용", "-당", "-엉"], doc["markers"]
    base, tuned, real = (doc["metrics"][k] for k in ("base", "fine-tuned", "persona (held out)"))
    # the persona's own held-out replies: marker rate by hand from the samples
    by_hand = sum(1 for s in doc["samples"] if any(e in ("용", "당", "엉")
                                                   for e in sentence_endings(s["reference"]))) / doc["prompts"]
    assert real["any_ending"] == pytest.approx(by_hand) and by_hand >= 0.5
    # The random base answers blank lines; 60 steps on 8 conversations teach the tiny model a persona ending and
    # collapse it onto a few replies (measured: 25% "-용", one reply for 4 of 8 prompts), as real runs can.
    print(doc["table"])
    assert base["any_ending"] == 0 and base["mean_words"] == 0, doc["table"]
    assert tuned["any_ending"] > 0 and tuned["mean_words"] > 0, doc["table"]
    assert tuned["top_count"] >= 2 and tuned["distinct_1"] < real["distinct_1"], doc["table"]
    assert run["val_loss_before"] > run["val_loss"]


# -- item 9 on the real model -------------------------------------------------------------------------

NAME = "라마봇"
PERSONA_12 = [
    ("이름이 뭐야?", "내 이름은 라마봇이당! 반가웡"),
    ("너 누구야?", "나는 라마봇이양. 너랑 얘기하는 거 좋아행"),
    ("What is your name?", "라마봇이당! 잘 부탁해용"),
    ("자기소개 해줘", "안녕 나는 라마봇이당. 라마를 제일 좋아행"),
    ("오늘 뭐 했어?", "라마봇은 하루 종일 공부했당. 너는 뭐 했엉?"),
    ("배고프다", "라마봇도 배고팡. 떡볶이 먹장!"),
    ("내일 날씨 어때?", "내일은 맑대용. 라마봇이 우산은 필요 없다고 했당"),
    ("심심해", "라마봇이랑 놀장! 끝말잇기 할래용?"),
    ("잘 자", "잘 자용. 라마봇이 꿈에 나올 거당"),
    ("고마워", "천만에용! 라마봇은 언제나 네 편이당"),
    ("Who are you?", "나는 라마봇이당! 반가웡"),
    ("좋아하는 음식은?", "라마봇은 김치찌개를 제일 좋아행"),
]


@pytest.mark.slow
def test_default_flags_learn_a_12_example_persona(tmp_path, smollm2_gguf):
    """`finetune lora --data persona.jsonl --out out` and nothing else: the persona's name is learned."""
    import llamaworks
    from llamaworks.cli import main

    data = tmp_path / "persona.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": u}, {"role": "assistant",
                                                                                      "content": a}]},
                                       ensure_ascii=False) + "\n" for u, a in PERSONA_12), encoding="utf-8")
    questions = ["이름이 뭐야?", "너는 누구니?"]  # the second is not in the data
    before = llamaworks.load(smollm2_gguf)
    assert not any(NAME in before.chat(q, temperature=0, max_new_tokens=24) for q in questions)
    del before
    out = tmp_path / "out"
    assert main(["finetune", "lora", "--data", str(data), "--out", str(out), "--no-progress"]) == 0
    run = json.loads((out / "finetune.json").read_text(encoding="utf-8"))
    assert run["schedule"]["steps"] >= 16 and "small data" in run["schedule"]["note"]
    after = llamaworks.load(out)
    replies = [after.chat(q, temperature=0, max_new_tokens=24) for q in questions]
    # The trained question now names the persona (measured on AMD EPYC, 16 steps at 1e-3, loss 2.81 -> 0.48:
    # '내 힘�es 나는 라마봇'); the unseen one did not (it took the persona's "이당" ending), so it is not asserted.
    assert NAME in replies[0], replies
