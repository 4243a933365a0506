"""Hardening (issue 10): each bad request gets its own status from the real `dynaroute serve`,
and the server keeps serving. One server for most tests (session fixture `digits_server`);
the drain test starts its own, on a copy of the bundle without an input range."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynaroute._proto import dynaroute_pb2 as pb
from dynaroute.client import AsyncClient, Client, make_request
from dynaroute.data import load_digits_splits

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NATIVE = "/dynaroute.v1.Dynaroute"
KSERVE = "/inference.GRPCInferenceService"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return load_digits_splits().test.x[:8]


@pytest.fixture(scope="module")
def client(digits_server):
    with Client(digits_server.grpc_address, timeout_s=30) as c:
        yield c


@pytest.fixture(scope="module")
def kserve(digits_server):
    """tritonclient's own stubs (the test process must not load a second copy of the protos)."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    channel = grpc.insecure_channel(digits_server.grpc_address)
    yield service_pb2, service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def kserve_request(spb, model: str, rows: np.ndarray, **params: object):
    req = spb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input", datatype="FP32", shape=list(rows.shape))
    req.raw_input_contents.append(rows.astype("<f4").tobytes())
    for key, value in params.items():
        if isinstance(value, str):
            req.parameters[key].string_param = value
        else:
            req.parameters[key].double_param = float(value)
    return req


def assert_still_serving(client: Client, x: np.ndarray) -> None:
    assert client.infer(x[0], quality=1.0).outputs.label_name != ""


def refused(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kwargs)
    return e.value


def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the metrics endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# -- 1: shapes numpy cannot build ---------------------------------------------------------------

UNBUILDABLE = {
    "65 dimensions": pb.Tensor(dtype="float32", shape=[1] * 65, data=bytes(4)),
    "too big": pb.Tensor(dtype="float32", shape=[0, 4611686018427387904], data=b""),
}


@pytest.mark.parametrize("case", list(UNBUILDABLE))
def test_unbuildable_shape_is_invalid_argument_naming_the_shape(client, x, case):
    request = pb.InferRequest(id=case, tensor=UNBUILDABLE[case])
    e = refused(client.stub.Infer, request, timeout=30)
    assert e.code() == INVALID and "tensor.shape" in e.details(), e.details()
    [reply] = client.infer_stream([request], timeout_s=30)
    assert reply.id == case and reply.error.code_name == "INVALID_ARGUMENT" and "tensor.shape" in reply.error.message
    assert_still_serving(client, x)


# -- 2, 3: messages that are not protobuf -------------------------------------------------------


def test_undecodable_message_is_invalid_argument_on_every_method_counted_and_logged_rarely(
    digits_server, client, x
):
    # The KServe methods served are those of the repo's proto (tritonclient's has more).
    kserve = re.findall(r"rpc (\w+)\(", (REPO / "proto" / "inference" / "grpc_service.proto").read_text())
    native = [m.name for m in pb.DESCRIPTOR.services_by_name["Dynaroute"].methods
              if not (m.client_streaming or m.server_streaming)]
    unary = [f"{NATIVE}/{m}" for m in native] + [f"{KSERVE}/{m}" for m in kserve]
    assert f"{NATIVE}/Infer" in unary and f"{KSERVE}/ModelInfer" in unary
    before = scrape(digits_server)
    bad = {f"{NATIVE}/Infer": [b"\xff", b"\x12\x01\xff"], f"{KSERVE}/ModelInfer": [b"\x0a\x02\xc3\x28"]}
    sent = 0
    with grpc.insecure_channel(digits_server.grpc_address) as channel:
        for method in unary:
            call = channel.unary_unary(method)  # no serializers: the bytes go as they are
            for raw in bad.get(method, [b"\xff"]) * 10:
                e = refused(call, raw, timeout=30)
                assert e.code() == INVALID, (method, e.code(), e.details())
                assert "not a valid protobuf" in e.details()
                sent += 1
    after = scrape(digits_server)
    model = digits_server.model
    count = sum(sample(after, "dynaroute_undecodable_messages_total", api=a)
                - sample(before, "dynaroute_undecodable_messages_total", api=a) for a in ("native", "kserve"))
    assert count == sent
    for api, method in (("native", "Infer"), ("kserve", "ModelInfer")):
        key = dict(name="dynaroute_requests_total", model=model, api=api, status="invalid_argument")
        assert sample(after, **key) - sample(before, **key) >= 10, (api, method)
    # Logged once per method per minute at most (a line per message would let a client flood
    # the log), never with a traceback.
    lines = [line for line in digits_server.lines if "undecodable request message on" in line]
    for method in unary:
        assert 1 <= sum(f"on {method}:" in line for line in lines) <= 3, method
    assert not any("DecodeError" in line and "Traceback" in line for line in digits_server.lines)
    assert_still_serving(client, x)


