"""The KServe v2 / Open Inference Protocol, independent of the transport.

`OpenInference` holds what the gRPC servicer (kserve.py) and the HTTP/REST transport (rest.py)
share, so that both look up, check, decode, budget, run and count a call the same way, and
load, replace and unload models the same way, and differ only in the wire form. Each call
names its model (version "1" or empty), looked up in the model repository (repository.py) and
held until the call is answered. A call holds one input of shape [N, ...example shape] (N >= 1;
BYTES [N] or [N, 1] for text models); each row is one engine request, and all run concurrently.
The budget comes from request parameters (quality, max_flops, target_accuracy, subnet, policy,
and a floor: min_quality or min_accuracy; any other name is refused); the route and cost go back in response
parameters: `route` and `cost` as JSON lists with one entry per row (each route with the
budget asked and served, `budget_asked`, `budget_got`, `budget_lowered`), plus scalar totals
(total_flops, full_flops, flops_ratio, rows_lowered, budget_asked_flops_ratio,
budget_got_flops_ratio) that plain KServe clients can read, and `budget_out_of_reach` (with
`budget_note`) when no calibrated point met the budget. One call counts once in
dynaroute_requests_total, its rows in dynaroute_rows_total, under the model's name (unknown
names count as "unknown").

This module loads no protobuf messages of the `inference` package: tritonclient.grpc
registers the same names, and a process (a test, a client) may import both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import struct
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dynaroute import __version__, metrics
from dynaroute.codec import InputSpec
from dynaroute.errors import InvalidInputError, shown
from dynaroute.gateway.inputs import check_size, decode_bytes_elements
from dynaroute.gateway.repository import VERSION, IndexEntry, Model, Repository
from dynaroute.gateway.types import InferRequest, InferResult, point_fields
from dynaroute.router.budget import Budget
from dynaroute.router.calibration import OperatingPoint

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
# Parameters of RepositoryModelUnload that are accepted (tritonclient always sends this one;
# dynaroute's models have no dependents). Loads take none: the bundle is loaded as it is.
UNLOAD_PARAMETERS = ("unload_dependents",)


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


def classification_counts(requested: Mapping[str, Any], num_classes: int) -> dict[str, int]:
    """Checked `classification` parameters (Triton's classification extension): a class count
    k >= 1 on the `logits` output, served as min(k, number of classes)."""
    out = {}
    for name, k in requested.items():
        if name != "logits":
            raise InvalidInputError(f"outputs: classification applies to the 'logits' output, not {shown(name)}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InvalidInputError(f"outputs[{name!r}].parameters.classification: got {shown(k)}; expected a class "
                                    "count >= 1")
        out[name] = min(k, num_classes)
    return out


def top_classes(logits: np.ndarray, k: int, labels: Sequence[str]) -> np.ndarray:
    """BYTES [N, k]: each row's k highest logits as "value:index:label", highest first, as
    Triton's classification extension writes them."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return np.array([[f"{row[j]:f}:{j}:{labels[j]}".encode() for j in idx] for row, idx in zip(logits, order,
                                                                                              strict=True)],
                    dtype=object).reshape(len(logits), k)


def wire_datatype(a: np.ndarray) -> str:
    """The protocol's datatype of an output array."""
    return "BYTES" if a.dtype == object else DATATYPE_OF[str(a.dtype.newbyteorder("="))]


def wire_bytes(a: np.ndarray) -> bytes:
    """An output's raw contents: little-endian values, or for BYTES each element after its
    4-byte little-endian length, as the protocol lays them out."""
    if a.dtype != object:
        return a.tobytes()
    return b"".join(struct.pack("<I", len(x)) + x for x in a.reshape(-1))


def check_repository_parameters(params: Mapping[str, Any], allowed: tuple[str, ...], call: str) -> None:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        expected = f"only {list(allowed)}" if allowed else "none"
        raise InvalidInputError(f"parameters: {call} does not take {[shown(n) for n in unknown[:4]]}; expected "
                                f"{expected} (a bundle is loaded as it is in the repository folder)")


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
    # Triton's classification extension: output name -> the `classification` parameter asked
    # for it (a class count k: the output becomes the top k as "value:index:label" strings).
    classification: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PreparedCall:
    """A call that passed every check: its rows, budget and outputs, admitted to the engine."""

    model: str
    id: str
    budget: Budget
    rows: list[np.ndarray] | list[str]
    outputs: list[str]
    classification: dict[str, int] = field(default_factory=dict)  # output -> top k, checked
    labels: tuple[str, ...] = ()  # the model's class names, for classification outputs


