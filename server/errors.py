"""Every error faceverify raises, each with its gRPC status code and reason.

Request errors (:class:`RequestError` and subclasses) reach the caller: one
interceptor turns them into a gRPC status whose message starts with the
machine-readable reason and whose details carry a ``google.rpc.ErrorInfo``
(domain ``faceverify.v1``, the reason, and metadata such as which image).
Anything else is a bug and becomes ``INTERNAL`` with a generic message; its
stack goes to the log, never to the caller.

Start-up errors (:class:`StartupError`) stop the server with a message that
names the problem; they are never sent over the wire.
"""

from __future__ import annotations

import grpc

DOMAIN = "faceverify.v1"


class FaceVerifyError(Exception):
    """Base of every error this package raises on purpose."""


class StartupError(FaceVerifyError):
    """The server cannot start: bad configuration, missing or corrupt models."""


class ConfigurationError(StartupError):
    """A setting is invalid or asks for something this machine does not have."""


class ModelError(StartupError):
    """A model file is missing, corrupt, or does not match its manifest."""


class RequestError(FaceVerifyError):
    """An error reported to the caller of an RPC.

    Attributes:
        code: the gRPC status code.
        reason: a stable UPPER_SNAKE_CASE identifier callers can switch on.
        metadata: extra machine-readable context (e.g. ``{"image": "selfie"}``);
            never a NIK, a path or a stack trace.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"
    # Seconds after which a retry may succeed (sent as google.rpc.RetryInfo).
    retry_after: float | None = None

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata


class InvalidImage(RequestError):
    """The bytes are not a decodable JPEG, PNG or WebP image (or are truncated)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_IMAGE"


class ImageTooLarge(RequestError):
    """The image exceeds the configured byte or pixel limit (e.g. a decompression bomb)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "IMAGE_TOO_LARGE"


class InvalidNik(RequestError):
    """The NIK is not a well-formed 16-digit Indonesian identity number."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_NIK"


class NoFaceDetected(RequestError):
    """No face was found in the image."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "NO_FACE_DETECTED"


class MultipleFaces(RequestError):
    """Several faces of comparable size were found, so the subject is ambiguous."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "MULTIPLE_FACES"


class FaceTooSmall(RequestError):
    """The face is smaller than the configured minimum size."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "FACE_TOO_SMALL"


class NotEnrolled(RequestError):
    """No enrolment exists for the NIK."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_ENROLLED"


class EnrollmentConflict(RequestError):
    """The NIK is already enrolled with a different face."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "NIK_CONFLICT"


class ReferenceKindNotCalibrated(RequestError):
    """The calibration has no operating point for the kind of reference photo asked."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "REFERENCE_KIND_NOT_CALIBRATED"


class NotPendingReview(RequestError):
    """A review decision for an enrolment that awaits none."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "NOT_PENDING_REVIEW"


class InvalidRequest(RequestError):
    """A request field is missing or malformed."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_REQUEST"


class Overloaded(RequestError):
    """The server's inference queue is full: retry with backoff, or elsewhere."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "OVERLOADED"


class RequestTooLarge(RequestError):
    """The request message is larger than the server accepts."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "REQUEST_TOO_LARGE"


class Unauthenticated(RequestError):
    """The caller presented no identity, or one the access policy does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(RequestError):
    """The caller's roles do not include the RPC."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class RateLimited(RequestError):
    """The caller is over its rate limit: retry after ``retry_after`` seconds."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMITED"

    def __init__(self, message: str, retry_after: float = 1.0, **metadata: str) -> None:
        super().__init__(message, retry_after_ms=str(max(1, round(retry_after * 1000))),
                         **metadata)
        self.retry_after = retry_after


class QueueTimeout(RequestError):
    """The call's deadline passed while it waited for inference."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXPIRED_IN_QUEUE"


class RegistryUnavailable(RequestError):
    """The shared registry (PostgreSQL) cannot be reached: retry shortly, or on
    another replica.  Verification, which needs no registry, keeps working."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "REGISTRY_UNAVAILABLE"
    retry_after = 1.0


class InternalError(RequestError):
    """An unexpected failure; details are in the server log under the request id."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"
