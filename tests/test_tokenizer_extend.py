"""`llamaworks tokenizer extend` / `stats` and the continued-pretraining pieces (stage 1, English mixing).

References: transformers (tokenizer.json and its GGUF loader), llama.cpp's llama-server /tokenize (ids stored in
fixtures/tokenizer/smollm2_ko_extended_llama_cpp.json by `benchmarks/korean_vocab.py --write-llama-cpp-fixture`),
and the base model itself for the logits. Korean text: tests/fixtures/korean (see its README).
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from llamaworks.tokenizer import Tokenizer, load_tokenizer
from llamaworks.tokenizer_engines import byte_alphabet
from llamaworks.tokenizer_extend import (
    extend_state,
    extend_tokenizer,
    learn_extension,
    read_corpus,
    tokenizer_stats,
)

KOREAN = Path(__file__).parent / "fixtures" / "korean"
LLAMA_CPP_IDS = Path(__file__).parent / "fixtures" / "tokenizer" / "smollm2_ko_extended_llama_cpp.json"
ADD = 300  # what the llama.cpp fixtures were written with (they record it too)
SPM_ADD = 400
LLAMA_CPP_SPM_IDS = Path(__file__).parent / "fixtures" / "tokenizer" / "llama_spm_ko_extended_llama_cpp.json"

ENGLISH = [
    "Hello world",
    " Hello world",
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see!",
    "def f(x):\n    return x * 2  # comment\n",
    "Whitespace   runs\t\tand\n\nnewlines ",
    "<|im_start|>user\nHi there<|im_end|>\n",
]
MIXED = [
    "대한민국은 민주공화국이다.",
    " 모든 국민은 법 앞에 평등하다.",
    "제1조 ① 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
    "Korea 대한민국 헌법 Constitution 1987년 10월 29일",
    "결혼중개업의 관리에 관한 법률 일부개정법률안",
    "안녕하세요, 반갑습니다! 😀 emoji and 漢字 too",
]


def held_out_korean() -> str:
    return (KOREAN / "kobill_1809899_head.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def base() -> Tokenizer:
    from llamaworks.assets import default_model_path

    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def extension(base: Tokenizer):
    texts = read_corpus([KOREAN / "constitution_head.txt"])
    return learn_extension(base, texts, ADD)


@pytest.fixture(scope="module")
def extended(base: Tokenizer, extension) -> Tokenizer:
    return extend_tokenizer(base, extension)


# ---- the tokenizer --------------------------------------------------------------------------------------------
def test_old_ids_unchanged_and_english_tokenizes_as_before(base: Tokenizer, extended: Tokenizer, extension) -> None:
    assert len(extension.tokens) == ADD and extended.vocab_size == base.vocab_size + ADD
    assert extended.token_list()[:base.vocab_size] == base.token_list()  # every old id names the same token
    assert (extended.bos_id, extended.eos_id, extended.chat_template) == (base.bos_id, base.eos_id,
                                                                          base.chat_template)
    assert extended.stop_ids == base.stop_ids
    for text in ENGLISH:
        assert extended.encode(text) == base.encode(text), text
    for text in ENGLISH + MIXED + [held_out_korean()]:
        assert extended.decode(extended.encode(text)) == text
    # The learner's own count of the corpus after merging is what the tokenizer then gives (no dead merges).
    corpus = read_corpus([KOREAN / "constitution_head.txt"])
    assert sum(len(extended.encode(t)) for t in corpus) == extension.corpus_tokens_after
    assert sum(len(base.encode(t)) for t in corpus) == extension.corpus_tokens_before


def test_ids_agree_with_transformers(extended: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    extended.save_hf(tmp_path)
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(ref) == extended.vocab_size
    for text in ENGLISH + MIXED + [held_out_korean()]:
        ids = extended.encode(text)
        assert ref.encode(text, add_special_tokens=False) == ids, text
        assert ref.decode(ids) == text


def test_ids_agree_with_llama_cpp(extended: Tokenizer, extension) -> None:
    """llama-server's /tokenize on a GGUF written with this extension (benchmarks/korean_vocab.py wrote it)."""
    fixture = json.loads(LLAMA_CPP_IDS.read_text(encoding="utf-8"))
    assert fixture["added"] == ADD and fixture["new_tokens"] == extension.tokens  # the same vocabulary
    assert [t for t, _ in fixture["vectors"]] == ENGLISH + MIXED + [held_out_korean()]
    for text, ids in fixture["vectors"]:
        assert extended.encode(text) == ids, text


