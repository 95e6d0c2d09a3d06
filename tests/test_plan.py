"""`llamaworks plan`: Chinchilla allocation, the inference-aware alternative, and the time estimate."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llamaworks.cli import main as cli_main
from llamaworks.errors import ConfigError
from llamaworks.plan import (
    chinchilla_loss,
    compute_optimal,
    inference_aware,
    measure_training_flops,
    parse_number,
    tokens_for_loss,
)


def test_compute_optimal_is_20_tokens_per_parameter():
    a = compute_optimal(params=7e9)
    assert a.tokens == pytest.approx(140e9) and a.train_flops == pytest.approx(6 * 7e9 * 140e9)
    b = compute_optimal(flops=a.train_flops)
    assert b.params == pytest.approx(7e9) and b.tokens == pytest.approx(140e9)
    # Chinchilla itself: 70B parameters, 1.4T tokens, ~5.9e23 FLOPs.
    c = compute_optimal(params=70e9)
    assert c.tokens == pytest.approx(1.4e12) and c.train_flops == pytest.approx(5.88e23, rel=1e-3)
    with pytest.raises(ConfigError):
        compute_optimal(params=1e9, flops=1e20)


def test_parametric_loss_and_its_inverse():
    # Hoffmann et al. 2022 eq. 10 with their fitted constants, at Chinchilla's own size.
    expected = 1.69 + 406.4 / 70e9**0.34 + 410.7 / 1.4e12**0.28
    assert chinchilla_loss(70e9, 1.4e12) == pytest.approx(expected)
    assert 1.9 < expected < 2.0
    assert tokens_for_loss(70e9, expected) == pytest.approx(1.4e12, rel=1e-9)
    assert math.isinf(tokens_for_loss(1e6, 2.0))  # a 1M model never reaches loss 2.0


@pytest.mark.parametrize("serve_tokens", [1e12, 1e13])
def test_inference_aware_is_smaller_same_loss_and_cheaper(serve_tokens):
    ref = compute_optimal(params=7e9, inference_tokens=serve_tokens)
    alt = inference_aware(ref, serve_tokens)
    assert alt.loss == pytest.approx(ref.loss, abs=1e-9)
    assert alt.params < ref.params and alt.tokens > ref.tokens
    assert alt.total_flops < ref.total_flops
    # A true minimum of 6ND(N) + 2NT along the equal-loss curve.
    for factor in (0.9, 1.1):
        n = alt.params * factor
        assert 6 * n * tokens_for_loss(n, ref.loss) + 2 * n * serve_tokens > alt.total_flops
    more = inference_aware(compute_optimal(params=7e9), serve_tokens * 10)
    assert more.params < alt.params  # more serving -> an even smaller model


def test_measured_step_gives_a_time_estimate():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = measure_training_flops("tiny-llama2", seq_len=32, batch=2, steps=1)
    finally:
        torch.set_num_threads(old)
    assert m["flops_per_s"] > 1e6 and m["tokens_per_s"] > 0 and m["device"] == "cpu"


def test_cli_plan(capsys):
    assert cli_main(["plan", "--params", "135M", "--inference-tokens", "1T", "--machine-flops", "1e10"]) == 0
    out = capsys.readouterr().out
    assert "compute-optimal (Chinchilla)" in out and "inference-aware" in out and "2.7B" in out
    assert "training time here" in out and "years" in out and "fewer total FLOPs" in out
    assert cli_main(["plan", "--flops", "1e21", "--no-measure", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["compute_optimal"]["params"] == pytest.approx(math.sqrt(1e21 / 120))
    assert "inference_aware" not in result and "machine" not in result
    assert cli_main(["plan", "--params", "lots"]) == 2


def test_parse_number():
    assert parse_number("135M") == 135e6 and parse_number("1.4T") == 1.4e12 and parse_number("7e9") == 7e9
