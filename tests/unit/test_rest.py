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
        (json.dumps({"inputs": [], "outputs": [{"name": "label", "parameters": {"classification": 2}}]}).encode(),
         None, "'classification'"),
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
    app = RestGateway(engine=None, config=ServerConfig(http_port=0), is_ready=lambda: True).app  # type: ignore[arg-type]
    served = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    documented = {(m, p) for p, ops in openapi_document()["paths"].items() for m in ops}
    assert served == documented
    assert set(PARAMETERS) == {*BUDGET_NUMBERS, *BUDGET_STRINGS}
