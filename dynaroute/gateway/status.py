"""THE one place that maps dynaroute's exceptions to gRPC status codes (and those to HTTP).

Every servicer goes through `status_for`, so a given error reads the same on the native API,
the KServe v2 API and the per-message errors of InferStream; the HTTP/REST transport goes
through `http_status_for`, the same code and message as an HTTP status.
"""

from __future__ import annotations

import logging

import grpc

from dynaroute.errors import (
    DeadlineError,
    InvalidInputError,
    ModelNotFoundError,
    OverloadedError,
    TooLargeError,
    UnauthenticatedError,
    UnavailableError,
)

log = logging.getLogger(__name__)

# Status details longer than this are cut (values echoed from a request are already cut with
# errors.shown; this bounds whatever else a message holds, e.g. a long list of names).
MAX_DETAILS_CHARS = 2048

# Most specific first: InvalidInputError is also a ValueError, DeadlineError a TimeoutError.
STATUS_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (DeadlineError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
)


# gRPC code -> HTTP status, as google.rpc.Code documents the pairs (grpc-gateway maps them the
# same). Overload is 429 Too Many Requests, kept apart from 503 (draining, starting, no expert)
# as gRPC keeps RESOURCE_EXHAUSTED apart from UNAVAILABLE; Triton, which has no overload code of
# its own, answers its full queues 503.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message for an exception. Anything unexpected is INTERNAL, its
    traceback logged here (the client gets the message, never the traceback)."""
    for cls, code in STATUS_CODES:
        if isinstance(exc, cls):
            return code, _bounded(str(exc))
    log.error("internal error while serving a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, _bounded(f"internal error: {type(exc).__name__}: {exc}")


def http_status_for(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and message for an exception: `status_for`'s code, as HTTP_STATUS maps it;
    a request over the size limit is 413 Content Too Large, HTTP's own code for it."""
    code, message = status_for(exc)
    return (413 if isinstance(exc, TooLargeError) else HTTP_STATUS[code]), message


def _bounded(message: str) -> str:
    if len(message) <= MAX_DETAILS_CHARS:
        return message
    return f"{message[: MAX_DETAILS_CHARS - 40]}... ({len(message)} chars, cut)"


def status_label(code: grpc.StatusCode) -> str:
    """The metrics label for a code: the lower-case name, e.g. "invalid_argument"."""
    return code.name.lower()
