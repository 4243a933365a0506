"""The SLO controller on a synthetic queue (no Ray, no server): it lowers the budgets that allow it
as the queue falls behind the objective, never below a floor, holds in its hysteresis band, and
restores them as the load falls; a budget without a floor, or whose floor forbids it, is never
lowered."""

from __future__ import annotations

import math

import pytest
from prometheus_client import REGISTRY

from dynaroute.config import EngineConfig, SloConfig
from dynaroute.errors import InvalidInputError
from dynaroute.gateway.slo import SloController
from dynaroute.router.budget import Budget
from dynaroute.router.calibration import CalibrationTable, OperatingPoint

FULL = 100.0
# A threshold policy's points (expected accuracy rises with FLOPs) and the full model.
POINTS = [
    OperatingPoint("threshold", 0.0, 0.80, 10, 0.10),
    OperatingPoint("threshold", 0.4, 0.88, 25, 0.25),
    OperatingPoint("threshold", 0.7, 0.92, 50, 0.50),
    OperatingPoint("threshold", 0.9, 0.94, 75, 0.75),
]
STATIC = [OperatingPoint("static", 0.0, 0.95, 100, 1.0)]
SUBNETS = [{"name": "w1-d3-p0", "flops": 100, "val_accuracy": 0.95}]


class SyntheticQueue:
    """A queue of work in FLOPs drained at `capacity` FLOPs per second: the wait it reports is
    the work ahead over the capacity, as MicroBatcher.backlog_s reports its own."""

    def __init__(self, capacity: float):
        self.capacity = capacity
        self.work = 0.0
        self.arrivals = 0  # requests queued so far
        self.cost = FULL  # FLOPs of the last requests queued: its drain rate in requests per second

    @property
    def queue_depth(self) -> int:  # requests waiting: some while there is work
        return int(self.work > 0)

    @property
    def drain_rate(self) -> float:
        return self.capacity / self.cost

    def backlog_s(self) -> float:
        return self.work / self.capacity

    def step(self, arrived_flops: float, dt: float, n: int = 0) -> None:
        self.work = max(0.0, self.work + arrived_flops - self.capacity * dt)
        self.arrivals += n
        if n:
            self.cost = arrived_flops / n


def table() -> CalibrationTable:
    return CalibrationTable({"threshold": POINTS, "static": STATIC}, {}, full_flops=int(FULL), router_flops=0)


def controller(queue: SyntheticQueue, **config: float) -> SloController:
    cfg = SloConfig(**{"objective_ms": 250.0, **config})
    return SloController("slo-test", cfg, table(), lambda: [queue], SUBNETS, int(FULL), seed=0)


def simulate(ctl: SloController, queue: SyntheticQueue, budget: Budget, phases: list[tuple[float, float]],
             dt: float = 0.01) -> list[dict]:
    """Open-loop arrivals (`rate` requests per second for `seconds`, per phase), each costing the
    FLOPs of the point the controller chose; one controller tick per step. Returns a record per
    step: time, level, the queue's wait, the mean FLOPs of the requests of that step."""
    t, owed, log = 0.0, 0.0, []
    asked = ctl.calibration.solve(budget).point
    for rate, seconds in phases:
        end = t + seconds
        while t < end - 1e-9:
            owed += rate * dt
            n = int(owed)
            owed -= n
            chosen = [ctl.choose(budget, asked) for _ in range(n)]
            for c in chosen:
                assert c.got.accuracy >= (budget.min_accuracy or 0.0) - 1e-12
                ctl.served(c, queue.backlog_s())
            queue.step(sum(c.got.mean_flops for c in chosen), dt, n)
            t += dt
            ctl.update(t)
            log.append({"t": t, "level": ctl.level, "wait": queue.backlog_s(),
                        "flops": sum(c.got.mean_flops for c in chosen) / n if n else math.nan})
    return log


def test_lowers_under_a_burst_holds_the_objective_and_restores_as_the_load_falls() -> None:
    capacity = 20 * FULL  # the full model answers 20 requests per second
    queue = SyntheticQueue(capacity)
    ctl = controller(queue)
    budget = Budget(quality=1.0, min_accuracy=0.88)  # asks for the full model, allows 0.88 expected
    log = simulate(ctl, queue, budget, [(10, 3.0), (60, 6.0), (10, 8.0)])  # 0.5x -> 3x -> 0.5x
    low, burst, after = log[:300], log[300:900], log[900:]
    assert all(r["level"] == 0.0 for r in low), "lowered at half the capacity"
    assert all(r["flops"] == FULL for r in low if not math.isnan(r["flops"]))
    # The burst lowers budgets before the queue's wait reaches admission control's 90% of the
    # objective, and the queue never gets there.
    assert max(r["level"] for r in burst) > 0.5
    assert max(r["wait"] for r in burst) < 0.9 * 0.25
    tail = [r["flops"] for r in burst[300:] if not math.isnan(r["flops"])]
    assert sum(tail) / len(tail) <= 0.5 * FULL  # 3x the full model's load fits only at a cheaper mix
    assert min(tail) >= 25  # never below the floor's point (0.88 expected accuracy, 25 FLOPs)
    # After the burst: back to the budget asked, every request at the full model.
    assert after[-1]["level"] == 0.0
    assert all(r["flops"] == FULL for r in after[-100:] if not math.isnan(r["flops"]))
    assert REGISTRY.get_sample_value("dynaroute_budget_lowered_total", {"model": "slo-test"}) > 0
    assert REGISTRY.get_sample_value("dynaroute_slo_level", {"model": "slo-test"}) == 0.0