class OpenInference:
    """The Open Inference Protocol over the model repository, independent of the transport:
    model checks, metadata, the repository calls, decoding and checking a call against the
    model it names, running its rows on that model's engine, the outputs and response
    parameters, and counting each call once in dynaroute_requests_total under `api`.

    Every call looks its model up in the repository (`Repository.use`) and holds it until its
    rows are answered, so that an unload or a replace closes an engine only once nothing uses it."""

    def __init__(self, models: Repository, max_message_bytes: int, is_ready: Callable[[], bool], api: str) -> None:
        self.models = models
        self.max_message_bytes = max_message_bytes
        self.is_ready = is_ready  # the server's readiness (started, not draining); a model's is the repository's
        self.api = api
        # A loaded model's tensor metadata, built once (a replaced model is a new Model).
        self._metadata_of: weakref.WeakKeyDictionary[Model, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = (
            weakref.WeakKeyDictionary()
        )

    def metadata(self, model: Model) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The model's (inputs, outputs) tensor metadata."""
        meta = self._metadata_of.get(model)
        if meta is None:
            labels = model.engine.model_info()["labels"]
            meta = self._metadata_of[model] = metadata_tensors(model.codec.spec, len(labels))
        return meta

    def model_metadata(self, name: str, version: str) -> dict[str, Any]:
        """The model metadata response's fields: NOT_FOUND for a name or version not served or a
        model not loaded, UNAVAILABLE while it loads or unloads."""
        model = self.models.get(name, version, field="name")
        inputs, outputs = self.metadata(model)
        return {"name": model.name, "versions": [VERSION], "platform": "dynaroute", "inputs": inputs,
                "outputs": outputs}

    def model_ready(self, name: str, version: str) -> bool:
        """A model of the repository that is not serving (loading, unloading, unloaded) is not
        ready; a name the repository does not know is NOT_FOUND."""
        self.models.check(name, version, field="name")
        return self.is_ready() and self.models.ready(name)

    # -- the model repository (Triton's extension) ---------------------------------------------

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model of the folder and every model loaded, with its state."""
        return self.models.index(ready_only=ready_only)

    async def load(self, name: str, parameters: Mapping[str, Any]) -> None:
        """Load the model, or replace it when loaded; returns once it serves."""
        check_repository_parameters(parameters, (), "RepositoryModelLoad")
        if not name:
            raise InvalidInputError("model_name: empty; expected the name of a bundle in the repository")
        await self.models.load(name)

    async def unload(self, name: str, parameters: Mapping[str, Any]) -> None:
        """Unload the model; returns once its in-flight requests have finished and its experts
        have stopped."""
        check_repository_parameters(parameters, UNLOAD_PARAMETERS, "RepositoryModelUnload")
        if not name:
            raise InvalidInputError("model_name: empty; expected the name of a loaded model")
        await self.models.unload(name)

    # -- infer ----------------------------------------------------------------------------------

    def decode_rows(self, model: Model, inputs: Sequence[WireTensor]) -> list[np.ndarray] | list[str]:
        """The call's one input -> one example per row, checked against `model`'s spec."""
        codec = model.codec
        spec = codec.spec
        wanted = self.metadata(model)[0][0]
        input_name = wanted["name"]
        if len(inputs) != 1:
            raise InvalidInputError(f"inputs: got {len(inputs)} input tensors, expected 1 named {input_name!r}")
        t = inputs[0]
        field = t.field
        if t.name != input_name:
            raise InvalidInputError(f"{field}.name: got {shown(t.name)}, expected {input_name!r}")
        want = wanted["datatype"]
        if t.datatype != want:
            raise InvalidInputError(f"{field}.datatype: got {shown(t.datatype)}, expected {want!r}")
        shape = [int(d) for d in t.shape]
        if spec.wire == "text":
            ok = len(shape) in (1, 2) and shape[0] >= 1 and (len(shape) == 1 or shape[1] == 1)
            expected = "[N] or [N, 1] with N >= 1"
        else:
            ok = len(shape) == len(spec.shape) + 1 and shape[0] >= 1 and tuple(shape[1:]) == spec.shape
            expected = f"[N, {', '.join(map(str, spec.shape))}] with N >= 1"
        if not ok:
            raise InvalidInputError(f"{field}.shape: got {shown(shape)}, expected {expected}")
        count = math.prod(shape)
        np_name = DATATYPES[want][0]
        if t.raw is not None:
            if spec.wire == "text":
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
        if spec.wire == "text":
            rows: list[str] = []
            for i, b in enumerate(values):
                try:
                    text = b if isinstance(b, str) else b.decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidInputError(f"{field} row {i}: not UTF-8 text") from None
                rows.append(codec.check(f"{field} row {i}", text))
            return rows
        arr = np.asarray(values, dtype=np_name).reshape(shape)
        return [codec.check(f"{field} row {i}", arr[i]) for i in range(shape[0])]

    def requested_outputs(self, names: Sequence[str]) -> list[str]:
        names = list(names) or list(OUTPUTS)
        for n in names:
            if n not in OUTPUTS:
                raise InvalidInputError(f"outputs: unknown output {shown(n)}; expected some of {list(OUTPUTS)}")
        return names

    def prepare(self, call: InferCall, held: contextlib.ExitStack) -> tuple[Model, PreparedCall]:
        """Every check a call must pass before the engine sees it, in the order the messages
        name them; its model is held in `held` from the name's check on. A call of several rows
        is admitted whole or refused whole."""
        check_size("request", call.size, self.max_message_bytes)
        model = held.enter_context(self.models.use(call.model, call.version, field="model_name"))
        budget = decode_budget(call.parameters)
        names = self.requested_outputs(call.outputs)
        classification = classification_counts(call.classification, len(model.labels))
        rows = self.decode_rows(model, call.inputs)
        if len(rows) > 1:
            model.engine.admit(len(rows))
        return model, PreparedCall(model=model.name, id=call.id, budget=budget, rows=rows, outputs=names,
                                   classification=classification, labels=model.labels)

    def count_refused(self, model: str, error: BaseException) -> None:
        """Count a call refused before the engine (by `prepare`, or by the transport), labelled
        as the repository labels the name (unknown names are not echoed)."""
        metrics.record_request(self.models.label(model), self.api, metrics.status_of(error))

    async def infer(self, call: InferCall, deadline: float | None) -> tuple[PreparedCall, list[InferResult]]:
        """Check the call (`prepare`; a refusal is counted here) and run it on its model, held
        until every row is answered. Raises what refused the call or the engine's exceptions
        (and CancelledError if the caller went)."""
        with contextlib.ExitStack() as held:
            try:
                model, prepared = self.prepare(call, held)
            except Exception as e:
                self.count_refused(call.model, e)
                raise
            return prepared, await self.run(model, prepared, deadline)

    async def run(self, model: Model, call: PreparedCall, deadline: float | None) -> list[InferResult]:
        """Run every row as one request of `model`'s engine, concurrently, and count the call
        once with its final status. Raises the engine's exceptions (and CancelledError if the
        caller went)."""
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
            results = await asyncio.gather(*(model.engine.infer(r) for r in requests))
        except BaseException as e:
            metrics.record_request(call.model, self.api, metrics.status_of(e))
            raise
        metrics.record_request(call.model, self.api, "ok")
        return list(results)

    @staticmethod
    def output_arrays(results: Sequence[InferResult], call: PreparedCall | None = None) -> dict[str, np.ndarray]:
        """Every output, little-endian, as the protocol's datatypes (DATATYPE_OF) name them; an
        output asked for as a classification is the BYTES [N, k] of its top k classes."""
        arrays = {
            "logits": np.stack([r.logits.reshape(-1) for r in results]).astype("<f4"),
            "label": np.asarray([r.label for r in results], dtype="<i8"),
            "confidence": np.asarray([r.confidence for r in results], dtype="<f4"),
        }
        for name, k in (call.classification.items() if call is not None else ()):
            arrays[name] = top_classes(arrays[name], k, call.labels)
        return arrays

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
