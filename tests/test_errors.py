"""The error hierarchy and the interceptor that turns it into gRPC statuses."""

from __future__ import annotations

import re
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2

from server import errors
from server.api.interceptor import STATUS, code_of, status_for


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


REQUEST_ERRORS = sorted(_subclasses(errors.RequestError), key=lambda c: c.__name__)


def test_every_request_error_has_a_unique_reason_and_the_edge_a_code_for_it() -> None:
    reasons = [cls.reason for cls in REQUEST_ERRORS]
    assert len(reasons) == len(set(reasons))
    assert set(STATUS) == set(reasons)  # no reason without a code, no stale entry
    for cls in REQUEST_ERRORS:
        assert isinstance(STATUS[cls.reason], grpc.StatusCode)
        assert STATUS[cls.reason] is not grpc.StatusCode.OK
        assert re.fullmatch(r"[A-Z][A-Z_]+", cls.reason)
        assert cls.__doc__, f"{cls.__name__} must document when it is raised"


@pytest.mark.parametrize("cls", REQUEST_ERRORS, ids=lambda c: c.__name__)
def test_status_carries_reason_message_and_error_info(cls: type[errors.RequestError]) -> None:
    status = status_for(cls("selfie: something is wrong", image="selfie"), "rid-1")
    assert status.code == code_of(cls("x"))
    assert status.details == f"{cls.reason}: selfie: something is wrong"
    # Rebuild the google.rpc.Status from the trailing metadata as a client would.
    md = dict(status.trailing_metadata)
    from google.rpc import status_pb2

    decoded = status_pb2.Status.FromString(md["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    decoded.details[0].Unpack(info)
    assert info.reason == cls.reason and info.domain == "faceverify.v1"
    extra = {"retry_after_ms": "1000"} if cls is errors.RateLimited else {}
    assert dict(info.metadata) == {"image": "selfie", "request_id": "rid-1", **extra}
    if cls.retry_after is not None or cls is errors.RateLimited:
        retry = error_details_pb2.RetryInfo()
        assert decoded.details[1].Unpack(retry)
        assert retry.retry_delay.ToTimedelta().total_seconds() == 1.0


def test_startup_errors_are_not_request_errors() -> None:
    for cls in (errors.ConfigurationError, errors.ModelError):
        assert issubclass(cls, errors.StartupError)
        assert not issubclass(cls, errors.RequestError)


