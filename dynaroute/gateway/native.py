"""The native `dynaroute.v1.Dynaroute` servicer: routing controls in, route and cost out."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from dynaroute._proto import dynaroute_pb2 as pb
from dynaroute._proto import dynaroute_pb2_grpc as pb_grpc
from dynaroute.errors import InvalidInputError, ModelNotFoundError, UnavailableError
from dynaroute.gateway.decoding import Undecodable
from dynaroute.gateway.inputs import check_example, check_size, check_text, decode_raw
from dynaroute.gateway.repository import Model, Repository
from dynaroute.gateway.status import record_request, status_for
from dynaroute.gateway.types import InferRequest, InferResult
from dynaroute.router.budget import Budget

API = "native"


def decode_budget(msg: pb.Budget) -> Budget:
    """The wire budget -> Budget (which checks ranges and raises InvalidInputError)."""
    target = msg.WhichOneof("target")
    kwargs: dict[str, Any] = {target: getattr(msg, target)} if target else {}
    if msg.HasField("policy"):
        if not msg.policy:
            raise InvalidInputError("budget.policy: empty; expected a policy name or no policy field")
        kwargs["policy"] = msg.policy
    return Budget(**kwargs)


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's gRPC deadline as a time.monotonic() instant (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def model_info_message(info: dict[str, Any], ready: bool) -> pb.ModelInfo:
    """The engine's model_info() dict (the manifest's public part) -> ModelInfo."""
    spec = info["input"]
    calibration = info.get("calibration", {})
    # {"default_policy": ..., "tables": {policy: [operating points]}}: one point per budget step.
    points = [(name, p) for name, table in calibration.get("tables", {}).items() for p in table]
    return pb.ModelInfo(
        name=info["name"],
        task=info["task"]["kind"],
        labels=info["labels"],
        input=pb.InputSpec(
            kind=spec["kind"], dtype=spec.get("dtype", ""), shape=spec.get("shape", []),
            max_length=spec.get("max_length", 0),
        ),
        subnets=[
            pb.SubnetInfo(
                name=s["name"], width=s["width"], depth=s["depth"], path=s["path"], flops=s["flops"],
                params=s["params"], val_accuracy=s["val_accuracy"],
            )
            for s in info["subnets"]
        ],
        full_subnet=info["full_subnet"],
        full_flops=info["full_flops"],
        router_flops=info["router_flops"],
        calibration=[
            pb.CalibrationPoint(
                policy=name, quality=p["quality"], threshold=p["threshold"], expected_accuracy=p["accuracy"],
                mean_flops=p["mean_flops"],
            )
            for name, p in points
        ],
        ready=ready,
        default_policy=calibration.get("default_policy", ""),
    )


def encode_result(result: InferResult, model: str) -> pb.InferReply:
    route, cost = result.route, result.cost
    return pb.InferReply(
        id=result.id,
        model=model,
        outputs=pb.Outputs(
            logits=result.logits.reshape(-1).tolist(), label=int(result.label), label_name=result.label_name,
            confidence=float(result.confidence),
        ),
        route=pb.Route(
            subnets=route.subnets, weights=route.weights, escalations=route.escalations,
            exit_depths=route.exit_depths, fallbacks=route.fallbacks, policy=route.policy,
            budget_out_of_reach=route.budget_out_of_reach, budget_note=route.budget_note,
        ),
        cost=pb.Cost(
            router_flops=cost.router_flops, expert_flops=cost.expert_flops, total_flops=cost.flops,
            full_flops=cost.full_flops, flops_ratio=cost.flops_ratio, queue_seconds=cost.queue_s,
            compute_seconds=cost.compute_s, total_seconds=cost.total_s,
        ),
    )


class NativeServicer(pb_grpc.DynarouteServicer):
    """Decodes and checks each request, calls its model's engine, encodes the answer. The
    model is looked up in the repository by the request's `model` (empty: the only model).
    Errors go through gateway.status, the one mapping of exceptions to status codes."""

    def __init__(
        self, models: Repository, max_message_bytes: int, is_ready: Callable[[], bool], max_stream_inflight: int = 256
    ) -> None:
        self.models = models
        self.max_message_bytes = max_message_bytes
        self.is_ready = is_ready  # the server's readiness (started, not draining); a model's is the repository's
        self.max_stream_inflight = max_stream_inflight

    def decode(self, msg: pb.InferRequest, deadline: float | None, model: Model) -> InferRequest:
        """Wire request -> engine request for `model`; raises InvalidInputError. The caller has
        checked the message's size."""
        spec = model.spec
        kind = msg.WhichOneof("input")
        if kind is None:
            raise InvalidInputError(f"input: neither tensor nor text is set; expected {spec.kind}")
        if spec.is_text and kind != "text":
            raise InvalidInputError(f"input: got a tensor, but model {model.name!r} expects text")
        if not spec.is_text and kind != "tensor":
            raise InvalidInputError(
                f"input: got text, but model {model.name!r} expects a tensor of dtype "
                f"{spec.dtype} and shape {list(spec.shape)}"
            )
        tensor = text = None
        if kind == "tensor":
            t = msg.tensor
            tensor = check_example("tensor", decode_raw("tensor", t.dtype, list(t.shape), t.data), spec)
        else:
            text = check_text("text", msg.text)
        return InferRequest(
            model=model.name, id=msg.id, tensor=tensor, text=text, budget=decode_budget(msg.budget), deadline=deadline,
        )

    def _take(
        self, held: contextlib.ExitStack, msg: pb.InferRequest, deadline: float | None
    ) -> tuple[Model, InferRequest]:
        """Check the message's size, hold its model for the call (`held`), decode it."""
        check_size("request", msg.ByteSize(), self.max_message_bytes)
        model = held.enter_context(self.models.use(self.models.resolve(msg.model)))
        return model, self.decode(msg, deadline, model)

    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferReply:
        with contextlib.ExitStack() as held:
            try:
                model, engine_request = self._take(held, request, deadline_of(context))
            except Exception as e:  # noqa: BLE001 - every error is mapped to a status in one place
                code, message = status_for(e)
                record_request(self.models.label(request.model), API, code)  # refused before the engine
                await context.abort(code, message)
            try:
                result = await model.engine.infer(engine_request)  # the engine counts what it answers or refuses
            except Exception as e:  # noqa: BLE001
                await context.abort(*status_for(e))
            return encode_result(result, model.name)

    async def _stream_one(self, msg: pb.InferRequest | Undecodable, deadline: float | None) -> pb.InferStreamReply:
        # A message that did not decode has no id to answer with: its reply's id is empty.
        msg_id, name = ("", "") if isinstance(msg, Undecodable) else (msg.id, msg.model)
        with contextlib.ExitStack() as held:
            try:
                try:
                    if isinstance(msg, Undecodable):
                        raise InvalidInputError(msg.message)
                    model, engine_request = self._take(held, msg, deadline)
                except Exception as e:
                    record_request(self.models.label(name), API, status_for(e)[0])
                    raise
                result = await model.engine.infer(engine_request)
            except Exception as e:  # noqa: BLE001 - a bad message answers for itself; the stream goes on
                code, message = status_for(e)
                error = pb.Error(code=code.value[0], code_name=code.name, message=message)
                return pb.InferStreamReply(id=msg_id, error=error)
            return pb.InferStreamReply(id=msg_id, reply=encode_result(result, model.name))

    async def InferStream(
        self, request_iterator: AsyncIterator[pb.InferRequest | Undecodable], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.InferStreamReply]:
        """Requests run concurrently (at most `max_stream_inflight` at once: reading waits for a
        slot, which is the backpressure); replies leave in completion order. A message that did
        not decode (gateway.decoding) gets an INVALID_ARGUMENT error reply, with an empty id."""
        deadline = deadline_of(context)
        replies: asyncio.Queue[pb.InferStreamReply | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.max_stream_inflight)

        async def one(msg: pb.InferRequest | Undecodable) -> None:
            try:
                replies.put_nowait(await self._stream_one(msg, deadline))
            finally:
                slots.release()

        async def read() -> None:
            tasks: set[asyncio.Task[None]] = set()
            try:
                async for msg in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(one(msg))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                await asyncio.gather(*list(tasks))
            finally:
                for task in tasks:
                    task.cancel()
                replies.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
            await reader  # re-raises a failure of the request stream itself
        finally:
            reader.cancel()

    def _info(self, model: Model) -> pb.ModelInfo:
        return model_info_message(model.engine.model_info(), self.is_ready() and self.models.ready(model.name))

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            return self._info(self.models.get(self.models.resolve(request.model)))
        except (InvalidInputError, ModelNotFoundError, UnavailableError) as e:
            await context.abort(*status_for(e))

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsReply:
        """The loaded models (RepositoryIndex lists the folder's, loaded or not)."""
        return pb.ListModelsReply(models=[self._info(m) for m in self.models.loaded()])
