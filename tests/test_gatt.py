"""Ghost Attention data (`data gatt`) and the per-message loss weight `finetune` honours."""

from __future__ import annotations

import json

import pytest

from llamaworks.data.gatt import Instruction, Rule, accept, read_instructions, sample_gatt, user_turns
from llamaworks.data.instruct import load_sft_dataset, tokenize_conversation
from llamaworks.data.records import DatasetError
from llamaworks.errors import ConfigError

LLAMA = "End every reply with 🦙."


@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf):
    from llamaworks.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf)


def _learned_text(tok, ex) -> str:
    return tok.decode([i for i, m in zip(ex.ids, ex.loss_mask) if m])


def test_weight_zero_replies_are_context_only(smol_tok, tmp_path):
    from llamaworks.chat_template import template_for

    template = template_for(smol_tok)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello.", "weight": 0},
                {"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Llamabot."}]
    ex = tokenize_conversation(messages, smol_tok, template)
    assert smol_tok.decode(ex.ids) == template.render(messages, add_generation_prompt=False)
    assert _learned_text(smol_tok, ex) == "Llamabot.<|im_end|>\n"
    # Read from a file: OpenAI's "weight" on messages, ShareGPT's on turns; bad weights named with file:line.
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"messages": messages},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo.", "weight": 0},
                           {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Ciao."}]},
    ]) + "\n", encoding="utf-8")
    ds = load_sft_dataset(path, smol_tok)
    assert [_learned_text(smol_tok, e) for e in ds.examples] == ["Llamabot.<|im_end|>\n", "Ciao.<|im_end|>\n"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "q", "weight": 0}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
    ]) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError) as err:
        load_sft_dataset(bad, smol_tok)
    assert [str(b) for b in err.value.bad] == [
        f"{bad}:1: messages[0].weight is only meaningful on an assistant message",
        f"{bad}:2: messages[1].weight must be 0 or 1, got 0.5",
        f"{bad}:3: every assistant message has weight 0: nothing to learn from"]


def test_long_conversation_windows_without_a_learned_reply_are_dropped(smol_tok, tmp_path):
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"Question number {i} " * 8},
                  {"role": "assistant", "content": f"Answer number {i} " * 8, **({"weight": 0} if i < 5 else {})}]
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"messages": turns}) + "\n", encoding="utf-8")
    ds = load_sft_dataset(path, smol_tok, max_seq_len=120)
    # Split into windows of whole exchanges; only the window holding the learned reply is kept.
    whole = tokenize_conversation(turns, smol_tok, ds_template(smol_tok))
    assert len(whole) > 121 and len(ds.examples) == 1 and len(ds.examples[0]) <= 121
    assert _learned_text(smol_tok, ds.examples[0]) == "Answer number 5 " * 8 + "<|im_end|>\n"


def ds_template(tok):
    from llamaworks.chat_template import template_for

    return template_for(tok)


def test_rules_and_what_a_sampled_reply_must_be():
    end = Rule.parse("ends-with:🦙")
    assert end("Paris is the capital. 🦙\n") and not end("🦙 Paris.")
    assert Rule.parse("starts-with:Ahoy")("  Ahoy! matey") and Rule.parse("regex:^[A-Z ]+$")("LOUD")
    for spec in ("ends-with", "sparkles:x", "contains:", "regex:("):
        with pytest.raises(ConfigError, match="--check"):
            Rule.parse(spec)
    assert accept(" Paris. 🦙 ", "stop", end) == "Paris. 🦙"
    assert accept("Paris. 🦙", "length", end) is None  # cut at max_new_tokens
    assert accept("🦙🦙🦙🦙", "stop", end) is None  # nothing but the marker
    assert accept("Paris.", "stop", end) is None
    assert accept("Paris.", "stop", end, repair=True) == "Paris. 🦙"
    assert accept("Paris.", "stop", None) == "Paris."


def test_instruction_files(tmp_path):
    txt = tmp_path / "i.txt"
    txt.write_text("# comment\nEnd every reply with 🦙.\n\nAct as a pirate.\n", encoding="utf-8")
    rule = Rule.parse("contains:🦙")
    assert read_instructions(txt, rule) == [Instruction(LLAMA, rule), Instruction("Act as a pirate.", rule)]
    js = tmp_path / "i.jsonl"
    js.write_text(json.dumps({"instruction": "Start with Ahoy.", "check": "starts-with:Ahoy"}) + "\n"
                  + json.dumps({"instruction": "x", "check": "nope"}) + "\n" + "{oops\n"
                  + json.dumps({"check": "contains:x"}) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"i.jsonl:2: check 'nope': expected KIND:VALUE") as err:
        read_instructions(js)
    # every malformed line is named, and no --skip-bad is suggested: `data gatt` has none for instruction files
    assert [b.line for b in err.value.bad] == [2, 3, 4] and "skip" not in str(err.value)


