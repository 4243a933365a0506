"""Dispatch to expert actors: a pool of replicas per expert, health, and fallback choice.

A replica whose call fails because its actor died (RayActorError and its subclasses) is
marked down and probed in the background until Ray has restarted it. A call that fails that
way is retried on another live replica of the same expert; with none left the pool raises
ExpertUnavailableError, and the engine sends the route to the nearest available subnet
(`Dispatcher.resolve`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from dynaroute.errors import UnavailableError
from dynaroute.experts.actor import ExpertOutput

log = logging.getLogger(__name__)

# Errors that mean "this replica cannot answer now" rather than "this input is bad".
ACTOR_DOWN = (RayActorError, ActorUnavailableError)


class ExpertUnavailableError(UnavailableError):
    """No replica of an expert is up."""


class ExpertCallError(UnavailableError):
    """An expert raised while running a batch."""


# One request's row for an expert: (subnet name, input row, exit bound or inf, first exit).
ExpertItem = tuple[str, Any, float, int]
# One request's answer from an expert: (logits [C], exit depth, FLOPs).
ExpertRowResult = tuple[np.ndarray, int, int]


@dataclass
class Replica:
    handle: Any  # ray.actor.ActorHandle
    up: bool = True
    inflight: int = 0


class ExpertPool:
    """The replicas of one expert actor (one entry of the placement)."""

    def __init__(
        self,
        name: str,
        subnets: Sequence[str],
        handles: Sequence[Any],
        stack: Callable[[Sequence[Any]], Any] = np.stack,
        groups: Callable[[Sequence[Any]], list[list[int]]] | None = None,
        on_live: Callable[[int], None] | None = None,
        probe_interval_s: float = 0.05,
    ):
        self.name = name
        self.subnets = tuple(subnets)
        self.replicas = [Replica(h) for h in handles]
        self._stack = stack  # the input codec's: one-example rows -> the batch an expert takes
        self._groups = groups  # the input codec's: one subnet's rows -> the batches they run as
        self._on_live = on_live
        self._probe_interval_s = probe_interval_s
        self._probes: set[asyncio.Task] = set()
        self._rr = itertools.count()
        self._closed = False
        self._report()

    @property
    def live(self) -> int:
        return sum(r.up for r in self.replicas)

    @property
    def available(self) -> bool:
        return any(r.up for r in self.replicas)

    def _report(self) -> None:
        if self._on_live is not None:
            self._on_live(self.live)

    def _pick(self) -> Replica | None:
        up = [r for r in self.replicas if r.up]
        if not up:
            return None
        least = min(r.inflight for r in up)
        candidates = [r for r in up if r.inflight == least]
        return candidates[next(self._rr) % len(candidates)]

    async def call(self, groups: list[tuple[str, Any, np.ndarray]]) -> list[ExpertOutput]:
        """One actor call for the whole batch, on a live replica; retried on another if it dies."""
        while True:
            replica = self._pick()
            if replica is None:
                raise ExpertUnavailableError(f"expert {self.name!r} has no live replica (restarting)")
            replica.inflight += 1
            try:
                return await replica.handle.run_groups.remote(groups)
            except ACTOR_DOWN as e:
                log.warning("expert %s: a replica is down (%s); retrying elsewhere", self.name, type(e).__name__)
                self.mark_down(replica)
            except RayTaskError as e:
                raise ExpertCallError(f"expert {self.name!r} failed: {e.cause!r}") from e
            finally:
                replica.inflight -= 1

    async def run_items(self, items: list[ExpertItem]) -> list[ExpertRowResult]:
        """The batcher's call: group rows by subnet (and within a subnet as the codec splits them:
        text by length), one actor call, split the answers back."""
        by_subnet: dict[str, list[int]] = {}
        for i, (subnet, *_) in enumerate(items):
            by_subnet.setdefault(subnet, []).append(i)
        split: list[tuple[str, list[int]]] = []
        for subnet, idx in by_subnet.items():
            if self._groups is None or len(idx) == 1:
                split.append((subnet, idx))
            else:
                split += [(subnet, [idx[j] for j in g]) for g in self._groups([items[i][1] for i in idx])]
        groups = []
        for subnet, idx in split:
            rows = self._stack([items[i][1] for i in idx])
            bounds = np.fromiter((items[i][2] for i in idx), dtype=np.float32, count=len(idx))
            if np.isinf(bounds).all():
                groups.append((subnet, rows, None, 1))
            else:
                groups.append((subnet, rows, bounds, np.fromiter((items[i][3] for i in idx), dtype=np.int64,
                                                                 count=len(idx))))
        outputs = await self.call(groups)
        results: list[ExpertRowResult | None] = [None] * len(items)
        for (_, idx), (logits, depth, flops) in zip(split, outputs, strict=True):
            for j, i in enumerate(idx):
                results[i] = (logits[j], int(depth[j]), int(flops[j]))
        return results  # type: ignore[return-value]

    def mark_down(self, replica: Replica) -> None:
        if not replica.up:
            return
        replica.up = False
        self._report()
        if not self._closed:
            task = asyncio.get_running_loop().create_task(self._probe(replica))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)

    async def _probe(self, replica: Replica) -> None:
        """Wait for Ray to restart the actor, then take it back into the pool."""
        while not self._closed:
            try:
                await replica.handle.ready.remote()
            except ACTOR_DOWN:
                await asyncio.sleep(self._probe_interval_s)
                continue
            replica.up = True
            self._report()
            log.info("expert %s: a replica is back", self.name)
            return

    async def close(self) -> None:
        self._closed = True
        for task in list(self._probes):
            task.cancel()
        if self._probes:
            await asyncio.gather(*self._probes, return_exceptions=True)


class Dispatcher:
    """Which pool holds each subnet, and which subnet to use when that pool is down."""

    def __init__(self, pools: Sequence[ExpertPool], subnet_flops: dict[str, int], subnet_path: dict[str, int]):
        self.pools = {p.name: p for p in pools}
        self.pool_of = {s: p for p in pools for s in p.subnets}
        self.subnet_flops = subnet_flops
        self.subnet_path = subnet_path

    def resolve(self, subnet: str, exclude: frozenset[str] | set[str] = frozenset()) -> str | None:
        """`subnet` if its pool is up and not excluded, else the available subnet on the same path
        with the closest FLOPs (the larger one on a tie), else None."""
        pool = self.pool_of[subnet]
        if pool.available and pool.name not in exclude:
            return subnet
        want, path = self.subnet_flops[subnet], self.subnet_path[subnet]
        best: tuple[float, int] | None = None
        choice = None
        for name, p in self.pool_of.items():
            if self.subnet_path[name] != path or not p.available or p.name in exclude:
                continue
            key = (abs(self.subnet_flops[name] - want), -self.subnet_flops[name])
            if best is None or key < best:
                best, choice = key, name
        return choice
