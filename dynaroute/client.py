"""Python clients for the native `dynaroute.v1` API, blocking and asyncio.

    with Client("127.0.0.1:50051") as c:
        reply = c.infer(x, quality=0.5)  # x: one example as a numpy array
        print(reply.outputs.label, reply.route.subnets, reply.cost.flops_ratio)

Replies are the protobuf messages of proto/dynaroute/v1/dynaroute.proto (InferReply,
InferStreamReply, ModelInfo). Errors raise grpc.RpcError with the server's status code.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np

from dynaroute._proto import dynaroute_pb2 as pb
from dynaroute._proto import dynaroute_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
_MAX_MESSAGE = 64 * 1024 * 1024  # the server enforces its own, smaller limit
_OPTIONS = [("grpc.max_receive_message_length", _MAX_MESSAGE), ("grpc.max_send_message_length", _MAX_MESSAGE)]


def make_budget(
    quality: float | None = None,
    max_flops: float | None = None,
    target_accuracy: float | None = None,
    subnet: str | None = None,
    policy: str | None = None,
    min_quality: float | None = None,
    min_accuracy: float | None = None,
) -> pb.Budget:
    """The wire budget: at most one target (none: the server's default), an optional policy and
    at most one floor (`min_quality`, `min_accuracy`): how far the server may lower the budget
    under load (none: never)."""
    targets = {"quality": quality, "max_flops": max_flops, "target_accuracy": target_accuracy, "subnet": subnet}
    chosen = {k: v for k, v in targets.items() if v is not None}
    if len(chosen) > 1:
        raise ValueError(f"give at most one of quality, max_flops, target_accuracy, subnet; got {sorted(chosen)}")
    budget = pb.Budget(**chosen)
    if policy is not None:
        budget.policy = policy
    if min_quality is not None:
        budget.min_quality = min_quality
    if min_accuracy is not None:
        budget.min_accuracy = min_accuracy
    return budget


def encode_tensor(tensor: np.ndarray) -> pb.Tensor:
    a = np.asarray(tensor)
    # Little-endian on the wire whatever the host order; the dtype keeps its numpy name.
    data = a.astype(a.dtype.newbyteorder("<")).tobytes()
    return pb.Tensor(dtype=a.dtype.name, shape=list(a.shape), data=data)


def make_request(
    tensor: np.ndarray | None = None,
    *,
    text: str | None = None,
    model: str = "",
    id: str = "",
    **budget: float | str | None,
) -> pb.InferRequest:
    """One native request: a tensor (one example) or a text, and at most one budget target
    (quality, max_flops, target_accuracy, subnet; policy; a floor), as `make_budget`."""
    if (tensor is None) == (text is None):
        raise ValueError("give exactly one of tensor and text")
    req = pb.InferRequest(model=model, id=id, budget=make_budget(**budget))
    if text is not None:
        req.text = text
    else:
        req.tensor.CopyFrom(encode_tensor(tensor))
    return req


def make_batch_request(
    tensor: np.ndarray | None = None,
    *,
    texts: Sequence[str] | None = None,
    model: str = "",
    id: str = "",
    **budget: float | str | None,
) -> pb.InferBatchRequest:
    """One native batch: a tensor of N examples (shape [N, ...one example's shape]) or N texts,
    with one budget for every row (as `make_budget`)."""
    if (tensor is None) == (texts is None):
        raise ValueError("give exactly one of tensor and texts")
    req = pb.InferBatchRequest(model=model, id=id, budget=make_budget(**budget))
    if texts is not None:
        req.texts.extend(texts)
    else:
        req.tensor.CopyFrom(encode_tensor(tensor))
    return req


def _channel_args(
    ca: str | None, cert: str | None, key: str | None, token: str | None
) -> tuple[grpc.ChannelCredentials | None, tuple[tuple[str, str], ...]]:
    creds = None
    if ca is not None or cert is not None:
        from dynaroute.gateway.security import channel_credentials

        creds = channel_credentials(ca, cert, key)
    metadata: tuple[tuple[str, str], ...] = ()
    if token:
        from dynaroute.gateway.security import bearer_metadata

        metadata = bearer_metadata(token)
    return creds, metadata


class _ClientBase:
    """One channel (`grpc` or `grpc.aio`, as the subclass says) with TLS and token options."""

    _grpc: Any = grpc

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        token: str | None = None,
        timeout_s: float | None = 10.0,
    ) -> None:
        creds, self._metadata = _channel_args(ca, cert, key, token)
        if creds is not None:
            self.channel = self._grpc.secure_channel(address, creds, options=_OPTIONS)
        else:
            self.channel = self._grpc.insecure_channel(address, options=_OPTIONS)
        self.stub = pb_grpc.DynarouteStub(self.channel)
        self.timeout_s = timeout_s


class Client(_ClientBase):
    """Blocking client over one channel. `ca` (and `cert`/`key` for mutual TLS) switch on TLS;
    `token` is sent as `authorization: Bearer <token>` on every call."""

    def infer(
        self, tensor: np.ndarray | None = None, *, timeout_s: float | None = None, **kwargs: Any
    ) -> pb.InferReply:
        """One example; kwargs as `make_request` (text, model, id, quality, max_flops, ...)."""
        request = make_request(tensor, **kwargs)
        return self.stub.Infer(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)

    def infer_batch(
        self, tensor: np.ndarray | None = None, *, timeout_s: float | None = None, **kwargs: Any
    ) -> pb.InferBatchReply:
        """N examples in one call (a tensor [N, ...] or texts=[...]; kwargs as
        `make_batch_request`). Admitted whole or refused whole (grpc.RpcError); then
        `reply.rows[i]` holds row i's reply or its error."""
        request = make_batch_request(tensor, **kwargs)
        return self.stub.InferBatch(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)

    def infer_stream(
        self, requests: Iterable[pb.InferRequest], *, timeout_s: float | None = None
    ) -> Iterator[pb.InferStreamReply]:
        """Many requests (build them with `make_request`, each with its own id) over one stream;
        replies come in completion order, each naming its id, errors per message."""
        return self.stub.InferStream(iter(requests), timeout=timeout_s, metadata=self._metadata)

    def get_model(self, model: str = "") -> pb.ModelInfo:
        return self.stub.GetModel(pb.GetModelRequest(model=model), timeout=self.timeout_s, metadata=self._metadata)

    def list_models(self) -> list[pb.ModelInfo]:
        reply = self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s, metadata=self._metadata)
        return list(reply.models)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """asyncio client over one channel; many calls may be in flight at once."""

    _grpc = grpc.aio

    async def infer(
        self, tensor: np.ndarray | None = None, *, timeout_s: float | None = None, **kwargs: Any
    ) -> pb.InferReply:
        return await self.stub.Infer(
            make_request(tensor, **kwargs), timeout=timeout_s or self.timeout_s, metadata=self._metadata
        )

    async def infer_batch(
        self, tensor: np.ndarray | None = None, *, timeout_s: float | None = None, **kwargs: Any
    ) -> pb.InferBatchReply:
        return await self.stub.InferBatch(
            make_batch_request(tensor, **kwargs), timeout=timeout_s or self.timeout_s, metadata=self._metadata
        )

    async def infer_stream(
        self, requests: Iterable[pb.InferRequest] | AsyncIterable[pb.InferRequest], *, timeout_s: float | None = None
    ) -> AsyncIterator[pb.InferStreamReply]:
        call = self.stub.InferStream(requests, timeout=timeout_s, metadata=self._metadata)
        async for reply in call:
            yield reply

    async def get_model(self, model: str = "") -> pb.ModelInfo:
        request = pb.GetModelRequest(model=model)
        return await self.stub.GetModel(request, timeout=self.timeout_s, metadata=self._metadata)

    async def list_models(self) -> list[pb.ModelInfo]:
        reply = await self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s, metadata=self._metadata)
        return list(reply.models)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