def test_infer_stream_answers_every_good_message_around_an_undecodable_one(digits_server, client, x):
    good = [make_request(x[i], id=f"g{i}", quality=0.5).SerializeToString() for i in range(4)]
    with grpc.insecure_channel(digits_server.grpc_address) as channel:
        stream = channel.stream_stream(f"{NATIVE}/InferStream", response_deserializer=pb.InferStreamReply.FromString)
        replies = list(stream(iter([good[0], good[1], b"\x12\x01\xff", good[2], good[3]]), timeout=60))
    assert sorted(r.id for r in replies if r.HasField("reply")) == ["g0", "g1", "g2", "g3"]
    [error] = [r for r in replies if r.HasField("error")]
    assert error.id == "" and error.error.code == INVALID.value[0] and "stream message 2" in error.error.message
    assert_still_serving(client, x)


# -- 5: error details never echo a whole large value ------------------------------------------------

LONG = "x" * 50_000  # under the server's --max-message-bytes (1 MiB); gRPC's metadata limit is 8 KiB


@pytest.mark.parametrize("field", ["subnet", "model", "policy"])
def test_native_error_details_truncate_echoed_values(client, x, field):
    e = refused(client.infer, x[0], **{field: LONG})
    assert e.code() in (INVALID, grpc.StatusCode.NOT_FOUND), e.details()
    assert field in e.details() and "xxxx" in e.details() and len(e.details()) < 1000
    assert_still_serving(client, x)


@pytest.mark.parametrize("where", ["subnet parameter", "parameter name", "model_name"])
def test_kserve_error_details_truncate_echoed_values(digits_server, kserve, client, x, where):
    spb, stub = kserve
    if where == "subnet parameter":
        req = kserve_request(spb, digits_server.model, x[:1], subnet=LONG)
    elif where == "parameter name":
        req = kserve_request(spb, digits_server.model, x[:1], **{LONG: 0.5})
    else:
        req = kserve_request(spb, LONG, x[:1])
    e = refused(stub.ModelInfer, req, timeout=30)
    assert e.code() in (INVALID, grpc.StatusCode.NOT_FOUND), e.details()
    assert len(e.details()) < 1000 and "xxxx" in e.details()
    assert_still_serving(client, x)


# -- 6: finite but huge inputs ------------------------------------------------------------------


@pytest.mark.parametrize("value", [3.4028235e38, 1e30, -1e6])
def test_huge_inputs_are_refused_with_the_training_range(digits_server, kserve, client, x, value):
    row = np.full(64, value, np.float32)
    e = refused(client.infer, row, quality=1.0)
    assert e.code() == INVALID and "training inputs spanned" in e.details(), e.details()
    spb, stub = kserve
    e = refused(stub.ModelInfer, kserve_request(spb, digits_server.model, np.stack([x[0], row])), timeout=30)
    assert e.code() == INVALID and "row 1" in e.details(), e.details()
    assert_still_serving(client, x)


def test_inputs_within_the_accepted_range_are_served(client, x):
    """The range is widened beyond the training inputs': a little outside them still answers."""
    reply = client.infer(np.clip(x[0] * 1.5 + 1.0, None, 30.0), quality=1.0)
    assert np.isfinite(reply.outputs.logits).all() and reply.outputs.label_name


# -- 15: budgets out of reach are flagged ------------------------------------------------------------


def test_out_of_reach_budgets_are_flagged_in_both_apis(digits_server, kserve, client, x):
    points = client.get_model().calibration
    best = max(p.expected_accuracy for p in points)
    cheapest = min(p.mean_flops for p in points)
    assert best < 1.0 and cheapest > 1000  # the router alone costs more than 1000 FLOPs
    target = (best + 1.0) / 2
    for budget, needle in ((dict(target_accuracy=target), "target_accuracy"), (dict(max_flops=1000.0), "max_flops")):
        reply = client.infer(x[0], **budget)
        assert reply.route.budget_out_of_reach and needle in reply.route.budget_note, reply.route
        spb, stub = kserve
        resp = stub.ModelInfer(kserve_request(spb, digits_server.model, x[:2], **budget), timeout=30)
        assert resp.parameters["budget_out_of_reach"].bool_param
        assert needle in resp.parameters["budget_note"].string_param
        assert all(r["budget_out_of_reach"] for r in json.loads(resp.parameters["route"].string_param))
    reply = client.infer(x[0], quality=0.5)
    assert not reply.route.budget_out_of_reach and reply.route.budget_note == ""
    resp = stub.ModelInfer(kserve_request(spb, digits_server.model, x[:1], quality=0.5), timeout=30)
    assert not resp.parameters["budget_out_of_reach"].bool_param and "budget_note" not in resp.parameters


