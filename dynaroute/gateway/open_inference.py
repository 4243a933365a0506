"""The KServe v2 / Open Inference Protocol, independent of the transport.

`KServeModel` holds what the gRPC servicer (kserve.py) and the HTTP/REST transport (rest.py)
share, so that both check, decode, budget, run and count a call the same way and differ only
in the wire form. A call holds one input of shape [N, ...example shape] (N >= 1; BYTES [N] or
[N, 1] for text models); each row is one engine request, and all run concurrently. The budget
comes from request parameters (quality, max_flops, target_accuracy, subnet, policy, and a floor:
min_quality or min_accuracy; any other name is refused); the route and cost go back in response
parameters: `route` and `cost` as JSON lists with one entry per row (each route with the
budget asked and served, `budget_asked`, `budget_got`, `budget_lowered`), plus scalar totals
(total_flops, full_flops, flops_ratio, rows_lowered, budget_asked_flops_ratio,
budget_got_flops_ratio) that plain KServe clients can read, and `budget_out_of_reach` (with
`budget_note`) when no calibrated point met the budget. One call counts once in dynaroute_requests_total, its rows in
dynaroute_rows_total.

This module loads no protobuf messages of the `inference` package: tritonclient.grpc
registers the same names, and a process (a test, a client) may import both.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dynaroute import __version__, metrics
from dynaroute.codec import InputCodec, InputSpec, codec_for
from dynaroute.errors import InvalidInputError, ModelNotFoundError, UnavailableError, shown
from dynaroute.gateway.inputs import check_size, decode_bytes_elements
from dynaroute.gateway.types import Engine, InferRequest, InferResult, point_fields
from dynaroute.router.budget import Budget
from dynaroute.router.calibration import OperatingPoint

VERSION = "1"
# KServe v2 datatype <-> numpy dtype, and which typed `contents` field carries it.
DATATYPES: dict[str, tuple[str, str]] = {
    "BOOL": ("bool", "bool_contents"),
    "INT8": ("int8", "int_contents"),
    "INT16": ("int16", "int_contents"),
    "INT32": ("int32", "int_contents"),
    "INT64": ("int64", "int64_contents"),
    "UINT8": ("uint8", "uint_contents"),
    "UINT16": ("uint16", "uint_contents"),
    "UINT32": ("uint32", "uint_contents"),
    "UINT64": ("uint64", "uint64_contents"),
    "FP16": ("float16", ""),  # over gRPC raw only, as the protocol says (JSON carries numbers)
    "FP32": ("float32", "fp32_contents"),
    "FP64": ("float64", "fp64_contents"),
    "BYTES": ("object", "bytes_contents"),
}
DATATYPE_OF = {np_name: dt for dt, (np_name, _) in DATATYPES.items() if dt != "BYTES"}
OUTPUTS = ("logits", "label", "confidence")
BUDGET_NUMBERS = ("quality", "max_flops", "target_accuracy", "min_quality", "min_accuracy")
BUDGET_STRINGS = ("subnet", "policy")


def _point_dict(point: OperatingPoint | None) -> dict[str, Any] | None:
    return None if point is None else point_fields(point)


def server_version() -> str:
    """dynaroute's version, as server metadata reports it."""
    return __version__


def decode_budget(params: Mapping[str, Any]) -> Budget:
    """The budget from request parameters (name -> plain value: number, string, bool or None);
    an unknown name is refused, not silently ignored (a misspelt `qualty` would otherwise be
    served at the default budget)."""
    unknown = sorted(set(params) - set(BUDGET_NUMBERS) - set(BUDGET_STRINGS))
    if unknown:
        names = ", ".join(shown(n) for n in unknown[:4]) + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else "")
        raise InvalidInputError(
            f"parameters: unknown name(s) {names}; expected some of {[*BUDGET_NUMBERS, *BUDGET_STRINGS]}"
        )
    kwargs: dict[str, Any] = {}
    for key in BUDGET_NUMBERS:
        if key in params:
            v = params[key]
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    raise InvalidInputError(f"parameters.{key}: {shown(v)} is not a number") from None
            if not isinstance(v, int | float) or isinstance(v, bool):
                raise InvalidInputError(f"parameters.{key}: expected a number (double or int64 parameter)")
            kwargs[key] = float(v)
    for key in BUDGET_STRINGS:
        if key in params:
            v = params[key]
            if not isinstance(v, str) or not v:
                raise InvalidInputError(f"parameters.{key}: expected a non-empty string parameter")
            kwargs[key] = v
    try:
        return Budget(**kwargs)
    except InvalidInputError as e:
        raise InvalidInputError(f"parameters: {e}") from None


