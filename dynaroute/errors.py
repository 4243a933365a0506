"""The project's exceptions. The gateway maps each to one gRPC status code, in one place."""

from __future__ import annotations


class DynarouteError(Exception):
    """Base class: every message says what was wrong and what was expected."""


class InvalidInputError(DynarouteError, ValueError):
    """A request field is malformed (dtype, shape, NaN, size, budget). -> INVALID_ARGUMENT"""


class TooLargeError(InvalidInputError):
    """A request is larger than the server's limit. -> INVALID_ARGUMENT (HTTP 413)"""


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


class DataError(DynarouteError, ValueError):
    """A training or evaluation data file is unreadable or holds a bad value. The message names
    the file, and where it applies the row (data rows count from 1, the header is not one) and
    the column, so that the user can find and fix it."""

    def __init__(self, message: str, file: str | None = None, row: int | None = None, column: str | None = None):
        where = ", ".join(
            part for part in (
                repr(str(file)) if file is not None else None,
                f"row {row}" if row is not None else None,
                f"column {column!r}" if column is not None else None,
            ) if part
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.file, self.row, self.column = file, row, column


# How much of a client's value an error message repeats: enough to recognise it, never so much
# that the status details outgrow a client's metadata limit (gRPC's default is 8 KiB).
ECHO_CHARS = 64


def shown(value: object, limit: int = ECHO_CHARS) -> str:
    """`repr(value)` for an error message, cut to `limit` characters (saying how long it was)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} chars" if isinstance(value, str) else f"{len(text)} chars as text"
    return f"{text[:limit]}... ({size})"
