"""KServe v2 over HTTP/REST on a real `dynaroute serve --http-port` (the session's digits and
tiny SST-2 servers): tritonclient.http and plain urllib, JSON and binary tensors, every error
as its HTTP status with a JSON body, and the server serving on after each."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynaroute.bundle import Bundle
from dynaroute.data import load_digits_splits
from tests.serving import full_logits

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXTS = ["a wonderful , moving film", "the script is dull and lifeless", "an awful movie"]


@pytest.fixture(scope="module")
def test_x() -> np.ndarray:
    return load_digits_splits().test.x


@pytest.fixture(scope="module")
def bundle(digits_bundle_dir) -> Bundle:
    return Bundle.load(digits_bundle_dir)


def http(server, method: str, path: str, body: bytes | dict | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """One plain HTTP call; returns status, headers and the JSON body (raw bytes if not JSON)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(f"http://{server.http_address}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, hdrs, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, dict(e.headers), e.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw


def infer_body(x: np.ndarray, **parameters: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                        "data": x.tolist()}]}
    if parameters:
        body["parameters"] = parameters
    return body


def assert_still_serving(server, x: np.ndarray) -> None:
    status, _, reply = http(server, "POST", "/v2/models/digits/infer", infer_body(x[:1]))
    assert status == 200, reply
    assert [o["name"] for o in reply["outputs"]] == ["logits", "label", "confidence"]


def test_tritonclient_http_health_metadata_and_infer(digits_server, bundle, test_x):
    import tritonclient.http as th

    triton = th.InferenceServerClient(digits_server.http_address)
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(bundle.name)
    assert triton.is_model_ready(bundle.name, "1")
    assert triton.get_server_metadata()["name"] == "dynaroute"
    meta = triton.get_model_metadata(bundle.name)
    assert meta["name"] == bundle.name and meta["versions"] == ["1"]
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [("input", "FP32", [-1, 64])]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "label", "confidence"]

    x = test_x[:3]
    expected = full_logits(bundle, x)
    for binary in (True, False):  # Triton's binary tensor extension (tritonclient's default), then JSON data
        inp = th.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        outputs = [th.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "label", "confidence")]
        result = triton.infer(bundle.name, [inp], request_id=f"h{binary}", outputs=outputs,
                              parameters={"subnet": bundle.full_subnet})
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(result.as_numpy("label"), expected.argmax(1))
        assert result.as_numpy("confidence").shape == (3,)
        response = result.get_response()
        assert response["id"] == f"h{binary}" and response["model_version"] == "1"
        params = response["parameters"]
        assert params["full_flops"] == 3 * bundle.full_flops and params["rows"] == 3
        assert [r["subnets"] for r in json.loads(params["route"])] == [[bundle.full_subnet]] * 3
        assert [c["full_flops"] for c in json.loads(params["cost"])] == [bundle.full_flops] * 3

    inp = th.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    only_label = triton.infer(bundle.name, [inp], outputs=[th.InferRequestedOutput("label")],
                              parameters={"quality": 0.0})
    assert only_label.as_numpy("logits") is None and only_label.as_numpy("label").shape == (3,)
    cheap = json.loads(only_label.get_response()["parameters"]["cost"])
    assert all(c["total_flops"] < bundle.full_flops for c in cheap)  # the budget moved the cost

    with pytest.raises(th.InferenceServerException) as e:
        triton.get_model_metadata("nope")
    assert e.value.status() == "404" and "nope" in e.value.message()
    bad = th.InferInput("input", [1, 63], "FP32")
    bad.set_data_from_numpy(x[:1, :63])
    with pytest.raises(th.InferenceServerException) as e:
        triton.infer(bundle.name, [bad])
    assert e.value.status() == "400" and "inputs[0].shape" in e.value.message()
    triton.close()