def test_a_budget_whose_floor_forbids_lowering_is_never_lowered() -> None:
    queue = SyntheticQueue(20 * FULL)
    ctl = controller(queue)
    queue.work = 10 * FULL  # far behind: the controller goes to its top level
    for i in range(1, 50):
        ctl.update(i * 0.02)
    assert ctl.level == 1.0
    allowed = Budget(quality=1.0, min_quality=0.0)
    asked = ctl.calibration.solve(allowed).point
    assert ctl.choose(allowed, asked).got.mean_flops == 10  # all the way to its floor
    for budget in (
        Budget(quality=1.0),  # no floor: the default never lowers
        Budget(quality=1.0, min_accuracy=0.95),  # the floor is the point asked
        Budget(quality=0.0, min_quality=0.5),  # the floor is above the point asked
        Budget(max_flops=25, min_accuracy=0.9),  # a floor above its point, by accuracy
        Budget(quality=1.0, min_accuracy=0.999),  # a floor no cheaper point reaches
    ):
        asked = ctl.calibration.solve(budget).point
        for _ in range(200):
            c = ctl.choose(budget, asked)
            assert c.got is asked and not c.lowered, budget
    pinned = ctl.pinned("w1-d3-p0")
    assert pinned.got is pinned.asked and pinned.got.flops_ratio == 1.0 and pinned.got.policy == "subnet"


def test_cheaper_points_first_as_the_level_rises() -> None:
    ctl = controller(SyntheticQueue(FULL))
    budget = Budget(quality=1.0, min_quality=0.0)
    asked = ctl.calibration.solve(budget).point
    assert [p.mean_flops for p in ctl.ladder(budget, asked)] == [10, 25, 50, 75, 100]
    means = []
    for level in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        ctl.level = level
        got = [ctl.choose(budget, asked).got.mean_flops for _ in range(2000)]
        means.append(sum(got) / len(got))
        # Each request is served at one of the two points around the cap.
        cap = 100 - level * 90
        assert all(g in {p.mean_flops for p in POINTS + STATIC} for g in got)
        assert all(abs(g - cap) <= 50 for g in got)
        assert means[-1] == pytest.approx(cap, rel=0.08)  # the mean cost follows the level
    assert means == sorted(means, reverse=True)


def test_hysteresis_holds_in_the_band_and_waits_before_restoring() -> None:
    queue = SyntheticQueue(FULL)
    ctl = controller(queue, hold_s=1.0, lower_at=0.4, restore_at=0.15)
    queue.work = 0.5 * 0.25 * FULL  # a wait of half the objective: lower
    ctl.update(0.0)
    ctl.update(0.1)
    raised = ctl.level
    assert raised > 0
    queue.work = 0.25 * 0.25 * FULL  # in the band: hold
    for i in range(2, 50):
        ctl.update(i * 0.1)
    assert ctl.level == raised
    queue.work = 0.0  # below restore_at, but only `hold_s` after the last lowering does it restore
    ctl2 = controller(queue, hold_s=1.0)
    ctl2.level, ctl2._last_lowered = 0.5, 10.0
    ctl2.update(10.5)
    ctl2.update(10.9)
    assert ctl2.level == 0.5
    ctl2.update(11.2)
    assert ctl2.level < 0.5


def test_one_slow_answer_on_a_busy_machine_lowers_nobody_a_queue_that_stays_slow_does() -> None:
    queue = SyntheticQueue(FULL)
    ctl = controller(queue)  # lowers at 0.4 x 250 ms = 100 ms of delay
    answer = ctl.pinned("w1-d3-p0")
    t = 0.0
    for i in range(100):
        ctl.served(answer, 0.2 if i == 50 else 0.01)  # one answer waited 200 ms, the rest 10 ms
        t += 0.02
        ctl.update(t)
    assert ctl.level == 0.0
    for _ in range(20):  # every answer waits 200 ms
        ctl.served(answer, 0.2)
        t += 0.02
        ctl.update(t)
    assert ctl.level > 0.0


def test_a_queue_where_nothing_waits_lowers_nobody_whatever_its_drain_rate() -> None:
    """A queue whose last batch was slowed (a busy machine) keeps a low drain rate until its next
    batch: with nothing waiting, its backlog says nothing about delay."""
    stale = SyntheticQueue(FULL / 100)  # reports 1 s of wait per FULL of work
    ctl = controller(stale)
    stale.work = FULL
    ctl.update(0.0)
    ctl.update(0.02)
    assert ctl.level > 0.0  # busy and slow: lower
    stale.work = 0.0
    stale.backlog_s = lambda: 5.0  # idle now, still reporting a long wait  # type: ignore[method-assign]
    for i in range(2, 400):
        ctl.update(i * 0.02)
    assert ctl.level == 0.0


