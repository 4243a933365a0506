"""MicroBatcher: one call per batch, no wait for a lone request, bounded queue, failures contained."""

from __future__ import annotations

import asyncio
import time

import pytest

from dynaroute.errors import OverloadedError, UnavailableError
from dynaroute.gateway.batcher import MicroBatcher


class Recorder:
    """A batch function that doubles its items and remembers every batch it got."""

    def __init__(self, gate: asyncio.Event | None = None):
        self.batches: list[list[int]] = []
        self.gate = gate

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        return [2 * i for i in items]


def make(fn, **kw) -> MicroBatcher:
    opts = {"max_batch_size": 8, "max_wait_ms": 2.0, "max_queue_size": 100, "max_inflight": 1}
    return MicroBatcher(fn, **{**opts, **kw})


async def test_lone_request_does_not_wait_for_max_wait():
    rec = Recorder()
    b = make(rec, max_wait_ms=2000.0)
    t0 = time.perf_counter()
    r = await b.submit(21)
    assert time.perf_counter() - t0 < 0.5  # one loop turn, not the two seconds of max_wait
    assert r.value == 42 and r.batch_size == 1
    assert rec.batches == [[21]]


async def test_requests_arriving_together_share_one_call_in_order():
    rec = Recorder()
    b = make(rec)
    results = await asyncio.gather(*(b.submit(i) for i in range(6)))
    assert rec.batches == [list(range(6))]
    assert [r.value for r in results] == [0, 2, 4, 6, 8, 10]


async def test_full_batch_goes_at_once_and_batches_never_exceed_max():
    rec = Recorder()
    b = make(rec, max_batch_size=4, max_inflight=10, max_wait_ms=5000.0)
    results = await asyncio.wait_for(asyncio.gather(*(b.submit(i) for i in range(10))), 2.0)
    assert [len(x) for x in rec.batches] == [4, 4, 2]
    assert [r.value for r in results] == [2 * i for i in range(10)]


async def test_requests_wait_while_a_call_is_in_flight_then_go_as_one_batch():
    gate = asyncio.Event()
    rec = Recorder(gate)
    b = make(rec, max_inflight=1)
    first = asyncio.ensure_future(b.submit(0))
    await asyncio.sleep(0.01)
    assert rec.batches == [[0]] and b.inflight == 1
    rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 6)]
    await asyncio.sleep(0.02)  # far beyond max_wait: still queued behind the running call
    assert len(rec.batches) == 1 and b.queue_depth == 5
    gate.set()
    await asyncio.gather(first, *rest)
    assert rec.batches == [[0], [1, 2, 3, 4, 5]]


async def test_full_queue_raises_overloaded_and_recovers():
    gate = asyncio.Event()
    rec = Recorder(gate)
    b = make(rec, max_queue_size=2, max_inflight=1)
    running = asyncio.ensure_future(b.submit(0))
    await asyncio.sleep(0.01)
    queued = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError, match="full"):
        await b.submit(3)
    gate.set()
    await asyncio.gather(running, *queued)
    assert (await b.submit(4)).value == 8


async def test_failures_reach_only_their_items_and_the_batcher_keeps_serving():
    async def fn(items: list[int]):
        if 99 in items:
            raise RuntimeError("expert crashed")
        return [ValueError(f"bad {i}") if i < 0 else i for i in items]

    b = make(fn)
    ok, bad = await asyncio.gather(b.submit(1), b.submit(-1), return_exceptions=True)
    assert ok.value == 1 and isinstance(bad, ValueError)
    with pytest.raises(RuntimeError, match="crashed"):
        await b.submit(99)
    assert (await b.submit(5)).value == 5


async def test_cancelled_caller_is_dropped_before_the_call():
    gate = asyncio.Event()
    rec = Recorder(gate)
    b = make(rec)
    first = asyncio.ensure_future(b.submit(0))
    await asyncio.sleep(0.01)
    doomed = asyncio.ensure_future(b.submit(1))
    kept = asyncio.ensure_future(b.submit(2))
    await asyncio.sleep(0)
    doomed.cancel()
    gate.set()
    await asyncio.gather(first, kept)
    assert rec.batches == [[0], [2]]