def metadata_tensors(spec: InputSpec, num_classes: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The model's input and output tensors as the protocol describes them: name, datatype and
    shape, -1 for the batch dimension."""
    if spec.wire == "text":
        inputs = [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    else:
        inputs = [{"name": "input", "datatype": DATATYPE_OF[spec.dtype], "shape": [-1, *spec.shape]}]
    outputs = [
        {"name": "logits", "datatype": "FP32", "shape": [-1, num_classes]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "confidence", "datatype": "FP32", "shape": [-1]},
    ]
    return inputs, outputs


@dataclass(frozen=True)
class WireTensor:
    """One input tensor as a transport carries it: typed values (gRPC `contents`, JSON `data`),
    read only once the name, datatype and shape have passed, or raw little-endian bytes (gRPC
    `raw_input_contents`, the HTTP binary tensor extension). The field names go into messages."""

    name: str
    datatype: str
    shape: list[int]
    values: Callable[[], Sequence[Any]] | None = None
    raw: bytes | None = None
    field: str = "inputs[0]"
    values_field: str = "inputs[0].data"
    raw_field: str = "raw_input_contents[0]"


@dataclass(frozen=True)
class InferCall:
    """One decoded infer request: what either transport read off the wire."""

    model: str
    version: str
    id: str
    parameters: Mapping[str, Any]  # name -> plain value; the budget's names only
    inputs: Sequence[WireTensor]
    outputs: Sequence[str]  # requested output names; empty: all of them
    size: int  # bytes on the wire


@dataclass(frozen=True)
class PreparedCall:
    """A call that passed every check: its rows, budget and outputs, admitted to the engine."""

    model: str
    id: str
    budget: Budget
    rows: list[np.ndarray] | list[str]
    outputs: list[str]


class KServeModel:
    """The Open Inference Protocol over one engine, independent of the transport: model checks,
    metadata, decoding and checking a call, running its rows, the outputs and response
    parameters, and counting each call once in dynaroute_requests_total under `api`."""

    def __init__(self, engine: Engine, max_message_bytes: int, is_ready: Callable[[], bool], api: str) -> None:
        self.engine = engine
        self.max_message_bytes = max_message_bytes
        self.is_ready = is_ready
        self.api = api

    # Read on first use, not at construction: the server builds this before the engine has
    # started (health says NOT_SERVING meanwhile).
    @functools.cached_property
    def codec(self) -> InputCodec:
        return codec_for(self.engine.model_info()["input"])  # checks only: the engine encodes

    @property
    def spec(self) -> InputSpec:
        return self.codec.spec

    @functools.cached_property
    def _metadata(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        info = self.engine.model_info()
        return metadata_tensors(self.spec, len(info["labels"]))

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return self._metadata[0]

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return self._metadata[1]

    @property
    def input_name(self) -> str:
        return self.inputs[0]["name"]

    def check_model(self, name: str, version: str, field: str = "name") -> None:
        if name != self.engine.model_name:
            raise ModelNotFoundError(
                f"{field}: model {shown(name)} is not served here; expected {self.engine.model_name!r}"
            )
        if version not in ("", VERSION):
            raise ModelNotFoundError(f"version: model {shown(name)} has only version {VERSION!r}, not {shown(version)}")

    def model_metadata(self, name: str, version: str) -> dict[str, Any]:
        """The model metadata response's fields, after checking the name and version."""
        self.check_model(name, version)
        return {"name": self.engine.model_name, "versions": [VERSION], "platform": "dynaroute",
                "inputs": self.inputs, "outputs": self.outputs}

    def model_ready(self, name: str, version: str) -> bool:
        self.check_model(name, version)
        return self.is_ready()

    # -- infer ----------------------------------------------------------------------------------

    def decode_rows(self, inputs: Sequence[WireTensor]) -> list[np.ndarray] | list[str]:
        """The call's one input -> one example per row, checked against the model's spec."""
        if len(inputs) != 1:
            raise InvalidInputError(f"inputs: got {len(inputs)} input tensors, expected 1 named {self.input_name!r}")
        t = inputs[0]
        field = t.field
        if t.name != self.input_name:
            raise InvalidInputError(f"{field}.name: got {shown(t.name)}, expected {self.input_name!r}")
        want = self.inputs[0]["datatype"]
        if t.datatype != want:
            raise InvalidInputError(f"{field}.datatype: got {shown(t.datatype)}, expected {want!r}")
        shape = [int(d) for d in t.shape]
        if self.spec.wire == "text":
            ok = len(shape) in (1, 2) and shape[0] >= 1 and (len(shape) == 1 or shape[1] == 1)
            expected = "[N] or [N, 1] with N >= 1"
        else:
            ok = len(shape) == len(self.spec.shape) + 1 and shape[0] >= 1 and tuple(shape[1:]) == self.spec.shape
            expected = f"[N, {', '.join(map(str, self.spec.shape))}] with N >= 1"
        if not ok:
            raise InvalidInputError(f"{field}.shape: got {shown(shape)}, expected {expected}")
        count = math.prod(shape)
        np_name = DATATYPES[want][0]
        if t.raw is not None:
            if self.spec.wire == "text":
                values: Any = decode_bytes_elements(t.raw_field, t.raw, count)
            else:
                itemsize = np.dtype(np_name).itemsize
                if len(t.raw) != count * itemsize:
                    raise InvalidInputError(
                        f"{t.raw_field}: {len(t.raw)} bytes, but {want} {shape} needs {count * itemsize} bytes"
                    )
                values = np.frombuffer(t.raw, dtype=np.dtype(np_name).newbyteorder("<")).astype(np_name)
        else:
            values = t.values() if t.values is not None else []
            if len(values) != count:
                raise InvalidInputError(f"{t.values_field}: {len(values)} values, but shape {shape} needs {count}")
        if self.spec.wire == "text":
            rows: list[str] = []
            for i, b in enumerate(values):
                try:
                    text = b if isinstance(b, str) else b.decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidInputError(f"{field} row {i}: not UTF-8 text") from None
                rows.append(self.codec.check(f"{field} row {i}", text))
            return rows
        arr = np.asarray(values, dtype=np_name).reshape(shape)
        return [self.codec.check(f"{field} row {i}", arr[i]) for i in range(shape[0])]

    def requested_outputs(self, names: Sequence[str]) -> list[str]:
        names = list(names) or list(OUTPUTS)
        for n in names:
            if n not in OUTPUTS:
                raise InvalidInputError(f"outputs: unknown output {shown(n)}; expected some of {list(OUTPUTS)}")
        return names

    def prepare(self, call: InferCall) -> PreparedCall:
        """Every check a call must pass before the engine sees it, in the order the messages
        name them; a call of several rows is admitted whole or refused whole."""
        check_size("request", call.size, self.max_message_bytes)
        self.check_model(call.model, call.version, field="model_name")
        budget = decode_budget(call.parameters)
        names = self.requested_outputs(call.outputs)
        rows = self.decode_rows(call.inputs)
        if len(rows) > 1:
            self.engine.admit(len(rows))
        return PreparedCall(model=call.model, id=call.id, budget=budget, rows=rows, outputs=names)

    def count_refused(self, model: str, error: BaseException) -> None:
        """Count a call refused before the engine (by `prepare`, or by the transport). Unknown
        names are not echoed into labels: a client must not grow the label set."""
        try:
            label = self.engine.model_name if model == self.engine.model_name else "unknown"
        except UnavailableError:  # still starting
            label = "unknown"
        metrics.record_request(label, self.api, metrics.status_of(error))

    async def run(self, call: PreparedCall, deadline: float | None) -> list[InferResult]:
        """Run every row as one engine request, concurrently, and count the call once with its
        final status. Raises the engine's exceptions (and CancelledError if the caller went)."""
        many = len(call.rows) > 1
        flow = object()  # this call's rows take turns with other calls in every queue
        requests = [
            InferRequest(
                model=call.model, id=f"{call.id}/{i}" if many else call.id, budget=call.budget, deadline=deadline,
                api=self.api, count_request=False, admitted=many, flow=flow,
                **({"text": r} if isinstance(r, str) else {"tensor": r}),
            )
            for i, r in enumerate(call.rows)
        ]
        try:
            results = await asyncio.gather(*(self.engine.infer(r) for r in requests))
        except BaseException as e:
            metrics.record_request(call.model, self.api, metrics.status_of(e))
            raise
        metrics.record_request(call.model, self.api, "ok")
        return list(results)

    @staticmethod
    def output_arrays(results: Sequence[InferResult]) -> dict[str, np.ndarray]:
        """Every output, little-endian, as the protocol's datatypes (DATATYPE_OF) name them."""
        return {
            "logits": np.stack([r.logits.reshape(-1) for r in results]).astype("<f4"),
            "label": np.asarray([r.label for r in results], dtype="<i8"),
            "confidence": np.asarray([r.confidence for r in results], dtype="<f4"),
        }

    @staticmethod
    def response_parameters(results: Sequence[InferResult]) -> dict[str, str | int | float | bool]:
        """Route and cost as JSON lists (one entry per row) plus scalar totals: scalars only,
        since the protocol's parameters hold strings, numbers and booleans."""
        routes = [
            {"subnets": r.route.subnets, "weights": r.route.weights, "escalations": r.route.escalations,
             "exit_depths": r.route.exit_depths, "fallbacks": r.route.fallbacks, "policy": r.route.policy,
             "label_name": r.label_name, "budget_out_of_reach": r.route.budget_out_of_reach,
             "budget_asked": _point_dict(r.route.budget_asked), "budget_got": _point_dict(r.route.budget_got),
             "budget_lowered": r.route.budget_lowered}
            for r in results
        ]
        costs = [
            {"router_flops": r.cost.router_flops, "expert_flops": r.cost.expert_flops, "total_flops": r.cost.flops,
             "full_flops": r.cost.full_flops, "flops_ratio": r.cost.flops_ratio, "queue_seconds": r.cost.queue_s,
             "compute_seconds": r.cost.compute_s, "total_seconds": r.cost.total_s}
            for r in results
        ]
        total = sum(c["total_flops"] for c in costs)
        full = sum(c["full_flops"] for c in costs)
        params: dict[str, str | int | float | bool] = {
            "route": json.dumps(routes), "cost": json.dumps(costs), "total_flops": int(total),
            "full_flops": int(full), "flops_ratio": total / full if full else 0.0, "rows": len(results),
            # Every row has the call's budget, so one flag says it for all of them.
            "budget_out_of_reach": results[0].route.budget_out_of_reach,
        }
        if results[0].route.budget_out_of_reach:
            params["budget_note"] = results[0].route.budget_note
        params["rows_lowered"] = sum(r.route.budget_lowered for r in results)
        asked = [r.route.budget_asked.flops_ratio for r in results if r.route.budget_asked is not None]
        got = [r.route.budget_got.flops_ratio for r in results if r.route.budget_got is not None]
        if asked and got:
            params["budget_asked_flops_ratio"] = sum(asked) / len(asked)
            params["budget_got_flops_ratio"] = sum(got) / len(got)
        return params
