"""gateway.rest without a server: the HTTP statuses of the project's errors, the JSON request
decoding (JSON data, nested data, binary tensor data), and the OpenAPI document (shipped file
equal to the served one; every route listed)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dynaroute import errors
from dynaroute.config import ServerConfig
from dynaroute.gateway.open_inference import BUDGET_NUMBERS, BUDGET_STRINGS
from dynaroute.gateway.openapi import PARAMETERS, openapi_document
from dynaroute.gateway.rest import HEADER_LENGTH, RestGateway, decode_request
from dynaroute.gateway.status import http_status_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (errors.InvalidInputError("inputs[0].shape: got [3]"), 400),
        (errors.TooLargeError("request: 5 bytes exceeds the server's limit of 4 bytes"), 413),
        (errors.UnauthenticatedError("no token"), 401),
        (errors.ModelNotFoundError("model_name: 'x' is not served here"), 404),
        (errors.OverloadedError("queue full"), 429),
        (errors.UnavailableError("draining"), 503),
        (errors.DeadlineError("deadline passed"), 504),
        (KeyError("a bug"), 500),
    ],
)
def test_errors_map_to_http_statuses_with_the_grpc_message(exc: Exception, status: int) -> None:
    code, message = http_status_for(exc)
    assert code == status and (str(exc) in message or "KeyError" in message)


def _body(**tensor: object) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", **tensor}]}).encode()


def test_json_data_flat_or_nested_and_transport_parameters() -> None:
    body = json.dumps({
        "id": "a", "parameters": {"quality": 0.5, "timeout": 2_000_000, "binary_data_output": True},
        "inputs": [{"name": "input", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2.5], [3, 4]]}],
        "outputs": [{"name": "label", "parameters": {"binary_data": False}}],
    }).encode()
    call, transport = decode_request("m", "", body, None)
    assert call.id == "a" and dict(call.parameters) == {"quality": 0.5}  # the transport's own are taken out
    assert transport.deadline is not None and transport.binary["label"] is False and transport.binary["logits"]
    values = call.inputs[0].values()
    assert values.dtype == np.float32 and values.tolist() == [1, 2.5, 3, 4]
    assert call.outputs == ["label"]


def test_binary_tensor_data_follows_the_json_header() -> None:
    raw = np.arange(2, dtype="<f4").tobytes()
    head = _body(parameters={"binary_data_size": len(raw)})
    call, _ = decode_request("m", "1", head + raw, str(len(head)))
    assert call.inputs[0].raw == raw and call.inputs[0].values is None
    text = b"".join(struct.pack("<I", len(s)) + s for s in (b"hi", b"there"))
    head = json.dumps({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(text)}}]}).encode()
    assert decode_request("m", "", head + text, str(len(head)))[0].inputs[0].raw == text


@pytest.mark.parametrize(
    ("body", "header", "needle"),
    [
        (b"[1, 2]", None, "expected a JSON object"),
        (b"\xff\xfe", None, "not JSON"),
        (b"[" * 100_000, None, "not JSON"),  # nested past the parser's depth: refused, not a crash
        (_body(data=[1, 2], extra=1), None, "inputs[0]: unknown key(s) 'extra'"),
        (_body(), None, "inputs[0].data: missing"),
        (_body(data=[1, 2], parameters={"binary_data_size": 8}), None, "binary_data_size"),
        (_body(parameters={"binary_data_size": 4}) + b"12345678", "999", HEADER_LENGTH),
        (_body(data=[1, 2]) + b"xx", str(len(_body(data=[1, 2]))), "no input's binary_data_size claims"),
        (json.dumps({"inputs": [], "parameters": {"timeout": -5}}).encode(), None, "parameters.timeout"),
        (json.dumps({"inputs": [], "parameters": {"quality": [1]}}).encode(), None, "parameters.quality"),
        (json.dumps({"inputs": {}}).encode(), None, "inputs: got {}"),
        (json.dumps({"inputs": [], "outputs": [{"name": "label", "parameters": {"top_k": 2}}]}).encode(),
         None, "'top_k'"),
    ],
)
def test_malformed_requests_are_refused_naming_the_field(body: bytes, header: str | None, needle: str) -> None:
    with pytest.raises(errors.InvalidInputError) as e:
        decode_request("m", "", body, header)
    assert needle in str(e.value)


@pytest.mark.parametrize(
    ("datatype", "data", "needle"),
    [
        ("FP32", ["1", "2"], "not all numbers"),
        ("INT64", [1.5, 2], "not all integers"),
        ("INT8", [1, 300], "outside INT8's range"),
        ("FP32", [[1], [2, 3]], "unequal lengths"),
        ("BYTES", ["a", 2], "expected strings"),
        ("FP32", 5, "expected a JSON array"),
    ],
)
def test_json_values_are_type_checked_never_coerced(datatype: str, data: object, needle: str) -> None:
    call, _ = decode_request("m", "", _body(datatype=datatype, data=data), None)
    with pytest.raises(errors.InvalidInputError) as e:
        call.inputs[0].values()  # read once the datatype and shape have passed the model's checks
    assert needle in str(e.value)


def test_the_http_transport_loads_beside_tritonclient_grpc() -> None:
    """rest.py loads no `inference` protobuf messages, so that a client or test process can
    import it and tritonclient.grpc (which registers the same names) together."""
    code = "import dynaroute.gateway.rest, dynaroute.gateway.openapi; import tritonclient.grpc"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_shipped_openapi_document_is_the_served_one() -> None:
    shipped = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert shipped == openapi_document(), "regenerate: python -m dynaroute.gateway.openapi > docs/openapi.json"


def test_openapi_lists_every_route_and_the_budget_names() -> None:
    app = RestGateway(models=None, config=ServerConfig(http_port=0), is_ready=lambda: True).app  # type: ignore[arg-type]
    served = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    documented = {(m, p) for p, ops in openapi_document()["paths"].items() for m in ops}
    assert served == documented
    assert set(PARAMETERS) == {*BUDGET_NUMBERS, *BUDGET_STRINGS}


async def test_rest_answers_per_model_of_the_repository_and_loads_and_unloads(tmp_path, monkeypatch):
    """The REST routes over a repository of two stand-in engines (no Ray): metadata and ready
    per model, NOT_FOUND for a name not served, not ready (503) and 404 once unloaded while the
    other answers, the repository endpoints, and metadata built again for a replaced model."""
    from aiohttp.test_utils import TestClient, TestServer

    from tests.unit.test_repository import StandInEngine, make_repository, write_bundle

    write_bundle(tmp_path / "alpha", "alpha")
    write_bundle(tmp_path / "beta", "beta")
    models, started, _ = make_repository(tmp_path)
    await models.load_all()
    gateway = RestGateway(models, ServerConfig(http_port=0), is_ready=lambda: True)
    async with TestClient(TestServer(gateway.app)) as client:
        async def call(method: str, path: str, **kw: object) -> tuple[int, object]:
            r = await client.request(method, path, **kw)
            return r.status, await r.json()

        for name in ("alpha", "beta"):
            status, meta = await call("GET", f"/v2/models/{name}")
            assert status == 200 and meta["name"] == name and meta["inputs"][0]["shape"] == [-1, 4], meta
            assert await call("GET", f"/v2/models/{name}/versions/1/ready") == (200, {"name": name, "ready": True})
        status, reply = await call("GET", "/v2/models/gamma")
        assert status == 404 and "'gamma' is not served here" in reply["error"]
        assert "model_repository" in (await call("GET", "/v2"))[1]["extensions"]

        assert await call("POST", "/v2/repository/models/beta/unload",
                          json={"parameters": {"unload_dependents": False}}) == (200, {})
        assert started[1].events == ["drain", "close"]
        assert await call("GET", "/v2/models/beta/ready") == (503, {"name": "beta", "ready": False})
        status, reply = await call("GET", "/v2/models/beta")
        assert status == 404 and "not loaded" in reply["error"] and "/v2/repository/models/beta/load" in reply["error"]
        assert (await call("GET", "/v2/models/alpha/ready"))[0] == 200
        status, rows = await call("POST", "/v2/repository/index")  # an empty body, as tritonclient sends
        assert status == 200 and rows == [{"name": "alpha", "version": "1", "state": "READY"},
                                          {"name": "beta", "version": "1", "state": "UNAVAILABLE",
                                           "reason": "unloaded"}]
        assert await call("POST", "/v2/repository/index", json={"ready": True}) == (
            200, [{"name": "alpha", "version": "1", "state": "READY"}])
        for path, body, code, needle in (
            ("/v2/repository/index", {"ready": "yes"}, 400, "ready"),
            ("/v2/repository/models/beta/load", {"parameters": {"config": "{}"}}, 400, "parameters"),
            ("/v2/repository/models/beta/unload", {"parameters": {"force": True}}, 400, "parameters"),
            ("/v2/repository/models/gamma/load", {}, 404, "no bundle named 'gamma'"),
        ):
            status, reply = await call("POST", path, json=body)
            assert status == code and needle in reply["error"], (path, reply)

        assert await call("POST", "/v2/repository/models/beta/load") == (200, {})
        assert (await call("GET", "/v2/models/beta/ready"))[0] == 200
        assert (await call("GET", "/v2/models/alpha"))[1]["outputs"][0]["shape"] == [-1, 2]
        three = {"input": {"kind": "tensor", "dtype": "float32", "shape": [4]}, "labels": ["no", "yes", "maybe"]}
        monkeypatch.setattr(StandInEngine, "model_info", lambda self: three)  # the new version has 3 labels
        assert await call("POST", "/v2/repository/models/alpha/load") == (200, {})  # a replace
        assert (await call("GET", "/v2/models/alpha"))[1]["outputs"][0]["shape"] == [-1, 3]
    await models.close()


def test_classification_is_the_top_k_of_logits_as_value_index_label_and_checked() -> None:
    from dynaroute.gateway.open_inference import classification_counts, top_classes, wire_bytes, wire_datatype

    logits = np.array([[0.5, 2.0, -1.0], [3.0, 1.0, 2.0]], np.float32)
    top = top_classes(logits, 2, ("cat", "dog", "eel"))
    assert top.tolist() == [[b"2.000000:1:dog", b"0.500000:0:cat"], [b"3.000000:0:cat", b"2.000000:2:eel"]]
    assert wire_datatype(top) == "BYTES" and wire_datatype(logits) == "FP32"
    assert wire_bytes(top[:1, :1]) == b"\x0e\x00\x00\x00" + b"2.000000:1:dog"  # length-prefixed, little-endian
    assert classification_counts({"logits": 9}, 3) == {"logits": 3}  # at most the number of classes
    with pytest.raises(errors.InvalidInputError, match="classification applies to the 'logits' output"):
        classification_counts({"label": 2}, 3)
    with pytest.raises(errors.InvalidInputError, match="expected a class count >= 1"):
        classification_counts({"logits": 0}, 3)
