"""The project's exceptions. The gateway maps each to one gRPC status code, in one place."""

from __future__ import annotations


class DynarouteError(Exception):
    """Base class: every message says what was wrong and what was expected."""


class InvalidInputError(DynarouteError, ValueError):
    """A request field is malformed (dtype, shape, NaN, size, budget). -> INVALID_ARGUMENT"""


class ModelNotFoundError(DynarouteError, LookupError):
    """The request names a model this server does not serve. -> NOT_FOUND"""


class OverloadedError(DynarouteError):
    """A bounded queue is full; retry later. -> RESOURCE_EXHAUSTED"""


class UnavailableError(DynarouteError):
    """The server is draining, or no expert can run the route. -> UNAVAILABLE"""


class DeadlineError(DynarouteError, TimeoutError):
    """The request's deadline passed before an answer was ready. -> DEADLINE_EXCEEDED"""


class UnauthenticatedError(DynarouteError):
    """Missing or wrong bearer token. -> UNAUTHENTICATED"""


class BundleError(DynarouteError):
    """A bundle directory is missing a file, has an unknown schema or mismatched weights."""
