"""Every error faceverify raises on purpose, each with its reason; no transport.

Request errors (:class:`RequestError` and subclasses) reach the caller: one
interceptor turns them into a gRPC status (its code from the reason, by the
table :data:`server.api.interceptor.STATUS`) whose message starts with the
machine-readable reason and whose details carry a ``google.rpc.ErrorInfo``
(domain ``faceverify.v1``, the reason, and metadata such as which image).
Anything else is a bug and becomes ``INTERNAL`` with a generic message; its
stack goes to the log, never to the caller.

Start-up errors (:class:`StartupError`) stop the server with a message that
names the problem; they are never sent over the wire.  The bases, and the
errors of the storage layer, are in :mod:`index.errors`.
"""

from __future__ import annotations

from index.errors import (
    ConfigurationError,
    FaceVerifyError,
    RegistryUnavailable,
    RequestError,
    StartupError,
)

__all__ = [
    "DOMAIN", "AuditUnavailable", "ChallengeNotFollowed", "ConfigurationError",
    "EnrollmentConflict", "FaceChanged", "FaceIsFlat", "FaceTooSmall", "FaceVerifyError",
    "FrameReplayed", "ImageTooLarge", "InternalError", "InvalidImage", "InvalidNik",
    "InvalidRequest", "LivenessNotAvailable", "LivenessSessionUnknown", "SessionExpired",
    "SessionUsed",
    "ModelError", "MultipleFaces", "NoFaceDetected", "NotEnrolled", "NotPendingReview",
    "Overloaded", "PermissionDenied", "QueueTimeout", "RateLimited", "ReferenceKindNotCalibrated",
    "RegistryUnavailable", "RequestError", "RequestTooLarge", "SelfieIsReferenceCopy",
    "SelfieNotLive",
    "StartupError", "Unauthenticated",
]

DOMAIN = "faceverify.v1"


class ModelError(StartupError):
    """A model file is missing, corrupt, or does not match its manifest."""



class InvalidImage(RequestError):
    """The bytes are not a decodable JPEG, PNG or WebP image (or are truncated)."""

    reason = "INVALID_IMAGE"


class ImageTooLarge(RequestError):
    """The image exceeds the configured byte or pixel limit (e.g. a decompression bomb)."""

    reason = "IMAGE_TOO_LARGE"


class InvalidNik(RequestError):
    """The NIK is not a well-formed 16-digit Indonesian identity number."""

    reason = "INVALID_NIK"


class NoFaceDetected(RequestError):
    """No face was found in the image."""

    reason = "NO_FACE_DETECTED"


class MultipleFaces(RequestError):
    """Several faces of comparable size were found, so the subject is ambiguous."""

    reason = "MULTIPLE_FACES"


class SelfieIsReferenceCopy(RequestError):
    """The selfie is a copy of the reference photo (a presentation attack), refused
    under the ``refuse`` presentation-attack policy."""

    reason = "SELFIE_IS_REFERENCE_COPY"


class SelfieNotLive(RequestError):
    """The presentation-attack models find the selfie to be a photo of a print or a
    screen, refused under the ``refuse`` presentation-attack policy."""

    reason = "SELFIE_NOT_LIVE"


class ChallengeNotFollowed(RequestError):
    """A liveness burst's frames do not show the session's movements in order.
    This and the next five are a burst's failed checks, refused under the
    ``refuse`` presentation-attack policy (:mod:`server.core.liveness`)."""

    reason = "CHALLENGE_NOT_FOLLOWED"


class FaceIsFlat(RequestError):
    """The burst's face moved as a picture does."""

    reason = "FACE_IS_FLAT"


class FaceChanged(RequestError):
    """The burst's frames show another face than the one matched."""

    reason = "FACE_CHANGED"


class FrameReplayed(RequestError):
    """A frame of the burst was sent before, or twice in it."""

    reason = "FRAME_REPLAYED"


class SessionExpired(RequestError):
    """The liveness session is past its expiry."""

    reason = "SESSION_EXPIRED"


class SessionUsed(RequestError):
    """The liveness session has answered a call already."""

    reason = "SESSION_USED"


class LivenessSessionUnknown(RequestError):
    """No liveness session has this id and nonce."""

    reason = "LIVENESS_SESSION_UNKNOWN"


class LivenessNotAvailable(RequestError):
    """The model set cannot run liveness sessions (no mouth corners among its
    detector's landmarks, or no liveness record in its calibration)."""

    reason = "LIVENESS_NOT_AVAILABLE"


class FaceTooSmall(RequestError):
    """The face is smaller than the configured minimum size."""

    reason = "FACE_TOO_SMALL"


class NotEnrolled(RequestError):
    """No enrolment exists for the NIK."""

    reason = "NOT_ENROLLED"


class EnrollmentConflict(RequestError):
    """The NIK is already enrolled with a different face."""

    reason = "NIK_CONFLICT"


class ReferenceKindNotCalibrated(RequestError):
    """The calibration has no operating point for the kind of reference photo asked."""

    reason = "REFERENCE_KIND_NOT_CALIBRATED"


class NotPendingReview(RequestError):
    """A review decision for an enrolment that awaits none."""

    reason = "NOT_PENDING_REVIEW"


class InvalidRequest(RequestError):
    """A request field is missing or malformed."""

    reason = "INVALID_REQUEST"


class Overloaded(RequestError):
    """The server's inference queue is full: retry with backoff, or elsewhere."""

    reason = "OVERLOADED"


class RequestTooLarge(RequestError):
    """The request message is larger than the server accepts."""

    reason = "REQUEST_TOO_LARGE"


class Unauthenticated(RequestError):
    """The caller presented no identity, or one the access policy does not know.

    Attributes:
        presented: what it presented, for the audit (``cn:<common name>``,
            ``key:<first 12 hex digits of the key's SHA-256>``; empty: nothing).
    """

    reason = "UNAUTHENTICATED"

    def __init__(self, message: str, presented: str = "", **metadata: str) -> None:
        super().__init__(message, **metadata)
        self.presented = presented


class PermissionDenied(RequestError):
    """The caller's roles do not include the RPC."""

    reason = "PERMISSION_DENIED"


class RateLimited(RequestError):
    """The caller is over its rate limit: retry after ``retry_after`` seconds."""

    reason = "RATE_LIMITED"

    def __init__(self, message: str, retry_after: float = 1.0, **metadata: str) -> None:
        super().__init__(message, retry_after_ms=str(max(1, round(retry_after * 1000))),
                         **metadata)
        self.retry_after = retry_after


class AuditUnavailable(RequestError):
    """The audit log cannot be written now, so an audited call is not answered."""

    reason = "AUDIT_UNAVAILABLE"
    retry_after = 1.0


class QueueTimeout(RequestError):
    """The call's deadline passed while it waited for inference."""

    reason = "DEADLINE_EXPIRED_IN_QUEUE"


class InternalError(RequestError):
    """An unexpected failure; details are in the server log under the request id."""

    reason = "INTERNAL"
