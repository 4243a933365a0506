"""A micro-batcher: requests that arrive together go out as one call.

Used per expert (one Ray actor call per batch) and for the router in the gateway process.
When to send a batch:
- at once when it is full (`max_batch_size`);
- when no call is running (the pipeline is idle): after one event-loop turn in which nothing
  else arrived, so a lone request (concurrency 1) pays a turn of the loop, not `max_wait_ms`;
- when calls are running (under load): when one of them returns, or after `max_wait_ms`,
  whichever comes first; the requests that arrived meanwhile go together. Under gRPC,
  requests reach the loop one per turn, so waiting for company only while busy is what
  forms batches, and it costs an idle server nothing;
- never more than `max_inflight` calls at once: beyond that, requests wait for a return.
Admission: `submit` refuses at once (OverloadedError) an item that cannot be answered in time
rather than letting it wait for its caller's deadline: when `max_queue_size` items already
wait, or when the queue's measured drain rate says that the work ahead of it, and its own
batch, would not be done before its `deadline`. Items of callers that gave up while waiting
(deadline, cancellation) are dropped before their batch is sent. `admitted=True` skips the
size bound for the rows of a request admitted whole at the door (a KServe batch): a request
is refused or served in full, never in part.
Fairness: items carry the `flow` (request) they belong to, and a batch takes one item from
each waiting flow in turn (round robin), so a request of a thousand rows shares the queue
with the single-row requests that arrive behind it instead of holding them until it is done.
Items without a flow are flows of one, which keeps plain submissions first in, first out.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from dynaroute.errors import OverloadedError, UnavailableError

T = TypeVar("T")
R = TypeVar("R")

# Weight of the newest batch in the drain rate's moving average: a few batches adapt it to a
# new load, one slow call does not swing it.
RATE_SMOOTHING = 0.2
# An item is admitted only if the queue's work ahead of it fits this share of the time left: the
# rest is for what follows the queue (aggregation, the reply's way back) and the estimate's error.
ADMISSION_HEADROOM = 0.9


_Entry = tuple[T, asyncio.Future, float]  # (item, its caller's future, when it was queued)


@dataclass(frozen=True)
class Batched(Generic[R]):
    """One request's answer, with where its time went."""

    value: R
    queue_s: float  # waiting in the batcher
    call_s: float  # the batch call it was part of
    batch_size: int


