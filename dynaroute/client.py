"""Python clients for the native `dynaroute.v1` API, blocking and asyncio, and `dynaroute infer`.

    with Client("127.0.0.1:50051") as c:
        reply = c.infer(x, quality=0.5)  # x: one example as a numpy array
        print(reply.outputs.label, reply.route.subnets, reply.cost.flops_ratio)

Replies are the protobuf messages of proto/dynaroute/v1/dynaroute.proto (InferReply,
InferStreamReply, ModelInfo). Errors raise grpc.RpcError with the server's status code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from dynaroute._proto import dynaroute_pb2 as pb
from dynaroute._proto import dynaroute_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
_MAX_MESSAGE = 64 * 1024 * 1024  # the server enforces its own, smaller limit
_OPTIONS = [("grpc.max_receive_message_length", _MAX_MESSAGE), ("grpc.max_send_message_length", _MAX_MESSAGE)]


def make_request(
    tensor: np.ndarray | None = None,
    *,
    text: str | None = None,
    model: str = "",
    id: str = "",
    quality: float | None = None,
    max_flops: float | None = None,
    target_accuracy: float | None = None,
    subnet: str | None = None,
    policy: str | None = None,
    min_quality: float | None = None,
    min_accuracy: float | None = None,
) -> pb.InferRequest:
    """One native request: a tensor (one example) or a text, at most one budget target, and at
    most one floor (`min_quality`, `min_accuracy`): how far the server may lower the budget under
    load (none: never)."""
    if (tensor is None) == (text is None):
        raise ValueError("give exactly one of tensor and text")
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
    req = pb.InferRequest(model=model, id=id, budget=budget)
    if text is not None:
        req.text = text
    else:
        a = np.asarray(tensor)
        # Little-endian on the wire whatever the host order; the dtype keeps its numpy name.
        data = a.astype(a.dtype.newbyteorder("<")).tobytes()
        req.tensor.CopyFrom(pb.Tensor(dtype=a.dtype.name, shape=list(a.shape), data=data))
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


# -- dynaroute infer ---------------------------------------------------------------------------


def load_tensor(path: str, dtype: str | None) -> np.ndarray:
    """One example from a .npy file (kept as stored) or a .json nested list (cast to `dtype`,
    the model's input dtype, since JSON numbers carry none)."""
    p = Path(path)
    if p.suffix == ".npy":
        return np.load(p, allow_pickle=False)
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--tensor {path}: not JSON ({e})") from None
        # A bare number or a nested list of numbers; numpy would make an object array of a
        # dict or of ragged lists, or raise TypeError deep inside.
        if not isinstance(data, list | int | float) or isinstance(data, bool):
            kind = {dict: "an object", str: "a string", bool: "true or false"}.get(type(data), "null")
            raise ValueError(f"--tensor {path}: expected a JSON array of numbers (one example), got {kind}")
        try:
            return np.asarray(data, dtype=dtype)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--tensor {path}: expected a JSON array of numbers (nested lists of one shape), "
                             f"which this is not ({e})") from None
    raise ValueError(f"--tensor: {path!r} must end in .npy or .json")


def reply_as_json(message: Message) -> dict[str, Any]:
    """A reply as a JSON-ready dict, 64-bit integers as numbers. Proto3's JSON mapping writes
    int64 as strings (JavaScript's numbers are doubles); a script reading `infer --json`
    expects numbers, and Python's json reads any integer exactly."""
    out = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    _int64_as_numbers(message.DESCRIPTOR, out)
    return out


_INT64 = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)


def _int64_as_numbers(descriptor: Descriptor, d: dict[str, Any]) -> None:
    for f in descriptor.fields:
        if f.name not in d:
            continue
        repeated = isinstance(d[f.name], list)
        values = d[f.name] if repeated else [d[f.name]]
        if f.message_type is not None and not f.message_type.GetOptions().map_entry:
            for v in values:
                _int64_as_numbers(f.message_type, v)
        elif f.cpp_type in _INT64:
            d[f.name] = [int(v) for v in values] if repeated else int(values[0])


def format_reply(reply: pb.InferReply) -> str:
    o, r, c = reply.outputs, reply.route, reply.cost
    route = ", ".join(f"{s} (weight {w:.2f})" for s, w in zip(r.subnets, r.weights, strict=False))
    lines = [
        f"label: {o.label} ({o.label_name})  confidence {o.confidence:.3f}",
        f"route: {route}  policy={r.policy or '-'}  escalations={r.escalations}  "
        f"exit depths={list(r.exit_depths)}" + (f"  fallbacks={list(r.fallbacks)}" if r.fallbacks else ""),
        f"cost:  {c.total_flops:,} FLOPs = {c.flops_ratio:.1%} of the full model's {c.full_flops:,} "
        f"(router {c.router_flops:,} + experts {c.expert_flops:,})",
        f"time:  queue {c.queue_seconds * 1e3:.2f} ms  compute {c.compute_seconds * 1e3:.2f} ms  "
        f"total {c.total_seconds * 1e3:.2f} ms",
    ]
    if r.budget_lowered:
        a, g = r.budget_asked, r.budget_got
        lines.append(f"budget: lowered under load from {a.policy} {a.flops_ratio:.1%} (expected accuracy "
                     f"{a.expected_accuracy:.4f}) to {g.policy} {g.flops_ratio:.1%} ({g.expected_accuracy:.4f})")
    return "\n".join(lines)


def main_infer(args: argparse.Namespace) -> int:
    """`dynaroute infer`: send one input, print label, route and cost (or --json)."""
    try:
        tls = {"ca": args.ca, "cert": args.cert, "key": args.key, "token": args.token}
        with Client(args.address, timeout_s=args.timeout_s, **tls) as client:
            kwargs: dict[str, Any] = {
                "model": args.model or "", "quality": args.quality, "max_flops": args.max_flops,
                "target_accuracy": args.target_accuracy, "subnet": args.subnet, "policy": args.policy,
                "min_quality": args.min_quality, "min_accuracy": args.min_accuracy,
            }
            if args.tensor:
                # JSON numbers carry no dtype: use the model's input dtype.
                dtype = client.get_model(args.model or "").input.dtype if args.tensor.endswith(".json") else None
                reply = client.infer(load_tensor(args.tensor, dtype), **kwargs)
            else:
                text = args.text if args.text is not None else Path(args.text_file).read_text().strip()
                reply = client.infer(text=text, **kwargs)
    except grpc.RpcError as e:
        print(f"dynaroute infer: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"dynaroute infer: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(reply_as_json(reply)))
    else:
        print(format_reply(reply))
    return 0
