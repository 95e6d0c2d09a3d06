"""DPO: the loss against a hand computation, sequence log-probs, the reference, and learning on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from llamaworks.config import get_preset
from llamaworks.errors import FormatError
from llamaworks.model import Transformer
from llamaworks.train.dpo import (
    DPOLoss,
    PreferenceBatchSource,
    PreferencePair,
    dpo_loss,
    frozen_reference,
    load_preferences,
    sequence_logprobs,
)
from llamaworks.train.loop import TrainConfig, run_training
from llamaworks.train.lora import LoRAConfig, apply_lora, lora_disabled, lora_modules, save_adapter


def test_dpo_loss_equals_hand_computation():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.5, -2.0])
    beta = 0.5
    loss, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=beta)
    # Example 1: margin 0.5*((-10+11) - (-12+11.5)) = 0.75; example 2: 0.5*((-4+5) - (-3+2)) = 1.0
    expected = (math.log(1 + math.exp(-0.75)) + math.log(1 + math.exp(-1.0))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(chosen_r, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(rejected_r, torch.tensor([-0.25, -0.5]))
    # Conservative DPO with label smoothing eps mixes in the flipped label.
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.2)
    flipped = (math.log(1 + math.exp(0.75)) + math.log(1 + math.exp(1.0))) / 2
    assert smoothed.item() == pytest.approx(0.8 * expected + 0.2 * flipped, abs=1e-6)
    # Equal policy and reference: margin 0, loss log 2.
    zero, _, _ = dpo_loss(pc, pr, pc, pr)
    assert zero.item() == pytest.approx(math.log(2), abs=1e-6)


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(get_preset("tiny-llama2")).eval()
    model.reset_parameters(std=0.1)
    return model


def test_sequence_logprobs_sum_only_response_tokens():
    model = tiny_model()
    pairs = [PreferencePair([1, 5, 6, 7, 8], [1, 5, 6, 9], 3, 3)]
    batch = PreferenceBatchSource(pairs, seq_len=16, micro_batch_size=1, shuffle=False).collate(pairs)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, -100, 9, -100]]
    with torch.no_grad():
        got = sequence_logprobs(model, batch)
        lp_chosen = torch.log_softmax(model(torch.tensor([[1, 5, 6, 7]])), -1)[0]
        lp_rejected = torch.log_softmax(model(torch.tensor([[1, 5, 6]])), -1)[0]
    expected = torch.stack([lp_chosen[2, 7] + lp_chosen[3, 8], lp_rejected[2, 9]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def preference_pairs(n: int = 8) -> list[PreferencePair]:
    """Prompt [1, p]; the chosen answer repeats p, the rejected one answers with p + 1."""
    pairs = []
    for i in range(n):
        p = 10 + i
        pairs.append(PreferencePair([1, p, 3, p, p, 2], [1, p, 3, p + 1, p + 1, 2], 3, 3))
    return pairs


def test_reference_is_the_base_model_with_adapters_off():
    model = tiny_model()
    base = frozen_reference(model)
    apply_lora(model, LoRAConfig(rank=2, targets="q,v"))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_()
    batch = PreferenceBatchSource(preference_pairs(2), 16, 2, shuffle=False).collate(preference_pairs(2))
    with torch.no_grad():
        expected = sequence_logprobs(base, batch)
        torch.testing.assert_close(DPOLoss().reference_logprobs(model, batch), expected)
        with lora_disabled(model):
            torch.testing.assert_close(sequence_logprobs(model, batch), expected)
        assert not torch.allclose(sequence_logprobs(model, batch), expected)
    with pytest.raises(ValueError, match="needs LoRA adapters"):
        DPOLoss().reference_logprobs(base, batch)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_loss_decreases_in_a_few_steps(tmp_path, method):
    model = tiny_model()
    if method == "lora":
        apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="q,k,v,o,gate,up,down"))
        loss_fn = DPOLoss(beta=0.5)
        save = lambda m, d: save_adapter(m, d)
    else:
        loss_fn = DPOLoss(beta=0.5, reference=frozen_reference(model))
        save = lambda m, d: torch.save({k: v for k, v in m.state_dict().items()}, d / "model.pt")
    source = PreferenceBatchSource(preference_pairs(), seq_len=16, micro_batch_size=4, seed=0)
    cfg = TrainConfig(lr=5e-3, warmup_steps=0, max_steps=12, weight_decay=0.0, eval_every=0, save_every=0,
                      log_every=1, progress=False, tensorboard=False, plot=False, save_final=False,
                      out_dir=tmp_path / "run")
    result = run_training(model, train_data=source, loss_fn=loss_fn, cfg=cfg, save_fn=save)
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 12
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    assert losses[-1] < 0.5 * losses[0], losses
    assert loss_fn.last_metrics["reward_accuracy"] == 1.0


def test_preference_source_resumes_at_the_same_batch():
    pairs = preference_pairs(5)
    a = PreferenceBatchSource(pairs, 16, 2, seed=3)
    it = iter(a)
    first = [next(it) for _ in range(4)]
    b = PreferenceBatchSource(pairs, 16, 2, seed=3)
    b.load_state_dict({"batches": 2})
    resumed = next(iter(b))
    assert torch.equal(resumed["input_ids"], first[2]["input_ids"])


def test_bad_preference_records_name_the_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "hi", "chosen": "a"}\n')
    with pytest.raises(FormatError, match=r"prefs.jsonl:2: missing field 'rejected'"):
        load_preferences(path, tokenizer=None, chat_template=None)
