"""Every Prometheus metric of dynaroute, declared once, in base units with fixed labels.

CONTRACT (shared with the gRPC layer): the names and label sets below. Who records what:
`dynaroute_requests_total` counts calls (a unary call, or one message of a request stream),
`dynaroute_rows_total` counts examples (a KServe call of N rows is one request and N rows).
The engine records everything for each row that reaches `RayEngine.infer`, including both
counters (`dynaroute_requests_total` only when `InferRequest.count_request`: the KServe
servicer counts its calls itself); the servicers count in `dynaroute_requests_total`, via
`record_refused`, the requests they refuse before calling the engine (a wire problem).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from dynaroute.gateway.status import STATUS_CODES, status_label

if TYPE_CHECKING:
    from dynaroute.gateway.aggregate import Outcome
    from dynaroute.gateway.types import Cost
    from dynaroute.router.policy import Route

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FLOPS_BUCKETS = tuple(float(10**e * m) for e in range(3, 12) for m in (1, 3))
_RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter(
    "dynaroute_requests", "Requests (calls, stream messages) by model, API and final status", ["model", "api", "status"]
)
ROWS = Counter(
    "dynaroute_rows", "Examples answered or refused by the engine, by model, API and status", ["model", "api", "status"]
)
UNDECODABLE = Counter(
    "dynaroute_undecodable_messages", "Request messages that are not valid protobuf, by API", ["api"]
)
REQUEST_DURATION = Histogram(
    "dynaroute_request_duration_seconds", "Request latency in the server", ["model"], buckets=_LATENCY_BUCKETS
)
REQUEST_QUEUE = Histogram(
    "dynaroute_request_queue_seconds", "Time a request waited in batch queues", ["model"], buckets=_LATENCY_BUCKETS
)
REQUEST_COMPUTE = Histogram(
    "dynaroute_request_compute_seconds",
    "Time a request spent in router and expert calls",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
REQUEST_FLOPS = Histogram(
    "dynaroute_request_flops", "FLOPs one request cost, router plus experts", ["model"], buckets=_FLOPS_BUCKETS
)
REQUEST_FLOPS_RATIO = Histogram(
    "dynaroute_request_flops_ratio",
    "FLOPs one request cost over the full model's FLOPs",
    ["model"],
    buckets=_RATIO_BUCKETS,
)
FLOPS = Counter("dynaroute_flops", "FLOPs spent, by subnet (subnet=router for the router)", ["model", "subnet"])
FULL_FLOPS = Counter("dynaroute_full_flops", "FLOPs the full model would have spent on the same requests", ["model"])
ROUTE_DECISIONS = Counter("dynaroute_route_decisions", "Subnets chosen by routing", ["model", "subnet"])
EXITS = Counter("dynaroute_exits", "Answers by the depth of the exit they left at", ["model", "depth"])
ESCALATIONS = Counter("dynaroute_escalations", "Cascade escalations to a larger subnet", ["model"])
FALLBACKS = Counter(
    "dynaroute_fallbacks", "Routes served by another subnet because an expert failed", ["model", "reason"]
)
BATCH_SIZE = Histogram(
    "dynaroute_batch_size", "Rows per batch (actor call, or router call)", ["model", "expert"], buckets=_BATCH_BUCKETS
)
QUEUE_DEPTH = Gauge("dynaroute_queue_depth", "Requests waiting in a batch queue", ["model", "expert"])
REPLICAS_LIVE = Gauge("dynaroute_expert_replicas_live", "Expert replicas able to take calls", ["model", "expert"])
INFLIGHT = Gauge("dynaroute_inflight_requests", "Requests inside the engine", ["model"])
# The SLO controller (dynaroute/gateway/slo.py).
BUDGET_LOWERED = Counter(
    "dynaroute_budget_lowered", "Requests (rows) served at a cheaper operating point than their budget asked", ["model"]
)
BUDGET_FLOPS_RATIO = Histogram(
    "dynaroute_budget_flops_ratio",
    "Expected FLOPs of the operating point served over those of the point asked (1: as asked)",
    ["model"],
    buckets=_RATIO_BUCKETS,
)
SLO_LEVEL = Gauge(
    "dynaroute_slo_level", "SLO controller level: 0 budgets as asked, 1 every budget that allows it at its floor",
    ["model"],
)
SLO_PRESSURE = Gauge(
    "dynaroute_slo_pressure_ratio", "Queue delay the SLO controller watches over the latency objective", ["model"]
)
SLO_OBJECTIVE = Gauge(
    "dynaroute_slo_objective_seconds", "Latency objective the SLO controller holds (0: none)", ["model"]
)

# The label values known in advance, whose children the engine creates at start (zero) so that
# rate() and increase() see the first request, error or fallback rather than a series that
# appears already at 1.
APIS = ("native", "kserve", "kserve_http")
STATUSES = ("ok", *(status_label(code) for _, code in STATUS_CODES), "internal")
FALLBACK_REASONS = ("expert_unavailable", "expert_error")


def status_of(error: BaseException | None) -> str:
    """The `status` label of a request that ended with `error` (None: ok)."""
    if error is None:
        return "ok"
    if isinstance(error, asyncio.CancelledError):  # the caller went away
        return "cancelled"
    # The gateway's one exception -> status code table, so the label always matches the reply.
    for cls, code in STATUS_CODES:
        if isinstance(error, cls):
            return status_label(code)
    return "internal"


def record_refused(model: str, api: str, code: grpc.StatusCode) -> None:
    """Count a request the servicers refused before the engine saw it (a wire problem), with the
    status code it was answered with; the engine counts the requests it handles."""
    record_request(model, api, status_label(code))


def record_request(model: str, api: str, status: str) -> None:
    """Count one finished request in dynaroute_requests_total."""
    REQUESTS.labels(model, api, status).inc()


class ModelMetrics:
    """The metric children of one model, looked up once (`labels()` costs a lookup and a lock
    per call, which adds up at thousands of requests per second)."""

    def __init__(self, model: str):
        self.model = model
        self.duration = REQUEST_DURATION.labels(model)
        self.queue = REQUEST_QUEUE.labels(model)
        self.compute = REQUEST_COMPUTE.labels(model)
        self.flops = REQUEST_FLOPS.labels(model)
        self.ratio = REQUEST_FLOPS_RATIO.labels(model)
        self.full_flops = FULL_FLOPS.labels(model)
        self.escalations = ESCALATIONS.labels(model)
        self.inflight = INFLIGHT.labels(model)
        self._children: dict[tuple[Any, ...], Any] = {}

    def precreate(self, subnets: Sequence[str], max_depth: int) -> None:
        """Create every known child at zero: requests by API and status, FLOPs and route
        decisions per subnet (FLOPs for the router too), exits per depth, fallbacks per reason
        (escalations and full FLOPs are created with the object)."""
        for api in APIS:
            for status in STATUSES:
                self.requests(api, status)
                self.rows(api, status)
        self.child(FLOPS, "router")
        for subnet in subnets:
            self.child(FLOPS, subnet)
            self.child(ROUTE_DECISIONS, subnet)
        for depth in range(1, max_depth + 1):
            self.child(EXITS, str(depth))
        for reason in FALLBACK_REASONS:
            self.child(FALLBACKS, reason)

    def requests(self, api: str, status: str) -> Any:
        return self.child(REQUESTS, api, status)

    def rows(self, api: str, status: str) -> Any:
        return self.child(ROWS, api, status)

    def child(self, metric: Any, *labels: str) -> Any:
        key = (metric, *labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(self.model, *labels)
        return c

    def record(self, route: Route, outcome: Outcome, cost: Cost, router_ran: bool) -> None:
        """What one answered request adds (its count, duration and in-flight are the caller's)."""
        self.queue.observe(cost.queue_s)
        self.compute.observe(cost.compute_s)
        self.flops.observe(cost.flops)
        self.ratio.observe(cost.flops_ratio)
        self.full_flops.inc(cost.full_flops)
        if router_ran:
            self.child(FLOPS, "router").inc(cost.router_flops)
        for s in route.subnets:
            self.child(ROUTE_DECISIONS, s).inc()
        for step in outcome.steps:
            self.child(FLOPS, step.subnet).inc(step.flops)
            self.child(EXITS, str(step.depth)).inc()
            if step.fallback_reason is not None:
                self.child(FALLBACKS, step.fallback_reason).inc()
        if outcome.escalations:
            self.escalations.inc(outcome.escalations)


def start_metrics_server(port: int, addr: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY) -> None:
    """Serve /metrics over HTTP; loopback unless told otherwise."""
    start_http_server(port, addr=addr, registry=registry)
