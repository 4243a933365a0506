"""The KServe v2 Open Inference Protocol's gRPC servicer (`inference.GRPCInferenceService`):
the protobuf wire form of `OpenInference` (open_inference.py), which the HTTP/REST transport
(rest.py) shares. Tensors come as typed `contents` or `raw_input_contents`; outputs go back as
`raw_output_contents`; parameters are the protocol's typed InferParameter values. The
model-repository calls (Triton's extension: RepositoryIndex, RepositoryModelLoad,
RepositoryModelUnload) index, load, replace and unload the repository's models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from dynaroute._proto import grpc_service_pb2 as pb
from dynaroute._proto import grpc_service_pb2_grpc as pb_grpc
from dynaroute.errors import InvalidInputError, ModelNotFoundError, UnavailableError, shown
from dynaroute.gateway.native import deadline_of
from dynaroute.gateway.open_inference import (
    DATATYPES,
    InferCall,
    OpenInference,
    PreparedCall,
    WireTensor,
    server_version,
    wire_bytes,
    wire_datatype,
)
from dynaroute.gateway.repository import VERSION, Repository
from dynaroute.gateway.status import status_for
from dynaroute.gateway.types import InferResult

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
    """KServe v2 over gRPC: the protobuf wire form of `OpenInference`, with the model-repository
    calls."""

    def __init__(self, models: Repository, max_message_bytes: int, is_ready: Callable[[], bool]) -> None:
        self.protocol = OpenInference(models, max_message_bytes, is_ready, API)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.protocol.is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            return pb.ModelReadyResponse(ready=self.protocol.model_ready(request.name, request.version))
        except ModelNotFoundError as e:
            await context.abort(*status_for(e))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name="dynaroute", version=server_version(), extensions=["model_repository"])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            meta = self.protocol.model_metadata(request.name, request.version)
        except (ModelNotFoundError, UnavailableError) as e:
            await context.abort(*status_for(e))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]],
        )

    # -- the model repository (Triton's extension) ------------------------------------------------

    def _check_repository(self, name: str) -> None:
        if name:
            raise ModelNotFoundError(f"repository_name: {shown(name)} is not a repository here; this server has one, "
                                     f"{str(self.protocol.models.root)!r}: leave the field empty")

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._check_repository(request.repository_name)
        except ModelNotFoundError as e:
            await context.abort(*status_for(e))
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[
            index(name=r.name, version=r.version, state=r.state.value, reason=r.reason)
            for r in self.protocol.index(ready_only=request.ready)
        ])

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext) -> Any:
        """Load the model, or replace it when loaded; answers once it serves."""
        try:
            self._check_repository(request.repository_name)
            await self.protocol.load(request.model_name, request.parameters)
        except Exception as e:  # noqa: BLE001 - every error is mapped to a status in one place
            await context.abort(*status_for(e))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext) -> Any:
        """Unload the model; answers once its in-flight requests have finished and its experts
        have stopped."""
        try:
            self._check_repository(request.repository_name)
            await self.protocol.unload(request.model_name, request.parameters)
        except Exception as e:  # noqa: BLE001
            await context.abort(*status_for(e))
        return pb.RepositoryModelUnloadResponse()

    # -- ModelInfer -------------------------------------------------------------------------------

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
            classification={o.name: _param_value(o.parameters["classification"]) for o in req.outputs
                            if "classification" in o.parameters},
        )

    def _encode(self, call: PreparedCall, results: list[InferResult]) -> Any:
        resp = pb.ModelInferResponse(model_name=call.model, model_version=VERSION, id=call.id)
        arrays = OpenInference.output_arrays(results, call)
        for name in call.outputs:
            a = arrays[name]
            resp.outputs.add(name=name, datatype=wire_datatype(a), shape=list(a.shape))
            resp.raw_output_contents.append(wire_bytes(a))
        for key, value in OpenInference.response_parameters(results).items():
            _set_param(resp.parameters[key], value)
        return resp

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            call = self._call(request)
        except Exception as e:  # noqa: BLE001 - every error is mapped to a status in one place
            self.protocol.count_refused(request.model_name, e)
            await context.abort(*status_for(e))
        try:  # refusals before the engine are counted by `infer`, the engine's answers by `run`
            prepared, results = await self.protocol.infer(call, deadline_of(context))
        except Exception as e:  # noqa: BLE001 - as above; CancelledError (the caller has gone) propagates
            await context.abort(*status_for(e))
        return self._encode(prepared, results)
