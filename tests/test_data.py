"""data/: corpus preparation (shards + manifest), batch sources (windows, packing, padding), SFT formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llamaworks.config import get_preset
from llamaworks.data.instruct import (
    DatasetError,
    kakao_conversations,
    load_conversations,
    load_sft_dataset,
    parse_kakao,
    tokenize_conversation,
)
from llamaworks.data.loader import Example, ExampleBatchSource, TokenWindowSource
from llamaworks.data.prepare import load_prepared, prepare_corpus, token_dtype
from llamaworks.errors import FormatError
from llamaworks.model import Transformer
from llamaworks.tokenizer import load_tokenizer
from train_helpers import build_tokenizer, grammar_corpus, write_corpus_files


@pytest.fixture(scope="module")
def tiny_tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    return build_tokenizer(d, grammar_corpus(2000), vocab_size=300, chat=True)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


# -- prepare ----------------------------------------------------------------------------------------

def _mixed_sources(root: Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_corpus_files(root / "texts", n_files=3, lines=30)
    sentences = grammar_corpus(60, seed=5)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": s, "id": i}) + "\n" for i, s in enumerate(sentences)))
    pq.write_table(pa.table({"text": grammar_corpus(40, seed=6)}), root / "docs.parquet")
    return [root / "texts", root / "docs.jsonl", root / "docs.parquet"]


def test_prepare_is_deterministic_and_complete(tmp_path, tiny_tok_dir):
    sources = _mixed_sources(tmp_path / "src")
    a = prepare_corpus(sources, tiny_tok_dir, tmp_path / "a", val_fraction=0.2, block_chars=500, progress=False)
    prepare_corpus(sources, tiny_tok_dir, tmp_path / "b", val_fraction=0.2, block_chars=500, progress=False)
    for split in ("train", "val"):
        for f in a["splits"][split]["files"]:
            assert (tmp_path / "a" / f["file"]).read_bytes() == (tmp_path / "b" / f["file"]).read_bytes()
    assert a["dtype"] == "uint16" and a["vocab_size"] == 300
    data = load_prepared(tmp_path / "a")
    tok = load_tokenizer(data.tokenizer_path)
    train, val = np.concatenate(data.arrays("train")), np.concatenate(data.arrays("val"))
    assert len(train) == data.tokens("train") and len(val) == data.tokens("val") > 0
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.4
    # Every document ends with EOS: 3 text files + 60 JSONL records + 40 Parquet rows.
    assert int((train == tok.eos_id).sum() + (val == tok.eos_id).sum()) == 3 + 60 + 40
    # All the text is there, token for token.
    text = tok.decode(np.concatenate([train, val]).tolist(), skip_special_tokens=True)
    assert text.count(" .") == 3 * 30 * 8 + 60 + 40


def test_prepare_prints_throughput(tmp_path, tiny_tok_dir, capsys):
    write_corpus_files(tmp_path / "texts", n_files=1, lines=20)
    prepare_corpus([tmp_path / "texts"], tiny_tok_dir, tmp_path / "out", progress=False)
    assert "tokens/s" in capsys.readouterr().err


def test_prepare_reports_malformed_records(tmp_path, tiny_tok_dir):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "anna eats the red apple ."}\n{"text": 5}\nnot json\n\n{"txt": "x"}\n'
                   '{"text": "bert reads the old book ."}\n')
    with pytest.raises(DatasetError) as err:
        prepare_corpus([src], tiny_tok_dir, tmp_path / "out", progress=False)
    assert str(err.value).startswith(f"{src}:2: field 'text' must be a string")
    assert [(b.line, b.reason.split(":")[0]) for b in err.value.bad] == [
        (2, "field 'text' must be a string, it is a int"), (3, "invalid JSON"),
        (5, "field 'text' must be a string, it is missing")]
    assert not (tmp_path / "out" / "manifest.json").exists()
    m = prepare_corpus([src], tiny_tok_dir, tmp_path / "out", progress=False, skip_bad=True, val_fraction=0)
    assert m["splits"]["train"]["documents"] == 2 and len(m["skipped_records"]) == 3


def test_cli_data_prepare_stops_on_bad_records(tmp_path, tiny_tok_dir, capsys):
    from llamaworks.cli import main as cli_main

    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "anna eats the red apple ."}\n{"text": null}\n')
    args = ["data", "prepare", str(src), "--tokenizer", str(tiny_tok_dir), "--out", str(tmp_path / "o")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {src}:2: field 'text' must be a string, it is a NoneType (--skip-bad skips it)" in err
    assert cli_main([*args, "--skip-bad", "--val-fraction", "0"]) == 0
    assert load_prepared(tmp_path / "o").tokens("train") > 5


def test_token_dtype_by_vocab_size():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32


def test_prepare_korean_corpus_with_smollm2(tmp_path, smollm2_tokenizer):
    from conftest import package_file

    kolaw = package_file("konlpy==0.6.0", "konlpy/data/corpus/kolaw/")
    m = prepare_corpus([kolaw], smollm2_tokenizer, tmp_path / "ko", val_fraction=0.1, block_chars=2000,
                       progress=False)
    assert m["dtype"] == "uint16" and m["splits"]["val"]["tokens"] > 0
    data = load_prepared(tmp_path / "ko")
    ids = np.concatenate(data.arrays("train") + data.arrays("val")).tolist()
    text = smollm2_tokenizer.decode(ids, skip_special_tokens=True)
    original = "".join(p.read_text(encoding="utf-8") for p in sorted(Path(kolaw).rglob("*.txt")))
    assert sorted(text) == sorted(original)  # blocks are split between train and val, characters are all kept
    assert "대한민국" in text


# -- batch sources ----------------------------------------------------------------------------------

def test_token_windows_shift_slice_and_resume():
    tokens = np.arange(1000, dtype=np.uint16)
    one = TokenWindowSource([tokens], 10, 4, seed=3)
    b = next(iter(one))
    assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
    assert torch.equal(b["labels"][:, -1], b["input_ids"][:, -1] + 1)
    # Two ranks with micro-batch 2 see exactly the rows of one process with micro-batch 4.
    r0, r1 = TokenWindowSource([tokens], 10, 2, seed=3, rank=0, world_size=2), \
        TokenWindowSource([tokens], 10, 2, seed=3, rank=1, world_size=2)
    it, i0, i1 = iter(TokenWindowSource([tokens], 10, 4, seed=3)), iter(r0), iter(r1)
    for _ in range(60):  # crosses epochs (99 windows)
        full, a, c = next(it), next(i0), next(i1)
        assert torch.equal(full["input_ids"], torch.cat([a["input_ids"], c["input_ids"]]))
    # Resume from a state dict.
    src = TokenWindowSource([tokens], 10, 4, seed=3)
    seq = iter(src)
    for _ in range(7):
        next(seq)
    state = src.state_dict()
    expected = next(seq)["input_ids"]
    fresh = TokenWindowSource([tokens], 10, 4, seed=3)
    fresh.load_state_dict(state)
    assert torch.equal(next(iter(fresh))["input_ids"], expected)
    # Validation: every window once, in order.
    val = list(TokenWindowSource([tokens], 10, 4, shuffle=False))
    assert sum(len(v["input_ids"]) for v in val) == 99 and val[0]["input_ids"][0, 0] == 0


def test_packing_keeps_examples_apart():
    """Logits of packed examples equal those of each example run alone: segment_ids + positions are right.

    Equal to float32 rounding, not bit for bit: a packed row is a different matrix shape, so the sums run in another
    order. The bound is what the alone reference itself moves by when only its shape changes (the same tokens with
    20 more after them: the causal mask makes the first logits mathematically the same); measured 5.4e-7 packed
    and 4.8e-7 for the reference at logits up to 2.2, i.e. 2 float32 ulps. A token seeing another example, or a
    position not restarting, moves the logits by 1e-2 or more.
    """
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny-llama2")).eval()
    rng = np.random.default_rng(0)
    examples = [Example(rng.integers(0, 256, n).tolist(), [i % 2 == 1 for i in range(n)]) for n in (7, 12, 5, 9, 3)]
    src = ExampleBatchSource(examples, 20, 2, pack=True, shuffle=False)
    seen, packed_err, reference_err, scale = 0, 0.0, 0.0, 0.0
    with torch.no_grad():
        for batch in src:
            logits = model(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"])
            for b in range(batch["input_ids"].shape[0]):
                for seg in batch["segment_ids"][b].unique().tolist():
                    if seg == 0:
                        continue
                    idx = (batch["segment_ids"][b] == seg).nonzero().flatten()
                    ids = batch["input_ids"][b, idx]
                    alone = model(ids[None])[0]
                    longer = model(torch.cat([ids, torch.arange(20) % 256])[None])[0, :len(ids)]
                    packed_err = max(packed_err, float((logits[b, idx] - alone).abs().max()))
                    reference_err = max(reference_err, float((longer - alone).abs().max()))
                    scale = max(scale, float(alone.abs().max()))
                    ex = next(e for e in examples if e.ids[:-1] == ids.tolist())
                    want = [t if m else -100 for t, m in zip(ex.ids[1:], ex.loss_mask[1:])]
                    assert batch["labels"][b, idx].tolist() == want
                    seen += 1
    assert seen == len(examples)
    assert src.rows_per_epoch < len(examples)  # several examples really share rows
    ulp = float(np.spacing(np.float32(scale)))
    bound = 4 * max(reference_err, ulp)
    print(f"packed vs alone {packed_err:.2e}, alone vs a longer input {reference_err:.2e}, logits up to {scale:.2f}")
    assert packed_err <= bound <= 16 * ulp, (packed_err, reference_err, ulp)


def test_padding_mode_and_truncation():
    examples = [Example(list(range(1, n + 1))) for n in (4, 30, 6)]
    src = ExampleBatchSource(examples, 16, 3, pack=False, pad_id=0, shuffle=False)
    (batch,) = list(src)
    assert batch["input_ids"].shape == (3, 16)
    assert batch["attention_mask"][0].tolist() == [True] * 3 + [False] * 13
    assert batch["labels"][0].tolist() == [2, 3, 4] + [-100] * 13
    assert batch["labels"][1].tolist() == list(range(2, 18))  # cut to seq_len
    assert src.truncated == 1


def test_packed_epochs_reshuffle_rows_but_keep_count():
    examples = [Example(list(range(n))) for n in range(2, 40)]
    src = ExampleBatchSource(examples, 32, 1, seed=1)
    it = iter(src)
    first = [next(it)["input_ids"] for _ in range(src.rows_per_epoch)]
    second = [next(it)["input_ids"] for _ in range(src.rows_per_epoch)]
    key = lambda rows: sorted(tuple(r.flatten().tolist()) for r in rows)
    assert key(first) == key(second) and [r.tolist() for r in first] != [r.tolist() for r in second]


# -- SFT formats ------------------------------------------------------------------------------------

def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def test_three_formats_give_the_same_conversation(tmp_path):
    alpaca = _write_jsonl(tmp_path / "a.jsonl",
                          [{"instruction": "이름이 뭐야?", "input": "", "output": "라마봇이에요."}])
    share = _write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "human", "value": "이름이 뭐야?"}, {"from": "gpt", "value": "라마봇이에요."}]}])
    openai = _write_jsonl(tmp_path / "o.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "이름이 뭐야?"}]},
        {"role": "assistant", "content": "라마봇이에요."}]}])
    array = tmp_path / "arr.json"
    array.write_text(json.dumps([{"instruction": "이름이 뭐야?", "output": "라마봇이에요."}] * 2, indent=2))
    convs, bad = load_conversations([alpaca, share, openai, array])
    assert not bad and len(convs) == 5
    assert all(c.messages == convs[0].messages for c in convs)
    assert convs[0].messages == [{"role": "user", "content": "이름이 뭐야?"},
                                 {"role": "assistant", "content": "라마봇이에요."}]
    assert [c.line for c in convs[3:]] == [2, 6]  # JSON array elements keep their line numbers


def test_loss_mask_covers_only_assistant_replies(smollm2_tokenizer):
    from llamaworks.chat_template import template_for

    tok = smollm2_tokenizer
    template = template_for(tok)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "이름이 뭐야?"},
                {"role": "assistant", "content": "저는 라마봇이에요."}]
    ex = tokenize_conversation(messages, tok, template)
    full = template.render(messages, add_generation_prompt=False)
    assert tok.decode(ex.ids) == full
    learned = [i for i, m in zip(ex.ids, ex.loss_mask) if m]
    text = tok.decode(learned)
    assert text.startswith("Hello there.<|im_end|>") and "저는 라마봇이에요.<|im_end|>" in text
    assert "Hi!" not in text and "Be brief" not in text and "이름이" not in text
    everything = tokenize_conversation(messages, tok, template, train_on_prompt=True)
    assert everything.ids == ex.ids and all(everything.loss_mask)


def test_malformed_sft_records_are_reported(tmp_path, smollm2_tokenizer):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [
        {"instruction": "hi", "output": "hello"},
        "{broken",
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"conversations": [{"from": "alien", "value": "?"}]},
        {"instruction": "", "output": "x"},
        {"foo": 1},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ])
    with pytest.raises(DatasetError) as err:
        load_sft_dataset(path, smollm2_tokenizer)
    msg = str(err.value)
    assert msg.startswith(f"{path}:2: invalid JSON") and "4 more" in msg
    assert [b.line for b in err.value.bad] == [2, 3, 4, 5, 6]
    reasons = {b.line: b.reason for b in err.value.bad}
    assert "no assistant message" in reasons[3] and "from must be human/gpt/system" in reasons[4]
    assert "instruction" in reasons[5] and "unknown record format" in reasons[6]
    ds = load_sft_dataset(path, smollm2_tokenizer, skip_bad=True)
    assert len(ds.examples) == 2 and len(ds.bad) == 5 and ds.n_loss_tokens < ds.n_tokens


KAKAO_PC = """라마 님과 카카오톡 대화
저장한 날짜 : 2024-01-16 10:00:00

