"""acc, acc_norm, mc2 and stderr arithmetic on hand-made log-likelihoods."""

from __future__ import annotations

import math

import pytest

from llamaworks.eval import metrics
from llamaworks.eval.runner import aggregate_groups, leaderboard_summary
from llamaworks.eval.task import Task


def test_acc_and_acc_norm_disagree_when_lengths_differ():
    lls = [-6.0, -8.0, -9.0]
    choices = ["ab", "abcdefgh", "abcdefghijkl"]  # -6/2 = -3, -8/8 = -1, -9/12 = -0.75 -> norm picks index 2
    assert metrics.acc(lls, 0) == 1.0
    assert metrics.acc_norm(lls, choices, 0) == 0.0
    assert metrics.acc_norm(lls, choices, 2) == 1.0
    # The normaliser is the choice text without the target delimiter: " ab" would change nothing here, but
    # len("x")=1 vs len("yy")=2 with lls -1.5/-2.8 -> -1.5 vs -1.4 -> index 1.
    assert metrics.acc_norm([-1.5, -2.8], ["x", "yy"], 1) == 1.0
    assert metrics.acc_norm([-1.5, -2.8], [" x", " yy"], 1) == 0.0  # -0.75 vs -0.933: with spaces, index 0


def test_ties_go_to_the_first_choice_like_numpy_argmax():
    assert metrics.acc([-1.0, -1.0, -2.0], 0) == 1.0
    assert metrics.acc([-1.0, -1.0, -2.0], 1) == 0.0


def test_mc2_is_the_normalised_probability_mass_of_true_answers():
    lls = [math.log(0.2), math.log(0.1), math.log(0.05), math.log(0.15)]
    # probabilities 0.2, 0.1, 0.05, 0.15 (sum 0.5) -> normalised 0.4, 0.2, 0.1, 0.3; true are 0 and 3
    assert metrics.mc2(lls, [1, 0, 0, 1]) == pytest.approx(0.7, abs=1e-12)
    assert metrics.mc2(lls, [0, 1, 0, 0]) == pytest.approx(0.2, abs=1e-12)
    assert metrics.mc2([-1000.0, -1001.0], [1, 0]) == pytest.approx(1 / (1 + math.exp(-1)), rel=1e-9)  # no underflow


def test_mean_stderr_uses_sample_standard_deviation():
    values = [1.0, 0.0, 1.0, 1.0]
    # mean 0.75; squared deviations 0.0625, 0.5625, 0.0625, 0.0625 = 0.75; /(n-1) = 0.25; sd 0.5; /sqrt(4) = 0.25
    assert metrics.mean(values) == 0.75
    assert metrics.mean_stderr(values) == pytest.approx(0.25)
    assert math.isnan(metrics.mean_stderr([1.0]))


def test_pooled_and_unweighted_group_stderr():
    # two subtasks: n=4, se=0.25 and n=2, se=0.5 -> pooled var = (3*0.0625*4 + 1*0.25*2) / (6-2) = 1.25/4
    assert metrics.pooled_stderr([0.25, 0.5], [4, 2]) == pytest.approx(math.sqrt(1.25 / 4 / 6))
    assert metrics.unweighted_stderr([0.3, 0.4]) == pytest.approx(0.25)  # sqrt(0.09 + 0.16) / 2
    # a one-item subtask (stderr undefined) adds no variance term but counts in the sizes
    assert metrics.pooled_stderr([0.25, float("nan")], [4, 1]) == pytest.approx(math.sqrt(3 * 0.0625 * 4 / 3 / 5))


def test_mmlu_group_is_size_weighted_and_leaderboard_uses_subject_mean():
    tasks = [Task(name="mmlu_a", docs=[], group="mmlu"), Task(name="mmlu_b", docs=[], group="mmlu")]
    results = {"mmlu_a": {"acc": 0.5, "acc_stderr": 0.25, "n": 4, "num_fewshot": 5},
               "mmlu_b": {"acc": 1.0, "acc_stderr": 0.0, "n": 2, "num_fewshot": 5}}
    groups = aggregate_groups(results, tasks)
    assert groups["mmlu"]["acc"] == pytest.approx((0.5 * 4 + 1.0 * 2) / 6)
    assert groups["mmlu"]["acc_subject_mean"] == pytest.approx(0.75)
    results.update({"arc_challenge": {"acc": 0.2, "acc_norm": 0.3}, "hellaswag": {"acc": 0.4, "acc_norm": 0.5},
                    "truthfulqa_mc2": {"acc": 0.45}})
    board = leaderboard_summary(results, groups)
    assert board["scores"]["arc_challenge"]["value"] == 0.3  # acc_norm
    assert board["scores"]["hellaswag"]["value"] == 0.5  # acc_norm
    assert board["scores"]["mmlu"]["value"] == 0.75  # unweighted mean of subjects
    assert board["scores"]["truthfulqa_mc2"]["value"] == 0.45  # mc2
    assert board["average"] == pytest.approx((0.3 + 0.5 + 0.75 + 0.45) / 4)
    del results["hellaswag"]
    assert leaderboard_summary(results, groups)["average"] is None  # incomplete set: no average