class MicroBatcher(Generic[T, R]):
    """Groups `submit(item)` calls into `run_batch(items) -> results` calls (same order).

    `run_batch` may return an exception instance in place of a result to fail one item only;
    if it raises, every item of the batch gets the exception.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue_size: int,
        max_inflight: int | Callable[[], int] = 1,
        name: str = "",
        on_batch: Callable[[int], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        cost: Callable[[T], float] | None = None,
    ):
        if max_batch_size < 1 or max_queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1, max_wait_ms >= 0")
        self.name = name
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1e3
        self.max_queue_size = max_queue_size
        self._max_inflight = max_inflight
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth
        # Waiting items by flow, flows in turn order (a dict keeps insertion order): the first
        # flow gives the next item, then goes to the back if it has more.
        self._flows: dict[Hashable, deque[_Entry[T]]] = {}
        self._waiting = 0  # items in all flows
        self._inflight = 0
        self._arrivals = 0  # submissions so far; compared across a loop turn to detect idleness
        self._check_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self._rate: float | None = None  # items per second per call slot, measured (None: no batch yet)
        self._inflight_items = 0  # items in the calls running
        # What an item costs to run, relative to others (e.g. its subnet's FLOPs; default 1 each).
        # The backlog and admission are judged in cost, at a drain rate measured in cost: where one
        # queue holds cheap and dear items, a count of items at a rate measured on dear batches
        # would refuse cheap ones that would be answered in time.
        self._cost = cost or (lambda _item: 1.0)
        self._cost_rate: float | None = None  # cost per second per call slot, measured
        self._waiting_cost = 0.0
        self._inflight_cost = 0.0

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def arrivals(self) -> int:
        """Items queued since the start (admitted ones): the SLO controller's arrival rate."""
        return self._arrivals

    @property
    def idle(self) -> bool:
        """Nothing waiting and no call running."""
        return not self._waiting and self._inflight == 0

    def _limit(self) -> int:
        m = self._max_inflight
        return max(1, m() if callable(m) else m)

    @property
    def drain_rate(self) -> float | None:
        """Items per second this queue drains at (all call slots), as measured; None before the
        first batch returned."""
        return None if self._rate is None else self._rate * self._limit()

    def expected_wait_s(self, flow: Hashable | None = None) -> float:
        """How long an item queued now would take to be answered: the items ahead of it and its
        own batch, behind the calls running, at the measured drain rate (0 before anything was
        measured). The first item of a flow waits for one item of each flow ahead (round
        robin); a later one of a flow, for everything waiting (a bound, cheap to compute)."""
        rate = self._drain_cost_rate()
        if not rate:
            return 0.0
        ahead = self._waiting if flow is not None and flow in self._flows else len(self._flows)
        if self._waiting:
            mean = self._waiting_cost / self._waiting
        else:
            mean = self._inflight_cost / max(self._inflight_items, 1)
        return (self._inflight_cost + mean * (ahead + min(self._waiting + 1, self.max_batch_size))) / rate

    def backlog_s(self) -> float:
        """How long the work ahead of an item queued now would take at the measured drain rate
        (every item waiting and running; no own batch): the queue's delay (0 before anything was
        measured). Read by the SLO controller."""
        rate = self._drain_cost_rate()
        return (self._inflight_cost + self._waiting_cost) / rate if rate else 0.0

    def _drain_cost_rate(self) -> float | None:
        return None if self._cost_rate is None else self._cost_rate * self._limit()

    def late_by_backlog(self, deadline: float, flow: Hashable | None = None) -> str | None:
        """Why an item with this deadline would be refused now (None: admit it). Only work
        ahead of it refuses it: on an idle queue an item runs, and its deadline decides."""
        if not (self._inflight_items or self._waiting):
            return None
        left, wait = deadline - time.monotonic(), self.expected_wait_s(flow)
        if wait <= ADMISSION_HEADROOM * left:
            return None
        return (f"queue {self.name!r} holds {wait * 1e3:.0f} ms of work, more than the "
                f"{max(left, 0.0) * 1e3:.0f} ms left before the deadline; retry later")

    async def submit(self, item: T, deadline: float | None = None, admitted: bool = False,
                     flow: Hashable | None = None) -> Batched[R]:
        """Queue one item and wait for its result. `deadline`: time.monotonic() by which the
        caller needs the answer; `flow`: the request it belongs to (items of one flow share the
        queue fairly with other flows; None: a flow of its own). Raises OverloadedError when
        the queue is full (unless `admitted`) or cannot answer before the deadline,
        UnavailableError after close(). Cancelling the caller drops the item if not yet sent."""
        if self._closed:
            raise UnavailableError(f"batcher {self.name!r} is closed")
        if not admitted and self._waiting >= self.max_queue_size:
            raise OverloadedError(
                f"queue {self.name!r} is full ({self.max_queue_size} waiting); retry later"
            )
        late = None if deadline is None else self.late_by_backlog(deadline, flow)
        if late is not None:
            raise OverloadedError(late)
        fut = asyncio.get_running_loop().create_future()
        self._flows.setdefault(fut if flow is None else flow, deque()).append((item, fut, time.perf_counter()))
        self._waiting += 1
        self._waiting_cost += self._cost(item)
        self._arrivals += 1
        self._depth_changed()
        if self._waiting >= self.max_batch_size:
            self._flush_if_allowed()
        else:
            self._schedule_check()
        return await fut

    def _depth_changed(self) -> None:
        if self._on_queue_depth is not None:
            self._on_queue_depth(self._waiting)

    def _schedule_check(self) -> None:
        if self._check_scheduled:
            return
        self._check_scheduled = True
        arrivals = self._arrivals
        asyncio.get_running_loop().call_soon(self._check, arrivals)

    def _check(self, arrivals_before: int) -> None:
        """One loop turn after an arrival: send now if idle, else wait for company (bounded)."""
        self._check_scheduled = False
        if not self._waiting:
            return
        # The head of the first flow in turn: the oldest item but for a long flow's later rows.
        waited = time.perf_counter() - next(iter(self._flows.values()))[0][2]
        if waited >= self.max_wait_s:
            self._flush_if_allowed()
            return
        if self._inflight == 0:
            if self._arrivals == arrivals_before:
                self._flush_if_allowed()
            else:  # a burst is arriving in this very turn: take it whole, look again next turn
                self._schedule_check()
            return
        # Busy: a returning call sends what has gathered; the timer bounds the wait.
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_wait_s - waited, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._waiting:
            self._flush_if_allowed()

    def _flush_if_allowed(self) -> None:
        """Send one batch unless enough calls are in flight (then a returning call sends it)."""
        while self._waiting and self._inflight < self._limit():
            batch = self._take()
            if not batch:
                return
            self._inflight += 1
            self._inflight_items += len(batch)
            cost = sum(self._cost(e[0]) for e in batch)  # once per batch: counted in, measured, counted out
            self._inflight_cost += cost
            task = asyncio.get_running_loop().create_task(self._run(batch, cost))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            # Send a second batch at once only if the queue still holds a full one.
            if self._waiting < self.max_batch_size:
                break
        if self._timer is not None and not self._waiting:
            self._timer.cancel()
            self._timer = None

    def _take(self) -> list[_Entry[T]]:
        """The next batch: one item from each flow in turn, until full or nothing waits."""
        batch: list[_Entry[T]] = []
        while self._waiting and len(batch) < self.max_batch_size:
            flow = next(iter(self._flows))
            entries = self._flows.pop(flow)
            entry = entries.popleft()
            self._waiting -= 1
            self._waiting_cost = max(0.0, self._waiting_cost - self._cost(entry[0])) if self._waiting else 0.0
            if entries:
                self._flows[flow] = entries  # to the back of the turn
            if not entry[1].done():  # skip callers that gave up (deadline, cancellation)
                batch.append(entry)
        self._depth_changed()
        return batch

    async def _run(self, batch: list[_Entry[T]], cost: float) -> None:
        start = time.perf_counter()
        try:
            if self._on_batch is not None:
                self._on_batch(len(batch))
            try:
                results: Sequence[R | BaseException] = await self._run_batch([e[0] for e in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} got {len(results)} results")
                # a failed call says nothing of the rate
                self._measure(len(batch), cost, time.perf_counter() - start)
            except asyncio.CancelledError:
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(UnavailableError(f"batcher {self.name!r} was closed"))
                raise
            except Exception as e:  # fail every item of the batch, keep serving
                results = [e] * len(batch)
            call_s = time.perf_counter() - start
            for (_, fut, t0), r in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(r, BaseException):
                    fut.set_exception(r)
                else:
                    fut.set_result(Batched(r, start - t0, call_s, len(batch)))
        finally:
            self._inflight -= 1
            self._inflight_items -= len(batch)
            self._inflight_cost = max(0.0, self._inflight_cost - cost) if self._inflight else 0.0
            if self._waiting and not self._closed:
                self._flush_if_allowed()

    def _measure(self, n: int, cost: float, call_s: float) -> None:
        """Fold one returned batch into the drain rates (items, and cost, per second of one call slot)."""
        seconds = max(call_s, 1e-6)
        for attr, sample in (("_rate", n / seconds), ("_cost_rate", cost / seconds)):
            old = getattr(self, attr)
            setattr(self, attr, sample if old is None else (1 - RATE_SMOOTHING) * old + RATE_SMOOTHING * sample)

    async def close(self) -> None:
        """Refuse new items, fail queued ones with UnavailableError, cancel running calls."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        flows, self._flows, self._waiting, self._waiting_cost = self._flows, {}, 0, 0.0
        for entries in flows.values():
            for _, fut, _ in entries:
                if not fut.done():
                    fut.set_exception(UnavailableError(f"batcher {self.name!r} was closed"))
        self._depth_changed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