async def test_reports_queue_and_call_time_and_batch_sizes():
    sizes: list[int] = []
    depths: list[int] = []

    async def slow(items):
        await asyncio.sleep(0.02)
        return items

    b = make(slow, on_batch=sizes.append, on_queue_depth=depths.append)
    r = (await asyncio.gather(b.submit(1), b.submit(2)))[0]
    assert r.call_s >= 0.015 and 0 <= r.queue_s < r.call_s
    assert sizes == [2] and max(depths) == 2 and depths[-1] == 0


async def test_close_fails_waiting_requests_and_refuses_new_ones():
    gate = asyncio.Event()
    b = make(Recorder(gate))
    running = asyncio.ensure_future(b.submit(0))
    await asyncio.sleep(0.01)
    waiting = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0)
    await b.close()
    for fut in (running, waiting):
        with pytest.raises(UnavailableError):
            await fut
    with pytest.raises(UnavailableError):
        await b.submit(2)


async def test_steady_arrivals_are_batched_but_wait_at_most_about_max_wait():
    rec = Recorder()
    b = make(rec, max_batch_size=10_000, max_wait_ms=5.0, max_queue_size=100_000)
    futs = []
    # New requests on every loop turn (the loop is never idle) until three batches went, or 2 s
    # passed: bounded by batches rather than a fixed window, so that a slow machine, whose first
    # turns may take longer than a short window, does not decide the outcome.
    end = time.perf_counter() + 2.0
    while len(rec.batches) < 3 and time.perf_counter() < end:
        futs.extend(asyncio.ensure_future(b.submit(1)) for _ in range(3))
        await asyncio.sleep(0)
    results = await asyncio.gather(*futs)
    # Were max_wait_ms ignored, everything would go as one batch when the arrivals stop.
    assert len(rec.batches) >= 3 and len(rec.batches[0]) < len(results)
    assert max(len(x) for x in rec.batches) > 1


async def test_while_a_call_runs_new_requests_wait_for_company_at_most_max_wait():
    gate = asyncio.Event()
    rec = Recorder(gate)
    b = make(rec, max_inflight=2, max_wait_ms=30.0)
    first = asyncio.ensure_future(b.submit(0))
    await asyncio.sleep(0.005)
    assert rec.batches == [[0]]  # the pipeline was idle: sent at once
    second = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0.005)
    assert len(rec.batches) == 1, "busy: a new request waits for company instead of going alone"
    third = asyncio.ensure_future(b.submit(2))
    await asyncio.sleep(0.2)
    assert rec.batches == [[0], [1, 2]]  # max_wait sent them together, while the first still runs
    gate.set()
    await asyncio.gather(first, second, third)


class Timed:
    """A batch function that takes `per_item_s` per item of its batch (a worker at a fixed rate)."""

    def __init__(self, per_item_s: float):
        self.per_item_s = per_item_s
        self.calls = 0

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls += 1
        await asyncio.sleep(self.per_item_s * len(items))
        return list(items)


async def test_an_item_that_cannot_be_answered_before_its_deadline_is_refused_at_once():
    b = make(Timed(0.01), max_batch_size=4, max_queue_size=1000)
    assert b.drain_rate is None and b.expected_wait_s() == 0.0  # nothing measured: nothing refused
    await b.submit(0)  # measures the drain rate: at most 100 items/s (sleeps last at least as asked)
    assert b.drain_rate is not None
    backlog = [asyncio.ensure_future(b.submit(i)) for i in range(40)]  # at least 0.4 s of work
    await asyncio.sleep(0)
    assert b.expected_wait_s() >= 0.3
    with pytest.raises(OverloadedError, match="ms of work, more than"):
        await b.submit(99, deadline=time.monotonic() + 0.05)
    assert not backlog[-1].done()  # refused at the door, not after waiting behind the backlog
    # a deadline the queue can meet is admitted and answered
    assert (await b.submit(7, deadline=time.monotonic() + 60.0)).value == 7
    assert [r.value for r in await asyncio.gather(*backlog)] == list(range(40))


