"""The gateway end to end: `dynaroute serve` on real local Ray, both gRPC APIs, health,
reflection, metrics. One server for the module (session fixture `digits_server`); the drain
test starts its own, since it ends it."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dynaroute._proto import dynaroute_pb2 as pb
from dynaroute.bundle import Bundle
from dynaroute.client import AsyncClient, Client, make_request
from dynaroute.data import load_digits_splits
from tests.serving import full_logits

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def test_x() -> np.ndarray:
    return load_digits_splits().test.x


@pytest.fixture(scope="module")
def client(digits_server):
    with Client(digits_server.grpc_address, timeout_s=30) as c:
        yield c


@pytest.fixture(scope="module")
def bundle(digits_bundle_dir) -> Bundle:
    return Bundle.load(digits_bundle_dir)


def assert_still_serving(client: Client, x: np.ndarray) -> None:
    assert client.infer(x, quality=1.0).outputs.label_name != ""


# -- native API -------------------------------------------------------------------------------


def test_infer_pinned_full_subnet_matches_in_process(client, bundle, test_x):
    x = test_x[:8]
    expected = full_logits(bundle, x)
    for i in range(len(x)):
        reply = client.infer(x[i], id=f"r{i}", subnet=bundle.full_subnet)
        assert reply.id == f"r{i}" and reply.model == bundle.name
        np.testing.assert_allclose(np.asarray(reply.outputs.logits), expected[i], rtol=1e-4, atol=1e-4)
        assert reply.outputs.label == int(expected[i].argmax())
        assert reply.outputs.label_name == bundle.labels[reply.outputs.label]
        assert list(reply.route.subnets) == [bundle.full_subnet] and list(reply.route.weights) == [1.0]
        c = reply.cost
        assert c.full_flops == bundle.full_flops
        assert c.total_flops == c.router_flops + c.expert_flops
        assert c.flops_ratio == pytest.approx(c.total_flops / c.full_flops)
        assert 0 < c.total_seconds and c.queue_seconds >= 0 and c.compute_seconds > 0


def test_budget_moves_cost(client, test_x):
    """Quality 0 spends no more than quality 1 on the same inputs, and less than the full model."""
    x = test_x[:40]
    cheap = [client.infer(row, quality=0.0).cost.flops_ratio for row in x]
    best = [client.infer(row, quality=1.0).cost.flops_ratio for row in x]
    assert np.mean(cheap) <= np.mean(best)
    assert np.mean(cheap) < 1.0


def test_get_model_and_list_models(client, bundle):
    info = client.get_model()
    assert info.name == bundle.name and info.ready
    assert info.input.kind == "tensor" and info.input.dtype == "float32" and list(info.input.shape) == [64]
    assert list(info.labels) == bundle.labels
    assert {s.name for s in info.subnets} == {s["name"] for s in bundle.subnet_infos}
    assert info.full_subnet == bundle.full_subnet and info.full_flops == bundle.full_flops
    assert client.get_model(bundle.name).name == bundle.name
    assert [m.name for m in client.list_models()] == [bundle.name]
    with pytest.raises(grpc.RpcError) as e:
        client.get_model("nope")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "model" in e.value.details()


def test_infer_stream_answers_every_id_and_survives_bad_messages(client, test_x):
    good = [make_request(test_x[i], id=f"g{i}", quality=0.5) for i in range(30)]
    bad = [
        make_request(test_x[0][:10], id="bad-shape"),
        make_request(np.full(64, np.nan, np.float32), id="bad-nan"),
        make_request(test_x[0], id="bad-model", model="nope"),
    ]
    replies = {r.id: r for r in client.infer_stream(good[:10] + bad + good[10:], timeout_s=60)}
    assert set(replies) == {r.id for r in good + bad}
    assert all(replies[r.id].HasField("reply") for r in good)
    assert replies["bad-shape"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "tensor.shape" in replies["bad-shape"].error.message
    assert replies["bad-nan"].error.code_name == "INVALID_ARGUMENT"
    assert replies["bad-model"].error.code_name == "NOT_FOUND"


async def test_async_client_many_in_flight(digits_server, test_x):
    async with AsyncClient(digits_server.grpc_address, timeout_s=60) as c:
        replies = await asyncio.gather(*(c.infer(test_x[i], id=str(i), quality=0.5) for i in range(100)))
        assert [r.id for r in replies] == [str(i) for i in range(100)]
        streamed = [r async for r in c.infer_stream([make_request(test_x[i], id=str(i)) for i in range(20)])]
        assert sorted(r.id for r in streamed) == sorted(str(i) for i in range(20))
        assert (await c.get_model()).name == digits_server.model


BAD_INPUTS = {
    "wrong dtype": (dict(tensor=np.zeros(64, np.float64)), grpc.StatusCode.INVALID_ARGUMENT, "tensor.dtype"),
    "unknown dtype": (None, grpc.StatusCode.INVALID_ARGUMENT, "tensor.dtype"),
    "wrong shape": (dict(tensor=np.zeros((8, 8), np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "tensor.shape"),
    "bytes not matching shape": (None, grpc.StatusCode.INVALID_ARGUMENT, "tensor.data"),
    "NaN": (dict(tensor=np.full(64, np.nan, np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    "Inf": (dict(tensor=np.full(64, np.inf, np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "Inf"),
    "empty tensor": (dict(tensor=np.zeros(0, np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "tensor.shape"),
    "no input": (None, grpc.StatusCode.INVALID_ARGUMENT, "input"),
    "text to a tensor model": (dict(text="hello"), grpc.StatusCode.INVALID_ARGUMENT, "input"),
    # over the digits server's --max-message-bytes (1 MiB), under the 4x gRPC refuses unread
    "over the size limit": (dict(tensor=np.zeros(300_000, np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "limit"),
    "unknown model": (dict(tensor=np.zeros(64, np.float32), model="nope"), grpc.StatusCode.NOT_FOUND, "model"),
    "quality out of range": (dict(tensor=np.zeros(64, np.float32), quality=1.5), grpc.StatusCode.INVALID_ARGUMENT,
                             "budget.quality"),
    "negative max_flops": (dict(tensor=np.zeros(64, np.float32), max_flops=-1.0), grpc.StatusCode.INVALID_ARGUMENT,
                           "budget.max_flops"),
    "unknown subnet": (dict(tensor=np.zeros(64, np.float32), subnet="w9-d9-p9"), grpc.StatusCode.INVALID_ARGUMENT,
                       "subnet"),
    "unknown policy": (dict(tensor=np.zeros(64, np.float32), policy="coin-flip"), grpc.StatusCode.INVALID_ARGUMENT,
                       "policy"),
}


def _raw_request(case: str) -> pb.InferRequest:
    if case == "unknown dtype":
        return pb.InferRequest(tensor=pb.Tensor(dtype="complex64", shape=[64], data=bytes(512)))
    if case == "bytes not matching shape":
        return pb.InferRequest(tensor=pb.Tensor(dtype="float32", shape=[64], data=bytes(100)))
    return pb.InferRequest()  # no input


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_naming_the_field_and_server_keeps_serving(client, test_x, case):
    kwargs, code, needle = BAD_INPUTS[case]
    with pytest.raises(grpc.RpcError) as e:
        if kwargs is None:
            client.stub.Infer(_raw_request(case), timeout=30)
        else:
            kwargs = dict(kwargs)
            client.infer(kwargs.pop("tensor", None), **kwargs)
    assert e.value.code() == code, e.value.details()
    assert needle.lower() in e.value.details().lower(), e.value.details()
    assert_still_serving(client, test_x[0])


async def test_deadline_exceeded_and_everyone_else_served(digits_server, test_x):
    """A burst with deadlines far shorter than the queue: late requests get DEADLINE_EXCEEDED,
    none hang or fail otherwise, and the server answers normally afterwards."""
    async with AsyncClient(digits_server.grpc_address) as c:

        async def one(i: int) -> grpc.StatusCode:
            try:
                await c.infer(test_x[i % len(test_x)], quality=1.0, timeout_s=0.002)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                return e.code()

        codes = await asyncio.gather(*(one(i) for i in range(300)))
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}
        assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
        assert (await c.infer(test_x[0], timeout_s=30)).outputs.label_name


# -- health, reflection, metrics ----------------------------------------------------------------


def test_health_serving_per_service(digits_server):
    with grpc.insecure_channel(digits_server.grpc_address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "dynaroute.v1.Dynaroute", "inference.GRPCInferenceService"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_lists_the_services(digits_server):
    with grpc.insecure_channel(digits_server.grpc_address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"dynaroute.v1.Dynaroute", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        req = reflection_pb2.ServerReflectionRequest(file_containing_symbol="dynaroute.v1.Dynaroute")
        reply = list(stub.ServerReflectionInfo(iter([req])))[0]
        assert reply.file_descriptor_response.file_descriptor_proto


def _scrape(server) -> str:
    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=10) as r:
        return r.read().decode()


def test_metrics_count_requests_by_status_and_pass_promtool(client, digits_server, test_x):
    client.infer(test_x[0])
    with pytest.raises(grpc.RpcError):
        client.infer(np.zeros(3, np.float32))
    text = _scrape(digits_server)
    model = digits_server.model
    assert f'dynaroute_requests_total{{api="native",model="{model}",status="ok"}}' in text
    assert f'dynaroute_requests_total{{api="native",model="{model}",status="invalid_argument"}}' in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make prometheus` (Debian's prometheus package)")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check.stdout + check.stderr


# -- KServe v2 ----------------------------------------------------------------------------------
# tritonclient's own stubs build the raw messages: a stock client's wire format, and the test
# process must not load a second copy of the `inference` protos.


def test_tritonclient_readiness_metadata_and_infer(digits_server, bundle, test_x):
    import tritonclient.grpc as tc

    triton = tc.InferenceServerClient(digits_server.grpc_address)
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(bundle.name)
    assert triton.get_server_metadata().name == "dynaroute"
    meta = triton.get_model_metadata(bundle.name)
    assert meta.name == bundle.name
    assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [("input", "FP32", [-1, 64])]
    assert [o.name for o in meta.outputs] == ["logits", "label", "confidence"]

    x = test_x[:3]
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = triton.infer(bundle.name, [inp], request_id="k1", parameters={"subnet": bundle.full_subnet})
    expected = full_logits(bundle, x)
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-4, atol=1e-4)
    assert result.as_numpy("logits").shape == (3, len(bundle.labels))
    np.testing.assert_array_equal(result.as_numpy("label"), expected.argmax(1))
    assert result.as_numpy("confidence").shape == (3,)
    response = result.get_response()
    assert response.id == "k1"
    assert response.parameters["full_flops"].int64_param == 3 * bundle.full_flops
    assert '"subnets"' in response.parameters["route"].string_param

    only_label = triton.infer(
        bundle.name, [inp], outputs=[tc.InferRequestedOutput("label")], parameters={"quality": 0.5}
    )
    assert only_label.as_numpy("logits") is None and only_label.as_numpy("label").shape == (3,)

    with pytest.raises(tc.InferenceServerException) as e:
        triton.get_model_metadata("nope")
    assert "nope" in str(e.value)
    triton.close()


def _kserve_stub(server):
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    channel = grpc.insecure_channel(server.grpc_address)
    return channel, service_pb2, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_kserve_typed_and_raw_contents_agree(digits_server, bundle, test_x):
    channel, spb, stub = _kserve_stub(digits_server)
    x = test_x[:2]
    typed = spb.ModelInferRequest(model_name=bundle.name)
    t = typed.inputs.add(name="input", datatype="FP32", shape=[2, 64])
    t.contents.fp32_contents.extend(x.ravel().tolist())
    typed.parameters["subnet"].string_param = bundle.full_subnet
    raw = spb.ModelInferRequest(model_name=bundle.name)
    raw.inputs.add(name="input", datatype="FP32", shape=[2, 64])
    raw.raw_input_contents.append(x.astype("<f4").tobytes())
    raw.parameters["subnet"].string_param = bundle.full_subnet
    a, b = stub.ModelInfer(typed, timeout=30), stub.ModelInfer(raw, timeout=30)
    assert [o.name for o in a.outputs] == ["logits", "label", "confidence"]
    assert list(a.outputs[0].shape) == [2, len(bundle.labels)] and a.outputs[0].datatype == "FP32"
    assert a.outputs[1].datatype == "INT64" and list(a.outputs[1].shape) == [2]
    assert a.raw_output_contents == b.raw_output_contents
    np.testing.assert_allclose(
        np.frombuffer(a.raw_output_contents[0], "<f4").reshape(2, -1), full_logits(bundle, x), rtol=1e-4, atol=1e-4
    )
    channel.close()


KSERVE_BAD = {
    "wrong datatype": ("FP64", [1, 64], "inputs[0].datatype", grpc.StatusCode.INVALID_ARGUMENT),
    "no batch dimension": ("FP32", [64], "inputs[0].shape", grpc.StatusCode.INVALID_ARGUMENT),
    "wrong shape": ("FP32", [1, 63], "inputs[0].shape", grpc.StatusCode.INVALID_ARGUMENT),
    "zero rows": ("FP32", [0, 64], "inputs[0].shape", grpc.StatusCode.INVALID_ARGUMENT),
    "raw bytes short": ("FP32", [2, 64], "raw_input_contents[0]", grpc.StatusCode.INVALID_ARGUMENT),
    "NaN": ("FP32", [1, 64], "NaN", grpc.StatusCode.INVALID_ARGUMENT),
    "bad budget": ("FP32", [1, 64], "parameters", grpc.StatusCode.INVALID_ARGUMENT),
    "unknown model": ("FP32", [1, 64], "model_name", grpc.StatusCode.NOT_FOUND),
}


@pytest.mark.parametrize("case", list(KSERVE_BAD))
def test_kserve_bad_input_is_refused_naming_the_field(digits_server, bundle, test_x, case):
    datatype, shape, needle, code = KSERVE_BAD[case]
    channel, spb, stub = _kserve_stub(digits_server)
    req = spb.ModelInferRequest(model_name="nope" if case == "unknown model" else bundle.name)
    req.inputs.add(name="input", datatype=datatype, shape=shape)
    data = np.full(64, np.nan, "<f4") if case == "NaN" else test_x[0].astype("<f4")
    req.raw_input_contents.append(data.tobytes())
    if case == "bad budget":
        req.parameters["quality"].double_param = 7.0
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(req, timeout=30)
    assert e.value.code() == code, e.value.details()
    assert needle.lower() in e.value.details().lower(), e.value.details()
    ok = spb.ModelInferRequest(model_name=bundle.name)
    ok.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    ok.raw_input_contents.append(test_x[0].astype("<f4").tobytes())
    assert len(stub.ModelInfer(ok, timeout=30).raw_output_contents) == 3
    channel.close()


# -- draining -----------------------------------------------------------------------------------


async def test_sigterm_drains_in_flight_then_exits_zero(digits_bundle_dir, test_x):
    """Health is NOT_SERVING while the engine starts, then SERVING; on SIGTERM it turns
    NOT_SERVING, requests in flight still complete, new ones get UNAVAILABLE, and the process
    exits 0."""
    from tests.serving import ServerProcess

    server = ServerProcess.start(digits_bundle_dir, wait=False)
    try:
        async with grpc.aio.insecure_channel(server.starting_address) as ch:
            status = (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)).status
        # The port opens before the engine's actors start (seconds): health says so meanwhile.
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        await asyncio.to_thread(server.wait_for, server.ready)
        async with grpc.aio.insecure_channel(server.grpc_address) as ch, AsyncClient(server.grpc_address) as c:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            done_at: list[tuple[float, grpc.StatusCode]] = []

            async def one(i: int) -> None:
                try:
                    await c.infer(test_x[i % len(test_x)], quality=1.0, timeout_s=60)
                    done_at.append((time.monotonic(), grpc.StatusCode.OK))
                except grpc.aio.AioRpcError as e:
                    done_at.append((time.monotonic(), e.code()))

            tasks = [asyncio.create_task(one(i)) for i in range(400)]
            while not done_at:  # the server is busy with the burst
                await asyncio.sleep(0.001)
            sigterm_at = time.monotonic()
            server.terminate()
            assert (await asyncio.wait_for(watch.read(), 30)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
        codes = {code for _, code in done_at}
        assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
        finished_after = [t for t, code in done_at if t > sigterm_at and code == grpc.StatusCode.OK]
        assert finished_after, "no request in flight at SIGTERM finished"
        assert await asyncio.to_thread(server.wait, 60) == 0, server.output()
        assert "dynaroute: stopped" in server.output()
    finally:
        server.stop()
