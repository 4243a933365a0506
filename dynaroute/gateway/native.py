"""The native `dynaroute.v1.Dynaroute` servicer: routing controls in, route and cost out."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from dynaroute import metrics
from dynaroute._proto import dynaroute_pb2 as pb
from dynaroute._proto import dynaroute_pb2_grpc as pb_grpc
from dynaroute.codec import InputCodec, codec_for
from dynaroute.errors import InvalidInputError, ModelNotFoundError, UnavailableError, shown
from dynaroute.gateway.decoding import Undecodable
from dynaroute.gateway.inputs import check_size, decode_raw
from dynaroute.gateway.status import status_for
from dynaroute.gateway.types import Engine, InferRequest, InferResult, point_fields
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


def error_message(e: Exception) -> pb.Error:
    """One message's error (a stream message, a batch row): its status code and message."""
    code, message = status_for(e)
    return pb.Error(code=code.value[0], code_name=code.name, message=message)


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
    def codec(self) -> InputCodec:
        # Read on first use, not at construction: the server registers this servicer before
        # the engine has started (health says NOT_SERVING meanwhile). Checks only: the engine
        # encodes.
        return codec_for(self.engine.model_info()["input"])

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
        spec = self.codec.spec
        if kind is None:
            raise InvalidInputError(f"input: neither tensor nor text is set; expected {spec.wire}")
        if kind != spec.wire:
            raise InvalidInputError(
                f"input: got {'a tensor' if kind == 'tensor' else 'text'}, but model {self.engine.model_name!r} "
                f"expects {spec.describe()}"
            )
        tensor = text = None
        if kind == "tensor":
            t = msg.tensor
            x = decode_raw("tensor", t.dtype, list(t.shape), t.data)
            if x.ndim == len(spec.shape) + 1 and x.shape[1:] == spec.shape and len(x) > 1:
                raise InvalidInputError(f"tensor.shape: got {shown(list(x.shape))}, {len(x)} examples; Infer takes "
                                        f"one, of shape {list(spec.shape)}: send several with InferBatch")
            tensor = self.codec.check("tensor", x)
        else:
            text = self.codec.check("text", msg.text)
        return InferRequest(
            model=self.engine.model_name, id=msg.id, tensor=tensor, text=text,
            budget=decode_budget(msg.budget), deadline=deadline,
        )

    def decode_batch(self, msg: pb.InferBatchRequest, deadline: float | None) -> list[InferRequest]:
        """Wire batch -> one engine request per row. What concerns the whole call (size, model,
        budget, dtype, the [N, ...] shape) is checked here and refuses it; each row's values are
        checked by the engine, which answers that row alone with an error."""
        check_size("request", msg.ByteSize(), self.max_message_bytes)
        self._check_model(msg.model)
        name = self.engine.model_name
        if msg.HasField("tensor") and msg.texts:
            raise InvalidInputError("tensor and texts: both are set; expected one of them")
        rows: list[dict[str, Any]]
        spec = self.codec.spec
        if spec.wire == "text":
            if msg.HasField("tensor"):
                raise InvalidInputError(f"tensor: got a tensor, but model {name!r} expects texts")
            if not msg.texts:
                raise InvalidInputError("texts: empty; expected N >= 1 sentences")
            rows = [{"text": t} for t in msg.texts]
        else:
            example = ", ".join(map(str, spec.shape))
            if msg.texts:
                raise InvalidInputError(f"texts: got texts, but model {name!r} expects a tensor of dtype "
                                        f"{spec.dtype} and shape [N, {example}]")
            if not msg.HasField("tensor"):
                raise InvalidInputError(f"tensor: not set; expected dtype {spec.dtype} and shape [N, {example}]")
            t = msg.tensor
            x = decode_raw("tensor", t.dtype, list(t.shape), t.data)
            if str(x.dtype) != spec.dtype:
                raise InvalidInputError(f"tensor.dtype: got {x.dtype}, expected {spec.dtype}")
            if x.ndim != len(spec.shape) + 1 or x.shape[1:] != spec.shape or x.shape[0] < 1:
                raise InvalidInputError(f"tensor.shape: got {shown(list(x.shape))}, expected [N, {example}] "
                                        "with N >= 1 (N examples)")
            rows = [{"tensor": row} for row in x]
        budget = decode_budget(msg.budget)
        many = len(rows) > 1
        flow = object()  # this call's rows take turns with other calls in every queue
        return [
            InferRequest(model=name, id=f"{msg.id}/{i}" if msg.id else str(i), budget=budget, deadline=deadline,
                         api=API, count_request=False, admitted=many, flow=flow, **row)
            for i, row in enumerate(rows)
        ]

    async def InferBatch(self, request: pb.InferBatchRequest, context: grpc.aio.ServicerContext) -> pb.InferBatchReply:
        """A batch is admitted whole (`Engine.admit`, as a KServe batch) or refused whole; then
        its rows run concurrently and each answers for itself. The call counts once in
        dynaroute_requests_total (OK once admitted), each row in dynaroute_rows_total."""
        try:
            rows = self.decode_batch(request, deadline_of(context))
            if len(rows) > 1:
                self.engine.admit(len(rows))
        except Exception as e:  # noqa: BLE001 - every error is mapped to a status in one place
            code, message = status_for(e)
            metrics.record_refused(self._model_label(request.model), API, code)
            await context.abort(code, message)
        model = self.engine.model_name
        try:
            results = await asyncio.gather(*(self.engine.infer(r) for r in rows), return_exceptions=True)
        except BaseException as e:  # cancelled: the caller has gone
            metrics.record_request(model, API, metrics.status_of(e))
            raise
        out = []
        for result in results:
            if isinstance(result, InferResult):
                out.append(pb.InferBatchRow(reply=encode_result(result, model)))
            elif isinstance(result, Exception):
                out.append(pb.InferBatchRow(error=error_message(result)))
            else:  # a BaseException of a row (cancellation) ends the call
                metrics.record_request(model, API, metrics.status_of(result))
                raise result
        metrics.record_request(model, API, "ok")
        return pb.InferBatchReply(id=request.id, model=model, rows=out)

    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferReply:
        try:
            engine_request = self.decode(request, deadline_of(context))
        except Exception as e:  # noqa: BLE001 - every error is mapped to a status in one place
            code, message = status_for(e)
            metrics.record_refused(self._model_label(request.model), API, code)  # refused before the engine
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
                metrics.record_refused(self._model_label(model), API, status_for(e)[0])
                raise
            result = await self.engine.infer(engine_request)
        except Exception as e:  # noqa: BLE001 - a bad message answers for itself; the stream goes on
            return pb.InferStreamReply(id=msg_id, error=error_message(e))
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