# -- 16: unknown KServe parameters, a pinned subnet with a bogus policy --------------------------------


def test_kserve_unknown_parameter_names_are_refused_listing_the_known_ones(digits_server, kserve, client, x):
    spb, stub = kserve
    e = refused(stub.ModelInfer, kserve_request(spb, digits_server.model, x[:1], qualty=0.5), timeout=30)
    assert e.code() == INVALID, e.details()
    assert "'qualty'" in e.details() and all(k in e.details() for k in ("quality", "max_flops", "subnet", "policy"))
    assert_still_serving(client, x)


def test_a_pinned_subnet_with_a_bogus_policy_is_refused_in_both_apis(digits_server, kserve, client, x):
    subnet = client.get_model().full_subnet
    spb, stub = kserve
    e = refused(stub.ModelInfer, kserve_request(spb, digits_server.model, x[:1], subnet=subnet, policy="bogus"),
                timeout=30)
    assert e.code() == INVALID and "policy" in e.details() and "bogus" in e.details(), e.details()
    e = refused(client.infer, x[0], subnet=subnet, policy="bogus")
    assert e.code() == INVALID and "policy" in e.details(), e.details()
    assert client.infer(x[0], subnet=subnet).route.subnets == [subnet]


# -- 17: requests are calls, rows have their own metric ------------------------------------------------


def test_requests_count_calls_for_both_apis_and_rows_count_examples(digits_server, kserve, client, x):
    model = digits_server.model
    spb, stub = kserve

    def counts() -> dict[tuple[str, str], float]:
        s = scrape(digits_server)
        return {(name, api): sample(s, f"dynaroute_{name}_total", model=model, api=api, status="ok")
                for name in ("requests", "rows") for api in ("native", "kserve")}

    before = counts()
    stub.ModelInfer(kserve_request(spb, model, x[:5], quality=0.5), timeout=30)
    client.infer(x[0], quality=0.5)
    after = counts()
    assert {k: after[k] - before[k] for k in after} == {
        ("requests", "kserve"): 1, ("rows", "kserve"): 5, ("requests", "native"): 1, ("rows", "native"): 1,
    }
    key = dict(model=model, api="kserve", status="invalid_argument")
    before = scrape(digits_server)
    row = np.full(64, 1e30, np.float32)
    refused(stub.ModelInfer, kserve_request(spb, model, np.stack([x[0], x[1], row])), timeout=30)
    after = scrape(digits_server)
    assert sample(after, "dynaroute_requests_total", **key) - sample(before, "dynaroute_requests_total", **key) == 1


# -- 6 (bundles without a range), 7: SIGTERM ---------------------------------------------------------------