async def test_admitted_rows_are_not_refused_by_the_size_bound():
    gate = asyncio.Event()
    b = make(Recorder(gate), max_batch_size=2, max_queue_size=4)
    first = asyncio.ensure_future(b.submit(0))  # holds the one call slot
    await asyncio.sleep(0.01)
    rows = [asyncio.ensure_future(b.submit(i, admitted=True)) for i in range(1, 11)]
    await asyncio.sleep(0)
    assert b.queue_depth == 10  # beyond max_queue_size: a request admitted whole
    with pytest.raises(OverloadedError, match="is full"):
        await b.submit(99)  # a new request still meets the bound
    gate.set()
    assert [r.value for r in await asyncio.gather(first, *rows)] == [2 * i for i in range(11)]


async def test_a_long_flow_shares_the_queue_with_requests_that_arrive_behind_it():
    gate = asyncio.Event()
    rec = Recorder(gate)
    b = make(rec, max_batch_size=4)
    first = asyncio.ensure_future(b.submit(0))  # holds the one call slot
    await asyncio.sleep(0.01)
    big = [asyncio.ensure_future(b.submit(i, flow="big")) for i in range(100, 110)]
    await asyncio.sleep(0)
    small = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(first, *big, *small)
    # FIFO would send the ten rows first; in turns, the two small requests ride the next batch.
    assert rec.batches[1] == [100, 1, 2, 101]
    assert sorted(sum(rec.batches, [])) == sorted([0, 1, 2, *range(100, 110)])
    assert [r.result().value for r in small] == [2, 4]


async def test_the_first_item_of_a_new_flow_is_judged_by_the_flows_ahead_not_every_row():
    async def slow(items):
        await asyncio.sleep(0.01 * len(items))
        return items

    b = make(slow, max_batch_size=1)
    await b.submit(0)  # measures the drain rate: at most 100 items/s
    rows = [asyncio.ensure_future(b.submit(i, flow="big", admitted=True)) for i in range(50)]
    await asyncio.sleep(0)
    # 0.5 s of rows wait, but they are one flow: a new request waits for one of them, not all.
    assert b.expected_wait_s() < 0.1 < b.expected_wait_s(flow="big")
    assert (await b.submit(7, deadline=time.monotonic() + 0.3)).value == 7
    await asyncio.gather(*rows)


class CostTimed:
    """A batch function whose call lasts 1 ms per unit of its items' cost (an item's value)."""

    async def __call__(self, items: list[int]) -> list[int]:
        await asyncio.sleep(0.001 * sum(items))
        return items


async def test_backlog_is_judged_in_cost_so_cheap_items_behind_cheap_items_are_not_refused():
    # The drain rate is measured on dear items (cost 10); then 40 cheap ones (cost 1) wait. Counted
    # as items at the dear rate they are ~0.4 s of work; in cost, ~0.04 s.
    async def backlog_then_ask(b: MicroBatcher) -> tuple[float, list]:
        await asyncio.gather(*(b.submit(10) for _ in range(4)))
        waiting = [asyncio.ensure_future(b.submit(1)) for _ in range(40)]
        await asyncio.sleep(0)
        return b.backlog_s(), waiting

    by_count = make(CostTimed(), max_batch_size=4, max_queue_size=1000)
    seconds, waiting = await backlog_then_ask(by_count)
    assert seconds >= 0.2
    with pytest.raises(OverloadedError, match="ms of work"):
        await by_count.submit(1, deadline=time.monotonic() + 0.2)
    await asyncio.gather(*waiting)

    by_cost = make(CostTimed(), max_batch_size=4, max_queue_size=1000, cost=float)
    seconds, waiting = await backlog_then_ask(by_cost)
    assert seconds < 0.1
    assert (await by_cost.submit(1, deadline=time.monotonic() + 0.2)).value == 1  # admitted
    await asyncio.gather(*waiting)
    assert by_cost.backlog_s() == 0.0  # nothing left: no cost leaks in the accounting
