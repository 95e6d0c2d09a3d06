"""End to end: text files -> `data prepare` -> `pretrain` a tiny LLaMA -> it has learned the corpus' structure."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llamaworks.cli import main as cli_main
from llamaworks.data.prepare import load_prepared
from train_helpers import build_tokenizer, grammar_corpus, unigram_entropy, write_corpus_files

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    files = write_corpus_files(root / "corpus", n_files=4, lines=200)
    build_tokenizer(root / "tok", [f.read_text() for f in files], vocab_size=300)
    return root


@pytest.mark.slow
def test_pretrain_learns_grammar_below_unigram_entropy(corpus, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    assert cli_main(["data", "prepare", str(corpus / "corpus"), "--tokenizer", str(corpus / "tok"), "--out",
                     str(data), "--val-fraction", "0.1"]) == 0
    prepared = load_prepared(data)
    val_tokens = np.concatenate(prepared.arrays("val"))
    h_unigram = unigram_entropy(val_tokens)
    assert h_unigram > 3.0  # ~30 words used with different frequencies

    out = tmp_path / "run"
    code = cli_main(["--threads", "1", "pretrain", "--model-config", "tiny-llama2", "--data", str(data),
                     "--out", str(out),
                     "--seq-len", "64", "--batch-size", "16", "--max-steps", "150", "--lr", "3e-3",
                     "--warmup-steps", "10", "--eval-every", "50", "--eval-batches", "4", "--save-every", "75",
                     "--log-every", "25", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "tok/s" in printed and "MFU" in printed and "val loss" in printed
    summary = json.loads((out / "checkpoints" / "step-000150" / "trainer_state.json").read_text())
    val_loss = float(summary["metrics"]["val_loss"])
    # The grammar leaves ~1.33 bits of choice per word (see train_helpers): the model must get far below the
    # context-free optimum, which is the unigram entropy.
    assert val_loss < 0.5 * h_unigram, (val_loss, h_unigram)

    # The output is a model `llamaworks chat` can open, with the tokenizer, that continues the grammar.
    from llamaworks.checkpoints import load_model

    model, tok, _ = load_model(out / "final")
    assert tok is not None and model.config.vocab_size == 300
    ids = tok.encode("anna paints the red", add_bos=False)
    with torch.no_grad():
        for _ in range(2):
            nxt = model(torch.tensor([ids]))[0, -1].argmax().item()
            ids.append(nxt)
    assert tok.decode(ids).startswith("anna paints the red wall")
    assert (out / "loss.png").exists() and (out / "run.json").exists()
    # `llamaworks chat --model OUT/final` opens it (piped stdin: one user turn per line).
    monkeypatch.setattr("sys.stdin", io.StringIO("anna eats\n"))
    capsys.readouterr()
    assert cli_main(["--threads", "1", "chat", "--model", str(out / "final"), "--temperature", "0", "-n", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_pretrain_python_api_resume_and_vocab(corpus, tmp_path):
    from llamaworks.data.prepare import prepare_corpus
    from llamaworks.train.pretrain import pretrain

    prepare_corpus([corpus / "corpus"], corpus / "tok", tmp_path / "data", val_fraction=0.1, progress=False)
    kw = dict(seq_len=32, micro_batch_size=4, lr=1e-3, warmup_steps=2, eval_every=0, save_every=4, log_every=2,
              progress=False, tensorboard=False)
    r = pretrain("tiny-tied", tmp_path / "data", tmp_path / "a", max_steps=6, **kw)
    assert r.step == 6 and r.val_loss is not None and r.final_dir.name == "final"
    # Continue the same run to more steps: resume picks up at step 6 and goes on.
    r2 = pretrain("tiny-tied", tmp_path / "data", tmp_path / "a", max_steps=8, resume=True, **kw)
    assert r2.step == 8 and r2.tokens == 8 * 4 * 32
    cfg = json.loads((tmp_path / "a" / "final" / "config.json").read_text())
    assert cfg["vocab_size"] == 300 and cfg["tie_word_embeddings"] is True
    # A run resumed from its step-4 checkpoint ends where the uninterrupted run ends (same schedule, data order,
    # RNG): the same losses after the resume point and the same final weights.
    whole = pretrain("tiny-tied", tmp_path / "data", tmp_path / "w", max_steps=8, **kw)
    step4 = tmp_path / "w" / "checkpoints" / "step-000004"
    assert step4.is_dir()
    shutil.copytree(step4, tmp_path / "r" / "checkpoints" / "step-000004")
    resumed = pretrain("tiny-tied", tmp_path / "data", tmp_path / "r", max_steps=8, resume=True, **kw)
    assert resumed.step == whole.step == 8
    logged = {run: {r["step"]: r["loss"] for r in csv.DictReader((tmp_path / run / "metrics.csv").open())
                    if r.get("loss")} for run in ("w", "r")}
    after = {s: v for s, v in logged["w"].items() if int(s) > 4}
    assert after and {s: logged["r"][s] for s in after} == after
    a, b = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("w", "r"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="unknown training option"):
        pretrain("tiny-tied", tmp_path / "data", tmp_path / "b", bogus=1)


def test_continue_with_lora_and_embeddings_saves_a_peft_adapter(corpus, tmp_path):
    """`pretrain --init M --train lora-embeddings`: LoRA plus the embeddings train; `final` is the merged model (what
    chat and convert read) and `final/adapter` a PEFT adapter that peft puts on M's transformers model to give the
    merged model's logits."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from llamaworks.checkpoints import load_model
    from llamaworks.data.prepare import prepare_corpus
    from llamaworks.train.lora import LoRAConfig
    from llamaworks.train.pretrain import pretrain

    prepare_corpus([corpus / "corpus"], corpus / "tok", tmp_path / "data", val_fraction=0, progress=False)
    kw = dict(seq_len=32, micro_batch_size=4, warmup_steps=0, eval_every=0, save_every=0, log_every=1,
              progress=False, tensorboard=False, plot=False)
    init = pretrain("tiny-tied", tmp_path / "data", tmp_path / "base", max_steps=2, lr=1e-3, **kw).final_dir
    r = pretrain(None, tmp_path / "data", tmp_path / "cont", init=init, train="lora-embeddings", max_steps=3,
                 lr=1e-2, weight_decay=0.0, lora=LoRAConfig(rank=4, alpha=8, targets="q,v,up"), **kw)
    adapter = json.loads((r.final_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["embed_tokens"] and adapter["r"] == 4
    assert json.loads((tmp_path / "cont" / "run.json").read_text())["lora"]["modules_to_save"] == ["embed_tokens"]
    before, after = load_file(init / "model.safetensors"), load_file(r.final_dir / "model.safetensors")
    emb = "model.embed_tokens.weight"
    assert not torch.equal(before[emb], after[emb])  # the embeddings trained ...
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"],  # ... and the adapters (merged)
                           after["model.layers.0.self_attn.q_proj.weight"])
    k = "model.layers.0.self_attn.k_proj.weight"  # not a LoRA target: unchanged
    assert torch.equal(before[k], after[k])
    assert torch.equal(before["model.norm.weight"], after["model.norm.weight"])
    x = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    merged, _, _ = load_model(r.final_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(init), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(hf, str(r.final_dir / "adapter")).eval()(input_ids=x).logits
        torch.testing.assert_close(merged.eval()(x), expected, atol=1e-4, rtol=1e-4)


def test_grammar_corpus_is_structured():
    sentences = grammar_corpus(100)
    assert all(s.split()[2] == "the" and s.endswith(" .") for s in sentences)
