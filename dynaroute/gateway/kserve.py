"""The KServe v2 Open Inference Protocol's gRPC servicer (`inference.GRPCInferenceService`):
the protobuf wire form of `KServeModel` (open_inference.py), which the HTTP/REST transport
(rest.py) shares. Tensors come as typed `contents` or `raw_input_contents`; outputs go back as
`raw_output_contents`; parameters are the protocol's typed InferParameter values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from dynaroute._proto import grpc_service_pb2 as pb
from dynaroute._proto import grpc_service_pb2_grpc as pb_grpc
from dynaroute.errors import InvalidInputError, ModelNotFoundError, UnavailableError
from dynaroute.gateway.native import deadline_of
from dynaroute.gateway.open_inference import (
    DATATYPE_OF,
    DATATYPES,
    VERSION,
    InferCall,
    KServeModel,
    PreparedCall,
    WireTensor,
    server_version,
)
from dynaroute.gateway.status import status_for
from dynaroute.gateway.types import Engine, InferResult

API = "kserve"  # the metrics `api` label of the gRPC transport


def _param_value(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _set_param(p: pb.InferParameter, value: str | int | float | bool) -> None:
    if isinstance(value, bool):  # before int: a bool is an int
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = value


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """KServe v2 over gRPC: the protobuf wire form of `KServeModel`."""

    def __init__(self, engine: Engine, max_message_bytes: int, is_ready: Callable[[], bool]) -> None:
        self.model = KServeModel(engine, max_message_bytes, is_ready, API)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.model.is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            return pb.ModelReadyResponse(ready=self.model.model_ready(request.name, request.version))
        except (ModelNotFoundError, UnavailableError) as e:
            await context.abort(*status_for(e))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name="dynaroute", version=server_version(), extensions=[])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            meta = self.model.model_metadata(request.name, request.version)
        except (ModelNotFoundError, UnavailableError) as e:
            await context.abort(*status_for(e))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]],
        )

    @staticmethod
    def _call(req: pb.ModelInferRequest) -> InferCall:
        """The protobuf request -> InferCall; the checks of its own wire form (raw contents
        given for every input or none, never beside typed contents) are made here."""
        if req.raw_input_contents and len(req.raw_input_contents) != len(req.inputs):
            raise InvalidInputError(
                f"raw_input_contents: {len(req.raw_input_contents)} entries for {len(req.inputs)} inputs"
            )
        tensors = []
        for i, t in enumerate(req.inputs):
            raw = req.raw_input_contents[i] if req.raw_input_contents else None
            if raw is not None and t.HasField("contents"):
                raise InvalidInputError(f"inputs[{i}].contents: set together with raw_input_contents; use one of them")
            contents_field = DATATYPES.get(t.datatype, ("", ""))[1]
            tensors.append(WireTensor(
                name=t.name, datatype=t.datatype, shape=list(t.shape), raw=raw,
                values=(lambda t=t, f=contents_field: list(getattr(t.contents, f)) if f else []),
                field=f"inputs[{i}]", values_field=f"inputs[{i}].contents.{contents_field or 'raw_input_contents'}",
                raw_field=f"raw_input_contents[{i}]",
            ))
        return InferCall(
            model=req.model_name, version=req.model_version, id=req.id,
            parameters={k: _param_value(v) for k, v in req.parameters.items()}, inputs=tensors,
            outputs=[o.name for o in req.outputs], size=req.ByteSize(),
        )

    def _encode(self, call: PreparedCall, results: list[InferResult]) -> Any:
        resp = pb.ModelInferResponse(model_name=call.model, model_version=VERSION, id=call.id)
        arrays = self.model.output_arrays(results)
        for name in call.outputs:
            a = arrays[name]
            resp.outputs.add(name=name, datatype=DATATYPE_OF[str(a.dtype.newbyteorder("="))], shape=list(a.shape))
            resp.raw_output_contents.append(a.tobytes())
        for key, value in self.model.response_parameters(results).items():
            _set_param(resp.parameters[key], value)
        return resp

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            call = self.model.prepare(self._call(request))
        except Exception as e:  # noqa: BLE001 - every error is mapped to a status in one place
            self.model.count_refused(request.model_name, e)
            await context.abort(*status_for(e))
        try:
            results = await self.model.run(call, deadline_of(context))
        except Exception as e:  # noqa: BLE001 - as above; CancelledError (the caller has gone) propagates
            await context.abort(*status_for(e))
        return self._encode(call, results)
