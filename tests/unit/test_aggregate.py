"""Route execution: one subnet, top-k weighted sum of logits, cascade escalation."""

from __future__ import annotations

import numpy as np
import pytest

from dynaroute.gateway.aggregate import SubnetAnswer, combine, confidence, execute
from dynaroute.router.policy import Route

# Per subnet: the logits it answers with and its FLOPs. "small" is unsure, "mid" fairly sure.
LOGITS = {
    "small": np.array([0.2, 0.1, 0.0], dtype=np.float32),
    "mid": np.array([3.0, 0.0, 0.0], dtype=np.float32),
    "big": np.array([9.0, 0.0, 0.0], dtype=np.float32),
    "p0": np.array([1.0, 0.0, 0.0], dtype=np.float32),
    "p1": np.array([0.0, 4.0, 0.0], dtype=np.float32),
}
FLOPS = {"small": 10, "mid": 100, "big": 1000, "p0": 50, "p1": 60}


class Experts:
    def __init__(self):
        self.calls: list[tuple[str, float | None, int]] = []

    async def __call__(self, subnet: str, bound: float | None, first_exit: int) -> SubnetAnswer:
        self.calls.append((subnet, bound, first_exit))
        return SubnetAnswer(subnet, LOGITS[subnet], depth=2, flops=FLOPS[subnet], queue_s=0.001, compute_s=0.002)


async def test_single_subnet_passes_through():
    run = Experts()
    out = await execute(Route(("mid",), (1.0,)), run)
    np.testing.assert_array_equal(out.logits, LOGITS["mid"])
    assert out.flops == 100 and out.escalations == 0 and run.calls == [("mid", None, 1)]
    assert [a.subnet for a in out.answers] == ["mid"]


async def test_topk_is_the_weighted_sum_of_branch_logits():
    run = Experts()
    out = await execute(Route(("p0", "p1"), (0.75, 0.25), policy="topk"), run)
    np.testing.assert_allclose(out.logits, 0.75 * LOGITS["p0"] + 0.25 * LOGITS["p1"])
    assert out.flops == 110 and sorted(c[0] for c in run.calls) == ["p0", "p1"]
    assert out.queue_s == pytest.approx(0.001) and out.compute_s == pytest.approx(0.002)  # side by side


async def test_cascade_escalates_until_confident_and_counts_each_step():
    run = Experts()
    bound = 0.9  # small (~0.37) and mid (~0.91) straddle it
    out = await execute(Route(("small",), (1.0,), escalation=("mid", "big"), confidence_bound=bound, first_exit=3),
                        run)
    assert [c[0] for c in run.calls] == ["small", "mid"]  # mid is confident: big never runs
    # the bound is also the early-exit bound, from the route's first exit on, at every rung
    assert all(c[1:] == (bound, 3) for c in run.calls)
    assert out.escalations == 1 and out.flops == 110
    np.testing.assert_array_equal(out.logits, LOGITS["mid"])
    assert [a.subnet for a in out.answers] == ["mid"] and [s.subnet for s in out.steps] == ["small", "mid"]
    assert out.queue_s == pytest.approx(0.002) and out.compute_s == pytest.approx(0.004)  # one after another


async def test_cascade_runs_the_whole_ladder_when_never_confident():
    out = await execute(Route(("small",), (1.0,), escalation=("mid", "big"), confidence_bound=0.99999), Experts())
    assert out.escalations == 2 and out.flops == 1110 and out.answers[0].subnet == "big"


def test_combine_and_confidence():
    assert confidence(np.array([0.0, 0.0])) == pytest.approx(0.5)
    assert confidence(np.array([100.0, 0.0, 0.0])) == pytest.approx(1.0)
    np.testing.assert_allclose(combine([np.ones(3), 3 * np.ones(3)], [0.5, 0.5]), 2 * np.ones(3))
    with pytest.raises(ValueError, match="weights"):
        combine([np.ones(3)], [0.5, 0.5])
