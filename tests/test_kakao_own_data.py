"""Issue 17 items 1-6: a user's own KakaoTalk exports -> training data they can trust.

Each test reproduces a failure a real export caused (glued date lines, placeholders in targets, cp949 files,
silent truncation, a lost prepared folder, phone numbers in the weights, several exports under different names)
with small realistic fixtures written here, and checks what is read now."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_tiny_smol_model
from llamaworks.data.inspect import inspect_data
from llamaworks.data.instruct import (
    DataReport,
    DatasetError,
    fit_conversation,
    load_conversations,
    load_sft_dataset,
    read_json_records,
    tokenize_conversation,
)
from llamaworks.data.kakaotalk import kakao_conversations, placeholder_kind, read_kakao
from llamaworks.data.prepare import load_prepared, prepare_corpus
from llamaworks.data.privacy import Scrubber, parse_kinds
from llamaworks.errors import ConfigError, FormatError
from llamaworks.tokenizer import load_tokenizer

ANDROID_KO = """김민수 님과 카카오톡 대화
저장한 날짜 : 2024년 1월 16일 오후 10:00

2024년 1월 15일 오전 8:15
2024년 1월 15일 오전 8:15, 김민수 : 일어났어?
2024년 1월 15일 오전 8:16, 나 : 응 일어났어용
2024년 1월 15일 오전 8:17, 김민수 : 사진
2024년 1월 15일 오전 8:17, 김민수 : 사진 2장
2024년 1월 15일 오전 8:18, 김민수 : 이거 봐봐
2024년 1월 15일 오전 8:19, 나 : 파일: 과제_초안.docx
2024년 1월 15일 오전 8:19, 나 : 귀엽당
내일 봐용
2024년 1월 16일 오전 9:00
2024년 1월 16일 오전 9:00, 나 : 좋은 아침이당
2024년 1월 16일 오전 9:01, 김민수 : 내 번호 바뀌었어 010-1234-5678
2024년 1월 16일 오전 9:02, 나 : 알겠엉 minsu.kim@example.com 으로 보낼게 계좌는 110-123-456789
2024년 1월 16일 오전 9:03, 김민수 : 이모티콘
"""

ANDROID_EN = """Talk with Minsu Kim
Date Saved : January 16, 2024, 10:00 PM

January 15, 2024, 8:12 AM
January 15, 2024, 8:12 AM, Minsu Kim : you up?
January 15, 2024, 8:13 AM, You : yep
January 15, 2024, 8:13 AM: Jisu joined this chatroom.
January 15, 2024, 8:14 AM, Minsu Kim : Photo
January 15, 2024, 8:15 AM, Minsu Kim : lunch?
multi-line too
January 15, 2024, 8:16 AM, You : sure
"""

# The same first day as ANDROID_KO, exported on a PC where the user appears under their own name.
PC_KO = """김민수 님과 카카오톡 대화
저장한 날짜 : 2024-01-17 09:00:00

