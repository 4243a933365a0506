"""Decoding request messages in the gateway, so that one that is not valid protobuf is bad input.

gRPC decodes a request with the method's deserializer before any handler runs, and a message
that does not parse ends the call with UNKNOWN ("Unexpected <class DecodeError>") and a logged
traceback. `DecodeGuardInterceptor` takes the decoding over: every handler gets raw bytes and
decodes them itself, so that an undecodable message answers INVALID_ARGUMENT on every method,
is counted in `dynaroute_undecodable_messages_total{api}`, and is logged at most once per method
per interval (a client sending garbage cannot flood the log). On request streams named in
`per_message`, an undecodable message becomes an `Undecodable` item of the stream, which the
servicer answers for itself while the stream goes on; on other streams it ends the call.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from dynaroute import metrics

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 60.0  # at most one log line per method in this long

# What a grpc.aio.ServerInterceptor is given: the next step that looks up a method's handler.
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


@dataclass(frozen=True)
class Undecodable:
    """Stands in, on a request stream, for a message that did not decode."""

    message: str  # what was wrong, for the client


class RateLimitedLog:
    """Logs one line per key per `interval_s`, saying how many were left out since the last."""

    def __init__(self, logger: logging.Logger, interval_s: float = LOG_INTERVAL_S) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}
        self._lock = threading.Lock()  # handlers run on the event loop, but the log is cheap to guard

    def warning(self, key: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval_s:
                self._skipped[key] = self._skipped.get(key, 0) + 1
                return
            self._last[key] = now
            skipped = self._skipped.pop(key, 0)
        more = f" ({skipped} more since the last line)" if skipped else ""
        self._log.warning("%s%s", message, more)


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """See the module docstring. `apis` maps a full service name to its metrics label (other
    services count as "other"); `on_undecodable(method)` is called for each undecodable unary
    request (e.g. to count it in dynaroute_requests_total)."""

    def __init__(
        self,
        apis: Mapping[str, str],
        per_message: Collection[str] = (),
        on_undecodable: Callable[[str], None] | None = None,
        interval_s: float = LOG_INTERVAL_S,
    ) -> None:
        self._apis = dict(apis)
        self._per_message = frozenset(per_message)
        self._on_undecodable = on_undecodable
        self._log = RateLimitedLog(log, interval_s)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}  # method -> (its, ours)
        for api in (*self._apis.values(), "other"):
            metrics.UNDECODABLE.labels(api)  # at zero from the start, so rate() sees the first one

    def _api(self, method: str) -> str:
        return self._apis.get(method.lstrip("/").split("/", 1)[0], "other")  # "/package.Service/Method"

    def _decode(self, method: str, deserialize: Callable[[bytes], Any], raw: bytes, what: str) -> Any:
        """The message, or an Undecodable saying why not (counted and, rate-limited, logged)."""
        try:
            return deserialize(raw)
        except DecodeError as e:
            metrics.UNDECODABLE.labels(self._api(method)).inc()
            self._log.warning(method, f"undecodable request message on {method}: {e}")
            return Undecodable(f"{what}: {len(raw)} bytes that are not a valid protobuf message of this method ({e})")

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        # The wrapped handler depends only on the method and its handler (the same object on
        # every call of a method): made once, not three closures and a handler per call.
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` taking raw bytes and decoding them itself (see the module docstring)."""
        deserialize = handler.request_deserializer
        per_message = method in self._per_message

        async def one(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            request = self._decode(method, deserialize, raw, "request")
            if isinstance(request, Undecodable):
                if self._on_undecodable is not None:
                    self._on_undecodable(method)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return request

        async def stream(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            index = 0
            async for raw in raws:
                request = self._decode(method, deserialize, raw, f"stream message {index}")
                index += 1
                if isinstance(request, Undecodable) and not per_message:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                yield request

        kw = {"request_deserializer": None, "response_serializer": handler.response_serializer}
        if handler.request_streaming and handler.response_streaming:
            behaviour = handler.stream_stream

            async def stream_stream(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
                async for reply in _responses(behaviour(stream(raws, context), context)):
                    yield reply

            return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)
        if handler.request_streaming:
            behaviour = handler.stream_unary

            async def stream_unary(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
                return await behaviour(stream(raws, context), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
        if handler.response_streaming:
            behaviour = handler.unary_stream

            async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                async for reply in _responses(behaviour(await one(raw, context), context)):
                    yield reply

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
        behaviour = handler.unary_unary

        async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await behaviour(await one(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)


async def _responses(result: Any) -> AsyncIterator[Any]:
    """A response-streaming behaviour's replies: it is an async generator, or a coroutine that
    writes them with context.write (grpc.aio allows both; the health service's Watch does that)."""
    if inspect.isasyncgen(result):
        async for reply in result:
            yield reply
    else:
        await result
