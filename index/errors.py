"""The errors of the storage layer and the service core, with no transport in them.

A :class:`RequestError` reaches the caller of a call: it carries a stable,
machine-readable ``reason`` (``REGISTRY_UNAVAILABLE``), a message and
metadata; the gRPC edge alone maps each reason to a status code
(:data:`server.api.interceptor.STATUS`).  A :class:`StartupError` stops the
server with a message that names the problem; it never crosses the wire.
The service's other errors (:mod:`server.errors`) build on these.
"""

from __future__ import annotations


class FaceVerifyError(Exception):
    """Base of every error this package raises on purpose."""


class StartupError(FaceVerifyError):
    """The server cannot start: bad configuration, missing or corrupt models."""


class ConfigurationError(StartupError):
    """A setting is invalid or asks for something this machine does not have."""


class RequestError(FaceVerifyError):
    """An error reported to the caller of an RPC.

    Attributes:
        reason: a stable UPPER_SNAKE_CASE identifier callers can switch on.
        metadata: extra machine-readable context (e.g. ``{"image": "selfie"}``);
            never a NIK, a path or a stack trace.
    """

    reason: str = "INTERNAL"
    # Seconds after which a retry may succeed (sent as google.rpc.RetryInfo).
    retry_after: float | None = None

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata


class RegistryUnavailable(RequestError):
    """The shared registry (PostgreSQL) cannot be reached: retry shortly, or on
    another replica.  Verification, which needs no registry, keeps working."""

    reason = "REGISTRY_UNAVAILABLE"
    retry_after = 1.0


class Quarantined(RequestError):
    """A stored enrolment failed authentication (with sealing on, its fields or
    sealed values were changed outside the service): it is not served until an
    operator restores it from a backup or erases it."""

    reason = "ENROLLMENT_QUARANTINED"
