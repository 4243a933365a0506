"""SLO-aware budgets on the real server: `dynaroute serve --slo-ms` on a text bundle under a
short burst lowers the budgets that allow it (never below their floor, never those without
one), every reply says the budget asked and the one served, the metrics count it, and budgets
are served as asked again once the burst is over."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from pathlib import Path

import grpc
import pytest

from dynaroute.client import AsyncClient, Client
from tests.serving import ServerProcess, scrape
from tests.sst2_sample import TEXTS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BURST = 240  # requests sent at once: several times what the full model answers in the objective


@pytest.fixture(scope="module")
def server(sst2_tiny_bundle_dir: Path):
    # An objective of 100 ms: the burst's queue is far behind it, an idle server far ahead.
    server = ServerProcess.start(sst2_tiny_bundle_dir, "--slo-ms", "100", "--slo-hold-s", "0.5")
    yield server
    server.stop()


def level(server: ServerProcess) -> float:
    return scrape(server)[("dynaroute_slo_level", (("model", server.model),))]


async def burst(address: str) -> list:
    """BURST requests at once, alternating: quality 1 allowed down to quality 0, and quality 1
    with no floor."""
    async with AsyncClient(address, timeout_s=120) as c:
        return await asyncio.gather(*(
            c.infer(text=TEXTS[i % len(TEXTS)], id=str(i), quality=1.0, min_quality=0.0 if i % 2 == 0 else None)
            for i in range(BURST)
        ))


def test_a_burst_lowers_budgets_that_allow_it_and_they_are_restored_after(server: ServerProcess) -> None:
    with Client(server.grpc_address, timeout_s=60) as client:
        info = client.get_model()
        # Idle: served as asked, and the reply says so.
        idle = client.infer(text=TEXTS[0], quality=1.0, min_quality=0.0)
        asked = idle.route.budget_asked
        assert not idle.route.budget_lowered and idle.route.budget_got == asked
        cheapest = min(p.mean_flops for p in info.calibration if p.policy == info.default_policy)
        assert cheapest < asked.mean_flops, "the bundle has no cheaper point to lower quality 1 to"
        pinned = client.infer(text=TEXTS[0], subnet=info.full_subnet)
        assert pinned.route.budget_asked.policy == "subnet" and pinned.route.budget_asked.flops_ratio == 1.0
        assert not pinned.route.budget_lowered

    before = scrape(server).get(("dynaroute_budget_lowered_total", (("model", server.model),)), 0.0)
    replies = asyncio.run(burst(server.grpc_address))
    floored = [r for r in replies if int(r.id) % 2 == 0]
    plain = [r for r in replies if int(r.id) % 2 == 1]
    lowered = [r for r in floored if r.route.budget_lowered]
    assert lowered, "no budget was lowered under a burst of several times the objective's work"
    for r in lowered:
        assert r.route.budget_asked == asked
        assert r.route.budget_got.mean_flops < asked.mean_flops
        assert r.cost.total_flops > 0 and r.outputs.label_name
    # No floor: never lowered, whatever the load.
    assert not any(r.route.budget_lowered for r in plain)
    assert all(r.route.budget_got == r.route.budget_asked == asked for r in plain)
    samples = scrape(server)
    model = (("model", server.model),)
    assert samples[("dynaroute_budget_lowered_total", model)] - before == len(lowered)
    assert samples[("dynaroute_budget_flops_ratio_count", model)] >= BURST

    # The load has fallen: within a bound, the level is back at 0 and budgets are as asked.
    deadline = time.monotonic() + 60
    with Client(server.grpc_address, timeout_s=60) as client:
        while True:
            reply = client.infer(text=TEXTS[1], quality=1.0, min_quality=0.0)
            if level(server) == 0.0 and not reply.route.budget_lowered:
                break
            assert time.monotonic() < deadline, f"the level stayed at {level(server)} after the burst"
            time.sleep(0.2)
        again = client.infer(text=TEXTS[2], quality=1.0, min_quality=0.0)
        assert not again.route.budget_lowered and again.route.budget_got == asked


def test_kserve_reports_the_budget_asked_and_served(server: ServerProcess) -> None:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    rows = [t.encode() for t in TEXTS]
    req = service_pb2.ModelInferRequest(model_name=server.model)
    req.inputs.add(name="text", datatype="BYTES", shape=[len(rows)])
    req.raw_input_contents.append(b"".join(struct.pack("<I", len(b)) + b for b in rows))
    req.parameters["quality"].double_param = 1.0
    req.parameters["min_quality"].double_param = 0.5
    with grpc.insecure_channel(server.grpc_address) as channel:
        resp = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=60)
    params = resp.parameters
    routes = json.loads(params["route"].string_param)
    assert len(routes) == len(rows)
    for r in routes:
        assert r["budget_asked"]["policy"] and r["budget_got"]["flops_ratio"] > 0
        assert r["budget_lowered"] == (r["budget_got"]["mean_flops"] < r["budget_asked"]["mean_flops"])
    assert params["rows_lowered"].int64_param == sum(r["budget_lowered"] for r in routes)
    assert params["budget_got_flops_ratio"].double_param <= params["budget_asked_flops_ratio"].double_param
    # A floor that is not a number is refused, naming the parameter.
    req.parameters["min_quality"].string_param = "lots"
    with grpc.insecure_channel(server.grpc_address) as channel, pytest.raises(grpc.RpcError) as e:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "min_quality" in e.value.details()


def test_floor_errors_are_invalid_argument(server: ServerProcess) -> None:
    with Client(server.grpc_address, timeout_s=60) as client:
        for kwargs, needle in (
            ({"quality": 1.0, "min_quality": 1.5}, "min_quality must be in"),
            ({"subnet": "w1-d6-p0", "min_quality": 0.5}, "pinned subnet is never lowered"),
            ({"min_quality": 0.5, "min_accuracy": 0.5}, "at most one floor"),
        ):
            with pytest.raises(grpc.RpcError) as e:
                client.infer(text=TEXTS[0], **kwargs)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details(), kwargs
