"""Each routing policy's decisions on hand-made router scores."""

from __future__ import annotations

import numpy as np
import pytest

from dynaroute.errors import InvalidInputError
from dynaroute.router.cascade import pareto_ladder
from dynaroute.router.policy import POLICIES, Route, make_policy

# One path, widths 0.5 / 1, depths 1 / 2, in the bundle's order (path, width, depth).
NAMES = ["w0.5-d1-p0", "w0.5-d2-p0", "w1-d1-p0", "w1-d2-p0"]
FLOPS = [10, 30, 20, 100]
ONE_GATE = np.array([1.0])


def test_registry_holds_the_four_policies_and_refuses_unknown_names() -> None:
    assert set(POLICIES.names()) == {"threshold", "cascade", "topk", "static"}
    with pytest.raises(InvalidInputError, match="unknown policy 'greedy'"):
        make_policy("greedy", NAMES, FLOPS)


def test_threshold_picks_the_cheapest_subnet_whose_predicted_correctness_reaches_it() -> None:
    policy = make_policy("threshold", NAMES, FLOPS)
    scores = np.array([0.6, 0.9, 0.8, 0.99])
    # cheapest first: w0.5-d1 (10) 0.6, w1-d1 (20) 0.8, w0.5-d2 (30) 0.9, w1-d2 (100) 0.99
    assert policy.route(scores, ONE_GATE, 0.5) == Route(("w0.5-d1-p0",), (1.0,), policy="threshold")
    assert policy.route(scores, ONE_GATE, 0.7).subnets == ("w1-d1-p0",)
    assert policy.route(scores, ONE_GATE, 0.85).subnets == ("w0.5-d2-p0",)
    assert policy.route(scores, ONE_GATE, 0.95).subnets == ("w1-d2-p0",)
    route = policy.route(scores, ONE_GATE, 0.95)
    assert route.confidence_bound is None and route.escalation == ()


def test_static_runs_one_subnet_whatever_the_scores_by_default_the_full_model() -> None:
    full = make_policy("static", NAMES, FLOPS)
    for scores in (np.array([0.99, 0.99, 0.99, 0.1]), np.array([0.1, 0.1, 0.1, 0.1])):
        assert full.route(scores, ONE_GATE, 0.5) == Route(("w1-d2-p0",), (1.0,), policy="static")
    assert make_policy("static", NAMES, FLOPS, subnet="w0.5-d2-p0").route(
        np.zeros(4), ONE_GATE, 0.0).subnets == ("w0.5-d2-p0",)
    with pytest.raises(ValueError, match="static option subnet"):
        make_policy("static", NAMES, FLOPS, subnet="w2-d1-p0")


def test_threshold_above_every_score_takes_the_most_trusted_subnet() -> None:
    policy = make_policy("threshold", NAMES, FLOPS)
    assert policy.route(np.array([0.6, 0.97, 0.8, 0.9]), ONE_GATE, 0.99).subnets == ("w0.5-d2-p0",)


def test_cascade_climbs_the_ladder_of_deepest_subnets_with_the_threshold_as_bound() -> None:
    policy = make_policy("cascade", NAMES, FLOPS, start_threshold=0.5)
    route = policy.route(np.array([0.9, 0.9, 0.9, 0.9]), ONE_GATE, 0.95)
    # depth 1 is reached by early exit inside w0.5-d2, so the ladder holds only the deepest subnets
    assert route == Route(("w0.5-d2-p0",), (1.0,), escalation=("w1-d2-p0",), confidence_bound=0.95,
                          policy="cascade")


def test_cascade_starts_higher_when_the_router_expects_the_small_subnets_to_fail() -> None:
    policy = make_policy("cascade", NAMES, FLOPS, start_threshold=0.5)
    route = policy.route(np.array([0.9, 0.2, 0.9, 0.8]), ONE_GATE, 0.9)
    assert route.subnets == ("w1-d2-p0",) and route.escalation == ()
    # nothing reaches the start threshold: start at the top rung
    assert policy.route(np.zeros(4), ONE_GATE, 0.9).subnets == ("w1-d2-p0",)


