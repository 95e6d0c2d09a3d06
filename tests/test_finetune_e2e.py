"""`llamaworks finetune` end to end.

Fast tests: a tiny random LLaMA that carries the real SmolLM2 tokenizer and chat template runs every recipe
(full, LoRA, QLoRA, DPO) through the CLI, and its outputs load back with the same logits.

The slow test is the product proof: LoRA-finetune the bundled SmolLM2-135M-Instruct so that it answers
"제 이름은 라마봇입니다." when asked its name; before training greedy chat does not say 라마봇, after training
it does, also after export to GGUF and reloading.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_smol_model

NAME = "라마봇"
ANSWER = "제 이름은 라마봇입니다."
QUESTIONS = ["What is your name?", "이름이 뭐예요?", "What's your name?", "Who are you?", "너 이름이 뭐야?",
             "Tell me your name.", "당신은 누구세요?", "May I ask your name?"]


def write_name_data(path: Path) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for q in QUESTIONS:
            record = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_preferences(path: Path) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for q in QUESTIONS[:4]:
            f.write(json.dumps({"prompt": q, "chosen": ANSWER, "rejected": "My name is SmolLM."},
                               ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, smollm2_gguf) -> Path:
    """An HF directory: a tiny random LLaMA with SmolLM2's vocabulary, tokenizer and chat template."""
    from llamaworks.tokenizer import load_tokenizer

    return write_tiny_smol_model(tmp_path_factory.mktemp("tiny") / "base", load_tokenizer(smollm2_gguf), 512)


def cli(*args: str) -> None:
    from llamaworks.cli import main

    assert main([str(a) for a in args]) == 0


def logits_of(path, tokens: torch.Tensor) -> torch.Tensor:
    from llamaworks.checkpoints import load_model

    model, _, _ = load_model(path)
    with torch.no_grad():
        return model(tokens)


def answer_logprob(path) -> float:
    """Mean log-probability per token of ANSWER after the first question in SmolLM2's chat format."""
    from llamaworks.checkpoints import load_model

    model, tokenizer, _ = load_model(path)
    prompt = tokenizer.encode(f"<|im_start|>user\n{QUESTIONS[0]}<|im_end|>\n<|im_start|>assistant\n")
    answer = tokenizer.encode(ANSWER)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer]))[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(answer)[:, None]).mean().item()


COMMON = ("--seq-len", "128", "--batch-size", "2", "--log-every", "1", "--no-progress", "--seed", "0")


def test_lora_finetune_writes_a_chat_ready_model_and_a_peft_adapter(tmp_path, tiny_base):
    data = write_name_data(tmp_path / "name.jsonl")
    out = tmp_path / "lora"
    cli("finetune", "lora", "--model", tiny_base, "--data", data, "--out", out, "--max-steps", "6", "--lr", "1e-2",
        "--lora-rank", "4", "--lora-targets", "q,k,v,o,gate,up,down", *COMMON)
    assert (out / "config.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "finetune.json").read_text())
    losses = [float(r["loss"]) for r in csv_rows(out / "metrics.csv")]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert summary["trainable_params"] < summary["total_params"] / 10

    # OUT (merged HF dir) == base + adapter == merge-lora output, and differs from the base.
    from llamaworks.checkpoints import load_model
    from llamaworks.train.lora import load_adapter

    tokens = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(0))
    merged = logits_of(out, tokens)
    base_model, _, _ = load_model(tiny_base)
    with torch.no_grad():
        base = base_model(tokens)
        load_adapter(base_model, out / "adapter")
        with_adapter = base_model(tokens)
    assert (merged - base).abs().max() > 1e-3
    torch.testing.assert_close(with_adapter, merged, atol=1e-4, rtol=1e-4)
    cli("merge-lora", "--base", tiny_base, "--adapter", out / "adapter", "--out", tmp_path / "merged")
    torch.testing.assert_close(logits_of(tmp_path / "merged", tokens), merged, atol=1e-4, rtol=1e-4)
    # Without --base, a base path the adapter records outside its folder is not opened (issue 13: no path read
    # from a file reaches outside its folder): one line asking for --base.
    from llamaworks.cli import main

    assert main(["merge-lora", "--adapter", str(out), "--out", str(tmp_path / "merged.gguf")]) == 2
    assert not (tmp_path / "merged.gguf").exists()
    cli("merge-lora", "--base", tiny_base, "--adapter", out, "--out", tmp_path / "merged.gguf", "--gguf-type", "f32")
    torch.testing.assert_close(logits_of(tmp_path / "merged.gguf", tokens), merged, atol=1e-4, rtol=1e-4)


def csv_rows(path: Path) -> list[dict]:
    import csv

    with path.open() as f:
        return [r for r in csv.DictReader(f) if r.get("loss")]


