"""Calibration: replaying routes, sweeping thresholds, and solving each kind of budget."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from dynaroute.errors import InvalidInputError
from dynaroute.router.budget import Budget
from dynaroute.router.calibration import (
    AUTO,
    CalibrationTable,
    OperatingPoint,
    calibrate,
    choose_cascade,
    default_thresholds,
    expected_cost,
)
from dynaroute.router.policy import Route
from dynaroute.router.replay import SubnetOutputs

ROWS = [
    {"name": "w0.5-d1-p0", "flops": 10, "exit_flops": [10]},
    {"name": "w0.5-d2-p0", "flops": 30, "exit_flops": [12, 34]},
    {"name": "w1-d1-p0", "flops": 20, "exit_flops": [20]},
    {"name": "w1-d2-p0", "flops": 100, "exit_flops": [22, 104]},
]


def outputs_of(per_subnet: dict[str, list[float]]) -> SubnetOutputs:
    """Two classes; each subnet's P(class 0) per example."""
    return SubnetOutputs({n: np.array([[p, 1 - p] for p in ps]) for n, ps in per_subnet.items()}, ROWS)


def test_replay_early_exit_and_escalation_pay_the_measured_exit_flops() -> None:
    out = outputs_of({"w0.5-d1-p0": [0.99, 0.6], "w0.5-d2-p0": [0.5, 0.7], "w1-d1-p0": [0.9, 0.95],
                      "w1-d2-p0": [0.9, 0.99]})
    cascade = Route(("w0.5-d2-p0",), (1.0,), escalation=("w1-d2-p0",), confidence_bound=0.9)
    easy = out.replay(cascade, 0)  # confident at the first exit of w0.5-d2
    assert (easy.flops, easy.escalations, easy.exit_depths) == (12, 0, (1,))
    assert easy.probs[0] == pytest.approx(0.99)
    hard = out.replay(cascade, 1)  # w0.5-d2 never confident: all of it, then w1-d2's first exit
    assert (hard.flops, hard.escalations, hard.exit_depths) == (34 + 22, 1, (1,))
    assert hard.probs[0] == pytest.approx(0.95)
    full = out.replay(Route(("w1-d2-p0",), (1.0,)), 1)  # no bound: no early exit, no exit heads on the way
    assert (full.flops, full.exit_depths) == (100, (2,))
    # from exit 2 on, the easy input passes its confident first exit by and pays all of w0.5-d2
    passed = out.replay(Route(("w0.5-d2-p0",), (1.0,), escalation=("w1-d2-p0",), confidence_bound=0.9,
                              first_exit=2), 0)
    assert (passed.flops, passed.escalations, passed.exit_depths) == (34 + 104, 1, (2,))


def test_replaying_many_rows_at_once_matches_one_at_a_time() -> None:
    rng = np.random.default_rng(0)
    out = SubnetOutputs({n: (lambda p: np.stack([p, 1 - p], 1))(rng.uniform(0, 1, 50)) for n in
                         ("w0.5-d1-p0", "w0.5-d2-p0", "w1-d1-p0", "w1-d2-p0")}, ROWS)
    rows = np.arange(50)
    routes = [Route(("w0.5-d2-p0",), (1.0,), escalation=("w1-d1-p0", "w1-d2-p0"), confidence_bound=0.8, first_exit=f)
              for f in (1, 2)] + [Route(("w0.5-d1-p0", "w1-d2-p0"), (0.3, 0.7)), Route(("w1-d2-p0",), (1.0,))]
    for route in routes:
        many = out.replay_rows(route, rows)
        for i in rows:
            one = out.replay(route, int(i))
            np.testing.assert_allclose(many.probs[i], one.probs)
            assert (many.flops[i], many.escalations[i]) == (one.flops, one.escalations)


def test_replay_mixes_branches_like_logits() -> None:
    out = outputs_of({"w0.5-d1-p0": [0.8], "w0.5-d2-p0": [0.5], "w1-d1-p0": [0.2], "w1-d2-p0": [0.5]})
    mixed = out.replay(Route(("w0.5-d1-p0", "w1-d1-p0"), (0.5, 0.5)), 0)
    assert mixed.flops == 30
    # logits log(.8/.2) and log(.2/.8) cancel at equal weights
    assert mixed.probs[0] == pytest.approx(0.5)


