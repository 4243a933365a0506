"""The model repository end to end: `dynaroute serve DIR` on a folder of two digits bundles
(the second a copy under another name), on real local Ray; Triton's repository calls from
`tritonclient.grpc` (the test process must not load a second copy of the `inference` protos,
so KServe calls go through tritonclient only), and the same over HTTP/REST (`tritonclient.http`
and urllib). One server for the module; the tests run in order (the last one replaces a model)."""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from dynaroute.bundle import Bundle
from dynaroute.client import AsyncClient, Client
from dynaroute.data import load_digits_splits

pytestmark = [pytest.mark.integration, pytest.mark.slow]

A, B = "digits-a", "digits-b"


def set_manifest(folder: Path, **changes: object) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "labels":
            manifest["task"]["labels"] = value
        else:
            manifest[key] = value
    path.write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="module")
def repo_dir(digits_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model_repository")
    for name in (A, B):
        shutil.copytree(digits_bundle_dir, root / name)
        set_manifest(root / name, name=name)
    (root / "notes").mkdir()  # a folder that is not a bundle: not a model
    return root


@pytest.fixture(scope="module")
def server(repo_dir: Path):
    from tests.serving import ServerProcess

    server = ServerProcess.start(repo_dir, "--http-port", "0")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return load_digits_splits().test.x[:16]


@pytest.fixture(scope="module")
def bundle(digits_bundle_dir: Path) -> Bundle:
    return Bundle.load(digits_bundle_dir)


def health(server, service: str) -> int:
    with grpc.insecure_channel(server.grpc_address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def replicas_live(server) -> dict[str, float]:
    """model -> the sum of dynaroute_expert_replicas_live over its experts, as scraped now."""
    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "dynaroute_expert_replicas_live":
            for s in family.samples:
                out[s.labels["model"]] = out.get(s.labels["model"], 0.0) + s.value
    return out


def index(triton) -> dict[str, tuple[str, str]]:
    return {m["name"]: (m.get("state", ""), m.get("reason", ""))
            for m in triton.get_model_repository_index(as_json=True).get("models", [])}


def test_two_models_are_served_together_and_each_answers(server, bundle, x):
    import tritonclient.grpc as tc

    assert server.model == f"{A},{B}"  # the ready line names every model
    with Client(server.grpc_address, timeout_s=30) as client:
        replies = {name: client.infer(x[0], model=name, subnet=bundle.full_subnet) for name in (A, B)}
        assert {name: r.model for name, r in replies.items()} == {A: A, B: B}
        np.testing.assert_allclose(replies[A].outputs.logits, replies[B].outputs.logits, rtol=1e-5)
        batch = client.infer_batch(x[:4], model=B, subnet=bundle.full_subnet)  # the native batch too
        assert batch.model == B and [r.reply.model for r in batch.rows] == [B] * 4
        assert [m.name for m in client.list_models()] == [A, B]
        assert client.get_model(B).name == B and client.get_model(B).ready
        with pytest.raises(grpc.RpcError) as e:
            client.infer(x[0])  # several models: the request must name one
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and A in e.value.details() and B in e.value.details()
    triton = tc.InferenceServerClient(server.grpc_address)
    try:
        inp = tc.InferInput("input", [3, 64], "FP32")
        inp.set_data_from_numpy(x[:3])
        for name in (A, B):
            assert triton.is_model_ready(name)
            result = triton.infer(name, [inp], parameters={"subnet": bundle.full_subnet})
            assert result.get_response().model_name == name and result.as_numpy("label").shape == (3,)
        assert index(triton) == {A: ("READY", ""), B: ("READY", "")}
        assert "model_repository" in triton.get_server_metadata().extensions
    finally:
        triton.close()
    for name in ("", A, B):
        assert health(server, name) == health_pb2.HealthCheckResponse.SERVING, name


def test_repository_errors_name_the_problem(server, x):
    import tritonclient.grpc as tc

    triton = tc.InferenceServerClient(server.grpc_address)
    try:
        cases = {
            "notes": ("StatusCode.NOT_FOUND", "is not a bundle"),
            "nope": ("StatusCode.NOT_FOUND", "no bundle named 'nope'"),
        }
        for name, (status, needle) in cases.items():
            with pytest.raises(tc.InferenceServerException) as e:
                triton.load_model(name)
            assert e.value.status() == status and needle in e.value.message(), e.value
        with pytest.raises(tc.InferenceServerException) as e:
            triton.load_model(A, config='{"max_batch_size": 8}')  # Triton's config override
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "parameters" in e.value.message()
        inp = tc.InferInput("input", [1, 64], "FP32")
        inp.set_data_from_numpy(x[:1])
        with pytest.raises(tc.InferenceServerException) as e:
            triton.infer(A, [inp], model_version="2")
        assert e.value.status() == "StatusCode.NOT_FOUND" and "version" in e.value.message()
        assert set(index(triton)) == {A, B}  # names a client tried are not listed
    finally:
        triton.close()


def http(server, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
    """One plain HTTP call to the REST port; returns the status and the JSON body."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{server.http_address}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def rest_infer(server, name: str, x: np.ndarray) -> tuple[int, Any]:
    return http(server, "POST", f"/v2/models/{name}/infer",
                {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}]})


def test_rest_answers_each_model_by_name_and_unloads_one_while_the_other_answers(server, bundle, x):
    import tritonclient.http as th

    triton = th.InferenceServerClient(server.http_address)
    try:
        for name in (A, B):  # every loaded model answers at its own path
            assert triton.is_model_ready(name) and triton.get_model_metadata(name)["name"] == name
            inp = th.InferInput("input", [3, 64], "FP32")
            inp.set_data_from_numpy(x[:3])
            result = triton.infer(name, [inp], parameters={"subnet": bundle.full_subnet})
            assert result.get_response()["model_name"] == name and result.as_numpy("label").shape == (3,)
        assert {m["name"]: m["state"] for m in triton.get_model_repository_index()} == {A: "READY", B: "READY"}
        assert "model_repository" in triton.get_server_metadata()["extensions"]

        assert http(server, "POST", f"/v2/repository/models/{B}/unload") == (200, {})
        assert http(server, "GET", f"/v2/models/{B}/ready") == (503, {"name": B, "ready": False})
        assert not triton.is_model_ready(B) and triton.is_server_ready()  # the server serves A on
        for status, reply in (http(server, "GET", f"/v2/models/{B}"), rest_infer(server, B, x[:1])):
            assert status == 404 and "not loaded" in reply["error"], reply
        status, reply = rest_infer(server, A, x[:2])
        assert status == 200 and reply["model_name"] == A, reply
        index = http(server, "POST", "/v2/repository/index", {"ready": True})
        assert index == (200, [{"name": A, "version": "1", "state": "READY"}])
        rows = {m["name"]: m for m in http(server, "POST", "/v2/repository/index")[1]}
        assert rows[B] == {"name": B, "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}

        status, reply = http(server, "GET", "/v2/models/nope/ready")  # a name the repository does not know
        assert status == 404 and "nope" in reply["error"], reply
        status, reply = http(server, "POST", "/v2/repository/models/nope/load")
        assert status == 404 and "no bundle named 'nope'" in reply["error"], reply
        status, reply = http(server, "POST", f"/v2/repository/models/{B}/load",
                             {"parameters": {"config": '{"max_batch_size": 8}'}})
        assert status == 400 and "parameters" in reply["error"], reply

        triton.load_model(B)  # loaded again, over REST, for the tests that follow
        assert triton.is_model_ready(B)
        status, reply = rest_infer(server, B, x[:1])
        assert status == 200 and reply["model_name"] == B, reply
    finally:
        triton.close()


async def test_one_model_unloads_and_reloads_while_the_other_serves_without_a_failure(server, x):
    import tritonclient.grpc.aio as triton_aio

    stop = asyncio.Event()
    codes: list[grpc.StatusCode] = []

    async def traffic(c: AsyncClient, i: int) -> None:
        while not stop.is_set():
            try:
                await c.infer(x[i % len(x)], model=B, quality=0.5, timeout_s=60)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as e:
                codes.append(e.code())

    triton = triton_aio.InferenceServerClient(server.grpc_address)
    try:
        async with AsyncClient(server.grpc_address, timeout_s=60) as c:
            senders = [asyncio.create_task(traffic(c, i)) for i in range(8)]
            try:
                while len(codes) < 20:  # the traffic is flowing before the unload
                    await asyncio.sleep(0.01)
                await triton.unload_model(A)
                assert not await triton.is_model_ready(A)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.infer(x[0], model=A)
                assert e.value.code() == grpc.StatusCode.NOT_FOUND and "not loaded" in e.value.details()
                index = await triton.get_model_repository_index(as_json=True)
                states = {m["name"]: (m.get("state"), m.get("reason")) for m in index["models"]}
                assert states == {A: ("UNAVAILABLE", "unloaded"), B: ("READY", None)}
                assert await asyncio.to_thread(health, server, A) == health_pb2.HealthCheckResponse.NOT_SERVING
                live = await asyncio.to_thread(replicas_live, server)
                assert A not in live and live[B] > 0  # no gauge claims replicas for the unloaded model
                during = len(codes)
                await triton.load_model(A)
                assert await triton.is_model_ready(A)
                assert (await c.infer(x[0], model=A, quality=0.5)).model == A
                assert await asyncio.to_thread(health, server, A) == health_pb2.HealthCheckResponse.SERVING
                assert (await asyncio.to_thread(replicas_live, server))[A] > 0
            finally:
                stop.set()
                await asyncio.gather(*senders)
    finally:
        await triton.close()
    assert len(codes) > during > 20  # B answered all along, unload and load included
    assert set(codes) == {grpc.StatusCode.OK}, {code for code in codes if code != grpc.StatusCode.OK}


async def test_replace_serves_the_new_bundle_after_finishing_every_request_in_flight(server, repo_dir, bundle, x):
    import tritonclient.grpc.aio as triton_aio

    renamed = [f"digit {label}" for label in bundle.labels]
    set_manifest(repo_dir / A, labels=renamed)  # the new version: same weights, other label names
    stop = asyncio.Event()
    # (when sent, when answered, label name or error code)
    seen: list[tuple[float, float, str | grpc.StatusCode]] = []
    loop = asyncio.get_running_loop()

    async def traffic(c: AsyncClient, i: int) -> None:
        while not stop.is_set():
            sent = loop.time()
            try:
                reply = await c.infer(x[i % len(x)], model=A, quality=1.0, timeout_s=60)
                seen.append((sent, loop.time(), reply.outputs.label_name))
            except grpc.aio.AioRpcError as e:
                seen.append((sent, loop.time(), e.code()))

    triton = triton_aio.InferenceServerClient(server.grpc_address)
    try:
        async with AsyncClient(server.grpc_address, timeout_s=60) as c:
            senders = [asyncio.create_task(traffic(c, i)) for i in range(16)]
            try:
                while len(seen) < 20:
                    await asyncio.sleep(0.01)
                started = loop.time()
                await triton.load_model(A)  # A is loaded: this replaces it
                replaced = loop.time()
                assert (await c.infer(x[0], model=A)).outputs.label_name in renamed
            finally:
                stop.set()
                await asyncio.gather(*senders)
    finally:
        await triton.close()
    errors = {what for _, _, what in seen if isinstance(what, grpc.StatusCode)}
    assert not errors, errors  # not one request refused or cut, in flight at the swap or not
    old_while_loading = [done for _, done, what in seen if started < done < replaced and what in bundle.labels]
    assert old_while_loading, "the old version stopped answering while the new one started"
    # The load answers once the old version is closed: every request sent after it meets the new one.
    assert {what for sent, _, what in seen if sent > replaced} <= set(renamed)
    assert (await asyncio.to_thread(replicas_live, server))[A] > 0  # the old engine's close left the new one's gauge