@pytest.mark.slow  # transformers' GGUF loader rebuilds a 49K-token BPE in Python: ~25 s here
def test_gguf_tokenizer_round_trip_agrees_with_transformers_gguf_loader(extended: Tokenizer, tmp_path: Path) -> None:
    """The extended vocabulary written into a (tiny) GGUF model reads back to the same ids, in ours and in
    transformers' GGUF loader (no digits in these texts: that loader ignores SmolLM2's digit split)."""
    from transformers import AutoTokenizer

    from llamaworks.checkpoints import save_gguf
    from llamaworks.config import get_preset
    from llamaworks.model import Transformer

    config = get_preset("tiny-tied").replace(vocab_size=extended.vocab_size)
    torch.manual_seed(0)
    path = save_gguf(tmp_path / "tiny.gguf", Transformer(config), config, extended, tensor_type="f32")
    ours = load_tokenizer(path)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    for text in ENGLISH + MIXED[:2] + MIXED[4:]:
        ids = extended.encode(text)
        assert ours.encode(text) == ids
        assert ref.encode(text, add_special_tokens=False) == ids, text


def test_hangul_tokens_per_syllable_drop_on_held_out_text(base: Tokenizer, extended: Tokenizer) -> None:
    text = held_out_korean()
    before, after = tokenizer_stats(base, [text]), tokenizer_stats(extended, [text])
    hangul = sum(unicodedata.name(c, "").startswith("HANGUL") for c in text)  # syllables and jamo (ㆍ)
    assert before["hangul"]["chars"] == after["hangul"]["chars"] == hangul
    # Even 300 tokens learned from 29 KB of the constitution cut a bill's Hangul tokens by more than a third.
    assert after["hangul"]["tokens_per_char"] < 0.65 * before["hangul"]["tokens_per_char"]
    for stats, tok in ((before, base), (after, extended)):
        assert stats["all"]["tokens"] == len(tok.encode(text))
        assert sum(stats[s]["tokens"] for s in ("hangul", "latin", "digit", "other")) == stats["all"]["tokens"]
        assert stats["all"]["bytes"] == len(text.encode("utf-8"))


def test_stats_counts_characters_words_and_bytes_per_script(base: Tokenizer) -> None:
    text = "대한민국 헌법 abc Def 123 ① 4"
    s = tokenizer_stats(base, [text])
    assert (s["hangul"]["chars"], s["hangul"]["words"], s["hangul"]["bytes"]) == (6, 2, 18)
    assert (s["latin"]["chars"], s["latin"]["words"], s["latin"]["bytes"]) == (6, 2, 6)
    assert (s["digit"]["chars"], s["digit"]["words"]) == (4, 2)  # "①" is not a decimal digit
    assert s["digit"]["tokens"] == 4  # SmolLM2 splits every digit
    assert s["all"]["words"] == 7 and s["all"]["chars"] == len(text)


def test_sentencepiece_vocabulary_gains_characters_then_merges(llama_spm: Tokenizer, tmp_path: Path) -> None:
    """LLaMA's SentencePiece vocabulary: Hangul syllables it lacks (byte fallback) become pieces first."""
    from transformers import AutoTokenizer

    texts = read_corpus([KOREAN / "constitution_head.txt"])
    ext = learn_extension(llama_spm, texts, SPM_ADD)
    tok = extend_tokenizer(llama_spm, ext)
    assert tok.token_list()[:llama_spm.vocab_size] == llama_spm.token_list()
    chars = [t for t in ext.tokens if len(t) == 1]
    assert sum(0xAC00 <= ord(c) <= 0xD7A3 for c in chars[:20]) >= 15  # mostly Hangul syllables
    assert ext.scores == sorted(ext.scores, reverse=True) and max(ext.scores) < min(
        llama_spm.to_gguf_metadata()["tokenizer.ggml.scores"])
    for text in ENGLISH[:5]:
        assert tok.encode(text) == llama_spm.encode(text), text
    text = held_out_korean()
    assert len(tok.encode(text)) < 0.7 * len(llama_spm.encode(text))
    assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert sum(len(tok.encode(t, add_bos=False)) for t in texts) == ext.corpus_tokens_after
    tok.save_hf(tmp_path)
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    for t in [*MIXED[:5], text]:
        assert ref.encode(t, add_special_tokens=False) == tok.encode(t, add_bos=False), t
    # llama.cpp (llama-server /tokenize on a GGUF with this vocabulary; benchmarks/korean_vocab.py wrote them).
    fixture = json.loads(LLAMA_CPP_SPM_IDS.read_text(encoding="utf-8"))
    assert fixture["added"] == SPM_ADD and fixture["new_tokens"] == ext.tokens
    assert [t for t, _ in fixture["vectors"]] == [*ENGLISH[:5], *MIXED, text]
    for t, ids in fixture["vectors"]:
        assert tok.encode(t, add_bos=False) == ids, t