def test_calibrate_finds_the_threshold_that_sends_only_hard_inputs_to_a_larger_subnet() -> None:
    # 8 easy inputs the smallest subnet gets right, 2 hard ones it gets wrong; the router knows which.
    n_easy, n_hard = 8, 2
    small = [0.9] * n_easy + [0.3] * n_hard
    out = outputs_of({"w0.5-d1-p0": small, "w0.5-d2-p0": small, "w1-d1-p0": [0.9] * 10, "w1-d2-p0": [0.9] * 10})
    labels = np.zeros(10, dtype=np.int64)
    correct_prob = np.array([[0.95, 0.95, 0.97, 0.99]] * n_easy + [[0.1, 0.1, 0.97, 0.99]] * n_hard)
    gate = np.ones((10, 1))
    table = calibrate(correct_prob, gate, out, labels, router_flops=1, full_flops=100,
                      policies={"threshold": {}, "cascade": {}})
    points = table.table("threshold")
    assert points[0].accuracy == pytest.approx(0.8) and points[0].mean_flops == pytest.approx(10 + 1)
    best = points[-1]
    assert best.accuracy == 1.0
    assert best.mean_flops == pytest.approx((n_easy * 10 + n_hard * 20) / 10 + 1)  # router included
    assert best.flops_ratio == pytest.approx(best.mean_flops / 100)
    # Pareto-monotone: accuracy strictly rises with FLOPs, quality runs 0..1
    assert all(a.accuracy < b.accuracy and a.mean_flops <= b.mean_flops for a, b in itertools.pairwise(points))
    assert points[0].quality == 0.0 and points[-1].quality == 1.0
    assert table.solve(Budget(quality=1.0)).point.accuracy == 1.0


def test_quality_1_is_never_below_the_full_model_even_where_a_cheap_subnet_ties_it_by_luck() -> None:
    # On these 40 rows the cheap subnet is right wherever the full model is (36 of 40), but
    # barely: 0.55 on the true class against the full model's 0.95. Its accuracy ties the full
    # model's; its assured accuracy does not, so quality 1 is the full model, not the cheap tie.
    n = 40
    right = np.arange(n) >= 4
    cheap = np.where(right, 0.55, 0.45)
    full = np.where(right, 0.95, 0.3)
    out = outputs_of({"w0.5-d1-p0": cheap, "w0.5-d2-p0": cheap, "w1-d1-p0": cheap, "w1-d2-p0": full})
    labels = np.zeros(n, dtype=np.int64)
    correct_prob = np.tile([0.9, 0.9, 0.9, 0.9], (n, 1))
    table = calibrate(correct_prob, np.ones((n, 1)), out, labels, router_flops=1, full_flops=100,
                      policies={"threshold": {}})
    cheap_point = table.table("threshold")[0]
    assert cheap_point.accuracy == pytest.approx(0.9) and cheap_point.mean_flops == 11
    assert cheap_point.assured < 0.9
    top = table.solve(Budget(quality=1.0)).point
    assert (top.policy, top.accuracy, top.assured) == ("static", pytest.approx(0.9), pytest.approx(0.9))
    bottom = table.solve(Budget(quality=0.0)).point
    assert (bottom.policy, bottom.mean_flops) == ("threshold", 11)
    # target_accuracy and max_flops read the measured accuracy: the cheap point reaches 0.9
    assert table.solve(Budget(target_accuracy=0.9)).point.mean_flops == 11


def test_quality_1_takes_a_cheaper_point_that_answers_as_the_full_model_does() -> None:
    n = 40
    full = np.where(np.arange(n) >= 4, 0.95, 0.3)
    out = outputs_of({"w0.5-d1-p0": 1 - full, "w0.5-d2-p0": 1 - full, "w1-d1-p0": full, "w1-d2-p0": full})
    correct_prob = np.tile([0.1, 0.1, 0.9, 0.9], (n, 1))
    table = calibrate(correct_prob, np.ones((n, 1)), out, np.zeros(n, dtype=np.int64), router_flops=1,
                      full_flops=100, policies={"threshold": {}})
    top = table.solve(Budget(quality=1.0)).point
    assert (top.policy, top.mean_flops, top.assured) == ("threshold", 21, pytest.approx(0.9))


POINTS = [
    OperatingPoint("threshold", 0.0, 0.90, 10, 0.1),
    OperatingPoint("threshold", 0.5, 0.95, 20, 0.2),
    OperatingPoint("threshold", 0.8, 0.99, 50, 0.5),
    OperatingPoint("threshold", 0.9, 1.00, 100, 1.0),
    OperatingPoint("threshold", 0.95, 0.98, 120, 1.2),  # dominated: dropped
]


@pytest.fixture
def table() -> CalibrationTable:
    cascade = [OperatingPoint("cascade", 0.9, 0.97, 15, 0.15)]
    return CalibrationTable({"threshold": POINTS, "cascade": cascade}, {"cascade": {"start_threshold": 0.5}},
                            full_flops=100, router_flops=1)