--------------- 2024년 1월 15일 월요일 ---------------
[김민수] [오전 8:15] 일어났어?
[홍길동] [오전 8:16] 응 일어났어용
[김민수] [오전 8:18] 이거 봐봐
[홍길동] [오전 8:19] 귀엽당
내일 봐용
--------------- 2024년 1월 17일 수요일 ---------------
[김민수] [오전 8:30] 오늘 점심 뭐 먹어?
[홍길동] [오전 8:31] 떡볶이 먹장
"""

DAY1 = [{"role": "user", "content": "일어났어?"}, {"role": "assistant", "content": "응 일어났어용"},
        {"role": "user", "content": "이거 봐봐"}, {"role": "assistant", "content": "귀엽당\n내일 봐용"}]


@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


def write(path: Path, text: str, encoding: str = "utf-8", newline: str = "\n") -> Path:
    path.write_bytes(text.replace("\n", newline).encode(encoding))
    return path


# -- item 2: Android exports, placeholders, persona openings, unknown speakers ------------------------------

def test_android_korean_bare_date_lines_and_placeholders_stay_out_of_training_text(tmp_path):
    path = write(tmp_path / "KakaoTalk_Android.txt", ANDROID_KO)
    export = read_kakao(path)
    assert export.format == "mobile" and len(export.messages) == 11
    # The bare date line used to be glued onto "귀엽당\n내일 봐용".
    assert export.messages[6].text == "귀엽당\n내일 봐용" and export.messages[7].when.day == 16
    report = DataReport()
    convs, bad = load_conversations([path], kakao_assistant="나", report=report)
    assert not bad
    assert convs[0].messages == DAY1
    # The persona opens day 2: its first message is kept (behind an empty user turn), placeholders are gone.
    assert convs[1].messages == [
        {"role": "user", "content": ""}, {"role": "assistant", "content": "좋은 아침이당"},
        {"role": "user", "content": "내 번호 바뀌었어 [PHONE]"},
        {"role": "assistant", "content": "알겠엉 [EMAIL] 으로 보낼게 계좌는 [ACCOUNT]"}]
    text = json.dumps([c.messages for c in convs], ensure_ascii=False)
    for leaked in ("사진", "과제_초안", "2024년", "오전", "이모티콘"):
        assert leaked not in text
    assert report.kakao.dropped == {"placeholder: photo": 2, "placeholder: file": 1, "placeholder: emoticon": 1}
    assert report.kakao.persona_openings == 1


def test_android_english_export_parses_and_unknown_speaker_lists_who_is_there(tmp_path):
    path = write(tmp_path / "KakaoTalk_en.txt", ANDROID_EN)
    export = read_kakao(path)
    assert export.format == "android-en" and export.events == 1
    assert [(m.who, m.text, m.when.hour, m.when.minute) for m in export.messages] == [
        ("Minsu Kim", "you up?", 8, 12), ("You", "yep", 8, 13), ("Minsu Kim", "Photo", 8, 14),
        ("Minsu Kim", "lunch?\nmulti-line too", 8, 15), ("You", "sure", 8, 16)]
    convs = kakao_conversations(export.messages, "You", str(path))
    assert convs[0].messages == [{"role": "user", "content": "you up?"}, {"role": "assistant", "content": "yep"},
                                 {"role": "user", "content": "lunch?\nmulti-line too"},
                                 {"role": "assistant", "content": "sure"}]
    with pytest.raises(FormatError, match=r"speaker '나' not found.*Minsu Kim \(3\), You \(2\)"):
        load_conversations([path], kakao_assistant="나")
    empty = write(tmp_path / "notes.csv", "Date,User,Message\n")
    with pytest.raises(FormatError, match="no KakaoTalk messages were recognised"):
        load_conversations([empty], kakao_assistant="나")


def test_placeholder_kinds():
    texts = ("사진", "사진 12장", "동영상", "(이모티콘)", "파일: 보고서.pdf", "음성메시지", "삭제된 메시지입니다.",
             "보이스톡 해요", "2 photos", "File: a.docx", "사진 예쁘다", "파일 보냈어", "보이스톡 하자")
    kinds = {t: placeholder_kind(t) for t in texts}
    assert kinds == {"사진": "photo", "사진 12장": "photo", "동영상": "video", "(이모티콘)": "emoticon",
                     "파일: 보고서.pdf": "file", "음성메시지": "voice message",
                     "삭제된 메시지입니다.": "deleted message",
                     "보이스톡 해요": "call", "2 photos": "photo", "File: a.docx": "file",
                     "사진 예쁘다": None, "파일 보냈어": None, "보이스톡 하자": None}


# -- item 3: encodings ---------------------------------------------------------------------------------------

def test_cp949_crlf_bom_exports_are_read_and_decode_errors_name_file_and_line(tmp_path):
    cp949 = write(tmp_path / "KakaoTalk_old_windows.txt", PC_KO, encoding="cp949", newline="\r\n")
    with pytest.raises(UnicodeDecodeError):
        cp949.read_bytes().decode("utf-8")
    export = read_kakao(cp949)
    assert export.encoding == "cp949" and export.format == "pc" and export.messages[1].who == "홍길동"
    report = DataReport()
    convs, _ = load_conversations([cp949], kakao_assistant="홍길동", report=report)
    assert convs[0].messages == DAY1
    assert f"not UTF-8, read as: {cp949} (cp949)" in report.summary()
    bom = tmp_path / "KakaoTalk_bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + PC_KO.replace("\n", "\r\n").encode())
    assert read_kakao(bom).encoding == "utf-8-sig"
    assert load_conversations([bom], kakao_assistant="홍길동")[0][0].messages == DAY1
    # Neither UTF-8 nor cp949: file and line are named.
    broken = tmp_path / "records.jsonl"
    broken.write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "\xff\xfe c"}\n')
    with pytest.raises(FormatError, match=r"records\.jsonl:3: not UTF-8"):
        list(read_json_records(broken))
    garbage = tmp_path / "chat.txt"
    garbage.write_bytes("첫 줄\n둘째 줄\n".encode() + b"\x80\xff\xff\n")
    with pytest.raises(FormatError, match=r"chat\.txt:3: not UTF-8 or cp949"):
        load_conversations([garbage], kakao_assistant="나")


def test_prepare_never_tokenizes_the_bom_and_reads_cp949(tmp_path, smol_tok):
    text = "라마는 남아메리카에 산다.\n알파카와 사촌이다.\n"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (src / "b.txt").write_bytes(text.encode("cp949"))
    m = prepare_corpus([src], smol_tok, tmp_path / "out", val_fraction=0, progress=False, add_eos=False)
    ids = load_prepared(tmp_path / "out").arrays("train")[0].tolist()
    one = smol_tok.encode(text, add_bos=False, add_eos=False)
    bos = [smol_tok.bos_id] if m["add_bos"] else []
    assert ids == (bos + one) * 2
    assert "\ufeff" not in smol_tok.decode(ids)


# -- item 4: data prepare writes atomically and recognises chat exports -------------------------------------

def test_failed_prepare_keeps_the_previous_output_and_leaves_no_empty_folder(tmp_path, smol_tok):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"문서 {i}번 내용입니다."}, ensure_ascii=False) + "\n"
                            for i in range(20)), encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n', encoding="utf-8")
    out = tmp_path / "prepared"
    prepare_corpus([good], smol_tok, out, val_fraction=0.1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2"):
        prepare_corpus([bad], smol_tok, out, val_fraction=0.1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert load_prepared(out).tokens("train") > 0
    with pytest.raises(DatasetError):
        prepare_corpus([bad], smol_tok, tmp_path / "new" / "prepared", progress=False)
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "prepared"]


def test_prepare_on_a_chat_export_says_what_to_run_instead(tmp_path, smol_tok):
    chat = write(tmp_path / "KakaoTalk.txt", PC_KO, newline="\r\n")
    with pytest.raises(FormatError, match=r"KakaoTalk chat export.*finetune lora --data .*--kakao-assistant"):
        prepare_corpus([chat], smol_tok, tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()
    # And a prepared folder given to finetune as chat data is named for what it is.
    good = tmp_path / "corpus.txt"
    good.write_text("그냥 평범한 글입니다.\n" * 5, encoding="utf-8")
    prepare_corpus([good], smol_tok, tmp_path / "p", val_fraction=0, progress=False)
    with pytest.raises(FormatError, match="`data prepare` output"):
        load_conversations([tmp_path / "p"])


# -- item 1: windows of whole turns, truncation counted --------------------------------------------------

def long_day(n: int) -> str:
    lines = ["--------------- 2024년 1월 15일 월요일 ---------------"]
    for i in range(n):
        lines.append(f"[민수] [오후 3:{i:02d}] 오늘 {i}번째 질문인데 점심에 뭐 먹었어? 나는 김치찌개 먹었어")
        lines.append(f"[라마] [오후 3:{i:02d}] 나는 {i}번째로 떡볶이 먹었당 맛있었용")
    return "\n".join(lines) + "\n"


def test_long_conversations_become_windows_of_whole_turns_and_truncation_is_counted(tmp_path, smol_tok):
    path = write(tmp_path / "KakaoTalk_long.txt", long_day(12))
    whole = load_sft_dataset([path], smol_tok, kakao_assistant="라마")
    assert len(whole.examples) == 1 and whole.report.split_conversations == 0
    seq_len = 160
    assert len(whole.examples[0]) > 3 * (seq_len + 1)  # the old code cut this at --seq-len and said nothing
    ds = load_sft_dataset([path], smol_tok, kakao_assistant="라마", max_seq_len=seq_len)
    r = ds.report
    assert r.split_conversations == 1 and r.windows == len(ds.examples) >= 4
    assert r.truncated == r.truncated_tokens == r.dropped_examples == 0 and ds.truncated == 0
    assert all(len(e) <= seq_len + 1 for e in ds.examples)
    learned = [smol_tok.decode([t for t, m in zip(e.ids, e.loss_mask) if m]) for e in ds.examples]
    for i in range(12):  # every reply is learned exactly once, whole
        assert sum(f"나는 {i}번째로 떡볶이 먹었당 맛있었용" in text for text in learned) == 1
    assert f"split into {r.windows} windows of whole turns" in r.summary()

    # One exchange longer than a row is cut (counted); a reply that starts after the row ends is dropped.
    long_reply = "[민수] [오후 4:00] 질문\n[라마] [오후 4:01] " + "아주 긴 대답이야 " * 80 + "\n"
    long_prompt = "[민수] [오후 5:00] " + "아주 긴 질문이야 " * 80 + "\n[라마] [오후 5:01] 응\n"
    path2 = write(tmp_path / "KakaoTalk_cut.txt", "--------------- 2024년 1월 16일 화요일 ---------------\n"
                  + long_reply + "--------------- 2024년 1월 17일 수요일 ---------------\n" + long_prompt)
    ds2 = load_sft_dataset([path2], smol_tok, kakao_assistant="라마", max_seq_len=seq_len)
    r2 = ds2.report
    assert (r2.truncated, r2.dropped_examples, len(ds2.examples)) == (1, 1, 1)
    assert r2.truncated_tokens == len(ds2.examples[0]) - (seq_len + 1) > 0 and r2.dropped_tokens > seq_len
    assert "1 example(s) still longer" in r2.summary() and "1 example(s) (" in r2.summary()


def test_fit_conversation_keeps_the_system_prompt_in_every_window(smol_tok):
    from llamaworks.chat_template import template_for

    template = template_for(smol_tok, "chatml")
    msgs = [{"role": "system", "content": "너는 라마야."}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"질문 {i} " * 3}, {"role": "assistant", "content": f"대답 {i} " * 3}]

    def tok(m):
        return tokenize_conversation(m, smol_tok, template)

    windows = fit_conversation(msgs, tok, 120)
    assert len(windows) >= 3 and all(len(w) <= 120 for w in windows)
    for w in windows:
        assert smol_tok.decode(w.ids).startswith("<|im_start|>system\n너는 라마야.")


# -- item 5: privacy scrubbing and inspect -------------------------------------------------------------------

def test_scrubber_replaces_personal_data_and_keeps_dates_and_times():
    s = Scrubber(kinds=parse_kinds("all"), names=["김민수"])
    text = ("연락처 010-1234-5678, 01098765432, +82 10-2222-3333, 사무실 02-123-4567 / 메일 a.b@c.co.kr / "
            "국민 123456-78-901234, 카드 1234-5678-9012-3456, 1234 5678 9012 3456, 주민 900101-1234567 / "
            "2024-01-15 15:30 / "
            "민수야 김민수 안녕 / 3,000원")
    assert s(text) == ("연락처 [PHONE], [PHONE], [PHONE], 사무실 [PHONE] / 메일 [EMAIL] / "
                       "국민 [ACCOUNT], 카드 [ACCOUNT], [ACCOUNT], 주민 [ID] / 2024-01-15 15:30 / "
                       "[NAME1]야 [NAME1] 안녕 / 3,000원")
    assert s.counts == {"phone": 4, "email": 1, "account": 3, "id": 1, "name": 2}
    assert parse_kinds("none") == () and parse_kinds("phones,emails") == ("phone", "email")
    with pytest.raises(ConfigError, match="unknown kind 'fax'"):
        parse_kinds("fax")


def test_chat_exports_are_scrubbed_by_default_and_it_is_configurable(tmp_path):
    path = write(tmp_path / "KakaoTalk_Android.txt", ANDROID_KO)
    jsonl = tmp_path / "sft.jsonl"
    jsonl.write_text(json.dumps({"messages": [{"role": "user", "content": "번호 010-1111-2222"},
                                              {"role": "assistant", "content": "ok"}]}, ensure_ascii=False) + "\n")
    report = DataReport()
    convs, _ = load_conversations([path, jsonl], kakao_assistant="나", report=report)
    assert report.scrubbed == {"phone": 1, "email": 1, "account": 1}
    assert convs[-1].messages[0]["content"] == "번호 010-1111-2222"  # non-chat data: as written by default
    assert "privacy: scrubbed 1 phone number, 1 e-mail address, 0 ID numbers, 1 account/card number" \
        in report.summary()
    convs, _ = load_conversations([path], kakao_assistant="나", scrub="none")
    assert "010-1234-5678" in convs[1].messages[2]["content"]
    convs, _ = load_conversations([path, jsonl], kakao_assistant="나", scrub="phone")
    assert "minsu.kim@example.com" in convs[1].messages[3]["content"]
    assert convs[-1].messages[0]["content"] == "번호 [PHONE]"
    # Other speakers' names: "all", or --scrub-name for anyone else.
    group = write(tmp_path / "group.txt", "--------------- 2024년 1월 15일 월요일 ---------------\n"
                  "[김민수] [오후 3:00] 지수야 뭐해\n[이지수] [오후 3:01] 민수 왔네\n"
                  "[나] [오후 3:02] 지수랑 민수 안녕 박철수도\n")
    convs, _ = load_conversations([group], kakao_assistant="나", scrub="all", scrub_names=["박철수"])
    assert convs[0].messages == [{"role": "user", "content": "[NAME2]: [NAME3]야 뭐해\n[NAME3]: [NAME2] 왔네"},
                                 {"role": "assistant", "content": "[NAME3]랑 [NAME2] 안녕 [NAME1]도"}]


def test_inspect_shows_speakers_drops_and_conversations_before_training(tmp_path):
    path = write(tmp_path / "KakaoTalk_Android.txt", ANDROID_KO)
    no_persona = inspect_data([path])
    assert "김민수: 6 message(s)" in no_persona and "나: 5 message(s)" in no_persona
    assert "--kakao-assistant" in no_persona
    text = inspect_data([path], kakao_assistant="나")
    assert "kakaotalk mobile, utf-8, 11 message(s) -> 2 conversation(s)" in text
    assert "나: 5 message(s)  <- persona (assistant)" in text
    assert "2 placeholder: photo" in text
    assert "KakaoTalk_Android.txt:10: placeholder: file: '파일: 과제_초안.docx'" in text
    assert "assistant: 귀엽당 / 내일 봐용" in text and "user: 내 번호 바뀌었어 [PHONE]" in text


# -- item 6: aliases, merged exports, validation split --------------------------------------------------------

def test_persona_aliases_merge_exports_and_overlaps_are_kept_once(tmp_path):
    android = write(tmp_path / "phone.txt", ANDROID_KO)
    pc = write(tmp_path / "pc.txt", PC_KO, encoding="cp949", newline="\r\n")
    english = write(tmp_path / "en.txt", ANDROID_EN)
    report = DataReport()
    convs, _ = load_conversations([android, pc, english], kakao_assistant=["나", "홍길동,you"], report=report)
    # Day 1 is in both the phone and the PC export: kept once. The PC export adds day 3, English adds one.
    assert [c.messages[1]["content"] for c in convs] == ["응 일어났어용", "좋은 아침이당", "떡볶이 먹장", "yep"]
    assert report.duplicates == 1
    assert [f.persona for f in report.files] == [["나"], ["홍길동"], ["You"]]
    with pytest.raises(FormatError, match=r"none of the speakers '나', '회원님' is in the chat|none of the speakers"):
        load_conversations([pc], kakao_assistant="나,회원님")


def test_val_fraction_holds_out_whole_conversations(tmp_path, smol_tok):
    days = "".join(f"--------------- 2024년 1월 {d}일 월요일 ---------------\n[민수] [오후 3:00] {d}일 안녕\n"
                   f"[라마] [오후 3:01] {d}일 반가웡\n[민수] [오후 3:02] 뭐해\n[라마] [오후 3:03] 공부해용\n"
                   for d in range(1, 11))
    path = write(tmp_path / "KakaoTalk.txt", days)
    ds = load_sft_dataset([path], smol_tok, kakao_assistant="라마", max_seq_len=64)
    assert ds.report.split_conversations == 10  # each day is two windows at this length
    train, val = ds.split(0.2, seed=0)
    assert (train.conversations, val.conversations) == (8, 2) and len(val.examples) == 4
    assert not set(train.groups) & set(val.groups)
    assert len(train.examples) + len(val.examples) == len(ds.examples)
    with pytest.raises(FormatError, match="too few"):
        load_sft_dataset([write(tmp_path / "one.txt", days.split("--------------- 2024년 1월 2일")[0])], smol_tok,
                         kakao_assistant="라마").split(0.5)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, smol_tok) -> Path:
    return write_tiny_smol_model(tmp_path_factory.mktemp("tiny") / "base", smol_tok, 256)


def test_finetune_cli_val_fraction_reports_val_loss_and_the_data_report(tmp_path, tiny_base, capsys):
    from llamaworks.cli import main

    days = "".join(f"{2024}년 1월 {d}일 오전 9:00\n2024년 1월 {d}일 오전 9:00, 김민수 : {d}일 뭐해?\n"
                   f"2024년 1월 {d}일 오전 9:01, 나 : 공부하는 중이용 010-1234-{d:04d}\n"
                   f"2024년 1월 {d}일 오전 9:02, 김민수 : 사진\n"
                   for d in range(1, 11))
    data = write(tmp_path / "KakaoTalk_Android.txt", days)
    out = tmp_path / "ft"
    args = ["finetune", "lora", "--model", str(tiny_base), "--data", str(data), "--kakao-assistant", "회원님,나",
            "--out", str(out), "--seq-len", "96", "--batch-size", "2", "--max-steps", "2", "--lr", "1e-2",
            "--lora-rank", "2", "--no-progress", "--val-fraction", "0.2", "--kakao-gap-minutes", "30"]
    assert main([*args, "--preview"]) == 0
    shown = capsys.readouterr().out
    assert "preview only" in shown and "validation: 2 conversation(s) held out" in shown
    assert not (out / "config.json").exists()
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["val_loss"] is not None and np.isfinite(summary["val_loss"])
    assert f"validation loss {summary['val_loss']:.4f}" in printed
    assert summary["data"]["val_examples"] == 2 and summary["data"]["scrubbed"] == {"phone": 10}
    assert summary["data"]["dropped_messages"] == {"placeholder: photo": 10}
    assert summary["config"]["kakao_gap_minutes"] == 30.0
