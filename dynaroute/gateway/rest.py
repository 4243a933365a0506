"""KServe v2 / Open Inference Protocol over HTTP/REST (aiohttp), beside the gRPC port.

The JSON wire form of `OpenInference` (open_inference.py), as kserve.py is its gRPC form: the
same models of the repository, checks, budget parameters, rows, route and cost as gRPC's
ModelInfer, and the same errors, as HTTP statuses (status.py) with a `{"error": "..."}` body.
Each model answers at /v2/models/{name}; Triton's REST repository extension (POST
/v2/repository/index, /v2/repository/models/{name}/load and /unload) loads, replaces and
unloads them as the gRPC Repository* calls do. Tensors travel as JSON `data` or, with Triton's binary tensor data
extension (what tritonclient.http sends by default), as raw bytes after the JSON header
(`Inference-Header-Content-Length`). Two request parameters belong to the transport, not the
budget, as in Triton: `binary_data_output` and `timeout` (microseconds: the request's
deadline, 504 when it passes). The same bearer token and TLS files as the gRPC port secure it;
the health endpoints answer without the token, as gRPC health does. GET /v2/openapi.json
serves the OpenAPI document (docs/openapi.json is the same document, shipped).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from dynaroute import metrics
from dynaroute.config import ServerConfig
from dynaroute.errors import InvalidInputError, ModelNotFoundError, TooLargeError, UnavailableError, shown
from dynaroute.gateway.inputs import MAX_DIMS
from dynaroute.gateway.open_inference import (
    DATATYPES,
    OUTPUTS,
    InferCall,
    OpenInference,
    PreparedCall,
    WireTensor,
    server_version,
    wire_bytes,
    wire_datatype,
)
from dynaroute.gateway.openapi import openapi_document
from dynaroute.gateway.repository import VERSION, IndexEntry, Repository
from dynaroute.gateway.security import AUTH_HEADER, bearer_problem, expected_bearer
from dynaroute.gateway.status import http_status_for
from dynaroute.gateway.types import InferResult

API = "kserve_http"  # the metrics `api` label of this transport
HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor data extension
EXTENSIONS = ["binary_tensor_data", "model_repository"]
# Paths that answer without the token (not without TLS): probes ask whether to send traffic.
EXEMPT_PATHS = ("/v2/health/live", "/v2/health/ready")
REQUEST_KEYS = {"id", "parameters", "inputs", "outputs"}
TENSOR_KEYS = {"name", "shape", "datatype", "parameters", "data"}
# The kind of JSON number each numpy kind takes: a float tensor takes integers too, an integer
# tensor never takes a fraction (it would be cut silently).
_JSON_KINDS = {"f": ("fiu", "numbers"), "i": ("iu", "integers"), "u": ("iu", "integers"), "b": ("b", "booleans")}


@dataclass(frozen=True)
class Transport:
    """What an infer request asks of the transport itself, not of the model."""

    deadline: float | None  # time.monotonic() instant, from the `timeout` parameter
    binary: dict[str, bool]  # output name -> send it as binary data


def error_response(status: int, message: str) -> web.Response:
    """The protocol's error form: the status, and `{"error": message}`."""
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"  # RFC 6750
    elif status == 429:
        headers["Retry-After"] = "1"
    return web.json_response({"error": message}, status=status, headers=headers)


def _error(e: BaseException) -> web.Response:
    return error_response(*http_status_for(e))


def _json_values(field: str, datatype: str, data: Any) -> Callable[[], Sequence[Any]]:
    """JSON `data` (flat or nested, row-major) -> flat values of `datatype`, read on demand
    (after the datatype and shape have passed). JSON types are checked, never coerced: "1.5"
    is not a number, 1.5 is not an INT64."""

    def read() -> Sequence[Any]:
        if not isinstance(data, list):
            raise InvalidInputError(f"{field}: got {type(data).__name__}; expected a JSON array of {datatype} values")
        if datatype == "BYTES":
            flat: list[Any] = []
            stack = [iter(data)]
            while stack:  # iterative: a deeply nested array must not exhaust the stack
                for v in stack[-1]:
                    if isinstance(v, list):
                        stack.append(iter(v))
                        break
                    if not isinstance(v, str):
                        raise InvalidInputError(f"{field}: holds {shown(v)}; expected strings (UTF-8 text) for BYTES")
                    flat.append(v)
                else:
                    stack.pop()
            return flat
        np_name = DATATYPES[datatype][0]
        try:
            a = np.asarray(data)
        except ValueError:  # ragged, or more dimensions than numpy holds
            raise InvalidInputError(
                f"{field}: nested arrays of unequal lengths or over {MAX_DIMS} levels; expected a flat array, "
                "or nested arrays matching the shape"
            ) from None
        kinds, what = _JSON_KINDS[np.dtype(np_name).kind]
        if a.size and a.dtype.kind not in kinds:
            raise InvalidInputError(f"{field}: holds values that are not all {what}; expected {what} for {datatype}")
        flat_a = a.reshape(-1)
        if a.size and np.dtype(np_name).kind in "iu":
            info = np.iinfo(np_name)
            if int(flat_a.min()) < info.min or int(flat_a.max()) > info.max:
                raise InvalidInputError(f"{field}: values outside {datatype}'s range [{info.min}, {info.max}]")
        return flat_a.astype(np_name)

    return read


