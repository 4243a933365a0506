"""The native `dynaroute.v1.Dynaroute` servicer: routing controls in, route and cost out."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from dynaroute._proto import dynaroute_pb2 as pb
from dynaroute._proto import dynaroute_pb2_grpc as pb_grpc
from dynaroute.errors import InvalidInputError, ModelNotFoundError, UnavailableError, shown
from dynaroute.gateway.decoding import Undecodable
from dynaroute.gateway.inputs import InputSpec, check_example, check_size, check_text, decode_raw
from dynaroute.gateway.status import record_request, status_for
from dynaroute.gateway.types import Engine, InferRequest, InferResult
from dynaroute.router.budget import Budget
from dynaroute.router.calibration import OperatingPoint

API = "native"


def decode_budget(msg: pb.Budget) -> Budget:
    """The wire budget -> Budget (which checks ranges and raises InvalidInputError)."""
    target = msg.WhichOneof("target")
    kwargs: dict[str, Any] = {target: getattr(msg, target)} if target else {}
    if msg.HasField("policy"):
        if not msg.policy:
            raise InvalidInputError("budget.policy: empty; expected a policy name or no policy field")
        kwargs["policy"] = msg.policy
    for floor in ("min_quality", "min_accuracy"):
        if msg.HasField(floor):
            kwargs[floor] = getattr(msg, floor)
    return Budget(**kwargs)


def point_fields(point: OperatingPoint) -> dict[str, Any]:
    """An operating point as the fields of a `CalibrationPoint` (also KServe's JSON for it)."""
    return {"policy": point.policy, "quality": point.quality, "threshold": point.threshold,
            "expected_accuracy": point.accuracy, "mean_flops": point.mean_flops, "flops_ratio": point.flops_ratio}


def budget_point(point: OperatingPoint | None) -> pb.CalibrationPoint | None:
    """An operating point -> its wire form (None stays unset)."""
    return None if point is None else pb.CalibrationPoint(**point_fields(point))


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
                mean_flops=p["mean_flops"], flops_ratio=p["flops_ratio"],
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
            budget_asked=budget_point(route.budget_asked), budget_got=budget_point(route.budget_got),
            budget_lowered=route.budget_lowered,
        ),
        cost=pb.Cost(
            router_flops=cost.router_flops, expert_flops=cost.expert_flops, total_flops=cost.flops,
            full_flops=cost.full_flops, flops_ratio=cost.flops_ratio, queue_seconds=cost.queue_s,
            compute_seconds=cost.compute_s, total_seconds=cost.total_s,
        ),
    )


class NativeServicer(pb_grpc.DynarouteServicer):
    """Decodes and checks each request, calls `engine.infer`, encodes the answer. Errors go
    through gateway.status, the one mapping of exceptions to status codes."""

    def __init__(
        self, engine: Engine, max_message_bytes: int, is_ready: Callable[[], bool], max_stream_inflight: int = 256
    ) -> None:
        self.engine = engine
        self.max_message_bytes = max_message_bytes
        self.is_ready = is_ready
        self.max_stream_inflight = max_stream_inflight

    @functools.cached_property
    def spec(self) -> InputSpec:
        # Read on first use, not at construction: the server registers this servicer before
        # the engine has started (health says NOT_SERVING meanwhile).
        return InputSpec.from_model_info(self.engine.model_info())

    def _model_label(self, name: str) -> str:
        # Unknown names are not echoed into labels: a client must not grow the label set.
        try:
            served = self.engine.model_name
        except UnavailableError:  # still starting
            return "unknown"
        return served if name in ("", served) else "unknown"

    def _check_model(self, name: str) -> None:
        if name and name != self.engine.model_name:
            raise ModelNotFoundError(f"model: {shown(name)} is not served here; expected {self.engine.model_name!r}")

    def decode(self, msg: pb.InferRequest, deadline: float | None) -> InferRequest:
        """Wire request -> engine request; raises InvalidInputError / ModelNotFoundError."""
        check_size("request", msg.ByteSize(), self.max_message_bytes)
        self._check_model(msg.model)
        kind = msg.WhichOneof("input")
        if kind is None:
            raise InvalidInputError(f"input: neither tensor nor text is set; expected {self.spec.kind}")
        if self.spec.is_text and kind != "text":
            raise InvalidInputError(f"input: got a tensor, but model {self.engine.model_name!r} expects text")
        if not self.spec.is_text and kind != "tensor":
            raise InvalidInputError(
                f"input: got text, but model {self.engine.model_name!r} expects a tensor of dtype "
                f"{self.spec.dtype} and shape {list(self.spec.shape)}"
            )
        tensor = text = None
        if kind == "tensor":
            t = msg.tensor
            tensor = check_example("tensor", decode_raw("tensor", t.dtype, list(t.shape), t.data), self.spec)
        else:
            text = check_text("text", msg.text)
        return InferRequest(
            model=self.engine.model_name, id=msg.id, tensor=tensor, text=text,
            budget=decode_budget(msg.budget), deadline=deadline,
        )

    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferReply:
        try:
            engine_request = self.decode(request, deadline_of(context))
        except Exception as e:  # noqa: BLE001 - every error is mapped to a status in one place
            code, message = status_for(e)
            record_request(self._model_label(request.model), API, code)  # refused before the engine
            await context.abort(code, message)
        try:
            result = await self.engine.infer(engine_request)  # the engine counts what it answers or refuses
        except Exception as e:  # noqa: BLE001
            await context.abort(*status_for(e))
        return encode_result(result, self.engine.model_name)

    async def _stream_one(self, msg: pb.InferRequest | Undecodable, deadline: float | None) -> pb.InferStreamReply:
        # A message that did not decode has no id to answer with: its reply's id is empty.
        msg_id, model = ("", "") if isinstance(msg, Undecodable) else (msg.id, msg.model)
        try:
            try:
                if isinstance(msg, Undecodable):
                    raise InvalidInputError(msg.message)
                engine_request = self.decode(msg, deadline)
            except Exception as e:
                record_request(self._model_label(model), API, status_for(e)[0])
                raise
            result = await self.engine.infer(engine_request)
        except Exception as e:  # noqa: BLE001 - a bad message answers for itself; the stream goes on
            code, message = status_for(e)
            error = pb.Error(code=code.value[0], code_name=code.name, message=message)
            return pb.InferStreamReply(id=msg_id, error=error)
        return pb.InferStreamReply(id=msg_id, reply=encode_result(result, self.engine.model_name))

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

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            self._check_model(request.model)
            return model_info_message(self.engine.model_info(), self.is_ready())
        except (ModelNotFoundError, UnavailableError) as e:
            await context.abort(*status_for(e))

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsReply:
        try:
            return pb.ListModelsReply(models=[model_info_message(self.engine.model_info(), self.is_ready())])
        except UnavailableError as e:
            await context.abort(*status_for(e))
