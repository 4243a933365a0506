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
lowering, whichever is shorter): the delay is the larger of the longest backlog of a queue in
which requests wait (the work ahead at its measured drain rate, `MicroBatcher.backlog_s`) and a
moving average of the answers' queue time. At a delay of `lower_at` times the objective or more
it raises the level, faster the further above; at `restore_at` or less, and once nothing was
lowered for `hold_s`, it lowers the level by `restore_per_s` per second; between the two it
holds (hysteresis, so that it does not oscillate). `lower_at` (0.4) is below the 0.9 of the time
left at which admission control refuses, so budgets are lowered before anyone is refused.
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


class QueueView(Protocol):
    """What the controller reads of a queue (a MicroBatcher)."""

    @property
    def queue_depth(self) -> int: ...

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
        ladder = self.ladder(budget, asked)
        if len(ladder) == 1:
            return Choice(asked, asked)
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

    def delay_s(self) -> float:
        """The delay watched: the longest backlog of a queue in which requests wait (the work
        ahead of a request queued now, at the queue's measured drain rate), or the moving average
        of the answers' queue time if longer. A queue in which nothing waits delays nobody: at
        low load its drain rate is measured on batches of one, whose time swings with the input
        and a busy machine, and the last one may be stale (only a batch corrects it)."""
        predicted = max((q.backlog_s() for q in self._queues() if q.queue_depth), default=0.0)
        if not self._answered:
            self._measured_s *= 1 - DELAY_SMOOTHING
        self._answered = False
        return max(predicted, self._measured_s)

    def update(self, now: float) -> float:
        """One tick: read the queues, move the level; returns it."""
        c = self.config
        dt = 0.0 if self._last_update is None else min(max(now - self._last_update, 0.0), 1.0)
        self._last_update = now
        self.objective_s = self.objective(now)
        delay = self.delay_s()
        self.pressure = 0.0 if self.objective_s is None else delay / self.objective_s
        if self.pressure >= c.lower_at:
            self.level = min(1.0, self.level + c.lower_per_s * dt * self.pressure / (2 * c.lower_at))
            self._last_lowered = now
        elif self.pressure <= c.restore_at and now - self._last_lowered >= c.hold_s:
            self.level = max(0.0, self.level - c.restore_per_s * dt)
        self._level_gauge.set(self.level)
        self._pressure_gauge.set(self.pressure)
        self._objective_gauge.set(self.objective_s or 0.0)
        return self.level

    async def run(self) -> None:
        """Tick until cancelled."""
        while True:
            self.update(time.monotonic())
            await asyncio.sleep(self.config.tick_ms / 1e3)
