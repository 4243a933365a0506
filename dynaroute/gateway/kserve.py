"""The KServe v2 Open Inference Protocol servicer (`inference.GRPCInferenceService`).

A request holds one input of shape [N, ...example shape] (N >= 1; BYTES [N] or [N, 1] for
text models); each row is one engine request, and all run concurrently. The budget comes from
request parameters (quality, max_flops, target_accuracy, subnet, policy; any other name is
refused); the route and cost go back in response parameters: `route` and `cost` as JSON lists
with one entry per row, plus scalar totals (total_flops, full_flops, flops_ratio) that plain
KServe clients can read, and `budget_out_of_reach` (with `budget_note`) when no calibrated
point met the budget. The budget asked and the one served are in each row's `route` entry
(`budget_asked`, `budget_got`, `budget_lowered`), with the rows served below their budget
(`rows_lowered`) and the mean expected FLOPs ratio of the points asked and served
(`budget_asked_flops_ratio`, `budget_got_flops_ratio`) as scalars. One call counts once in
dynaroute_requests_total, its rows in dynaroute_rows_total.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import json
import math
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from dynaroute import metrics
from dynaroute._proto import grpc_service_pb2 as pb
from dynaroute._proto import grpc_service_pb2_grpc as pb_grpc
from dynaroute.errors import InvalidInputError, ModelNotFoundError, UnavailableError, shown
from dynaroute.gateway.inputs import InputSpec, check_example, check_size, check_text, decode_bytes_elements
from dynaroute.gateway.native import deadline_of, point_fields
from dynaroute.gateway.status import record_request, status_for
from dynaroute.gateway.types import Engine, InferRequest, InferResult
from dynaroute.router.budget import Budget
from dynaroute.router.calibration import OperatingPoint

API = "kserve"
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
    "FP16": ("float16", ""),  # raw only, as the protocol says
    "FP32": ("float32", "fp32_contents"),
    "FP64": ("float64", "fp64_contents"),
    "BYTES": ("object", "bytes_contents"),
}
DATATYPE_OF = {np_name: dt for dt, (np_name, _) in DATATYPES.items() if dt != "BYTES"}
OUTPUTS = ("logits", "label", "confidence")
BUDGET_NUMBERS = ("quality", "max_flops", "target_accuracy", "min_quality", "min_accuracy")
BUDGET_STRINGS = ("subnet", "policy")


def _version() -> str:
    try:
        return importlib.metadata.version("dynaroute")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def _param_value(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def decode_budget(params: Any) -> Budget:
    """The budget from request parameters; an unknown name is refused, not silently ignored
    (a misspelt `qualty` would otherwise be served at the default budget)."""
    unknown = sorted(set(params) - set(BUDGET_NUMBERS) - set(BUDGET_STRINGS))
    if unknown:
        names = ", ".join(shown(n) for n in unknown[:4]) + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else "")
        raise InvalidInputError(
            f"parameters: unknown name(s) {names}; expected some of {[*BUDGET_NUMBERS, *BUDGET_STRINGS]}"
        )
    kwargs: dict[str, Any] = {}
    for key in BUDGET_NUMBERS:
        if key in params:
            v = _param_value(params[key])
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    raise InvalidInputError(f"parameters.{key}: {shown(v)} is not a number") from None
            if v is None or isinstance(v, bool):
                raise InvalidInputError(f"parameters.{key}: expected a number (double or int64 parameter)")
            kwargs[key] = float(v)
    for key in BUDGET_STRINGS:
        if key in params:
            v = _param_value(params[key])
            if not isinstance(v, str) or not v:
                raise InvalidInputError(f"parameters.{key}: expected a non-empty string parameter")
            kwargs[key] = v
    try:
        return Budget(**kwargs)
    except InvalidInputError as e:
        raise InvalidInputError(f"parameters: {e}") from None


def _point_dict(point: OperatingPoint | None) -> dict[str, Any] | None:
    return None if point is None else point_fields(point)


def metadata_tensors(spec: InputSpec, num_classes: int) -> tuple[list[Any], list[Any]]:
    meta = pb.ModelMetadataResponse.TensorMetadata
    if spec.is_text:
        inputs = [meta(name="text", datatype="BYTES", shape=[-1])]
    else:
        inputs = [meta(name="input", datatype=DATATYPE_OF[spec.dtype], shape=[-1, *spec.shape])]
    outputs = [
        meta(name="logits", datatype="FP32", shape=[-1, num_classes]),
        meta(name="label", datatype="INT64", shape=[-1]),
        meta(name="confidence", datatype="FP32", shape=[-1]),
    ]
    return inputs, outputs


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """KServe v2 over the same engine as the native API."""

    def __init__(self, engine: Engine, max_message_bytes: int, is_ready: Callable[[], bool]) -> None:
        self.engine = engine
        self.max_message_bytes = max_message_bytes
        self.is_ready = is_ready

    # Read on first use, not at construction: the server registers this servicer before the
    # engine has started (health says NOT_SERVING meanwhile).
    @functools.cached_property
    def spec(self) -> InputSpec:
        return InputSpec.from_model_info(self.engine.model_info())

    @functools.cached_property
    def _metadata(self) -> tuple[list[Any], list[Any]]:
        info = self.engine.model_info()
        return metadata_tensors(self.spec, len(info["labels"]))

    @property
    def inputs(self) -> list[Any]:
        return self._metadata[0]

    @property
    def outputs(self) -> list[Any]:
        return self._metadata[1]

    @property
    def input_name(self) -> str:
        return self.inputs[0].name

    def _check_model(self, name: str, version: str, field: str = "name") -> None:
        if name != self.engine.model_name:
            raise ModelNotFoundError(
                f"{field}: model {shown(name)} is not served here; expected {self.engine.model_name!r}"
            )
        if version not in ("", VERSION):
            raise ModelNotFoundError(f"version: model {shown(name)} has only version {VERSION!r}, not {shown(version)}")

    async def _fail(self, context: grpc.aio.ServicerContext, e: Exception) -> None:
        await context.abort(*status_for(e))

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._check_model(request.name, request.version)
        except (ModelNotFoundError, UnavailableError) as e:
            await self._fail(context, e)
        return pb.ModelReadyResponse(ready=self.is_ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name="dynaroute", version=_version(), extensions=[])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._check_model(request.name, request.version)
            return pb.ModelMetadataResponse(
                name=self.engine.model_name, versions=[VERSION], platform="dynaroute", inputs=self.inputs,
                outputs=self.outputs,
            )
        except (ModelNotFoundError, UnavailableError) as e:
            await self._fail(context, e)

    # -- ModelInfer ---------------------------------------------------------------------------

    def _decode_rows(self, req: pb.ModelInferRequest) -> list[np.ndarray] | list[str]:
        """The request's one input -> one example per row, checked against the model's spec."""
        if len(req.inputs) != 1:
            raise InvalidInputError(
                f"inputs: got {len(req.inputs)} input tensors, expected 1 named {self.input_name!r}"
            )
        t = req.inputs[0]
        field = "inputs[0]"
        if t.name != self.input_name:
            raise InvalidInputError(f"{field}.name: got {shown(t.name)}, expected {self.input_name!r}")
        want = self.inputs[0].datatype
        if t.datatype != want:
            raise InvalidInputError(f"{field}.datatype: got {shown(t.datatype)}, expected {want!r}")
        shape = [int(d) for d in t.shape]
        if self.spec.is_text:
            ok = len(shape) in (1, 2) and shape[0] >= 1 and (len(shape) == 1 or shape[1] == 1)
            expected = "[N] or [N, 1] with N >= 1"
        else:
            ok = len(shape) == len(self.spec.shape) + 1 and shape[0] >= 1 and tuple(shape[1:]) == self.spec.shape
            expected = f"[N, {', '.join(map(str, self.spec.shape))}] with N >= 1"
        if not ok:
            raise InvalidInputError(f"{field}.shape: got {shown(shape)}, expected {expected}")
        count = math.prod(shape)
        np_name, contents_field = DATATYPES[want]
        if req.raw_input_contents:
            if len(req.raw_input_contents) != len(req.inputs):
                raise InvalidInputError(
                    f"raw_input_contents: {len(req.raw_input_contents)} entries for {len(req.inputs)} inputs"
                )
            if t.HasField("contents"):
                raise InvalidInputError(f"{field}.contents: set together with raw_input_contents; use one of them")
            raw = req.raw_input_contents[0]
            if self.spec.is_text:
                values: Any = decode_bytes_elements("raw_input_contents[0]", raw, count)
            else:
                itemsize = np.dtype(np_name).itemsize
                if len(raw) != count * itemsize:
                    raise InvalidInputError(
                        f"raw_input_contents[0]: {len(raw)} bytes, but {want} {shape} needs {count * itemsize} bytes"
                    )
                values = np.frombuffer(raw, dtype=np.dtype(np_name).newbyteorder("<")).astype(np_name)
        else:
            values = list(getattr(t.contents, contents_field)) if contents_field else []
            if len(values) != count:
                raise InvalidInputError(
                    f"{field}.contents.{contents_field or 'raw_input_contents'}: {len(values)} values, "
                    f"but shape {shape} needs {count}"
                )
        if self.spec.is_text:
            rows: list[str] = []
            for i, b in enumerate(values):
                try:
                    rows.append(check_text(f"{field} row {i}", b.decode("utf-8")))
                except UnicodeDecodeError:
                    raise InvalidInputError(f"{field} row {i}: not UTF-8 text") from None
            return rows
        arr = np.asarray(values, dtype=np_name).reshape(shape)
        return [check_example(f"{field} row {i}", arr[i], self.spec) for i in range(shape[0])]

    def _requested_outputs(self, req: pb.ModelInferRequest) -> list[str]:
        names = [o.name for o in req.outputs] or list(OUTPUTS)
        for n in names:
            if n not in OUTPUTS:
                raise InvalidInputError(f"outputs: unknown output {shown(n)}; expected some of {list(OUTPUTS)}")
        return names

    def _encode(self, req: pb.ModelInferRequest, names: list[str], results: list[InferResult]) -> Any:
        n = len(results)
        arrays = {
            "logits": np.stack([r.logits.reshape(-1) for r in results]).astype("<f4"),
            "label": np.asarray([r.label for r in results], dtype="<i8"),
            "confidence": np.asarray([r.confidence for r in results], dtype="<f4"),
        }
        resp = pb.ModelInferResponse(model_name=self.engine.model_name, model_version=VERSION, id=req.id)
        for name in names:
            a = arrays[name]
            resp.outputs.add(name=name, datatype=DATATYPE_OF[str(a.dtype.newbyteorder("="))], shape=list(a.shape))
            resp.raw_output_contents.append(a.tobytes())
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
        params = resp.parameters
        params["route"].string_param = json.dumps(routes)
        params["cost"].string_param = json.dumps(costs)
        params["total_flops"].int64_param = int(total)
        params["full_flops"].int64_param = int(full)
        params["flops_ratio"].double_param = total / full if full else 0.0
        params["rows"].int64_param = n
        # Every row has the call's budget, so one flag says it for all of them.
        params["budget_out_of_reach"].bool_param = results[0].route.budget_out_of_reach
        if results[0].route.budget_out_of_reach:
            params["budget_note"].string_param = results[0].route.budget_note
        params["rows_lowered"].int64_param = sum(r.route.budget_lowered for r in results)
        asked = [r.route.budget_asked.flops_ratio for r in results if r.route.budget_asked is not None]
        got = [r.route.budget_got.flops_ratio for r in results if r.route.budget_got is not None]
        if asked and got:
            params["budget_asked_flops_ratio"].double_param = sum(asked) / len(asked)
            params["budget_got_flops_ratio"].double_param = sum(got) / len(got)
        return resp

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        name = request.model_name
        try:
            check_size("request", request.ByteSize(), self.max_message_bytes)
            self._check_model(name, request.model_version, field="model_name")
            budget = decode_budget(request.parameters)
            names = self._requested_outputs(request)
            rows = self._decode_rows(request)
            if len(rows) > 1:
                self.engine.admit(len(rows))
        except Exception as e:  # noqa: BLE001 - every error is mapped to a status in one place
            code, message = status_for(e)
            # Refused before the engine. Unknown names are not echoed into labels: a client must
            # not grow the label set.
            try:
                model = self.engine.model_name if name == self.engine.model_name else "unknown"
            except UnavailableError:
                model = "unknown"
            record_request(model, API, code)
            await context.abort(code, message)
        deadline = deadline_of(context)
        requests = [
            InferRequest(
                model=name, id=f"{request.id}/{i}" if len(rows) > 1 else request.id, budget=budget,
                deadline=deadline, api=API, count_request=False, admitted=len(rows) > 1,
                **({"text": r} if isinstance(r, str) else {"tensor": r}),
            )
            for i, r in enumerate(rows)
        ]
        try:
            # Each row is one engine request (which counts it in dynaroute_rows_total); they run
            # concurrently. The call is counted here, once, with its final status.
            results = await asyncio.gather(*(self.engine.infer(r) for r in requests))
        except BaseException as e:
            metrics.record_request(name, API, metrics.status_of(e))
            if not isinstance(e, Exception):  # cancelled: the caller has gone
                raise
            await context.abort(*status_for(e))
        metrics.record_request(name, API, "ok")
        return self._encode(request, names, list(results))