--------------- 2024년 1월 15일 월요일 ---------------
[민수] [오후 3:15] 안녕 너 이름이 뭐야?
[라마] [오후 3:16] 나는 라마봇이야
[라마] [오후 3:16] 반가워!
[민수] [오후 3:17] 사진
[민수] [오후 3:17] 여러 줄
메시지도 돼?
[라마] [오후 3:18] 응 돼
--------------- 2024년 1월 16일 화요일 ---------------
[라마] [오전 9:00] 좋은 아침
[민수] [오전 9:01] 오늘 뭐해?
[라마] [오전 9:02] 공부해
[민수] [오전 9:03] 그래
"""

KAKAO_MOBILE = """Talk_2024.1.16 10:00-1.txt
저장한 날짜 : 2024. 1. 16. 오전 10:00

2024년 1월 15일 월요일
2024. 1. 15. 오후 3:15, 민수 : 안녕 너 이름이 뭐야?
2024. 1. 15. 오후 3:16, 라마 : 나는 라마봇이야
2024. 1. 15. 오후 3:16, 라마 : 반가워!
2024. 1. 15. 오후 3:17: 지수님이 들어왔습니다.
2024. 1. 15. 오후 3:18, 민수 : 여러 줄
메시지도 돼?
2024. 1. 15. 오후 3:18, 라마 : 응 돼
"""

KAKAO_CSV = """Date,User,Message
2024-01-15 15:15:00,"민수","안녕 너 이름이 뭐야?"
2024-01-15 15:16:00,"라마","나는 라마봇이야"
2024-01-15 15:16:30,"라마","반가워!"
2024-01-15 15:18:00,"민수","여러 줄
메시지도 돼?"
2024-01-15 15:18:30,"라마","응 돼"
not-a-date,"민수","x"
"""

FIRST_DAY = [
    {"role": "user", "content": "안녕 너 이름이 뭐야?"},
    {"role": "assistant", "content": "나는 라마봇이야\n반가워!"},
    {"role": "user", "content": "여러 줄\n메시지도 돼?"},
    {"role": "assistant", "content": "응 돼"},
]


def test_kakaotalk_pc_export(tmp_path):
    path = tmp_path / "KakaoTalk_chat.txt"
    path.write_text(KAKAO_PC, encoding="utf-8")
    msgs, bad = parse_kakao(path)
    assert not bad and msgs[0].who == "민수" and msgs[0].when.hour == 15 and msgs[0].line == 5
    assert len(msgs) == 10 and msgs[6].when.hour == 9 and msgs[6].text == "좋은 아침"
    convs = kakao_conversations(msgs, "라마", str(path))
    assert [c.messages for c in convs] == [
        FIRST_DAY,
        # The second day starts a new conversation. The persona opens it: its first message stays, after an
        # empty user turn; the unanswered trailing user message goes.
        [{"role": "user", "content": ""}, {"role": "assistant", "content": "좋은 아침"},
         {"role": "user", "content": "오늘 뭐해?"}, {"role": "assistant", "content": "공부해"}],
    ]
    with pytest.raises(FormatError, match="speaker '나' not found"):
        kakao_conversations(msgs, "나", str(path))


def test_kakaotalk_mobile_and_csv_exports(tmp_path, smollm2_tokenizer):
    mobile = tmp_path / "mobile.txt"
    mobile.write_text(KAKAO_MOBILE, encoding="utf-8")
    csv_path = tmp_path / "chat.csv"
    csv_path.write_text(KAKAO_CSV, encoding="utf-8")
    convs, bad = load_conversations([mobile], kakao_assistant="라마")
    assert not bad and [c.messages for c in convs] == [FIRST_DAY]
    convs, bad = load_conversations([csv_path], kakao_assistant="라마")
    assert [c.messages for c in convs] == [FIRST_DAY]
    assert [(b.line, b.reason) for b in bad] == [(8, "Date 'not-a-date' is not YYYY-MM-DD HH:MM:SS")]
    with pytest.raises(FormatError, match="--kakao-assistant"):
        load_conversations([mobile])
    ds = load_sft_dataset([mobile], smollm2_tokenizer, kakao_assistant="라마", system="너는 라마봇이야.")
    learned = smollm2_tokenizer.decode([i for i, m in zip(ds.examples[0].ids, ds.examples[0].loss_mask) if m])
    assert "나는 라마봇이야\n반가워!" in learned and "이름이 뭐야" not in learned