def test_quality_maps_to_the_cheapest_point_reaching_its_share_of_the_accuracy_range(table: CalibrationTable) -> None:
    solve = table.solve
    assert [p.threshold for p in table.table("threshold")] == [0.0, 0.5, 0.8, 0.9]
    assert solve(Budget(quality=0.0, policy="threshold")).point.accuracy == 0.90
    assert solve(Budget(quality=1.0, policy="threshold")).point.accuracy == 1.00
    assert solve(Budget(quality=0.5, policy="threshold")).point.accuracy == 0.95  # target exactly 0.95
    assert solve(Budget(quality=0.6, policy="threshold")).point.accuracy == 0.99  # target 0.96
    assert solve(Budget(), default_quality=0.0).point.accuracy == 0.90  # no budget: the server's default


def test_max_flops_gets_the_most_accurate_point_that_fits(table: CalibrationTable) -> None:
    r = table.solve(Budget(max_flops=60, policy="threshold"))
    assert r.reachable and r.point.mean_flops == 50
    low = table.solve(Budget(max_flops=5, policy="threshold"))
    assert not low.reachable and low.point.mean_flops == 10 and "below the cheapest" in low.note


def test_target_accuracy_gets_the_cheapest_point_that_reaches_it(table: CalibrationTable) -> None:
    r = table.solve(Budget(target_accuracy=0.96, policy="threshold"))
    assert r.reachable and r.point.accuracy == 0.99 and r.point.mean_flops == 50
    assert table.solve(Budget(target_accuracy=1.0, policy="threshold")).point.mean_flops == 100


def test_unreachable_target_accuracy_falls_back_to_the_most_accurate_point_and_says_so() -> None:
    t = CalibrationTable({"threshold": POINTS[:3]}, {}, full_flops=100, router_flops=1)
    r = t.solve(Budget(target_accuracy=0.999))
    assert not r.reachable and r.point.accuracy == 0.99 and "above the best" in r.note


def test_auto_table_merges_policies_and_takes_the_better_one_at_each_cost(table: CalibrationTable) -> None:
    auto = table.table(None)
    assert table.default_policy == AUTO
    assert [(p.policy, p.accuracy) for p in auto] == [
        ("threshold", 0.90), ("cascade", 0.97), ("threshold", 0.99), ("threshold", 1.00)]
    assert table.solve(Budget(max_flops=40)).point.policy == "cascade"


def test_bad_budgets_are_input_errors(table: CalibrationTable) -> None:
    with pytest.raises(InvalidInputError, match="unknown policy 'greedy'"):
        table.solve(Budget(quality=0.5, policy="greedy"))
    with pytest.raises(InvalidInputError, match="topk"):  # not calibrated in this bundle
        table.solve(Budget(policy="topk"))
    with pytest.raises(InvalidInputError, match="pins a subnet"):
        table.solve(Budget(subnet="w1-d2-p0"))
    with pytest.raises(InvalidInputError, match="quality must be in"):
        Budget(quality=1.5)
    with pytest.raises(InvalidInputError, match="at most one"):
        Budget(quality=0.5, max_flops=10)
    with pytest.raises(InvalidInputError, match="max_flops"):
        Budget(max_flops=-1)


def test_the_table_survives_the_manifest_round_trip(table: CalibrationTable) -> None:
    d = json.loads(json.dumps(table.to_dict()))
    again = CalibrationTable.from_dict(d)
    assert again.tables == table.tables and again.options == table.options
    assert [b["budget"] for b in d["budgets"]] == [0, 0.25, 0.5, 0.75, 1]
    for q in (0.0, 0.3, 0.7, 1.0):
        assert again.solve(Budget(quality=q)) == table.solve(Budget(quality=q))


CASCADE_BOUNDS = default_thresholds("cascade", np.zeros((1, 1)))


def test_cascade_ladder_is_the_cheapest_sub_ladder_reaching_the_target() -> None:
    # 8 easy inputs w0.5-d1 answers confidently; 2 hard ones it and w0.5-d2 get wrong, w1-d1 right
    out = outputs_of({"w0.5-d1-p0": [0.99] * 8 + [0.4] * 2, "w0.5-d2-p0": [0.99] * 8 + [0.45] * 2,
                      "w1-d1-p0": [0.99] * 10, "w1-d2-p0": [0.99] * 10})
    labels = np.zeros(10, dtype=np.int64)
    scores = np.full((10, 4), 0.9), np.ones((10, 1))
    frontier = ["w0.5-d1-p0", "w0.5-d2-p0", "w1-d1-p0", "w1-d2-p0"]
    # escalating through w0.5-d2 or on to w1-d2 would pay for rungs that do not help
    chosen = choose_cascade(*scores, out, labels, frontier, "w1-d2-p0", 0.0, CASCADE_BOUNDS)
    assert chosen == {"ladder": ["w0.5-d1-p0", "w1-d1-p0"], "first_exit": 1}
    # no cascade reaches the full model's accuracy for less than the full model: the whole frontier
    wrong = outputs_of({n: [0.3] * 10 for n in frontier[:-1]} | {"w1-d2-p0": [0.99] * 10})
    assert choose_cascade(*scores, wrong, labels, frontier, "w1-d2-p0", 0.0, CASCADE_BOUNDS) == {
        "ladder": frontier, "first_exit": 1}


