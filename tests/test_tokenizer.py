"""Tokenizer parity with transformers / sentencepiece / tiktoken / llama.cpp's own vectors, round trips, streaming."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import package_file
from llamaworks.errors import FormatError
from llamaworks.tokenizer import StreamDecoder, Tokenizer, load_tokenizer, read_gguf_tokenizer_metadata
from llamaworks.tokenizer_engines import LLAMA3_PATTERN, llama3_special_tokens

LLAMA_CPP = "llama-cpp-python==0.3.16"  # its sdist vendors llama.cpp's vocab test files

CORPUS = [
    "Hello world",
    " Hello world",
    "Hello, world! How's it going? I'm fine; you'll see.",
    "한국어 문장입니다. 안녕하세요, 반갑습니다!",
    "ㄱㄴㄷ ㅏㅑ ㅎㅎㅎ",
    "digits 12345 and 3.14159, 2024-11-30",
    "emoji 👍🏽 🦙 👨‍👩‍👧",
    "def f(x):\n\tif x:\n\t\treturn 1\n    else:\n        return  2\n",
    "a   b\n\n\nc \n \n   ",
    "  two leading spaces",
    "trailing spaces   ",
    "Ünïcödé façade — “quotes” …",
    "mixed 한국어 and English 123",
    "",
]

# Digits next to letters, punctuation, spaces and newlines: where isolating each digit (llama.cpp's "smollm"
# pre-tokenizer) changes how the whitespace around them is grouped.
DIGIT_CORPUS = [
    "12345",
    "1234567890",
    " 2024",
    " 1,000,000 dollars",
    "x1y22z333",
    "3.14159265358979",
    "phone: 010-1234-5678",
    "v1.2.3-rc4",
    "0x1F600 and 0b1010",
    "in 1999, 12 ppl",
    "93\n \n6",
    "a 1  2   3\n\n 4 \n5",
    "7 \t 8\n  9",
    "٣٤٥ ١٢ ①②③ ²³ ½",
]
SMOLLM2_LLAMA_CPP = Path(__file__).parent / "fixtures" / "tokenizer" / "smollm2_llama_cpp.json"

# Texts containing the vocabulary's own special-token strings.
SPECIAL_CORPUS = {
    "smollm2": ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "a<|endoftext|>b"],
    "llama3": ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", "x<|eom_id|>"],
    "spm": ["<s>[INST] Hi [/INST]", "a</s>b"],
}


def read_vectors(path: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's test-tokenizer-0 format: inputs separated by a marker line, one output line per input."""
    inputs = path.with_name(path.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = path.with_name(path.name + ".out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(v) for v in line.split()]) for text, line in zip(inputs, outputs)]


# ---- session-scoped tokenizers and references ---------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: Path) -> Tokenizer:
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_ref_gguf(smollm2_gguf: Path):
    """transformers' own GGUF loader (it ignores `tokenizer.ggml.pre` = "smollm")."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def smollm2_ref(smollm2_ref_gguf):
    """llama.cpp's ids for the texts its vectors hold; transformers' GGUF tokenizer for the special-token texts
    (no digits there, so the two agree)."""
    vectors = dict(json.loads(SMOLLM2_LLAMA_CPP.read_text(encoding="utf-8"))["vectors"])

    class Reference:
        @staticmethod
        def encode(text: str, add_special_tokens: bool = False) -> list[int]:
            assert not add_special_tokens
            return vectors[text] if text in vectors else smollm2_ref_gguf.encode(text, add_special_tokens=False)

    return Reference()


@pytest.fixture(scope="session")
def llama3(llama3_tiktoken_model: Path) -> Tokenizer:
    return load_tokenizer(llama3_tiktoken_model)


@pytest.fixture(scope="session")
def llama3_ref(llama3_tiktoken_model: Path):
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=str(llama3_tiktoken_model), extra_special_tokens=llama3_special_tokens())
    return PreTrainedTokenizerFast(tokenizer_object=converter.converted(), bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>")


@pytest.fixture(scope="session")
def spm(sentencepiece_model: Path) -> Tokenizer:
    return load_tokenizer(sentencepiece_model)


@pytest.fixture(scope="session")
def spm_ref(sentencepiece_model: Path):
    """transformers' SentencePiece conversion with LLaMA's legacy prefix rules (a space prefix on every chunk)."""
    from sentencepiece import sentencepiece_model_pb2
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sentencepiece_model.read_bytes())
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    engine = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    return PreTrainedTokenizerFast(tokenizer_object=engine, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def llama_spm_gguf() -> Path:
    path = package_file(LLAMA_CPP, "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf")
    for suffix in (".inp", ".out"):
        package_file(LLAMA_CPP, f"vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf{suffix}")
    return path


@pytest.fixture(scope="session")
def llama_spm(llama_spm_gguf: Path) -> Tokenizer:
    return load_tokenizer(llama_spm_gguf)


# ---- id parity -------------------------------------------------------------------------------------------------
def test_smollm2_gguf_matches_llama_cpp_and_transformers(smollm2: Tokenizer, smollm2_ref_gguf) -> None:
    """Ids from llama.cpp's own tokenizer on the same GGUF (fixtures/tokenizer/smollm2_llama_cpp.json, written by
    llama-server's /tokenize) for every text, digits included; and transformers' GGUF loader on every text too.
    transformers ignores `tokenizer.ggml.pre` = "smollm" (it splits with GPT-2's pattern alone), so where
    isolating the digits regroups the whitespace next to them the two references disagree: there llama.cpp is
    the reference, and the texts where they disagree are listed, not skipped wholesale."""
    vectors = json.loads(SMOLLM2_LLAMA_CPP.read_text(encoding="utf-8"))["vectors"]
    assert [text for text, _ in vectors] == CORPUS + DIGIT_CORPUS  # the fixture covers exactly these texts
    assert smollm2.kind == "gpt2" and smollm2.vocab_size == 49152
    disagree = []
    for text, llama_cpp in vectors:
        ours = smollm2.encode(text, add_bos=False)
        assert ours == llama_cpp, text
        assert smollm2.decode(ours) == smollm2_ref_gguf.decode(ours) == text
        if ours != smollm2_ref_gguf.encode(text, add_special_tokens=False):
            disagree.append(text)
    # Only texts where a digit touches whitespace that GPT-2's pattern would group across it:
    assert disagree == ["def f(x):\n\tif x:\n\t\treturn 1\n    else:\n        return  2\n", "93\n \n6",
                        "a 1  2   3\n\n 4 \n5", "7 \t 8\n  9", "٣٤٥ ١٢ ①②③ ²³ ½"]
    for text in SPECIAL_CORPUS["smollm2"]:
        assert smollm2.encode(text, add_bos=False) == smollm2_ref_gguf.encode(text, add_special_tokens=False), text
    assert smollm2.encode("<|im_start|>")[-1] == smollm2.token_to_id("<|im_start|>") == 1
    assert smollm2.add_bos is False and smollm2.bos_token == "<|im_start|>" and smollm2.eos_token == "<|im_end|>"
    assert {smollm2.token_to_id("<|im_end|>"), smollm2.token_to_id("<|endoftext|>")} <= smollm2.stop_ids
    assert smollm2.chat_template and "<|im_start|>" in smollm2.chat_template


def test_smollm2_digits_are_split_like_llama_cpp(smollm2: Tokenizer, smollm2_ref_gguf) -> None:
    # Every digit its own token, as llama.cpp (the vectors above) and transformers' GGUF tokenizer both give.
    ids = smollm2.encode("12345", add_bos=False)
    assert ids == smollm2_ref_gguf.encode("12345", add_special_tokens=False)
    assert [smollm2.decode([i]) for i in ids] == list("12345")


def test_llama3_tiktoken_matches_transformers_and_tiktoken(llama3: Tokenizer, llama3_ref,
                                                          llama3_tiktoken_model: Path) -> None:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    specials = {tok: 128000 + i for i, tok in enumerate(llama3_special_tokens())}
    native = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN,
                               mergeable_ranks=load_tiktoken_bpe(str(llama3_tiktoken_model)), special_tokens=specials)
    assert llama3.vocab_size == 128256
    for text in CORPUS + SPECIAL_CORPUS["llama3"]:
        ours = llama3.encode(text, add_bos=False)
        assert ours == llama3_ref.encode(text, add_special_tokens=False), text
        assert ours == native.encode(text, allowed_special="all"), text
        assert llama3.decode(ours) == native.decode(ours) == llama3_ref.decode(ours) == text
    assert llama3.encode("hi")[0] == llama3.bos_id == 128000
    assert llama3.stop_ids >= {128001, 128008, 128009}
    assert llama3.token_to_id("<|start_header_id|>") == 128006


def test_sentencepiece_matches_transformers_and_sentencepiece(spm: Tokenizer, spm_ref,
                                                              sentencepiece_model: Path) -> None:
    import sentencepiece

    native = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    assert spm.kind == "llama" and spm.vocab_size == 32000 and spm.bos_id == 1 and spm.eos_id == 2
    for text in CORPUS:
        ours = spm.encode(text, add_bos=False)
        assert ours == native.encode(text), text  # SentencePiece itself is the ground truth
        assert ours == spm_ref.encode(text, add_special_tokens=False), text
        assert spm.decode(ours) == native.decode(ours) == spm_ref.decode(ours) == text
    for text in SPECIAL_CORPUS["spm"]:
        ours = spm.encode(text, add_bos=False)
        assert ours == spm_ref.encode(text, add_special_tokens=False), text
        for skip in (False, True):
            assert spm.decode(ours, skip_special_tokens=skip) == spm_ref.decode(ours, skip_special_tokens=skip)
    assert spm.encode("Hi")[0] == 1  # LLaMA adds BOS


def test_llama_spm_gguf_matches_llama_cpp_vectors(llama_spm: Tokenizer, llama_spm_gguf: Path) -> None:
    vectors = read_vectors(llama_spm_gguf)
    assert len(vectors) > 30
    for text, expected in vectors:
        assert llama_spm.encode(text, add_bos=False) == expected, text
    assert llama_spm.add_bos and llama_spm.encode("Hello")[0] == 1


def test_llama_bpe_gguf_matches_llama_cpp_vectors() -> None:
    path = package_file(LLAMA_CPP, "vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf")
    for suffix in (".inp", ".out"):
        package_file(LLAMA_CPP, f"vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf{suffix}")
    tok = load_tokenizer(path)
    for text, expected in read_vectors(path):
        assert tok.encode(text, add_bos=False) == expected, text


# ---- round trips -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["smollm2", "llama3", "spm"])
def test_decode_encode_is_lossless(name: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    for text in CORPUS:
        assert tok.decode(tok.encode(text, add_bos=False)) == text
    ids = tok.encode("Hello", add_bos=True)
    assert ids[0] == tok.bos_id != ids[1]  # a BOS asked for is there, and decoding can skip it
    assert tok.decode(ids, skip_special_tokens=True) == "Hello"


@pytest.mark.parametrize("name,ref", [("smollm2", "smollm2_ref"), ("llama3", "llama3_ref"), ("spm", "spm_ref")])
def test_save_hf_loads_in_transformers_with_same_ids(name: str, ref: str, request: pytest.FixtureRequest,
                                                     tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok: Tokenizer = request.getfixturevalue(name)
    reference = request.getfixturevalue(ref)
    tok.save_hf(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["add_bos_token"] == tok.add_bos and config.get("bos_token") == tok.bos_token
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in CORPUS + (DIGIT_CORPUS if name == "smollm2" else []) + SPECIAL_CORPUS[name]:
        expected = tok.encode(text)  # with BOS exactly when the vocabulary adds it
        assert loaded.encode(text) == expected, text
        assert loaded.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
    assert loaded.chat_template == tok.chat_template  # None when the vocabulary has none
    again = load_tokenizer(tmp_path)
    assert again.add_bos == tok.add_bos and again.eos_id == tok.eos_id and again.stop_ids >= {tok.eos_id}
    assert (again.kind, again.pre, again.add_space_prefix) == (tok.kind, tok.pre, tok.add_space_prefix)
    assert all(again.encode(t) == tok.encode(t) for t in CORPUS)


@pytest.mark.parametrize("name", ["smollm2", "llama3", "spm", "llama_spm"])
def test_gguf_metadata_round_trip(name: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    meta = tok.to_gguf_metadata()
    assert len(meta["tokenizer.ggml.tokens"]) == tok.vocab_size == len(meta["tokenizer.ggml.token_type"])
    assert meta["tokenizer.ggml.model"] == tok.kind
    again = Tokenizer.from_gguf_metadata(meta, f"{name}-roundtrip")
    texts = CORPUS + [t for group in SPECIAL_CORPUS.values() for t in group]
    assert [again.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert (again.bos_id, again.eos_id, again.add_bos, again.stop_ids) == (tok.bos_id, tok.eos_id, tok.add_bos,
                                                                          tok.stop_ids)


def test_hf_json_to_gguf_metadata_keeps_ids(spm: Tokenizer, tmp_path: Path) -> None:
    """tokenizer.json has no SentencePiece scores: they are derived from the merges and must give the same ids."""
    spm.save_hf(tmp_path)
    from_json = load_tokenizer(tmp_path / "tokenizer.json")
    meta = from_json.to_gguf_metadata()
    assert meta["tokenizer.ggml.model"] == "llama" and len(meta["tokenizer.ggml.scores"]) == spm.vocab_size
    again = Tokenizer.from_gguf_metadata(meta, "from-json")
    assert [again.encode(t) for t in CORPUS] == [spm.encode(t) for t in CORPUS]


def test_duplicate_gguf_tokens_keep_every_id() -> None:
    tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab", "a"]  # a repeated token string, as some GGUFs have
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0, -2.0, -0.5, -3.0],
            "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1, 1], "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.add_space_prefix": False}
    tok = Tokenizer.from_gguf_metadata(meta, "dup.gguf")
    assert tok.vocab_size == len(tokens)
    assert tok.encode("abab") == [1, 5, 5] and tok.decode([3, 4]) == "ab"


def test_gguf_metadata_written_with_gguf_writer_reads_back(spm: Tokenizer, tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in spm.to_gguf_metadata().items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif key.endswith("token_type"):
            writer.add_array(key, [int(v) for v in value])
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    again = load_tokenizer(path)
    assert read_gguf_tokenizer_metadata(path)["tokenizer.ggml.model"] == "llama"
    assert [again.encode(t) for t in CORPUS] == [spm.encode(t) for t in CORPUS]


# ---- streaming -------------------------------------------------------------------------------------------------
STREAM_TEXTS = ["한국어 문장입니다. 안녕하세요! 👍🏽 ㄱㄴㄷ ㅏㅑ", "Hello  world,\n\tcode 12345 🦙 끝.", "뷁똠햏 😀"]


@pytest.mark.parametrize("name", ["smollm2", "llama3", "spm"])
def test_stream_decoder_emits_whole_characters(name: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        stream = StreamDecoder(tok)
        chunks = [stream.push(i) for i in ids]
        chunks.append(stream.flush())
        assert "".join(chunks) == tok.decode(ids)
        assert not any("\ufffd" in c for c in chunks), chunks
    # A reply cut by the token limit inside such a character ends before it (never in U+FFFD); text before it
    # is all there.
    for cut in range(1, len(tok.encode("뷁", add_bos=False))):
        ids = tok.encode("똠 뷁", add_bos=False)
        ids = ids[: len(ids) - len(tok.encode("뷁", add_bos=False)) + cut]
        stream = StreamDecoder(tok)
        text = "".join(stream.push(i) for i in ids) + stream.flush()
        assert "\ufffd" not in text and text.rstrip() == "똠", (cut, text)
    # Rare syllables are split into bytes (<0xEB><0xB7><0x81> or byte-level pieces): held back until whole.
    rare = tok.encode("뷁똠햏", add_bos=False)
    stream = StreamDecoder(tok)
    chunks = [stream.push(i) for i in rare]
    assert len(rare) > 3 and "" in chunks
    assert [c for c in chunks if c] in (["뷁", "똠", "햏"], ["뷁", "똠햏"])


def test_stream_decoder_keeps_sentencepiece_continuation_spaces(spm: Tokenizer) -> None:
    prompt = spm.encode("The capital of France is")
    answer = spm.encode(" Paris, of course.", add_bos=False)[1:]  # drop the lone "▁" of the dummy prefix
    stream = StreamDecoder(spm, prompt_ids=prompt)
    text = "".join(stream.push(i) for i in answer) + stream.flush()
    assert text == " Paris, of course."
    assert spm.decode(prompt + answer, skip_special_tokens=True) == "The capital of France is" + text
    plain = StreamDecoder(spm)
    assert "".join(plain.push(i) for i in answer) + plain.flush() == spm.decode(answer) == "Paris, of course."


def test_stream_decoder_skips_special_tokens(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("<|im_start|>assistant\n안녕<|im_end|>")
    stream = StreamDecoder(smollm2, skip_special_tokens=True)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == "assistant\n안녕"


# ---- errors ----------------------------------------------------------------------------------------------------
def test_bad_files_raise_format_error(tmp_path: Path) -> None:
    cases = {
        "tokenizer.model": b"\x00\x01garbage that is not a protobuf\xff\xfe",
        "tokenizer.json": b"{not json",
        "model.gguf": b"NOPE" + b"\x00" * 64,
        "truncated.gguf": b"GGUF\x03\x00\x00\x00",
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(FormatError) as info:
            load_tokenizer(path)
        message = str(info.value)
        assert name in message and "\n" not in message, message
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(FormatError, match="unsupported"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]}, "x.gguf")
    with pytest.raises(FormatError, match="scores"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"],
                                      "tokenizer.ggml.scores": [0.0]}, "x.gguf")


def test_from_dir_reads_meta_layout_and_generation_config(sentencepiece_model: Path, tmp_path: Path) -> None:
    original = tmp_path / "original"
    original.mkdir()
    shutil.copy(sentencepiece_model, original / "tokenizer.model")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "chat_template": "{{ 1 }}"}))
    tok = load_tokenizer(tmp_path)
    assert tok.source.endswith("tokenizer.model") and tok.stop_ids == {2, 7}
    assert tok.add_bos is False and tok.encode("Hi") == tok.encode("Hi", add_bos=False)
    assert tok.chat_template == "{{ 1 }}"