def test_rest_answers_as_grpc_kserve_does(digits_server, bundle, test_x):
    import tritonclient.grpc as tc

    x = test_x[:4]
    status, headers, reply = http(digits_server, "POST", f"/v2/models/{bundle.name}/versions/1/infer",
                                  {**infer_body(x, subnet="w0.5-d3-p0"), "id": "r1"})
    assert status == 200 and headers["Content-Type"].startswith("application/json"), reply
    by_name = {o["name"]: o for o in reply["outputs"]}
    assert by_name["logits"]["datatype"] == "FP32" and by_name["logits"]["shape"] == [4, len(bundle.labels)]
    assert by_name["label"]["datatype"] == "INT64"

    triton = tc.InferenceServerClient(digits_server.grpc_address)
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    grpc_result = triton.infer(bundle.name, [inp], parameters={"subnet": "w0.5-d3-p0"})
    triton.close()
    np.testing.assert_allclose(np.reshape(by_name["logits"]["data"], (4, -1)), grpc_result.as_numpy("logits"),
                               rtol=1e-5, atol=1e-5)
    assert by_name["label"]["data"] == grpc_result.as_numpy("label").tolist()
    grpc_params = grpc_result.get_response().parameters
    assert reply["parameters"]["total_flops"] == grpc_params["total_flops"].int64_param
    assert json.loads(reply["parameters"]["route"])[0]["subnets"] == ["w0.5-d3-p0"]

    nested = infer_body(x[:2])
    nested["inputs"][0]["data"] = x[:2].reshape(2, 8, 8).tolist()  # nested row-major arrays, as the protocol allows
    status, _, reply = http(digits_server, "POST", f"/v2/models/{bundle.name}/infer", nested)
    assert status == 200 and reply["outputs"][0]["shape"] == [2, len(bundle.labels)], reply


def test_text_bytes_over_rest_answer_as_grpc(sst2_server, sst2_tiny_bundle_dir):
    import tritonclient.grpc as tc
    import tritonclient.http as th

    name = Bundle.load(sst2_tiny_bundle_dir).name
    data = np.array([t.encode() for t in TEXTS], dtype=object)
    g = tc.InferenceServerClient(sst2_server.grpc_address)
    g_inp = tc.InferInput("text", [len(TEXTS)], "BYTES")
    g_inp.set_data_from_numpy(data)
    expected = g.infer(name, [g_inp], parameters={"subnet": "w1-d6-p0"}).as_numpy("logits")
    g.close()

    h = th.InferenceServerClient(sst2_server.http_address)
    meta = h.get_model_metadata(name)
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [("text", "BYTES", [-1])]
    for binary in (True, False):
        inp = th.InferInput("text", [len(TEXTS)], "BYTES")
        inp.set_data_from_numpy(data, binary_data=binary)
        result = h.infer(name, [inp], parameters={"subnet": "w1-d6-p0"})
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    h.close()

    body = {"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [[TEXTS[0]], [TEXTS[1]]]}],
            "parameters": {"subnet": "w1-d6-p0"}}
    status, _, reply = http(sst2_server, "POST", f"/v2/models/{name}/infer", body)
    assert status == 200, reply
    np.testing.assert_allclose(np.reshape(reply["outputs"][0]["data"], (2, -1)), expected[:2], rtol=1e-5, atol=1e-5)
    body["inputs"][0]["data"] = [["  "], [TEXTS[1]]]
    status, _, reply = http(sst2_server, "POST", f"/v2/models/{name}/infer", body)
    assert status == 400 and "inputs[0] row 0" in reply["error"], reply


def _row(x: np.ndarray) -> dict[str, Any]:
    return infer_body(x[:1])


