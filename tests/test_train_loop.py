"""The shared training loop: schedule, optimizer groups, accumulation, checkpoints, SIGKILL + resume, metrics."""

from __future__ import annotations

import csv
import itertools
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llamaworks.config import get_preset
from llamaworks.data.loader import Example, ExampleBatchSource, TokenWindowSource
from llamaworks.model import Transformer
from llamaworks.train.checkpointing import list_checkpoints
from llamaworks.train.loop import TrainConfig, build_optimizer, lr_at, run_training
from llamaworks.train.metrics import flops_per_token, matmul_params

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, vocab: int = 64) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(get_preset("tiny-llama2").replace(vocab_size=vocab))
    m.reset_parameters()
    return m


def pattern_tokens(n: int, vocab: int = 64, seed: int = 0) -> np.ndarray:
    """A stream where each token mostly follows from the previous one (learnable, not trivial)."""
    rng = np.random.default_rng(seed)
    nxt = rng.permutation(vocab)
    out = np.empty(n, dtype=np.uint16)
    out[0] = 0
    for i in range(1, n):
        out[i] = nxt[out[i - 1]] if rng.random() < 0.8 else rng.integers(vocab)
    return out


def save_state_dict(model, directory: Path) -> None:
    torch.save(model.state_dict(), directory / "model.pt")


def read_metrics(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway through the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_optimizer_decays_matrices_only_and_skips_frozen():
    m = tiny_model()
    m.tok_embeddings.weight.requires_grad_(False)
    opt = build_optimizer(m, TrainConfig(weight_decay=0.1, betas=(0.9, 0.95)))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(m.tok_embeddings.weight) not in ids
    assert len(ids) == sum(1 for p in m.parameters() if p.requires_grad)
    assert opt.defaults["betas"] == (0.9, 0.95)


def _sft_examples(n: int, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(4, 20))
        ids = rng.integers(0, 64, length).tolist()
        prompt = int(rng.integers(1, length - 1))
        out.append(Example(ids, [False] * prompt + [True] * (length - prompt)))
    return out


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    """8 examples in one micro-batch vs 4 + 4 accumulated: the same update, although the micro-batches hold
    different numbers of target tokens (the loss is normalised by the step's token count)."""
    examples = _sft_examples(16)
    results = []
    for mb, accum in ((8, 1), (4, 2), (2, 4)):
        m = tiny_model()
        src = ExampleBatchSource(examples, 32, mb, pack=False, shuffle=False)
        cfg = TrainConfig(lr=1e-2, warmup_steps=0, max_steps=1, micro_batch_size=mb, grad_accum_steps=accum,
                          out_dir=tmp_path / f"r{mb}", progress=False, tensorboard=False, plot=False,
                          save_final=False, grad_clip=0)
        r = run_training(m, train_data=src, cfg=cfg, save_fn=save_state_dict)
        results.append((r.train_loss, torch.cat([p.detach().flatten() for p in m.parameters()])))
    for loss, params in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        # Adam's first step is ~lr * sign(grad): elements whose gradient is ~0 may differ by rounding only.
        torch.testing.assert_close(params, results[0][1], rtol=0, atol=5e-5)


def test_checkpoints_keep_last_metrics_and_artifacts(tmp_path):
    m = tiny_model()
    tokens = pattern_tokens(20000)
    train = TokenWindowSource([tokens[:16000]], 32, 8, seed=0)
    val = TokenWindowSource([tokens[16000:]], 32, 8, shuffle=False)
    out = tmp_path / "run"
    cfg = TrainConfig(lr=3e-3, warmup_steps=5, max_steps=40, eval_every=20, eval_batches=4, save_every=10,
                      keep_last=2, log_every=5, out_dir=out, progress=False)
    r = run_training(m, train_data=train, val_data=val, cfg=cfg, save_fn=save_state_dict)
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [30, 40]
    assert not list((out / "checkpoints").glob("*.tmp"))
    last = out / "checkpoints" / "step-000040"
    for name in ("model.pt", "trainer_state.pt", "trainer_state.json", "rank0.pt"):
        assert (last / name).exists(), name
    assert (out / "final" / "model.pt").exists()
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    rows = read_metrics(out)
    assert [int(r["step"]) for r in rows] == list(range(5, 41, 5))
    assert [r["step"] for r in rows if r["val_loss"]] == ["20", "40"]
    # It learned: the pattern has ~0.8 probability of the next token, far below log(64) = 4.16.
    assert r.val_loss < 2.5 and r.val_ppl == pytest.approx(math.exp(r.val_loss))
    assert float(rows[-1]["tokens_per_s"]) > 0 and 0 < float(rows[-1]["mfu"]) < 1
    assert r.tokens == 40 * 8 * 32
    # The saved model is the trained one.
    sd = torch.load(out / "final" / "model.pt", weights_only=True)
    torch.testing.assert_close(sd["norm.weight"], m.norm.weight.detach())


def test_frozen_parameters_and_custom_loss(tmp_path):
    m = tiny_model()
    for name, p in m.named_parameters():
        p.requires_grad_(name.startswith("layers.1."))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    calls = []

    def loss_fn(model, batch):
        calls.append(batch["input_ids"].shape)
        logits = model(batch["input_ids"])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    src = TokenWindowSource([pattern_tokens(4000)], 16, 4)
    cfg = TrainConfig(lr=1e-2, warmup_steps=0, max_steps=3, grad_accum_steps=2, out_dir=tmp_path, progress=False,
                      tensorboard=False, plot=False)
    run_training(m, train_data=src, loss_fn=loss_fn, cfg=cfg, save_fn=save_state_dict)
    assert len(calls) == 6
    for n, p in m.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == n.startswith("layers.1."), n
    state = torch.load(tmp_path / "checkpoints" / "step-000003" / "trainer_state.pt", weights_only=True)
    assert set(state["trainable"]) == {n for n in before if n.startswith("layers.1.")}


def test_activation_checkpointing_same_result(tmp_path):
    losses = []
    for ac in (False, True):
        m = tiny_model()
        src = TokenWindowSource([pattern_tokens(4000)], 16, 4)
        cfg = TrainConfig(lr=1e-2, warmup_steps=0, max_steps=3, out_dir=tmp_path / str(ac), progress=False,
                          tensorboard=False, plot=False, save_final=False, activation_checkpointing=ac, log_every=1)
        run_training(m, train_data=src, cfg=cfg, save_fn=save_state_dict)
        assert m.activation_checkpointing is ac
        losses.append([float(r["loss"]) for r in read_metrics(tmp_path / str(ac))])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_bf16_autocast_trains(tmp_path):
    m = tiny_model()
    src = TokenWindowSource([pattern_tokens(8000)], 32, 8)
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=20, precision="bf16", out_dir=tmp_path, progress=False,
                      tensorboard=False, plot=False, log_every=5)
    r = run_training(m, train_data=src, cfg=cfg, save_fn=save_state_dict)
    rows = read_metrics(tmp_path)
    assert m.norm.weight.dtype == torch.float32  # master weights stay fp32
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"]) and math.isfinite(r.train_loss)


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = get_preset("tiny-llama2")
    m = Transformer(cfg)
    per_layer = 4 * 64 * 64 + 3 * 64 * 172
    assert matmul_params(m) == 2 * per_layer + 256 * 64  # embeddings excluded, untied output counted
    assert flops_per_token(m, 100) == 6 * matmul_params(m) + 12 * 2 * 4 * 16 * 100
    tied = Transformer(get_preset("tiny-tied"))
    assert matmul_params(tied) == 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 160) + 256 * 64


