"""THE one place that maps dynaroute's exceptions to gRPC status codes.

Every servicer goes through `status_for`, so a given error reads the same on the native API,
the KServe v2 API and the per-message errors of InferStream.
"""

from __future__ import annotations

import logging

import grpc

from dynaroute.errors import (
    DeadlineError,
    InvalidInputError,
    ModelNotFoundError,
    OverloadedError,
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


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message for an exception. Anything unexpected is INTERNAL, its
    traceback logged here (the client gets the message, never the traceback)."""
    for cls, code in STATUS_CODES:
        if isinstance(exc, cls):
            return code, _bounded(str(exc))
    log.error("internal error while serving a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, _bounded(f"internal error: {type(exc).__name__}: {exc}")


def _bounded(message: str) -> str:
    if len(message) <= MAX_DETAILS_CHARS:
        return message
    return f"{message[: MAX_DETAILS_CHARS - 40]}... ({len(message)} chars, cut)"


def status_label(code: grpc.StatusCode) -> str:
    """The metrics label for a code: the lower-case name, e.g. "invalid_argument"."""
    return code.name.lower()
