"""The report's yardsticks: the static frontier, the frontier comparison and the oracle."""

from __future__ import annotations

import numpy as np
import pytest

from dynaroute.router.replay import SubnetOutputs
from dynaroute.training.report import frontier_check, oracle, static_frontier

STATIC = [
    {"name": "a", "flops": 10, "val_accuracy": 0.91, "test_accuracy": 0.90},
    {"name": "b", "flops": 20, "val_accuracy": 0.95, "test_accuracy": 0.95},
    {"name": "c", "flops": 30, "val_accuracy": 0.93, "test_accuracy": 0.93},  # dominated
    {"name": "d", "flops": 100, "val_accuracy": 0.96, "test_accuracy": 0.97},
]


def test_static_frontier_keeps_the_subnets_that_beat_every_cheaper_one() -> None:
    assert [r["name"] for r in static_frontier(STATIC)] == ["a", "b", "d"]


def test_static_frontier_is_chosen_on_validation_not_on_the_test_split() -> None:
    # "c" is lucky on test: a user choosing a subnet by validation would never pick it
    lucky = [*STATIC[:2], {**STATIC[2], "test_accuracy": 0.99}, STATIC[3]]
    assert [r["name"] for r in static_frontier(lucky)] == ["a", "b", "d"]
    assert [r["name"] for r in static_frontier(lucky, key="test_accuracy")] == ["a", "b", "c"]


def test_frontier_check_compares_best_accuracy_within_each_flops_level() -> None:
    above = [{"mean_flops": 12, "accuracy": 0.95}, {"mean_flops": 40, "accuracy": 0.97}]
    check = frontier_check(above, static_frontier(STATIC), 10, 100)
    assert check["ok"] and check["strict_ok"] and check["from_flops"] == 12 and check["worst_gap"] == 0.0
    # Below the static frontier between 40 and 100 FLOPs: the full subnet's 0.97 is never reached.
    below = [{"mean_flops": 12, "accuracy": 0.95}, {"mean_flops": 40, "accuracy": 0.96}]
    check = frontier_check(below, static_frontier(STATIC), 10, 100)
    assert not check["ok"] and check["worst_gap"] == pytest.approx(-0.01) and check["worst_at_flops"] == 100
    assert frontier_check(below, static_frontier(STATIC), 10, 100, tolerance=0.01)["ok"]


def test_oracle_takes_the_cheapest_correct_subnet_per_example() -> None:
    rows = [{"name": "w0.5-d1-p0", "flops": 10, "exit_flops": [10]}, {"name": "w1-d1-p0", "flops": 100,
                                                                      "exit_flops": [100]}]
    # example 0: small right; 1: only big right; 2: neither (counted wrong, at the cheapest cost)
    small = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])
    big = np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1]])
    o = oracle(SubnetOutputs({"w0.5-d1-p0": small, "w1-d1-p0": big}, rows), np.array([0, 1, 1]), full_flops=100)
    assert o["accuracy"] == pytest.approx(2 / 3)
    assert o["mean_flops"] == pytest.approx((10 + 100 + 10) / 3)
    assert o["flops_ratio"] == pytest.approx(o["mean_flops"] / 100)