CHILD = textwrap.dedent("""
    import os, sys, time
    import numpy as np, torch
    sys.path.insert(0, {tests!r})
    from test_train_loop import tiny_model, pattern_tokens, save_state_dict
    from llamaworks.data.loader import TokenWindowSource
    from llamaworks.train.loop import TrainConfig, run_training

    torch.set_num_threads(1)
    out, resume, slow = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])

    class Slow(TokenWindowSource):
        def __iter__(self):
            for batch in super().__iter__():
                time.sleep(slow)  # gives the test time to kill the run between checkpoints
                yield batch

    tokens = pattern_tokens(20000)
    train = Slow([tokens[:16000]], 32, 4, seed=3)
    val = TokenWindowSource([tokens[16000:]], 32, 4, shuffle=False)
    cfg = TrainConfig(lr=3e-3, warmup_steps=4, max_steps=24, grad_accum_steps=2, eval_every=6, eval_batches=2,
                      save_every=5, keep_last=3, log_every=1, out_dir=out, progress=False, seed=7)
    # Dropout-free model: make the RNG matter anyway, so restoring it is tested.
    def loss_fn(model, batch):
        from llamaworks.train.loop import causal_lm_loss
        noise = torch.rand(()) * 1e-3
        return causal_lm_loss(model, batch) + noise
    run_training(tiny_model(seed=1), train_data=train, val_data=val, loss_fn=loss_fn, cfg=cfg,
                 save_fn=save_state_dict, resume=resume)
""")


def _child(script: Path, out: Path, resume: bool, slow: float) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    return subprocess.Popen([sys.executable, str(script), str(out), "1" if resume else "0", str(slow)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_and_resume_reproduces_uninterrupted_run(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    reference = _child(script, tmp_path / "ref", False, 0.0)
    killed_dir = tmp_path / "killed"
    victim = _child(script, killed_dir, False, 0.15)
    # Kill it hard between checkpoints: after step 12 is logged (last checkpoint: step 10).
    deadline = time.time() + 120
    while time.time() < deadline:
        rows = read_metrics(killed_dir) if (killed_dir / "metrics.csv").exists() else []
        if rows and int(rows[-1]["step"]) >= 12:
            break
        assert victim.poll() is None, victim.stdout.read()
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = int(read_metrics(killed_dir)[-1]["step"])
    assert killed_at < 24
    last_ckpt = max(s for s, _ in list_checkpoints(killed_dir / "checkpoints"))
    assert last_ckpt < killed_at  # some steps after the checkpoint were lost and must be redone
    resumed = _child(script, killed_dir, True, 0.0)
    out, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, out
    assert "resumed from" in out and f"at step {last_ckpt}" in out
    ref_out, _ = reference.communicate(timeout=180)
    assert reference.returncode == 0, ref_out

    ref_rows, got_rows = read_metrics(tmp_path / "ref"), read_metrics(killed_dir)
    assert [r["step"] for r in got_rows] == [r["step"] for r in ref_rows] == [str(s) for s in range(1, 25)]
    assert [r["step"] for r in ref_rows if r["val_loss"]] == ["6", "12", "18", "24"]  # eval_every=6
    for ref, got in zip(ref_rows, got_rows):
        assert float(got["loss"]) == pytest.approx(float(ref["loss"]), rel=1e-6, abs=1e-7), ref["step"]
        assert (got["val_loss"] == "") == (ref["val_loss"] == "")
        if ref["val_loss"]:
            assert float(got["val_loss"]) == pytest.approx(float(ref["val_loss"]), rel=1e-6)
    a = torch.load(tmp_path / "ref" / "final" / "model.pt", weights_only=True)
    b = torch.load(killed_dir / "final" / "model.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
