"""Every Prometheus metric of dynaroute, declared once, in base units with fixed labels.

CONTRACT (shared with the gRPC layer): the names and label sets below. Who records what:
the servicers count every request in `dynaroute_requests_total` (they know the API and the
final status); the engine records everything else for each request that reaches it.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FLOPS_BUCKETS = tuple(float(10**e * m) for e in range(3, 12) for m in (1, 3))
_RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter("dynaroute_requests", "Requests by model, API and final status", ["model", "api", "status"])
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

def start_metrics_server(port: int, addr: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY) -> None:
    """Serve /metrics over HTTP; loopback unless told otherwise."""
    start_http_server(port, addr=addr, registry=registry)