def test_pareto_ladder_keeps_a_shallow_subnet_that_beats_a_deeper_one_and_drops_dominated_ones() -> None:
    # DynaBERT-like: w1-d1 (20 FLOPs) beats w0.5-d2 (30) and w1-d2 (100) on validation
    accuracy = [0.80, 0.84, 0.90, 0.89]
    assert pareto_ladder(NAMES, FLOPS, accuracy) == ["w0.5-d1-p0", "w1-d1-p0"]
    # each rung strictly more accurate, cheapest first
    assert pareto_ladder(NAMES, FLOPS, [0.80, 0.85, 0.82, 0.95]) == ["w0.5-d1-p0", "w1-d1-p0", "w0.5-d2-p0",
                                                                     "w1-d2-p0"]


def test_cascade_climbs_a_given_ladder_and_refuses_unknown_rungs() -> None:
    policy = make_policy("cascade", NAMES, FLOPS, start_threshold=0.5, ladder=["w0.5-d1-p0", "w1-d1-p0"])
    route = policy.route(np.array([0.9, 0.9, 0.9, 0.9]), ONE_GATE, 0.9)
    assert route == Route(("w0.5-d1-p0",), (1.0,), escalation=("w1-d1-p0",), confidence_bound=0.9,
                          policy="cascade")
    # the router's start threshold skips rungs of the given ladder too
    assert policy.route(np.array([0.1, 0.9, 0.9, 0.9]), ONE_GATE, 0.9).subnets == ("w1-d1-p0",)
    with pytest.raises(ValueError, match="ladder"):
        make_policy("cascade", NAMES, FLOPS, ladder=["w9-d9-p0"])


def test_cascade_carries_its_first_exit_into_every_route() -> None:
    policy = make_policy("cascade", NAMES, FLOPS, first_exit=2)
    assert policy.route(np.array([0.9, 0.9, 0.9, 0.9]), ONE_GATE, 0.9).first_exit == 2
    assert make_policy("cascade", NAMES, FLOPS).route(np.ones(4), ONE_GATE, 0.9).first_exit == 1
    with pytest.raises(ValueError, match="first_exit"):
        make_policy("cascade", NAMES, FLOPS, first_exit=0)


PATH_NAMES = ["w1-d1-p0", "w1-d2-p0", "w1-d1-p1", "w1-d2-p1", "w1-d1-p2", "w1-d2-p2"]
PATH_FLOPS = [10, 40, 10, 40, 10, 40]


def test_topk_runs_the_k_most_weighted_paths_with_renormalised_gate_weights() -> None:
    policy = make_policy("topk", PATH_NAMES, PATH_FLOPS, k=2)
    gate = np.array([0.1, 0.6, 0.3])
    scores = np.array([0.5, 0.9, 0.9, 0.99, 0.8, 0.99])
    route = policy.route(scores, gate, 0.85)
    # paths 1 and 2 at depth 1: weighted score (0.6 * 0.9 + 0.3 * 0.8) / 0.9 = 0.867 >= 0.85
    assert route.subnets == ("w1-d1-p1", "w1-d1-p2")
    assert route.weights == pytest.approx((2 / 3, 1 / 3))
    assert route.policy == "topk" and route.confidence_bound is None
    # a stricter threshold moves both branches to depth 2
    assert policy.route(scores, gate, 0.95).subnets == ("w1-d2-p1", "w1-d2-p2")


def test_topk_follows_the_gate_to_another_path() -> None:
    policy = make_policy("topk", PATH_NAMES, PATH_FLOPS, k=1)
    route = policy.route(np.full(6, 0.9), np.array([0.7, 0.2, 0.1]), 0.5)
    assert route == Route(("w1-d1-p0",), (1.0,), policy="topk")


def test_topk_on_a_single_path_bundle_runs_one_branch() -> None:
    policy = make_policy("topk", NAMES, FLOPS, k=2)
    route = policy.route(np.array([0.6, 0.9, 0.8, 0.99]), ONE_GATE, 0.7)
    assert route.subnets == ("w1-d1-p0",) and route.weights == (1.0,)


def test_cascade_follows_the_gate_to_the_path_it_weighs_most() -> None:
    policy = make_policy("cascade", PATH_NAMES, PATH_FLOPS)
    route = policy.route(np.full(6, 0.9), np.array([0.2, 0.1, 0.7]), 0.9)
    assert route.subnets == ("w1-d2-p2",)