def test_user_turns_of_a_user_only_file_are_separate_turns():
    assert user_turns([{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                       {"role": "user", "content": "b"}, {"role": "assistant", "content": "old"},
                       {"role": "user", "content": "c"}]) == ("S", ["a", "b", "c"])


def test_gatt_samples_with_the_instruction_everywhere_and_trains_it_once(smollm2_gguf, smol_tok):
    """The default model samples (greedy); every prompt it saw had the instruction on each user turn; the records
    keep it on the first only and learn only the last reply, which `finetune`'s reader confirms."""
    from llamaworks import api
    from llamaworks.engine.backend import EngineOptions

    llm = api.load(smollm2_gguf, options=EngineOptions(max_rows=2, max_context=1024, threads=1))
    seen = []
    encode = llm.encode_chat

    def spy(messages):
        seen.append([dict(m) for m in messages])
        return encode(messages)

    llm.encode_chat = spy
    chats = [[{"role": "user", "content": "Name a fruit."}, {"role": "user", "content": "And a vegetable?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
              {"role": "user", "content": "What is 2+2?"}]]
    records, stats = sample_gatt(llm, chats, [Instruction(LLAMA)], every_turn=True, temperature=0,
                                 max_new_tokens=12, progress=False)
    assert stats.replies == 4 and stats.records == 4 and stats.tries == 4
    assert seen and all(m["content"].startswith(LLAMA + "\n\n") for p in seen for m in p if m["role"] == "user")
    final = [r for r in records if len(r["messages"]) >= 4]
    assert len(final) == 2
    for r in final:
        users = [m for m in r["messages"] if m["role"] == "user"]
        assert users[0]["content"].startswith(LLAMA) and not any(LLAMA in m["content"] for m in users[1:])
        replies = [m for m in r["messages"] if m["role"] == "assistant"]
        assert [m.get("weight", 1) for m in replies] == [0, 1]
    # The turn-2 reply was sampled from the history with the instruction on both user turns.
    last_prompt = next(p for p in seen if len(p) >= 3 and p[-1]["content"].endswith("And a vegetable?"))
    assert [m["content"] for m in last_prompt if m["role"] == "user"] == [f"{LLAMA}\n\nName a fruit.",
                                                                         f"{LLAMA}\n\nAnd a vegetable?"]
    assert last_prompt[1]["content"] == final[0]["messages"][1]["content"]
    from llamaworks.chat_template import template_for

    ex = tokenize_conversation(final[0]["messages"], smol_tok, template_for(smol_tok))
    assert _learned_text(smol_tok, ex) == final[0]["messages"][-1]["content"] + "<|im_end|>\n"


@pytest.mark.slow  # 9.3 min at load average ~8 on 2 vCPUs: samples GAtt data, fine-tunes, plays held-out chats twice
def test_gatt_fine_tuning_makes_the_instruction_hold_at_later_turns(smollm2_gguf, tmp_path):
    """The cheap version of benchmarks/gatt_adherence.py: the base model never ends its replies as the first turn
    asked; after a short full fine-tune on GAtt data it does at turns 2-3 of held-out chats about other topics."""
    from llamaworks import api
    from llamaworks.data.gatt import measure_adherence
    from llamaworks.engine.backend import EngineOptions
    from llamaworks.train.finetune import FinetuneConfig, finetune

    instruction, rule = "Answer in one sentence, then write 🦙.", Rule.parse("ends-with:🦙")
    train_topics = ["cats", "coffee", "owls", "trains", "bread", "snow", "tea", "bees"]
    chats = [[{"role": "user", "content": f"Tell me a fun fact about {t}."},
              {"role": "user", "content": f"Why do people like {train_topics[i - 1]}?"}]
             for i, t in enumerate(train_topics)]
    heldout = [[f"Tell me a fun fact about {t}.", "Describe it in one sentence.", f"Why do people like {t}?"]
               for t in ("dolphins", "pianos", "cheese", "castles")]
    base = api.load(smollm2_gguf, options=EngineOptions(max_rows=4, max_context=1024))
    records, stats = sample_gatt(base, chats, [Instruction(instruction, rule)], tries=2, repair=True,
                                 every_turn=True, temperature=0.7, max_new_tokens=48, progress=False)
    assert stats.records >= 12
    before = measure_adherence(base, heldout, instruction, rule, temperature=0, max_new_tokens=48)
    data = tmp_path / "gatt.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    finetune(FinetuneConfig(method="full", model=str(smollm2_gguf), data=[str(data)], out=str(tmp_path / "out"),
                            max_steps=12, lr=2e-4, seq_len=256, micro_batch_size=2, progress=False,
                            tensorboard=False, plot=False, seed=0))
    tuned = api.load(tmp_path / "out", backend="torch", device="cpu", options=EngineOptions(max_rows=4))
    after = measure_adherence(tuned, heldout, instruction, rule, temperature=0, max_new_tokens=48)
    assert before.rate(2) <= 0.25, before.replies
    assert after.rate(2) >= 0.8, after.replies
