"""RayEngine: validate, route (micro-batched router), dispatch to Ray experts, aggregate, count.

The engine holds the request pipeline only (validate -> route -> execute -> result); what
depends on the input kind (checks, tokenising or standardising, stacking rows, whether that
runs in a thread) is the bundle's input codec (dynaroute.codec).

CONTRACT (used by the servicers): `RayEngine.start(bundle_path, config)`, `model_name`,
`ready`, `model_info()`, `infer(InferRequest)`, `drain()`, `close()`. Ray must already be
initialised by the caller. `infer` raises the exceptions of dynaroute.errors.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynaroute import metrics
from dynaroute.bundle import Bundle
from dynaroute.codec import InputCodec
from dynaroute.config import EngineConfig, PlacementConfig
from dynaroute.errors import (
    DeadlineError,
    DynarouteError,
    InvalidInputError,
    ModelNotFoundError,
    OverloadedError,
    UnavailableError,
    shown,
)
from dynaroute.gateway.aggregate import SubnetAnswer, execute
from dynaroute.gateway.batcher import MicroBatcher
from dynaroute.gateway.deployment import create_actors, kill_actors, wait_ready
from dynaroute.gateway.dispatch import (
    Dispatcher,
    ExpertCallError,
    ExpertItem,
    ExpertPool,
    ExpertRowResult,
    ExpertUnavailableError,
)
from dynaroute.gateway.slo import SloController
from dynaroute.gateway.types import Cost, InferRequest, InferResult, RouteTaken
from dynaroute.router.budget import Budget
from dynaroute.router.calibration import OperatingPoint
from dynaroute.router.policy import Route

# A router batch item: (input row or sentence, the operating point chosen for its budget, or a
# Route already fixed by a pin).
_RouterItem = tuple[Any, Budget | OperatingPoint | Route]
# Its answer: (route, input row for the experts, whether the router ran for it).
_Routed = tuple[Route, Any, bool]


class RayEngine:
    """Serves one bundle: router in this process, experts as Ray actors."""

    def __init__(
        self,
        bundle: Bundle,
        config: EngineConfig,
        router: Any,
        placement: PlacementConfig,
        handles: dict[str, list[Any]],
    ):
        """Use `start`; this wires already-created actors (`handles`, by placement actor name)."""
        self.bundle = bundle
        self.config = config
        self.router = router
        self._handles = handles
        self._metrics = metrics.ModelMetrics(bundle.name)
        self._full_flops = bundle.full_flops
        self._labels = bundle.labels
        self._subnets = [s["name"] for s in bundle.subnet_infos]
        # Exits are numbered 1..(number of exits of the deepest subnet).
        max_depth = max(len(s.get("exit_flops") or ()) or int(s["depth"]) for s in bundle.subnet_infos)
        self._metrics.precreate(self._subnets, max_depth)
        self.codec: InputCodec = bundle.codec()
        self._router_thread: ThreadPoolExecutor | None = None
        if self.codec.in_thread:
            self._router_thread = ThreadPoolExecutor(1, thread_name_prefix="dynaroute-router")
        model = bundle.name
        pools = [
            ExpertPool(
                a.name,
                a.subnets,
                handles[a.name],
                stack=self.codec.stack,
                groups=self.codec.groups,
                on_live=metrics.REPLICAS_LIVE.labels(model, a.name).set,
            )
            for a in placement.actors
        ]
        self.dispatcher = Dispatcher(
            pools,
            {s["name"]: int(s["flops"]) for s in bundle.subnet_infos},
            {s["name"]: int(s["path"]) for s in bundle.subnet_infos},
        )
        self._batchers: dict[str, MicroBatcher[ExpertItem, ExpertRowResult]] = {}
        for pool in pools:
            self._batchers[pool.name] = MicroBatcher(
                pool.run_items,
                max_batch_size=config.max_batch_size,
                max_wait_ms=config.max_wait_ms,
                max_queue_size=config.max_queue_size,
                max_inflight=lambda p=pool: p.live * config.max_inflight_batches,
                name=f"expert {pool.name}",
                on_batch=metrics.BATCH_SIZE.labels(model, pool.name).observe,
                on_queue_depth=metrics.QUEUE_DEPTH.labels(model, pool.name).set,
                # one queue may hold rows of every subnet (the default placement): judge its
                # backlog by their FLOPs, not their count
                cost=lambda item, f=self.dispatcher.subnet_flops: float(f[item[0]]),
            )
        self._router_batch_size = metrics.BATCH_SIZE.labels(model, "router")
        self._router_batcher: MicroBatcher[_RouterItem, _Routed] = MicroBatcher(
            self._route_batch,
            max_batch_size=config.router_max_batch_size,
            max_wait_ms=config.router_max_wait_ms,
            max_queue_size=config.max_queue_size,
            max_inflight=1,
            name="router",
            on_batch=self._router_batch_size.observe,
            on_queue_depth=metrics.QUEUE_DEPTH.labels(model, "router").set,
        )
        # Lowers the budgets that allow it while the queues are late for the objective.
        self._slo = SloController(model, config.slo, router.calibration,
                                  lambda: (self._router_batcher, *self._batchers.values()), bundle.subnet_infos,
                                  self._full_flops)
        self._slo_task = asyncio.get_running_loop().create_task(self._slo.run())
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        self._closed = False

    # ---- lifecycle -------------------------------------------------------------------------

    @staticmethod
    def default_placement(bundle: Bundle, config: EngineConfig) -> PlacementConfig:
        return PlacementConfig.default(
            [(s["name"], int(s["flops"])) for s in bundle.subnet_infos],
            num_actors=config.default_num_actors,
            num_cpus=config.default_num_cpus,
        )

    @classmethod
    async def start(cls, bundle_path: str | Path, config: EngineConfig | None = None) -> RayEngine:
        """Load the bundle and the router, create the expert actors, wait until they are ready."""
        from dynaroute.router.runtime import RouterRuntime

        config = config or EngineConfig()
        # Small router batches gain nothing from intra-op threads, and on a busy machine torch's
        # thread pool can stall a tiny op for milliseconds.
        torch.set_num_threads(config.router_threads)
        bundle = Bundle.load(bundle_path)
        placement = config.placement or cls.default_placement(bundle, config)
        placement.check_subnets([s["name"] for s in bundle.subnet_infos])
        router = RouterRuntime.from_bundle(bundle, default_quality=config.default_quality, backend=config.backend)
        handles = create_actors(bundle.root, placement, config)
        try:
            await wait_ready(handles, config.ready_timeout_s)
        except BaseException:
            kill_actors(handles)
            raise
        return cls(bundle, config, router, placement, handles)

    @property
    def model_name(self) -> str:
        return self.bundle.name

    @property
    def ready(self) -> bool:
        return not (self._draining or self._closed)

    def model_info(self) -> dict[str, Any]:
        m = self.bundle.manifest
        keys = ("name", "task", "input", "full_subnet", "router", "calibration")
        info = {k: m[k] for k in keys if k in m}
        info["labels"] = self.bundle.labels
        info["full_flops"] = self._full_flops
        info["router_flops"] = int(self.router.flops)
        info["subnets"] = [
            {k: s.get(k) for k in ("name", "width", "depth", "path", "flops", "params", "val_accuracy", "exit_flops")}
            for s in self.bundle.subnet_infos
        ]
        return info

    def admit(self, rows: int) -> None:
        """Admit a request of `rows` rows whole, or refuse it before any row is queued: one that
        no queue of this server can ever hold is an input error naming the limit; one that does
        not fit now is overload (retry later). Its rows are then sent with `admitted=True`."""
        limit = self.config.max_queue_size
        if rows > limit:
            raise InvalidInputError(f"a request of {rows} rows is more than this server admits at once ({limit} rows, "
                                    f"`dynaroute serve --max-queue-size`); send it in parts of at most {limit}")
        if self._router_batcher.queue_depth + rows > limit:
            raise OverloadedError(f"{rows} rows do not fit the router's queue now ({self._router_batcher.queue_depth} "
                                  f"of {limit} waiting); retry later")

    async def drain(self) -> None:
        """Refuse new requests (UnavailableError) and wait for the in-flight ones."""
        self._draining = True
        await self._idle.wait()

    async def close(self) -> None:
        """Stop the batchers and kill the actors this engine created."""
        self._draining = True
        self._closed = True
        self._slo_task.cancel()
        await self._router_batcher.close()
        for b in self._batchers.values():
            await b.close()
        for p in self.dispatcher.pools.values():
            await p.close()
        kill_actors(self._handles)
        if self._router_thread is not None:
            self._router_thread.shutdown(wait=False)
        for p in self.dispatcher.pools.values():
            metrics.REPLICAS_LIVE.labels(self.model_name, p.name).set(0)

    # ---- one request -----------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResult:
        start = time.perf_counter()
        error: BaseException | None = None
        self._inflight += 1
        self._idle.clear()
        self._metrics.inflight.inc()
        try:
            if self._draining:
                raise UnavailableError(f"model {self.model_name!r} is shutting down; retry on another server")
            if request.deadline is None:
                return await self._infer(request, start)
            remaining = request.deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineError(f"request {shown(request.id)}: the deadline passed before it was started")
            try:
                async with asyncio.timeout(remaining):
                    return await self._infer(request, start)
            except TimeoutError as e:
                if isinstance(e, DynarouteError):
                    raise
                raise DeadlineError(
                    f"request {shown(request.id)}: no answer within its deadline ({remaining * 1e3:.1f} ms)"
                ) from None
        except BaseException as e:
            error = e
            raise
        finally:
            status = metrics.status_of(error)
            if request.count_request:
                self._metrics.requests(request.api, status).inc()
            self._metrics.rows(request.api, status).inc()
            self._metrics.duration.observe(time.perf_counter() - start)
            self._metrics.inflight.dec()
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _infer(self, request: InferRequest, start: float) -> InferResult:
        if request.model and request.model != self.model_name:
            raise ModelNotFoundError(
                f"model {shown(request.model)} is not served here; this server serves {self.model_name!r}"
            )
        x = self._validate_input(request)
        budget = request.budget
        queue_s = compute_s = 0.0
        policies = self.router.calibration.tables
        if budget.policy is not None and budget.policy not in policies:  # checked even when a subnet is pinned
            raise InvalidInputError(f"budget.policy {shown(budget.policy)} is unknown; this bundle is calibrated "
                                    f"for {sorted(policies)}")
        if budget.subnet is not None:
            if budget.subnet not in self.dispatcher.pool_of:
                raise InvalidInputError(f"budget.subnet {shown(budget.subnet)} is not a subnet of "
                                        f"{self.model_name!r}; expected one of {self._subnets}")
            resolution = None
            pinned = Route((budget.subnet,), (1.0,), policy="subnet")  # as RouterRuntime.plan pins
            choice = self._slo.pinned(budget.subnet)
        else:
            pinned = None  # a budget with nothing set resolves to the router's default quality
            resolution = self.router.resolve(budget)  # cached per budget; says when it was out of reach
            choice = self._slo.choose(budget, resolution.point, request.deadline)  # lowered under load if allowed
        if request.deadline is not None:
            self._refuse_if_late(request.deadline, budget.subnet, request.flow)
        if pinned is not None and not self.codec.in_thread:
            route, row, router_ran = pinned, self.codec.encode([x]).rows[0], False  # nothing for the router to do
        elif self._inflight == 1 and not self.codec.in_thread and self._router_batcher.idle:
            # A lone request (concurrency 1): route it here and now. The batcher's hop (a task
            # and loop turns) costs more than encoding and scoring one row of a tensor router;
            # with other requests in flight the batcher is used, so batches still form under load.
            t0 = time.perf_counter()
            routed = self._route_batch_sync([(x, choice.got)])[0]
            compute_s = time.perf_counter() - t0
            self._router_batch_size.observe(1)
            if isinstance(routed, BaseException):
                raise routed
            route, row, router_ran = routed
        else:
            b = await self._router_batcher.submit((x, pinned or choice.got), request.deadline, request.admitted,
                                                  request.flow)
            (route, row, router_ran), queue_s, compute_s = b.value, b.queue_s, b.call_s

        async def run(subnet: str, bound: float | None, first_exit: int) -> SubnetAnswer:
            return await self._run_subnet(subnet, row, bound, first_exit, request.deadline, request.admitted,
                                          request.flow)

        outcome = await execute(route, run)
        logits = np.asarray(outcome.logits, dtype=np.float32)
        if not np.isfinite(logits).all():  # a bundle without a value range let an extreme input through
            raise InvalidInputError("the model's answer to this input is not finite: its values are too far from "
                                    "those it was trained on; expected inputs like its training data")
        router_flops = int(self.router.flops) if router_ran else 0
        cost = Cost(
            router_flops=router_flops,
            expert_flops=outcome.flops,
            full_flops=self._full_flops,
            queue_s=queue_s + outcome.queue_s,
            compute_s=compute_s + outcome.compute_s,
            total_s=time.perf_counter() - start,
        )
        self._metrics.record(route, outcome, cost, router_ran)
        self._slo.served(choice, cost.queue_s)
        z = np.exp(logits - logits.max())
        label = int(z.argmax())
        return InferResult(
            id=request.id,
            logits=logits,
            label=label,
            label_name=self._labels[label],
            confidence=float(z[label] / z.sum()),
            route=RouteTaken(
                subnets=[a.subnet for a in outcome.answers],
                weights=list(route.weights) if len(outcome.answers) == len(route.weights) else [1.0],
                escalations=outcome.escalations,
                exit_depths=[a.depth for a in outcome.answers],
                fallbacks=[s.fallback for s in outcome.steps if s.fallback],
                policy=route.policy,
                budget_out_of_reach=resolution is not None and not resolution.reachable,
                budget_note="" if resolution is None else resolution.note,
                budget_asked=choice.asked,
                budget_got=choice.got,
            ),
            cost=cost,
        )

    def _validate_input(self, request: InferRequest) -> Any:
        return self.codec.validate(request.tensor, request.text, self.model_name)

    # ---- the router, one batch at a time ----------------------------------------------------

    async def _route_batch(self, items: list[_RouterItem]) -> list[_Routed | BaseException]:
        # A tensor router (digits: a few microseconds of torch) runs on the event loop, where a
        # thread hop would cost more than the work; tokenising and a text router run in a thread
        # so that the loop keeps serving while they do (torch and tokenizers release the GIL).
        if self.codec.in_thread:
            return await asyncio.get_running_loop().run_in_executor(self._router_thread, self._route_batch_sync, items)
        return self._route_batch_sync(items)

    def _route_batch_sync(self, items: list[_RouterItem]) -> list[_Routed | BaseException]:
        encoded = self.codec.encode([x for x, _ in items])
        rows = encoded.rows
        need = [i for i, (_, b) in enumerate(items) if not isinstance(b, Route)]
        out: list[_Routed | BaseException] = [(b, rows[i], False) if isinstance(b, Route) else None  # type: ignore[misc]
                                              for i, (_, b) in enumerate(items)]
        if need:
            # Rows whose subnet is pinned were only encoded; the router scores the others.
            batch = encoded.batch if len(need) == len(items) else self.codec.stack([rows[i] for i in need])
            correct_prob, gate = self.router.score(batch)
            for j, i in enumerate(need):
                try:
                    route = self.router.plan(items[i][1], correct_prob[j], gate[j])
                    out[i] = (route, rows[i], True)
                except DynarouteError as e:
                    out[i] = e
        return out

    def _refuse_if_late(self, deadline: float, subnet: str | None, flow: Hashable | None = None) -> None:
        """Refuse at the door, before the router's work, a request no expert queue can answer
        before its deadline: the pinned subnet's queue, or every queue for a routed request
        (it needs at least one). The queues check again when the row reaches them."""
        pools = [self.dispatcher.pool_of[subnet].name] if subnet is not None else list(self._batchers)
        reasons = [self._batchers[p].late_by_backlog(deadline, flow) for p in pools]
        if all(reasons):
            raise OverloadedError(str(reasons[0]))

    # ---- one subnet on the experts, with fallback ---------------------------------------------

    async def _run_subnet(self, subnet: str, row: Any, bound: float | None, first_exit: int = 1,
                          deadline: float | None = None, admitted: bool = False,
                          flow: Hashable | None = None) -> SubnetAnswer:
        exclude: set[str] = set()
        reason = "expert_unavailable"
        b = math.inf if bound is None else float(bound)
        while True:
            use = self.dispatcher.resolve(subnet, exclude)
            if use is None:
                raise UnavailableError(
                    f"no expert can run subnet {subnet!r} or a fallback on its path; experts are restarting"
                )
            pool = self.dispatcher.pool_of[use]
            try:
                r = await self._batchers[pool.name].submit((use, row, b, first_exit), deadline, admitted, flow)
            except ExpertUnavailableError:
                exclude.add(pool.name)
                continue
            except ExpertCallError:
                exclude.add(pool.name)
                reason = "expert_error"
                continue
            logits, depth, flops = r.value
            return SubnetAnswer(
                subnet=use,
                logits=logits,
                depth=depth,
                flops=flops,
                queue_s=r.queue_s,
                compute_s=r.call_s,
                fallback=None if use == subnet else f"{subnet}->{use}",
                fallback_reason=None if use == subnet else reason,
            )
