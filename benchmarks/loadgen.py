"""Load generators for the serving benchmarks (bench_overload.py, bench_slo.py): the server under
test, a closed loop that measures capacity, and an open loop that sends each request at its time
whatever the replies do.

Each request is the keyword arguments of `AsyncClient.infer` (text= or a tensor, and a budget);
`request(i)` gives the i-th.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from dynaroute.bundle import Bundle
from dynaroute.client import AsyncClient
from dynaroute.demo import start_server

Request = Callable[[int], dict[str, Any]]


@dataclass(frozen=True)
class Sent:
    """One request of an open loop: when it was sent (seconds from the start), how it ended, the
    latency the client saw, and the reply when it was OK."""

    index: int
    sent_s: float
    status: str  # a grpc.StatusCode name
    latency_s: float
    reply: Any = None


@contextmanager
def served(bundle: Path, extra_args: Sequence[str] = ()) -> Iterator[str]:
    """`dynaroute serve BUNDLE` on local Ray for the block; yields its gRPC address, stops it
    with SIGTERM after."""
    proc, address = start_server(bundle, extra_args=extra_args)
    try:
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def dynamic_budget(bundle: Bundle, quality: float | None = None, target_accuracy: float | None = None,
                   backend: str | None = None) -> dict[str, float]:
    """The dynamic route's budget for `AsyncClient.infer`: `quality` when given, else
    `target_accuracy`, else the full model's accuracy on the rows the calibration table of
    `backend` was built on, less 0.5 points (issue 5's bar)."""
    if quality is not None:
        return {"quality": quality}
    if target_accuracy is not None:
        return {"target_accuracy": target_accuracy}
    full = bundle.subnet_info(bundle.full_subnet)
    return {"target_accuracy": float(bundle.calibration(backend).get("full_accuracy", full["val_accuracy"])) - 0.005}


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1e3, q)) if len(seconds) else float("nan")


def infer_kwargs(x: Any) -> dict[str, Any]:
    """The input's keyword for AsyncClient.infer: a sentence or a tensor."""
    return {"text": x} if isinstance(x, str) else {"tensor": x}


async def closed_loop(address: str, request: Request, n: int, concurrency: int = 32) -> tuple[float, list[Any]]:
    """A closed loop: `concurrency` requests in flight, `n` in all (after one round to warm up).
    Returns the requests per second and the replies, in request order."""
    async with AsyncClient(address, timeout_s=120) as c:
        slots = asyncio.Semaphore(concurrency)

        async def one(i: int) -> Any:
            async with slots:
                x = request(i)
                return await c.infer(x.pop("tensor", None), **x)

        await asyncio.gather(*(one(i) for i in range(concurrency)))  # warm up
        t0 = time.perf_counter()
        replies = await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - t0), list(replies)


async def capacity(address: str, request: Request, n: int, concurrency: int = 32) -> float:
    """Requests per second of a closed loop (`closed_loop`)."""
    return (await closed_loop(address, request, n, concurrency))[0]


def steady(rate: float, seconds: float) -> list[float]:
    """Send times of requests evenly spaced at `rate` per second for `seconds`."""
    return [i / rate for i in range(int(rate * seconds))]


async def open_loop(address: str, request: Request, send_at: Sequence[float], deadline_s: float,
                    on_reply: Callable[[float, Any], None] | None = None) -> list[Sent]:
    """Request i is sent at `send_at[i]` seconds from the start (or as soon as the loop gets there),
    each with a `deadline_s` deadline; returns every request's outcome in sending order.
    `on_reply(time.monotonic(), reply)` sees each OK reply as it comes."""
    out: list[Sent | None] = [None] * len(send_at)
    async with AsyncClient(address) as c:
        start = time.monotonic()

        async def one(i: int, t_sent: float) -> None:
            reply = None
            try:
                x = request(i)
                reply = await c.infer(x.pop("tensor", None), timeout_s=deadline_s, **x)
                status = "OK"
                if on_reply is not None:
                    on_reply(time.monotonic(), reply)
            except grpc.aio.AioRpcError as e:
                status = e.code().name
            out[i] = Sent(i, t_sent - start, status, time.monotonic() - t_sent, reply)

        tasks = []
        for i, at in enumerate(send_at):
            now = time.monotonic()
            if start + at > now:
                await asyncio.sleep(start + at - now)
            tasks.append(asyncio.create_task(one(i, time.monotonic())))
        await asyncio.gather(*tasks)
    return [s for s in out if s is not None]