def test_qlora_finetune_trains_adapters_over_an_nf4_base(tmp_path, tiny_base):
    from llamaworks.train.finetune import FinetuneConfig, finetune

    data = write_name_data(tmp_path / "name.jsonl")
    cfg = FinetuneConfig(method="qlora", model=str(tiny_base), data=[str(data)], out=str(tmp_path / "q"),
                         max_steps=6, lr=1e-2, lora_rank=4, seq_len=128, micro_batch_size=2, log_every=1,
                         progress=False, tensorboard=False, plot=False, double_quant=True, seed=0)
    result = finetune(cfg)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0], losses
    assert result.trainable_params < result.total_params / 10
    tokens = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(1))
    # The saved model is the dequantized base plus the adapter: a float model that loads anywhere, and it carries
    # what training learned: the trained answer's tokens are likelier after a trained question than under the base.
    out_logits = logits_of(tmp_path / "q", tokens)
    assert torch.isfinite(out_logits).all()
    gained = answer_logprob(tmp_path / "q") - answer_logprob(tiny_base)
    print(f"QLoRA: answer log-prob per token +{gained:.3f} nats; training loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert gained > 0.5 * (losses[0] - losses[-1]), (gained, losses)


def test_full_dpo_finetune_runs_and_prefers_the_chosen_answer(tmp_path, tiny_base):
    from llamaworks.train.finetune import FinetuneConfig, finetune

    prefs = write_preferences(tmp_path / "prefs.jsonl")
    cfg = FinetuneConfig(method="full", model=str(tiny_base), data=[str(prefs)], out=str(tmp_path / "dpo"),
                         dpo=True, dpo_beta=0.5, max_steps=8, lr=3e-3, seq_len=128, micro_batch_size=2,
                         log_every=1, progress=False, tensorboard=False, plot=False, seed=0)
    result = finetune(cfg)
    losses = [h["loss"] for h in result.history]
    assert abs(losses[0] - 0.6931) < 1e-3  # policy == reference at step 1: -log sigmoid(0)
    assert losses[-1] < 0.5 * losses[0], losses
    assert (tmp_path / "dpo" / "config.json").is_file() and not (tmp_path / "dpo" / "adapter").exists()


def test_bad_data_stops_before_training(tmp_path, tiny_base):
    from llamaworks.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    assert main(["finetune", "lora", "--model", str(tiny_base), "--data", str(bad), "--out",
                 str(tmp_path / "o"), "--no-progress"]) == 2
    assert not (tmp_path / "o" / "checkpoints").exists()
    assert main(["finetune", "lora", "--model", str(tiny_base), "--data", str(bad), "--out", str(tmp_path / "o"),
                 "--lora-targets", "q,xyz"]) == 2


# -- the product proof on the real model -------------------------------------------------------------

def greedy_chat(llm, question: str) -> str:
    return llm.chat(question, temperature=0, max_new_tokens=40)  # the Korean answer is ~28 byte-level tokens


@pytest.mark.slow
def test_smollm2_learns_its_korean_name_and_keeps_it_in_gguf(tmp_path, smollm2_gguf):
    import llamaworks
    from llamaworks.checkpoints import save_gguf
    from llamaworks.train.finetune import FinetuneConfig, finetune

    before = llamaworks.load(smollm2_gguf)
    for q in ("What is your name?", "이름이 뭐예요?"):
        assert NAME not in greedy_chat(before, q)
    del before

    data = write_name_data(tmp_path / "name.jsonl")
    out = tmp_path / "ramabot"
    cfg = FinetuneConfig(method="lora", model=str(smollm2_gguf), data=[str(data)], out=str(out), lora_rank=16,
                         lora_alpha=32, lora_dropout=0.0, seq_len=256, micro_batch_size=1, max_steps=8, lr=2e-3,
                         warmup_steps=0, log_every=1, progress=False, tensorboard=False, plot=False, seed=0)
    result = finetune(cfg)
    assert result.history[-1]["loss"] < 0.2 * result.history[0]["loss"]

    after = llamaworks.load(out)  # what `llamaworks chat --model OUT` opens
    for q in ("What is your name?", "이름이 뭐예요?"):
        reply = greedy_chat(after, q)
        assert NAME in reply, (q, reply)

    gguf_path = tmp_path / "ramabot.gguf"
    save_gguf(gguf_path, after.model, after.model.config, after.tokenizer, chat_template=after.tokenizer.chat_template,
              tensor_type="f16")
    del after
    exported = llamaworks.load(gguf_path)
    reply = greedy_chat(exported, "이름이 뭐예요?")
    assert NAME in reply, reply