def test_cascade_passes_by_a_first_exit_that_is_confidently_wrong() -> None:
    # w0.5-d2's first exit (w0.5-d1) says class 0 at 0.95 for every input, wrongly for the 2 hard
    # ones; its last exit is right on all (the hard ones at 0.9). A bound above 0.95 would send every
    # input on to exit 2 and the hard ones up the ladder: from exit 2 on, w0.5-d2 alone is right.
    labels = np.array([0] * 8 + [1] * 2)
    out = outputs_of({"w0.5-d1-p0": [0.95] * 10, "w0.5-d2-p0": [0.99] * 8 + [0.1] * 2,
                      "w1-d1-p0": [0.99] * 8 + [0.5] * 2, "w1-d2-p0": [0.99] * 8 + [0.01] * 2})
    scores = np.full((10, 4), 0.9), np.ones((10, 1))
    frontier = ["w0.5-d1-p0", "w0.5-d2-p0", "w1-d2-p0"]
    chosen = choose_cascade(*scores, out, labels, frontier, "w1-d2-p0", 0.0, CASCADE_BOUNDS)
    assert chosen == {"ladder": ["w0.5-d2-p0", "w1-d2-p0"], "first_exit": 2}
    table = calibrate(*scores, out, labels, 1, 100, {"cascade": chosen})
    point = table.solve(Budget(target_accuracy=1.0)).point
    assert point.accuracy == 1.0 and point.mean_flops == 34 + 1  # all of w0.5-d2, nothing more


def test_expected_cost_prefers_a_margin_over_a_curve_that_only_touches_the_target() -> None:
    # the reference is right on rows 0..89. "touch" is right on 90 rows too, but not the same ones,
    # at 30 FLOPs; "margin" is right on rows 0..91 at 40. On these rows touch is cheaper; over
    # resamples of them it misses the target about half the time and then costs the fallback.
    n = 100
    reference = np.arange(n) < 90
    touch = np.arange(n) >= 10
    margin = np.arange(n) < 92
    draws = np.stack([np.bincount(np.random.default_rng(s).integers(0, n, n), minlength=n) for s in range(200)])
    cost = {name: expected_cost(c[None, :], np.full((1, n), f, dtype=np.float64), reference, 0.0, 100.0,
                                draws.astype(np.float64))
            for name, c, f in (("touch", touch, 30.0), ("margin", margin, 40.0))}
    assert cost["margin"] == pytest.approx(40.0)
    assert cost["touch"] > 50.0


def test_cascade_start_threshold_is_searched_when_asked_and_skipping_the_first_rung_can_lose() -> None:
    # The router says rung 0 fails every input (0.1), so start_threshold 0.5 starts them all at
    # w1-d2; in fact w0.5-d1 answers 8 of 10 confidently and rightly: starting everyone at the
    # cheapest rung (start_threshold 0) reaches the full model's accuracy for less.
    out = outputs_of({"w0.5-d1-p0": [0.99] * 8 + [0.4] * 2, "w0.5-d2-p0": [0.99] * 8 + [0.45] * 2,
                      "w1-d1-p0": [0.99] * 10, "w1-d2-p0": [0.99] * 10})
    labels = np.zeros(10, dtype=np.int64)
    scores = np.tile([0.1, 0.1, 0.9, 0.9], (10, 1)), np.ones((10, 1))
    frontier = ["w0.5-d1-p0", "w1-d1-p0"]
    fixed = choose_cascade(*scores, out, labels, frontier, "w1-d2-p0", 0.0, CASCADE_BOUNDS)
    assert "start_threshold" not in fixed
    searched = choose_cascade(*scores, out, labels, frontier, "w1-d2-p0", 0.0, CASCADE_BOUNDS,
                              start_thresholds=[0.5, 0.0])
    assert searched == {"ladder": frontier, "first_exit": 1, "start_threshold": 0.0}
    cost = {}
    for name, opts in (("fixed", fixed), ("searched", searched)):
        table = calibrate(*scores, out, labels, 1, 100, {"cascade": {"start_threshold": 0.5, **opts}})
        cost[name] = table.solve(Budget(target_accuracy=1.0)).point.mean_flops
    assert cost["searched"] < cost["fixed"]
