"""metrics.py: the contract's names and labels, and what one answered request adds."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dynaroute import metrics
from dynaroute.gateway.aggregate import Outcome, SubnetAnswer
from dynaroute.gateway.types import Cost
from dynaroute.router.policy import Route

CONTRACT = {
    "dynaroute_requests": ("counter", {"model", "api", "status"}),
    "dynaroute_rows": ("counter", {"model", "api", "status"}),
    "dynaroute_undecodable_messages": ("counter", {"api"}),
    "dynaroute_request_duration_seconds": ("histogram", {"model"}),
    "dynaroute_request_queue_seconds": ("histogram", {"model"}),
    "dynaroute_request_compute_seconds": ("histogram", {"model"}),
    "dynaroute_request_flops": ("histogram", {"model"}),
    "dynaroute_request_flops_ratio": ("histogram", {"model"}),
    "dynaroute_flops": ("counter", {"model", "subnet"}),
    "dynaroute_full_flops": ("counter", {"model"}),
    "dynaroute_route_decisions": ("counter", {"model", "subnet"}),
    "dynaroute_exits": ("counter", {"model", "depth"}),
    "dynaroute_escalations": ("counter", {"model"}),
    "dynaroute_fallbacks": ("counter", {"model", "reason"}),
    "dynaroute_batch_size": ("histogram", {"model", "expert"}),
    "dynaroute_queue_depth": ("gauge", {"model", "expert"}),
    "dynaroute_expert_replicas_live": ("gauge", {"model", "expert"}),
    "dynaroute_inflight_requests": ("gauge", {"model"}),
}


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _cascade_request(m: metrics.ModelMetrics) -> None:
    """A cascade that escalated once, its first step served by a fallback subnet."""
    steps = (
        SubnetAnswer("small-b", np.zeros(3), depth=1, flops=100, fallback="small->small-b",
                     fallback_reason="expert_unavailable"),
        SubnetAnswer("big", np.zeros(3), depth=3, flops=900),
    )
    outcome = Outcome(np.zeros(3), steps[1:], steps, escalations=1, queue_s=0.001, compute_s=0.002)
    cost = Cost(router_flops=50, expert_flops=1000, full_flops=2000, queue_s=0.001, compute_s=0.002, total_s=0.004)
    m.record(Route(("small",), (1.0,), escalation=("big",), confidence_bound=0.9), outcome, cost, router_ran=True)


def test_every_contract_metric_is_exposed_with_its_labels():
    m = metrics.ModelMetrics("contract-model")
    _cascade_request(m)
    metrics.REQUESTS.labels("contract-model", "native", "ok").inc()
    metrics.ROWS.labels("contract-model", "native", "ok").inc()
    metrics.UNDECODABLE.labels("native").inc()
    metrics.BATCH_SIZE.labels("contract-model", "expert-0").observe(4)
    metrics.QUEUE_DEPTH.labels("contract-model", "expert-0").set(0)
    metrics.REPLICAS_LIVE.labels("contract-model", "expert-0").set(1)
    m.inflight.inc()
    m.duration.observe(0.004)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(REGISTRY).decode())}
    for name, (kind, labels) in CONTRACT.items():
        assert name in families, f"{name} is not exposed"
        fam = families[name]
        assert fam.type == kind, f"{name} is a {fam.type}, the contract says {kind}"
        # Metrics without a model label (undecodable messages: no model can be read) count too.
        ours = [s for s in fam.samples if s.labels.get("model", "contract-model") == "contract-model"]
        assert ours, f"{name} has no sample for the model"
        assert {k for k in ours[0].labels if k != "le"} == labels, f"{name} labels {ours[0].labels}"


def test_one_request_adds_its_flops_route_exits_escalations_and_fallbacks():
    m = metrics.ModelMetrics("record-model")
    _cascade_request(m)
    _cascade_request(m)
    v = {
        "router": _value("dynaroute_flops_total", model="record-model", subnet="router"),
        "small-b": _value("dynaroute_flops_total", model="record-model", subnet="small-b"),
        "big": _value("dynaroute_flops_total", model="record-model", subnet="big"),
    }
    assert v == {"router": 100, "small-b": 200, "big": 1800}
    assert _value("dynaroute_full_flops_total", model="record-model") == 4000
    # The saved share that dashboards compute from the two counters.
    assert 1 - sum(v.values()) / 4000 == pytest.approx(1 - 2100 / 4000)
    assert _value("dynaroute_route_decisions_total", model="record-model", subnet="small") == 2
    assert _value("dynaroute_exits_total", model="record-model", depth="1") == 2
    assert _value("dynaroute_exits_total", model="record-model", depth="3") == 2
    assert _value("dynaroute_escalations_total", model="record-model") == 2
    assert _value("dynaroute_fallbacks_total", model="record-model", reason="expert_unavailable") == 2
    assert _value("dynaroute_request_flops_count", model="record-model") == 2
    assert _value("dynaroute_request_flops_sum", model="record-model") == 2100
    assert _value("dynaroute_request_flops_ratio_sum", model="record-model") == pytest.approx(2 * 1050 / 2000)
    assert _value("dynaroute_request_queue_seconds_sum", model="record-model") == pytest.approx(0.002)
    assert _value("dynaroute_request_compute_seconds_sum", model="record-model") == pytest.approx(0.004)


def test_status_labels_are_the_lower_case_grpc_code_names():
    from dynaroute.errors import DeadlineError, InvalidInputError, ModelNotFoundError, OverloadedError, UnavailableError

    assert metrics.status_of(None) == "ok"
    assert metrics.status_of(InvalidInputError("x")) == "invalid_argument"
    assert metrics.status_of(ModelNotFoundError("x")) == "not_found"
    assert metrics.status_of(OverloadedError("x")) == "resource_exhausted"
    assert metrics.status_of(UnavailableError("x")) == "unavailable"
    assert metrics.status_of(DeadlineError("x")) == "deadline_exceeded"  # not the TimeoutError it also is
    assert metrics.status_of(RuntimeError("x")) == "internal"
    metrics.record_request("status-model", "kserve", "ok")
    assert _value("dynaroute_requests_total", model="status-model", api="kserve", status="ok") == 1


def test_known_children_exist_at_zero_from_the_start_so_rate_sees_the_first_increase():
    m = metrics.ModelMetrics("fresh-model")
    m.precreate(["small", "big"], max_depth=3)

    def present(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"model": "fresh-model", **labels})

    for api in ("native", "kserve"):
        for status in ("ok", "invalid_argument", "resource_exhausted", "unavailable", "unauthenticated", "internal"):
            assert present("dynaroute_requests_total", api=api, status=status) == 0, (api, status)
            assert present("dynaroute_rows_total", api=api, status=status) == 0, (api, status)
    for subnet in ("router", "small", "big"):
        assert present("dynaroute_flops_total", subnet=subnet) == 0
    for subnet in ("small", "big"):
        assert present("dynaroute_route_decisions_total", subnet=subnet) == 0
    assert [present("dynaroute_exits_total", depth=str(d)) for d in (1, 2, 3, 4)] == [0, 0, 0, None]
    for reason in ("expert_unavailable", "expert_error"):
        assert present("dynaroute_fallbacks_total", reason=reason) == 0
    assert present("dynaroute_escalations_total") == 0
    # The pre-created children are the ones recording uses.
    _cascade_request(m)
    assert present("dynaroute_exits_total", depth="3") == 1


def test_calls_refused_by_the_token_check_count_as_unauthenticated_per_api():
    from dynaroute.gateway.security import count_rejected

    model = ["unknown"]  # the server's label while it starts, then the served model's name
    on_rejected = count_rejected({"dynaroute.v1.Dynaroute": "native", "inference.GRPCInferenceService": "kserve"},
                                 lambda: model[0])
    before = {
        (m, api): _value("dynaroute_requests_total", model=m, api=api, status="unauthenticated")
        for m in ("unknown", "auth-model") for api in ("native", "kserve")
    }
    on_rejected("/inference.GRPCInferenceService/ModelInfer")
    on_rejected("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")  # not a model request
    model[0] = "auth-model"
    on_rejected("/dynaroute.v1.Dynaroute/Infer")
    on_rejected("/dynaroute.v1.Dynaroute/InferStream")
    on_rejected("/inference.GRPCInferenceService/ModelInfer")
    after = {
        key: _value("dynaroute_requests_total", model=key[0], api=key[1], status="unauthenticated") - v
        for key, v in before.items()
    }
    assert after == {("unknown", "native"): 0, ("unknown", "kserve"): 1,
                     ("auth-model", "native"): 2, ("auth-model", "kserve"): 1}
