"""The SLO controller: holds a latency objective under load by serving cheaper operating points.

Under a load spike a server that spends the same FLOPs on every request lets its queues grow
until deadlines expire or admission control refuses. A supernet holds many calibrated
operating points in one set of weights, so the gateway can instead spend less per request
while the load lasts, for the requests that allow it: a budget with a floor
(`Budget.min_quality` / `min_accuracy`) may be served at any point of its calibration table
between the floor and the point it asked for (`CalibrationTable.ladder`); without a floor a
budget is always served as asked.

One controller per model holds a level in [0, 1]: 0 serves every budget as asked, 1 serves every
budget that allows it at its floor. At level l a request's FLOPs cap is
`asked - l * (asked - floor)` (expected mean FLOPs of its points), and it is served at the
cheaper of the two points around the cap or the dearer one, at random in the proportion that
puts its expected FLOPs on the cap: the mean cost follows the level smoothly even when a table
has only a few points. Cheaper points are therefore reached in order, and never one below the
floor.

Every `tick_ms` the controller compares the delay of the engine's queues with the objective
(`SloConfig.objective_ms`, or the tightest deadline among the recent requests that allow
lowering, whichever is shorter). The delay of a queue in which requests wait is its backlog (the
work ahead at its measured drain rate, `MicroBatcher.backlog_s`) plus, when items arrive faster
than it drains them, the backlog they add over the next `lookahead` x objective: predictive, so
that a burst lowers budgets within a few ticks, before its delay has built up and admission
control refuses the requests behind it. The delay watched is the longest of these, or a moving
average of the answers' queue time if longer. At a delay of `lower_at` times the objective or
more it raises the level, faster the further above; at `restore_at` or less, once nothing was
lowered for `hold_s`, and while the model's request rate is at most `restore_load` times the one
at which it last had to lower, or at most the one it served as asked before (the load that
lowering answered has passed, not merely been absorbed by the cheaper points; a slowdown at an
unchanged load restores too), it lowers the level by `restore_per_s` per second; otherwise it
holds (hysteresis, so that it does not oscillate). `lower_at` (0.4) is below the 0.9 of the
time left at which admission control refuses, so budgets are lowered before anyone is refused.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from dynaroute import metrics
from dynaroute.config import SloConfig
from dynaroute.router.budget import Budget
from dynaroute.router.calibration import CalibrationTable, OperatingPoint

# Distinct budgets whose ladder is kept (cleared when full: clients choose budgets freely).
_LADDER_CACHE_SIZE = 1024
# Weight of one answer's queue time in the measured delay (a moving average over answers): one
# slow answer on a busy machine does not lower anyone's budget, a queue that grows soon does. A
# tick without answers decays it by the same weight.
DELAY_SMOOTHING = 0.1
# Time constant of the arrival rates' moving averages: a few ticks see a burst, a few requests
# that arrive together are not one.
ARRIVAL_TAU_S = 0.2


class QueueView(Protocol):
    """What the controller reads of a queue (a MicroBatcher)."""

    @property
    def queue_depth(self) -> int: ...

    @property
    def arrivals(self) -> int: ...  # items queued so far

    @property
    def drain_rate(self) -> float | None: ...  # items per second, as measured

    def backlog_s(self) -> float: ...


@dataclass(frozen=True)
class Choice:
    """The operating point a request asked for and the one it is served at."""

    asked: OperatingPoint
    got: OperatingPoint

    @property
    def lowered(self) -> bool:
        return self.got.mean_flops < self.asked.mean_flops


class SloController:
    """Chooses each request's operating point under the model's current level, and moves the
    level from the queues' delay (see the module docstring). `queues` returns the queues to
    watch (the router's and every expert's)."""

    def __init__(self, model: str, config: SloConfig, calibration: CalibrationTable,
                 queues: Callable[[], Iterable[QueueView]], subnet_infos: Sequence[dict[str, Any]],
                 full_flops: int, seed: int = 0):
        self.config = config
        self.calibration = calibration
        self._queues = queues
        self.level = 0.0
        self.pressure = 0.0
        self.objective_s: float | None = None if config.objective_ms is None else config.objective_ms / 1e3
        self._rng = random.Random(seed)
        self._ladders: dict[Budget, list[OperatingPoint]] = {}
        self._last_update: float | None = None
        self._last_lowered = -math.inf
        self._measured_s = 0.0  # moving average of the answers' queue time
        self._answered = False  # whether an answer came since the last tick
        self._tick_deadline = math.inf  # tightest time left among this tick's requests that allow lowering
        self._deadlines: deque[tuple[float, float]] = deque()  # (tick time, tightest time left) per tick
        self._arrived: dict[int, tuple[int, float]] = {}  # per queue (id): arrivals counted, their rate
        self._requests = 0  # requests chosen for so far (routed and pinned)
        self._requests_seen = 0
        self.load = 0.0  # the model's requests per second (moving average)
        self._lowered_at_load = math.inf  # the load at which it last had to lower (max over that episode)
        self._lowering = False  # whether the last tick lowered
        self._rest_load = 0.0  # the load on the last tick at level 0 (served as asked)
        self._outpaced = 0.0  # this tick: the largest arrival rate over drain rate of a queue in which items wait
        self._floor_share = 1.0  # moving average over requests that allow lowering: their floor's FLOPs over asked
        self._running = False  # run() ticks on time.monotonic(): choose() may then tick too
        # A pinned subnet is served as asked: a point of its own, policy "subnet".
        self._pinned = {
            s["name"]: OperatingPoint("subnet", 0.0, float(s.get("val_accuracy") or 0.0), float(s["flops"]),
                                      float(s["flops"]) / full_flops)
            for s in subnet_infos
        }
        self._lowered = metrics.BUDGET_LOWERED.labels(model)
        self._ratio = metrics.BUDGET_FLOPS_RATIO.labels(model)
        self._level_gauge = metrics.SLO_LEVEL.labels(model)
        self._pressure_gauge = metrics.SLO_PRESSURE.labels(model)
        self._objective_gauge = metrics.SLO_OBJECTIVE.labels(model)
        self._level_gauge.set(0.0)
        self._pressure_gauge.set(0.0)
        self._objective_gauge.set(self.objective_s or 0.0)

    # ---- per request ---------------------------------------------------------------------

    def ladder(self, budget: Budget, asked: OperatingPoint) -> list[OperatingPoint]:
        """The budget's points from its floor to `asked`, cheapest first (cached per budget)."""
        ladder = self._ladders.get(budget)
        if ladder is None:
            ladder = self.calibration.ladder(budget, asked)
            if len(self._ladders) >= _LADDER_CACHE_SIZE:
                self._ladders.clear()
            self._ladders[budget] = ladder
        return ladder

    def choose(self, budget: Budget, asked: OperatingPoint, deadline: float | None = None) -> Choice:
        """The point to serve a routed request at. `asked`: its budget's own point;
        `deadline` (time.monotonic()) counts towards the objective when the budget allows
        lowering."""
        self._requests += 1
        if self._running:
            self._tick_if_due()
        ladder = self.ladder(budget, asked)
        if len(ladder) == 1:
            return Choice(asked, asked)
        if asked.mean_flops > 0:
            self._floor_share += DELAY_SMOOTHING * (ladder[0].mean_flops / asked.mean_flops - self._floor_share)
        if deadline is not None:
            self._tick_deadline = min(self._tick_deadline, deadline - time.monotonic())
        if self.level <= 0.0:
            return Choice(asked, asked)
        cap = asked.mean_flops - self.level * (asked.mean_flops - ladder[0].mean_flops)
        for lo, hi in zip(ladder, ladder[1:], strict=False):
            if cap <= hi.mean_flops:
                if hi.mean_flops <= lo.mean_flops:  # two points at one cost: the dearer is not dearer
                    return Choice(asked, hi)
                dearer = (cap - lo.mean_flops) / (hi.mean_flops - lo.mean_flops)
                return Choice(asked, hi if self._rng.random() < dearer else lo)
        return Choice(asked, asked)

    def pinned(self, subnet: str) -> Choice:
        """A pinned subnet's request: served as asked."""
        point = self._pinned[subnet]
        self._requests += 1
        return Choice(point, point)

    def served(self, choice: Choice, queue_s: float) -> None:
        """An answered request: its queue time feeds the measured delay; metrics."""
        self._measured_s += DELAY_SMOOTHING * (queue_s - self._measured_s)
        self._answered = True
        self._ratio.observe(choice.got.mean_flops / choice.asked.mean_flops if choice.asked.mean_flops else 1.0)
        if choice.lowered:
            self._lowered.inc()

    # ---- the control loop -------------------------------------------------------------------

    def objective(self, now: float) -> float | None:
        """The objective now: `objective_ms`, or the tightest recent deadline if shorter."""
        if self._tick_deadline < math.inf:
            self._deadlines.append((now, self._tick_deadline))
            self._tick_deadline = math.inf
        while self._deadlines and self._deadlines[0][0] < now - self.config.deadline_window_s:
            self._deadlines.popleft()
        candidates = [d for _, d in self._deadlines]
        if self.config.objective_ms is not None:
            candidates.append(self.config.objective_ms / 1e3)
        return max(min(candidates), 1e-3) if candidates else None

    def _arrival_rate(self, queue: QueueView, dt: float) -> float:
        """The moving average of a queue's arrivals per second, with the last tick's."""
        count = queue.arrivals
        seen, rate = self._arrived.get(id(queue), (count, 0.0))
        if dt > 0:
            rate += min(1.0, dt / ARRIVAL_TAU_S) * ((count - seen) / dt - rate)
        self._arrived[id(queue)] = (count, rate)
        return rate

    def queue_delay_s(self, queue: QueueView, dt: float, horizon_s: float) -> float:
        """A queue's delay: its backlog, plus what arrivals faster than its drain rate add to it
        over `horizon_s` (0 for a queue in which nothing waits: see `delay_s`)."""
        arriving = self._arrival_rate(queue, dt)
        if not queue.queue_depth:
            return 0.0
        drain = queue.drain_rate
        outpaced = arriving / drain if drain else 0.0
        self._outpaced = max(self._outpaced, outpaced)
        return queue.backlog_s() + max(0.0, outpaced - 1.0) * horizon_s  # growth: seconds of backlog per second

    def delay_s(self, dt: float = 0.0) -> float:
        """The delay watched: the longest delay of a queue in which requests wait (its backlog,
        the work ahead of a request queued now at the queue's measured drain rate, and what the
        arrivals beyond that rate add over `lookahead` x objective), or the moving average of the
        answers' queue time if longer. A queue in which nothing waits delays nobody: at low load
        its drain rate is measured on batches of one, whose time swings with the input and a
        busy machine, and the last one may be stale (only a batch corrects it)."""
        horizon = self.config.lookahead * (self.objective_s or 0.0)
        self._outpaced = 0.0
        predicted = max((self.queue_delay_s(q, dt, horizon) for q in self._queues()), default=0.0)
        if not self._answered:
            self._measured_s *= 1 - DELAY_SMOOTHING
        self._answered = False
        return max(predicted, self._measured_s)

    def matching_level(self) -> float:
        """The level whose requests cost 1/u of those served now, where u is the largest arrival
        rate over drain rate of a queue in which items wait: the drain then keeps up, at once
        rather than after the delay has grown tick by tick (how far to lower). The cost at level
        l is 1 - l * (1 - floor share) of the asked (the mean over requests that allow lowering)."""
        if self._outpaced <= 1.0 or self._floor_share >= 1.0:
            return 0.0
        span = 1.0 - self._floor_share
        cost = 1.0 - self.level * span
        return min(1.0, (1.0 - cost / self._outpaced) / span)

    def update(self, now: float) -> float:
        """One tick: read the queues, move the level; returns it."""
        c = self.config
        dt = 0.0 if self._last_update is None else min(max(now - self._last_update, 0.0), 1.0)
        self._last_update = now
        self.objective_s = self.objective(now)
        delay = self.delay_s(dt)
        if dt > 0:
            self.load += min(1.0, dt / ARRIVAL_TAU_S) * ((self._requests - self._requests_seen) / dt - self.load)
        self._requests_seen = self._requests
        if self.level <= 0.0:
            self._rest_load = self.load
        self.pressure = 0.0 if self.objective_s is None else delay / self.objective_s
        if self.pressure >= c.lower_at:
            self.level = min(1.0, max(self.level + c.lower_per_s * dt * self.pressure / (2 * c.lower_at),
                                      self.matching_level()))
            self._last_lowered = now
            self._lowered_at_load = max(self._lowered_at_load, self.load) if self._lowering else self.load
            self._lowering = True
        else:
            self._lowering = False
            if (self.pressure <= c.restore_at and now - self._last_lowered >= c.hold_s
                    and self.load <= max(c.restore_load * self._lowered_at_load, self._rest_load)):
                self.level = max(0.0, self.level - c.restore_per_s * dt)
        self._level_gauge.set(self.level)
        self._pressure_gauge.set(self.pressure)
        self._objective_gauge.set(self.objective_s or 0.0)
        return self.level

    def _tick_if_due(self) -> None:
        """Tick now if the loop's tick is late. A burst's first requests keep the event loop busy
        (gRPC, routing, queueing), so that the timer's tick can come 100 ms late, and every
        request routed meanwhile would be served as asked, at the full model's cost."""
        now = time.monotonic()
        if self._last_update is not None and now - self._last_update >= self.config.tick_ms / 1e3:
            self.update(now)

    async def run(self) -> None:
        """Tick until cancelled (and from `choose` when the timer is late)."""
        self._running = True
        while True:
            self.update(time.monotonic())
            await asyncio.sleep(self.config.tick_ms / 1e3)