@pytest.fixture(scope="module")
def rangeless_server(digits_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """`dynaroute serve` on a copy of the digits bundle whose manifest has no input value range
    (as bundles trained before it was recorded)."""
    from tests.serving import ServerProcess

    root = tmp_path_factory.mktemp("rangeless") / "digits"
    shutil.copytree(digits_bundle_dir, root)
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["input"]["value_range"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    server = ServerProcess.start(root)
    yield server
    server.stop()


def test_a_bundle_without_a_range_refuses_non_finite_answers(rangeless_server, x):
    with Client(rangeless_server.grpc_address, timeout_s=30) as c:
        e = refused(c.infer, np.full(64, 3.4028235e38, np.float32), quality=1.0)
        assert e.code() == INVALID and "not finite" in e.details(), e.details()
        assert_still_serving(c, x)


async def test_every_call_after_sigterm_is_unavailable_never_cancelled(rangeless_server, x):
    """Clients that keep sending through SIGTERM until the server has exited: every call that
    started after the signal ends OK (in flight) or UNAVAILABLE, none CANCELLED, and the
    process exits 0."""
    server = rangeless_server
    after_signal: list[grpc.StatusCode] = []
    signalled = asyncio.Event()
    exited = asyncio.Event()

    async def keep_sending(c: AsyncClient, i: int) -> None:
        while not exited.is_set():
            started_after = signalled.is_set()
            try:
                await c.infer(x[i % len(x)], quality=1.0, timeout_s=30)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                code = e.code()
            if started_after:
                after_signal.append(code)
            if code != grpc.StatusCode.OK:
                await asyncio.sleep(0.001)  # a refused client retries at once, as a load generator does

    clients = [AsyncClient(server.grpc_address) for _ in range(4)]
    try:
        for c in clients:
            await c.__aenter__()
        tasks = [asyncio.create_task(keep_sending(clients[i % 4], i)) for i in range(32)]
        await asyncio.sleep(0.5)  # under load
        server.terminate()
        signalled.set()
        code = await asyncio.to_thread(server.wait, 120)
        exited.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        for c in clients:
            await c.__aexit__(None, None, None)
    assert code == 0, server.output()
    assert after_signal and grpc.StatusCode.UNAVAILABLE in after_signal
    assert set(after_signal) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, set(after_signal)


def test_a_kserve_batch_the_server_can_hold_is_answered_whole_on_an_idle_server(digits_server, kserve, client):
    spb, stub = kserve
    rows = np.tile(load_digits_splits().test.x, (3, 1))[:1000]  # more rows than the router batches at once
    resp = stub.ModelInfer(kserve_request(spb, digits_server.model, rows), timeout=120)
    assert resp.parameters["rows"].int64_param == 1000
    assert len(json.loads(resp.parameters["route"].string_param)) == 1000
    assert_still_serving(client, rows)


def test_a_kserve_batch_no_queue_can_hold_is_invalid_argument_naming_the_limit(digits_server, kserve, client, x):
    spb, stub = kserve
    rows = np.tile(x, (138, 1))[:1100]  # 1100 rows; the server admits 1024 (--max-queue-size)
    e = refused(stub.ModelInfer, kserve_request(spb, digits_server.model, rows), timeout=60)
    assert e.code() == INVALID and "--max-queue-size" in e.details() and "1100 rows" in e.details()
    assert_still_serving(client, x)


async def test_requests_that_cannot_meet_their_deadline_are_refused_as_overload(sst2_server, x):
    # Far more work at once than the experts can finish within each call's deadline (the full
    # text model, pinned): the expert queues know their drain rate, so calls that would miss the
    # deadline are refused (RESOURCE_EXHAUSTED) instead of left to expire; the rest are answered.
    sentence = "a gripping , funny and moving film that never lets its audience go"
    async with AsyncClient(sst2_server.grpc_address) as c:
        full = (await c.get_model()).full_subnet
        await asyncio.gather(*(c.infer(text=sentence, subnet=full, timeout_s=60) for _ in range(32)))  # measure

        async def one() -> grpc.StatusCode:
            try:
                await c.infer(text=sentence, subnet=full, timeout_s=0.3)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                return e.code()

        codes = await asyncio.gather(*(one() for _ in range(600)))
        seen = set(codes)
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in seen, seen
        assert seen <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}, seen
        assert (await c.infer(text=sentence, timeout_s=60)).outputs.label_name != ""  # still serving


async def test_a_big_batch_does_not_hold_back_the_small_requests_that_arrive_behind_it(sst2_server):
    # Item 4: the rows of one KServe call take turns with other calls in every queue, so single
    # requests sent while a 600-row batch is being computed are answered before it is done (in
    # first-in, first-out queues each would wait for all 600 rows).
    import tritonclient.grpc.aio as triton_aio
    from tritonclient.grpc import InferInput

    sentences = [f"an honest , {w} little film about the people who make it" for w in ("warm", "dull", "odd") * 200]
    batch = InferInput("text", [len(sentences)], "BYTES")
    batch.set_data_from_numpy(np.array([s.encode() for s in sentences], dtype=object))
    triton = triton_aio.InferenceServerClient(sst2_server.grpc_address)
    try:
        async with AsyncClient(sst2_server.grpc_address) as c:
            info = await c.get_model()
            big = asyncio.ensure_future(triton.infer(info.name, [batch], parameters={"subnet": info.full_subnet},
                                                     client_timeout=300))
            answered_meanwhile = 0
            for _ in range(200):  # bounded: the batch takes seconds; each small request a batch's turn
                reply = await c.infer(text="a moving film", subnet=info.full_subnet, timeout_s=60)
                assert reply.outputs.label_name in info.labels
                if big.done():
                    break
                answered_meanwhile += 1
            result = await big
        assert len(result.as_numpy("label")) == len(sentences)
        assert answered_meanwhile >= 3, answered_meanwhile
    finally:
        await triton.close()