def test_without_an_objective_only_deadlines_of_requests_that_allow_lowering_set_one() -> None:
    queue = SyntheticQueue(FULL)
    ctl = controller(queue, objective_ms=None)
    queue.work = 10 * FULL
    ctl.update(0.0)
    ctl.update(0.1)
    assert ctl.objective_s is None and ctl.level == 0.0
    import time

    fixed = Budget(quality=1.0)
    ctl.choose(fixed, ctl.calibration.solve(fixed).point, deadline=time.monotonic() + 0.2)
    ctl.update(0.2)
    assert ctl.objective_s is None and ctl.level == 0.0  # a budget that cannot be lowered sets none
    allowed = Budget(quality=1.0, min_quality=0.0)
    ctl.choose(allowed, ctl.calibration.solve(allowed).point, deadline=time.monotonic() + 0.2)
    ctl.update(0.3)
    assert 0.15 < ctl.objective_s <= 0.2 and ctl.level > 0.0
    ctl.update(0.3 + ctl.config.deadline_window_s + 0.1)  # the deadline ages out of the window
    assert ctl.objective_s is None


def test_floors_and_config_are_checked() -> None:
    with pytest.raises(InvalidInputError, match="at most one floor"):
        Budget(min_quality=0.5, min_accuracy=0.9)
    with pytest.raises(InvalidInputError, match="pinned subnet is never lowered"):
        Budget(subnet="w1-d3-p0", min_quality=0.5)
    with pytest.raises(InvalidInputError, match="min_accuracy must be in"):
        Budget(min_accuracy=1.5)
    with pytest.raises(ValueError, match="restore_at < lower_at"):
        SloConfig(lower_at=0.2, restore_at=0.3)
    with pytest.raises(ValueError, match="objective_ms"):
        SloConfig(objective_ms=0)
    with pytest.raises(ValueError, match="EngineConfig.slo"):
        EngineConfig(slo=250)  # type: ignore[arg-type]


def test_lowers_as_soon_as_arrivals_outpace_the_drain_before_the_delay_builds() -> None:
    """At 3x the full model's rate the queue's backlog grows by 2 s per second: the controller
    acts on the arrivals against the drain rate, before the backlog alone reaches `lower_at`."""
    capacity = 20 * FULL
    queue = SyntheticQueue(capacity)
    ctl = controller(queue, objective_ms=1000.0)  # lower_at 0.4: 400 ms of backlog on its own
    budget = Budget(quality=1.0, min_accuracy=0.88)
    log = simulate(ctl, queue, budget, [(10, 3.0), (60, 1.0)])
    first = next(r for r in log if r["level"] > 0)
    assert first["t"] > 3.0, "lowered at half the capacity"
    assert first["wait"] < 0.4 * 1.0  # the backlog is still below lower_at x objective
    assert max(r["wait"] for r in log) < 0.9 * 1.0  # admission control's 90% is never reached


def test_holds_while_the_load_that_lowered_it_lasts_then_restores() -> None:
    """Once the cheaper points keep up with a burst, the queue is empty and the delay low: the
    controller does not restore while the burst lasts (it would fall behind again, and refuse),
    only after it. A budget without a floor in the same burst is served as asked throughout."""
    queue = SyntheticQueue(20 * FULL)
    ctl = controller(queue, hold_s=1.0)
    budget = Budget(quality=1.0, min_accuracy=0.88)
    log = simulate(ctl, queue, budget, [(10, 2.0), (60, 8.0), (10, 8.0)])
    burst, after = log[200:1000], log[1000:]
    top = max(range(len(burst)), key=lambda i: burst[i]["level"])
    assert burst[top]["level"] > 0.5
    assert all(r["level"] >= burst[top]["level"] - 1e-9 for r in burst[top:]), "restored during the burst"
    assert max(r["wait"] for r in burst) < 0.9 * 0.25
    assert after[-1]["level"] == 0.0
    fixed = Budget(quality=1.0)
    asked = ctl.calibration.solve(fixed).point
    ctl.level = 1.0
    assert all(not ctl.choose(fixed, asked).lowered for _ in range(100))


def test_a_slowdown_at_an_unchanged_load_restores_when_it_passes() -> None:
    """Lowered because the queue slowed (a busy machine), not because more arrived: the load is
    the one served as asked before, so the level comes back once the queue keeps up again."""
    queue = SyntheticQueue(20 * FULL)
    ctl = controller(queue, hold_s=1.0)
    budget = Budget(quality=1.0, min_accuracy=0.88)
    simulate(ctl, queue, budget, [(10, 2.0)])
    assert ctl.level == 0.0
    queue.capacity = 4 * FULL  # the same 10 requests per second now take 2.5 x the queue's time
    simulate(ctl, queue, budget, [(10, 2.0)])
    assert ctl.level > 0.0
    queue.capacity = 20 * FULL
    simulate(ctl, queue, budget, [(10, 8.0)])
    assert ctl.level == 0.0