def _object(field: str, value: Any, allowed: set[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInputError(f"{field}: got {type(value).__name__}; expected a JSON object")
    if allowed is not None and (unknown := sorted(set(value) - allowed)):
        raise InvalidInputError(f"{field}: unknown key(s) {', '.join(map(shown, unknown))}; expected some of "
                                f"{sorted(allowed)}")
    return value


def _string(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"{field}: got {shown(value)}; expected a string")
    return value


def _scalar_parameters(field: str, value: Any) -> dict[str, Any]:
    params = _object(field, value)
    for k, v in params.items():
        if v is not None and not isinstance(v, str | int | float | bool):
            raise InvalidInputError(f"{field}.{k}: got {type(v).__name__}; expected a string, number or boolean")
    return params


def decode_request(model: str, version: str, body: bytes, header_length: str | None) -> tuple[InferCall, Transport]:
    """An HTTP infer request body (JSON, then binary tensor data if `header_length` is given)
    -> the call and what it asks of the transport. Raises InvalidInputError naming the field."""
    if header_length is None:
        head, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise InvalidInputError(
                f"{HEADER_LENGTH}: {shown(header_length)}; expected the JSON header's length in bytes, at most the "
                f"body's {len(body)}"
            )
        head, binary = body[:n], body[n:]
    try:
        doc = json.loads(head)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise InvalidInputError(f"body: not JSON ({str(e)[:120]}); expected an inference request object") from None
    doc = _object("body", doc, REQUEST_KEYS)
    request_id = _string("id", doc.get("id", ""))
    params = dict(_scalar_parameters("parameters", doc.get("parameters", {})))
    binary_default = params.pop("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInputError(f"parameters.binary_data_output: got {shown(binary_default)}; expected a boolean")
    deadline = None
    if "timeout" in params:
        timeout_us = params.pop("timeout")
        if not isinstance(timeout_us, int) or isinstance(timeout_us, bool) or timeout_us <= 0:
            raise InvalidInputError(f"parameters.timeout: got {shown(timeout_us)}; expected microseconds, an "
                                    "integer > 0")
        deadline = time.monotonic() + timeout_us / 1e6

    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidInputError(f"inputs: got {shown(inputs)}; expected a JSON array of input tensors")
    tensors, offset = [], 0
    for i, t in enumerate(inputs):
        field = f"inputs[{i}]"
        t = _object(field, t, TENSOR_KEYS)
        shape = t.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidInputError(f"{field}.shape: got {shown(shape)}; expected an array of integers")
        tparams = _object(f"{field}.parameters", t.get("parameters", {}), {"binary_data_size"})
        raw = None
        if "binary_data_size" in tparams:
            size = tparams["binary_data_size"]
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary) - offset:
                raise InvalidInputError(f"{field}.parameters.binary_data_size: got {shown(size)}; expected the "
                                        f"tensor's byte count, at most the {len(binary) - offset} bytes left")
            if "data" in t:
                raise InvalidInputError(f"{field}: both data and binary_data_size; use one of them")
            raw, offset = binary[offset : offset + size], offset + size
        elif "data" not in t:
            raise InvalidInputError(f"{field}.data: missing; expected the tensor's values (or binary_data_size)")
        datatype = _string(f"{field}.datatype", t.get("datatype"))
        tensors.append(WireTensor(
            name=_string(f"{field}.name", t.get("name")), datatype=datatype, shape=shape, raw=raw,
            values=_json_values(f"{field}.data", datatype, t.get("data")) if raw is None else None,
            field=field, values_field=f"{field}.data", raw_field=f"{field} binary data",
        ))
    if offset != len(binary):
        raise InvalidInputError(f"body: {len(binary) - offset} bytes after the JSON header that no input's "
                                "binary_data_size claims")

    outputs = doc.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidInputError(f"outputs: got {shown(outputs)}; expected a JSON array of requested outputs")
    names, binary_out, classification = [], {}, {}
    for i, o in enumerate(outputs):
        o = _object(f"outputs[{i}]", o, {"name", "parameters"})
        name = _string(f"outputs[{i}].name", o.get("name"))
        oparams = _object(f"outputs[{i}].parameters", o.get("parameters", {}), {"binary_data", "classification"})
        if "classification" in oparams:
            classification[name] = oparams["classification"]
        flag = oparams.get("binary_data", binary_default)
        if not isinstance(flag, bool):
            raise InvalidInputError(f"outputs[{i}].parameters.binary_data: got {shown(flag)}; expected a boolean")
        names.append(name)
        binary_out[name] = flag
    call = InferCall(model=model, version=version, id=request_id, parameters=params, inputs=tensors, outputs=names,
                     size=len(body), classification=classification)
    return call, Transport(deadline=deadline, binary={n: binary_out.get(n, binary_default) for n in OUTPUTS})


def encode_response(call: PreparedCall, transport: Transport, results: list[InferResult]) -> web.Response:
    """The results as the protocol's JSON response; outputs asked for as binary follow the JSON
    header as raw little-endian bytes, in output order."""
    arrays = OpenInference.output_arrays(results, call)
    outputs, chunks = [], []
    for name in call.outputs:
        a = arrays[name]
        out: dict[str, Any] = {"name": name, "datatype": wire_datatype(a), "shape": list(a.shape)}
        if transport.binary[name]:
            data = wire_bytes(a)
            out["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            out["data"] = [x.decode() for x in a.reshape(-1)] if a.dtype == object else a.reshape(-1).tolist()
        outputs.append(out)
    head = json.dumps({
        "model_name": call.model, "model_version": VERSION, "id": call.id,
        "parameters": OpenInference.response_parameters(results), "outputs": outputs,
    }).encode()
    if not chunks:
        return web.Response(body=head, content_type="application/json")
    return web.Response(body=b"".join([head, *chunks]), content_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(head))})


class RestGateway:
    """The aiohttp application: routes, the token check, JSON errors, over `OpenInference`."""

    def __init__(self, models: Repository, config: ServerConfig, is_ready: Callable[[], bool],
                 token: str | None = None) -> None:
        self.protocol = OpenInference(models, config.max_message_bytes, is_ready, API)
        self.max_body_bytes = config.max_message_bytes
        self._expected = expected_bearer(token) if token else None
        # aiohttp refuses larger bodies itself (413) when they come without a Content-Length.
        self.app = web.Application(middlewares=[self._errors, self._auth], client_max_size=self.max_body_bytes)
        add = self.app.router.add_route
        add("GET", "/v2/health/live", self.live)
        add("GET", "/v2/health/ready", self.ready)
        add("GET", "/v2", self.server_metadata)
        add("GET", "/v2/openapi.json", self.openapi)
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            add("GET", base, self.model_metadata)
            add("GET", f"{base}/ready", self.model_ready)
            add("POST", f"{base}/infer", self.infer)
        add("POST", "/v2/repository/index", self.repository_index)
        add("POST", "/v2/repository/models/{model}/load", self.repository_load)
        add("POST", "/v2/repository/models/{model}/unload", self.repository_unload)

    # -- middleware ---------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        """aiohttp's own refusals (no such route, wrong method) as the protocol's JSON errors."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            if e.status == 404:
                message = (f"no endpoint {shown(request.path)}; expected a KServe v2 path "
                           "(GET /v2/openapi.json lists them)")
            elif e.status == 405:
                message = f"{request.method} is not allowed on {shown(request.path)}; expected {e.headers['Allow']}"
            else:
                message = e.text or e.reason
            return error_response(e.status, message)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if self._expected is None or request.path in EXEMPT_PATHS:
            return await handler(request)
        problem = bearer_problem(request.headers.getall(AUTH_HEADER, []), self._expected, where="header")
        if problem is None:
            return await handler(request)
        # A refused call names no model to the server: the only model's name, "unknown" when several.
        metrics.record_request(self.protocol.models.label(""), API, "unauthenticated")
        return error_response(401, problem)

    # -- health and metadata ------------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.protocol.is_ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "dynaroute", "version": server_version(), "extensions": EXTENSIONS})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    async def model_metadata(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(self.protocol.model_metadata(*_model_of(request)))
        except (ModelNotFoundError, UnavailableError) as e:
            return _error(e)

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model_of(request)
        try:
            ready = self.protocol.model_ready(name, version)
        except ModelNotFoundError as e:
            return _error(e)
        return web.json_response({"name": name, "ready": ready}, status=200 if ready else 503)

    # -- infer --------------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> bytes:
        limit = self.max_body_bytes
        if request.content_length is not None and request.content_length > limit:  # refused unread
            raise TooLargeError(f"request: {request.content_length} bytes exceeds the server's limit of {limit} bytes")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise TooLargeError(f"request: more than the server's limit of {limit} bytes") from None

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model_of(request)
        try:
            body = await self._body(request)
            call, transport = decode_request(name, version, body, request.headers.get(HEADER_LENGTH))
        except Exception as e:  # noqa: BLE001 - every error is mapped to a status in one place
            self.protocol.count_refused(name, e)
            return _error(e)
        try:  # refusals before the engine are counted by `infer`, the engine's answers by `run`
            prepared, results = await self.protocol.infer(call, transport.deadline)
        except Exception as e:  # noqa: BLE001 - as above
            return _error(e)
        return encode_response(prepared, transport, results)

    # -- the model repository (Triton's extension) --------------------------------------------

    async def _repository_request(self, request: web.Request, allowed: set[str]) -> dict[str, Any]:
        """The body of a repository call: empty (tritonclient's index sends none) or a JSON
        object of `allowed` keys."""
        body = await self._body(request)
        if not body.strip():
            return {}
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise InvalidInputError(f"body: not JSON ({str(e)[:120]}); expected a JSON object") from None
        return _object("body", doc, allowed)

    async def repository_index(self, request: web.Request) -> web.Response:
        """Every model of the folder and every loaded one, with its state (Triton's JSON form:
        version and reason only when set)."""
        try:
            doc = await self._repository_request(request, {"ready"})
            ready = doc.get("ready", False)
            if not isinstance(ready, bool):
                raise InvalidInputError(f"ready: got {shown(ready)}; expected a boolean")
        except Exception as e:  # noqa: BLE001
            return _error(e)
        return web.json_response([_index_row(r) for r in self.protocol.index(ready_only=ready)])

    async def _repository_parameters(self, request: web.Request) -> dict[str, Any]:
        doc = await self._repository_request(request, {"parameters"})
        return _object("parameters", doc.get("parameters", {}))

    async def repository_load(self, request: web.Request) -> web.Response:
        """Load the model, or replace it when loaded; answers once it serves."""
        try:
            await self.protocol.load(request.match_info["model"], await self._repository_parameters(request))
        except Exception as e:  # noqa: BLE001
            return _error(e)
        return web.json_response({})

    async def repository_unload(self, request: web.Request) -> web.Response:
        """Unload the model; answers once its in-flight requests have finished and its experts
        have stopped."""
        try:
            await self.protocol.unload(request.match_info["model"], await self._repository_parameters(request))
        except Exception as e:  # noqa: BLE001
            return _error(e)
        return web.json_response({})


def _index_row(r: IndexEntry) -> dict[str, str]:
    row = {"name": r.name, "version": r.version, "state": r.state.value, "reason": r.reason}
    return {k: v for k, v in row.items() if v or k in ("name", "state")}


def _model_of(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


class RestServer:
    """The HTTP/REST port of `dynaroute serve`: started beside the gRPC port, on the same host,
    with the same TLS files and token; stopped after the models have drained."""

    def __init__(self, models: Repository, config: ServerConfig, is_ready: Callable[[], bool]) -> None:
        from dynaroute.gateway.security import read_token_file, server_ssl_context

        if config.http_port is None:
            raise ValueError("ServerConfig.http_port: None; the HTTP port is off")
        token = read_token_file(config.auth_token_file) if config.auth_token_file else None
        self.gateway = RestGateway(models, config, is_ready, token)
        self.ssl_context = (server_ssl_context(config.tls_cert, config.tls_key, config.tls_client_ca)
                            if config.tls_cert and config.tls_key else None)
        self.config = config
        # No access log: gRPC logs no line per call either, and a line per request costs.
        self.runner = web.AppRunner(self.gateway.app, access_log=None, shutdown_timeout=config.grace_s)
        self.port = 0

    def _bind(self) -> socket.socket:
        host = self.config.host.strip("[]")  # "[::]" as gRPC writes it
        family, kind, proto, _, address = socket.getaddrinfo(
            host, self.config.http_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            # Not SO_REUSEPORT: a busy port is an error, as on the gRPC port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as e:
            sock.close()
            raise OSError(f"could not bind the HTTP port {self.config.host}:{self.config.http_port} ({e})") from None
        return sock

    async def start(self) -> int:
        """Listen; returns the bound port (the one chosen, for http_port 0)."""
        sock = self._bind()
        self.port = sock.getsockname()[1]
        await self.runner.setup()
        await web.SockSite(self.runner, sock, ssl_context=self.ssl_context).start()
        return self.port

    async def stop(self) -> None:
        """Stop listening, let handlers in flight finish (at most grace_s), close connections."""
        await self.runner.cleanup()