@pytest.fixture(scope="module")
def llama_spm() -> Tokenizer:
    from conftest import package_file

    return load_tokenizer(package_file("llama-cpp-python==0.3.16",
                                       "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"))


@pytest.fixture(scope="module")
def base_ref(base: Tokenizer, tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("base-tokenizer")
    base.save_hf(folder)
    return AutoTokenizer.from_pretrained(str(folder))


# ---- the model ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny-tied", "tiny-llama2"])
def test_new_rows_are_the_mean_of_the_base_pieces_rows(preset: str, base: Tokenizer, extension, base_ref) -> None:
    """Each new row (embedding, and the output head when untied) is the mean of the rows of the ids transformers'
    copy of the base tokenizer gives for the new token's text."""
    from llamaworks.config import get_preset
    from llamaworks.model import Transformer

    config = get_preset(preset).replace(vocab_size=base.vocab_size)
    torch.manual_seed(0)
    model = Transformer(config)
    model.reset_parameters(std=0.5)
    old = dict(model.state_dict())
    state, new_config = extend_state(old, config, base, extension)
    assert new_config.vocab_size == base.vocab_size + ADD
    decoder = {v: k for k, v in byte_alphabet().items()}
    names = ["tok_embeddings.weight"] + (["output.weight"] if not config.tie_embeddings else [])
    for name in names:
        assert torch.equal(state[name][:base.vocab_size], old[name])
    checked = 0
    for i, token in enumerate(extension.tokens):
        try:
            text = bytes(decoder[c] for c in token).decode("utf-8")
        except UnicodeDecodeError:
            continue  # part of a character: no text to hand the reference
        ids = base_ref.encode(text, add_special_tokens=False)
        for name in names:
            torch.testing.assert_close(state[name][base.vocab_size + i], old[name][ids].mean(0), rtol=0, atol=1e-6)
        checked += 1
    assert checked > ADD // 3


@pytest.mark.slow  # loads SmolLM2-135M twice and writes it once in float32: 20-90 s on this shared CPU
def test_extended_default_model_gives_base_logits_on_english(base: Tokenizer, extension, tmp_path: Path) -> None:
    """SmolLM2-135M extended, written as an HF checkpoint and read back: logits of the old vocabulary on English
    text equal the base model's (1e-5), and the text has the same ids."""
    from llamaworks.checkpoints import load_model, save_hf

    model, tok, ckpt = load_model(None)
    ext_tok = extend_tokenizer(tok, extension)
    state, config = extend_state(dict(model.state_dict()), ckpt.config, tok, extension)
    save_hf(tmp_path / "ext", state, config, ext_tok, chat_template=ckpt.chat_template)
    del state
    ext_model, ext_loaded, _ = load_model(tmp_path / "ext")
    assert ext_loaded.vocab_size == ext_model.config.vocab_size == base.vocab_size + ADD
    text = " ".join(ENGLISH)
    ids = tok.encode(text)
    assert ext_loaded.encode(text) == ids
    with torch.no_grad():
        want = model(torch.tensor([ids]))
        got = ext_model(torch.tensor([ids]))
    assert got.shape[-1] == base.vocab_size + ADD
    assert float((got[..., :base.vocab_size] - want).abs().max()) <= 1e-5


# ---- continued pretraining --------------------------------------------------------------------------------------
def test_stage_one_trains_only_the_new_rows(tmp_path: Path) -> None:
    """Through the real training loop: old embedding rows, rows of new tokens never seen and every other weight stay
    bit for bit; new rows of tokens in the batches move."""
    from llamaworks.config import get_preset
    from llamaworks.data.loader import TokenWindowSource
    from llamaworks.model import Transformer
    from llamaworks.train.loop import TrainConfig, run_training
    from llamaworks.train.pretrain import freeze_to_new_rows

    for preset in ("tiny-tied", "tiny-llama2"):
        config = get_preset(preset)
        torch.manual_seed(0)
        model = Transformer(config)
        model.reset_parameters()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        first_new = 200
        freeze_to_new_rows(model, first_new)
        rng = np.random.default_rng(0)
        stream = rng.integers(0, 240, 4000).astype(np.int64)  # new ids 200-239 occur, 240-255 never
        src = TokenWindowSource([stream], 32, 4, seed=0)
        cfg = TrainConfig(lr=1e-2, warmup_steps=0, max_steps=4, weight_decay=0.0, eval_every=0, save_every=0,
                          log_every=0, out_dir=tmp_path / preset, progress=False, tensorboard=False, plot=False,
                          save_final=False)
        run_training(model, train_data=src, cfg=cfg, save_fn=lambda m, d: None)
        after = model.state_dict()
        heads = [n for n in ("tok_embeddings.weight", "output.weight") if n in after]
        for name, value in after.items():
            if name in heads:
                assert torch.equal(value[:first_new], before[name][:first_new]), name
                assert not torch.equal(value[first_new:240], before[name][first_new:240]), name
                # Rows of tokens never in a batch get no update (Adam would move them by ~lr per step).
                assert torch.equal(value[240:], before[name][240:]), name
            else:
                assert torch.equal(value, before[name]), name


def test_mixed_source_keeps_the_ratio_resumes_and_splits_across_ranks() -> None:
    from llamaworks.data.loader import MixedWindowSource

    ko = np.arange(0, 1000, dtype=np.int64)
    en = np.arange(10_000, 11_000, dtype=np.int64)
    src = MixedWindowSource([ko], [en], 0.25, 8, 4, seed=3, rank=0, world_size=1)
    it = iter(src)
    batches = [next(it)["input_ids"] for _ in range(10)]
    rows = torch.cat(batches)
    english = (rows[:, 0] >= 10_000).sum().item()
    assert english == 10  # 25% of 40 rows, exactly
    # Every row is a contiguous window of one stream.
    assert all(bool(((r[1:] - r[:-1]) == 1).all()) for r in rows)
    resumed = MixedWindowSource([ko], [en], 0.25, 8, 4, seed=3, rank=0, world_size=1)
    resumed.load_state_dict({"batches": 6})
    assert torch.equal(next(iter(resumed))["input_ids"], batches[6])
    halves = [MixedWindowSource([ko], [en], 0.25, 8, 2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    first = [next(iter(h))["input_ids"] for h in halves]
    assert torch.equal(torch.cat(first), batches[0])


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    from llamaworks.cli import main

    assert main(["tokenizer", "extend", "--corpus", str(tmp_path / "missing.txt"), "--add", "10",
                 "--out", str(tmp_path / "o")]) == 2
    assert "missing.txt: no such file or directory" in capsys.readouterr().err
    (tmp_path / "c.txt").write_text("가나다", encoding="utf-8")
    assert main(["tokenizer", "extend", "--corpus", str(tmp_path / "c.txt"), "--add", "0",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--add must be a positive number" in capsys.readouterr().err
    assert main(["pretrain", "--init", str(tmp_path), "--model-config", "tiny-12m", "--data", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "either --model-config" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # extend + two short runs of a tiny model with SmolLM2's 49K vocabulary: 50-110 s here
def test_extend_then_two_stage_pretrain_end_to_end(base: Tokenizer, tmp_path: Path) -> None:
    """`tokenizer extend` on a (tiny, random) model, then `pretrain --init --train new-rows` with English mixed in,
    then `--train all`: stage 1 moves only the new rows; the outputs load with the extended tokenizer."""
    from safetensors.torch import load_file

    from conftest import write_tiny_smol_model
    from llamaworks.data.prepare import prepare_corpus
    from llamaworks.tokenizer_extend import extend_model
    from llamaworks.train.pretrain import pretrain

    tiny = write_tiny_smol_model(tmp_path / "tiny", base, max_seq_len=128)
    r = extend_model(tiny, [KOREAN / "constitution_head.txt"], 50, tmp_path / "ext", gguf_type=None, progress=False)
    assert (r.base_vocab, r.vocab) == (base.vocab_size, base.vocab_size + 50)
    assert json.loads((tmp_path / "ext" / "vocab_extension.json").read_text())["base_vocab"] == base.vocab_size
    (tmp_path / "en.txt").write_text("\n\n".join(ENGLISH * 20), encoding="utf-8")
    prepare_corpus([KOREAN / "constitution_head.txt"], tmp_path / "ext", tmp_path / "ko", val_fraction=0,
                   progress=False)
    prepare_corpus([tmp_path / "en.txt"], tmp_path / "ext", tmp_path / "en", val_fraction=0, progress=False)
    kw = dict(seq_len=32, micro_batch_size=4, warmup_steps=0, eval_every=0, save_every=0, log_every=1,
              progress=False, tensorboard=False, plot=False, mix_data=tmp_path / "en", mix_ratio=0.25)
    pretrain(None, tmp_path / "ko", tmp_path / "s1", init=tmp_path / "ext", train="new-rows", max_steps=3, lr=1e-2,
             **kw)
    before = load_file(tmp_path / "ext" / "model.safetensors")
    after = load_file(tmp_path / "s1" / "final" / "model.safetensors")
    emb = "model.embed_tokens.weight"
    assert torch.equal(after[emb][:base.vocab_size], before[emb][:base.vocab_size])
    assert not torch.equal(after[emb][base.vocab_size:], before[emb][base.vocab_size:])
    assert all(torch.equal(after[k], before[k]) for k in before if k != emb)
    pretrain(None, tmp_path / "ko", tmp_path / "s2", init=tmp_path / "s1" / "final", train="all", max_steps=2,
             lr=1e-3, **kw)
    final = load_file(tmp_path / "s2" / "final" / "model.safetensors")
    assert not torch.equal(final["model.norm.weight"], after["model.norm.weight"])  # everything trains now
    assert load_tokenizer(tmp_path / "s2" / "final").token_list() == load_tokenizer(tmp_path / "ext").token_list()
    run = json.loads((tmp_path / "s2" / "run.json").read_text())
    assert run["init"] == str(tmp_path / "s1" / "final") and run["mix_ratio"] == 0.25
    with pytest.raises(ValueError, match=r"vocab_extension\.json"):
        pretrain(None, tmp_path / "ko", tmp_path / "s3", init=tmp_path / "s1" / "final", train="new-rows",
                 max_steps=1, **kw)


@pytest.mark.slow  # two extensions of a tiny model with SmolLM2's 49K vocabulary + transformers: 29-94 s here
def test_fit_output_unties_fits_new_rows_and_loads_in_transformers(base: Tokenizer, tmp_path: Path) -> None:
    """`tokenizer extend --fit-output`: a tied model gains its own output matrix whose old rows are the embeddings
    (old-token logits unchanged) and whose new rows are fitted; the input rows stay the mean of their pieces; the
    new rows lower the loss on windows the fit never trained on; transformers reads the untied checkpoint to our
    logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from conftest import write_tiny_smol_model
    from llamaworks.checkpoints import load_model
    from llamaworks.tokenizer_extend import extend_model

    tiny = write_tiny_smol_model(tmp_path / "tiny", base, max_seq_len=512)
    corpus = [KOREAN / "constitution_head.txt"]
    extend_model(tiny, corpus, 50, tmp_path / "mean", gguf_type=None, progress=False)
    (tmp_path / "en.txt").write_text("\n\n".join(ENGLISH * 40), encoding="utf-8")
    extend_model(tiny, corpus, 50, tmp_path / "fit", gguf_type=None, progress=False, fit_output=200,
                 fit_corpus=[tmp_path / "en.txt"])
    mean, fit = load_file(tmp_path / "mean" / "model.safetensors"), load_file(tmp_path / "fit" / "model.safetensors")
    emb, head, n = "model.embed_tokens.weight", "lm_head.weight", base.vocab_size
    assert head not in mean and torch.equal(fit[emb], mean[emb])  # inputs: the mean rows, as without the fit
    assert torch.equal(fit[head][:n], mean[emb][:n]) and not torch.equal(fit[head][n:], mean[emb][n:])
    record = json.loads((tmp_path / "fit" / "vocab_extension.json").read_text())["fit_output"]
    assert record["val_after"] < record["val_before"] and record["train_after"] < record["train_before"]
    assert record["fit_corpus"] == [str(tmp_path / "en.txt")]
    cfg = json.loads((tmp_path / "fit" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    ours, tok, _ = load_model(tmp_path / "fit")
    ids = torch.tensor([tok.encode(held_out_korean()[:300] + " " + ENGLISH[2], add_bos=False)])
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fit"), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), ref(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
