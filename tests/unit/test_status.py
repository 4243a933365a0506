"""gateway.status: the one mapping from dynaroute's exceptions to gRPC status codes."""

from __future__ import annotations

import logging

import grpc
import pytest

from dynaroute import errors
from dynaroute.gateway.status import status_for, status_label


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidInputError("tensor.shape: got [3], expected [64]"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ModelNotFoundError("model: 'x' is not served here"), grpc.StatusCode.NOT_FOUND),
        (errors.OverloadedError("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.UnavailableError("draining"), grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineError("deadline passed"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.UnauthenticatedError("no token"), grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_project_errors_map_to_their_code_with_the_message(exc: Exception, code: grpc.StatusCode) -> None:
    assert status_for(exc) == (code, str(exc))


def test_anything_else_is_internal_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    try:
        raise KeyError("boom")
    except KeyError as e:
        with caplog.at_level(logging.ERROR):
            code, message = status_for(e)
    assert code == grpc.StatusCode.INTERNAL and "KeyError" in message
    assert caplog.records and caplog.records[0].exc_info is not None  # the traceback is in the log


def test_plain_value_error_is_not_mistaken_for_bad_input() -> None:
    assert status_for(ValueError("bug"))[0] == grpc.StatusCode.INTERNAL


def test_metrics_label_is_the_lower_case_code_name() -> None:
    assert status_label(grpc.StatusCode.INVALID_ARGUMENT) == "invalid_argument"
    assert status_label(grpc.StatusCode.OK) == "ok"