# case -> (method, path, body maker, status, what the message must name)
BAD: dict[str, tuple[str, str, Any, int, str]] = {
    "bad shape": ("POST", "/v2/models/digits/infer",
                  lambda x: {"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32",
                                         "data": x[0, :63].tolist()}]}, 400, "inputs[0].shape"),
    "bad dtype": ("POST", "/v2/models/digits/infer",
                  lambda x: {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP64",
                                         "data": x[0].tolist()}]}, 400, "inputs[0].datatype"),
    "data not numbers": ("POST", "/v2/models/digits/infer",
                         lambda x: {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                                "data": ["1"] * 64}]}, 400, "inputs[0].data"),
    "too few values": ("POST", "/v2/models/digits/infer",
                       lambda x: {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                                              "data": x[0].tolist()}]}, 400, "inputs[0].data"),
    "unknown model": ("POST", "/v2/models/nope/infer", _row, 404, "model_name"),
    "unknown version": ("POST", "/v2/models/digits/versions/7/infer", _row, 404, "version"),
    "unknown parameter": ("POST", "/v2/models/digits/infer", lambda x: {**_row(x), "parameters": {"qualty": 0.5}},
                          400, "qualty"),
    "budget out of range": ("POST", "/v2/models/digits/infer", lambda x: {**_row(x), "parameters": {"quality": 7}},
                            400, "parameters"),
    "unknown request key": ("POST", "/v2/models/digits/infer", lambda x: {**_row(x), "input": []}, 400, "'input'"),
    "bad JSON": ("POST", "/v2/models/digits/infer", lambda x: b'{"inputs": [', 400, "not JSON"),
    "too-large body": ("POST", "/v2/models/digits/infer", lambda x: b" " * ((1 << 20) + 1), 413, "limit"),
    "deadline passed": ("POST", "/v2/models/digits/infer", lambda x: {**_row(x), "parameters": {"timeout": 1}},
                        504, "deadline"),
    "unknown model metadata": ("GET", "/v2/models/nope", lambda x: None, 404, "nope"),
    "unknown model ready": ("GET", "/v2/models/nope/ready", lambda x: None, 404, "nope"),
    "no such endpoint": ("GET", "/v2/modelz", lambda x: None, 404, "/v2/modelz"),
    "wrong method": ("GET", "/v2/models/digits/infer", lambda x: None, 405, "POST"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_every_error_is_its_http_status_with_a_json_body_and_the_server_keeps_serving(digits_server, test_x, case):
    method, path, make, code, needle = BAD[case]
    status, headers, reply = http(digits_server, method, path, make(test_x))
    assert status == code, reply
    assert headers["Content-Type"].startswith("application/json") and set(reply) == {"error"}, reply
    assert needle.lower() in reply["error"].lower(), reply
    assert_still_serving(digits_server, test_x)


def test_openapi_document_is_served_and_rest_calls_are_counted(digits_server, test_x):
    status, _, doc = http(digits_server, "GET", "/v2/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.") and "/v2/models/{model}/infer" in doc["paths"]

    def counts() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://{digits_server.metrics_address}/metrics", timeout=10).read().decode()
        return {s.labels["status"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "dynaroute_requests_total" and s.labels["api"] == "kserve_http"
                and s.labels["model"] == digits_server.model}

    before = counts()
    assert_still_serving(digits_server, test_x)
    http(digits_server, "POST", "/v2/models/digits/infer", b"{")
    after = counts()
    assert after["ok"] == before["ok"] + 1
    assert after["invalid_argument"] == before["invalid_argument"] + 1


async def test_sigterm_drains_http_in_flight_then_exits_zero(digits_bundle_dir, test_x):
    """The HTTP port opens while the engine starts (ready: 503), then serves; on SIGTERM ready
    turns 503, requests in flight still complete, later ones get 503 (or find the port closed),
    and the process exits 0."""
    from tests.serving import ServerProcess

    server = ServerProcess.start(digits_bundle_dir, "--http-port", "0", wait=False)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{server.http_address}/v2/health/ready") as r:
                assert r.status == 503 and (await r.json()) == {"ready": False}  # the actors are still starting
            await asyncio.to_thread(server.wait_for, server.ready)
            url = f"http://{server.http_address}/v2/models/digits/infer"
            done_at: list[tuple[float, int | str]] = []

            async def one(i: int) -> None:
                try:
                    async with session.post(url, json=infer_body(test_x[i % len(test_x)][None])) as r:
                        await r.read()
                        done_at.append((time.monotonic(), r.status))
                except aiohttp.ClientConnectionError as e:  # the port closed: the client retries elsewhere
                    done_at.append((time.monotonic(), type(e).__name__))

            tasks = [asyncio.create_task(one(i)) for i in range(300)]
            while not done_at:
                await asyncio.sleep(0.001)
            sigterm_at = time.monotonic()
            server.terminate()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
        statuses = {s for _, s in done_at}
        assert statuses <= {200, 503, "ClientConnectorError", "ServerDisconnectedError", "ClientOSError"}, statuses
        assert [t for t, s in done_at if t > sigterm_at and s == 200], "no request in flight at SIGTERM finished"
        assert await asyncio.to_thread(server.wait, 60) == 0, server.output()
        assert "dynaroute: stopped" in server.output()
    finally:
        server.stop()
