"""A small synchronous Python client for faceverify, used by the CLI and tests.

Example::

    with FaceVerifyClient("localhost:50051") as client:
        result = client.verify(Path("selfie.jpg").read_bytes(), Path("id.jpg").read_bytes())
        print(result.match, result.score)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server.api.tls import ClientTls, channel
from server.gen import faceverify_pb2 as pb
from server.gen import faceverify_pb2_grpc as pb_grpc


@dataclass
class CallError(Exception):
    """A failed call: gRPC code name, faceverify reason and message, and ErrorInfo metadata."""

    code: str
    reason: str
    message: str
    metadata: dict[str, str]

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def call_error(exc: grpc.RpcError) -> CallError:
    """Decode a faceverify error (or any gRPC error) into a :class:`CallError`."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    status = rpc_status.from_call(exc) if isinstance(exc, grpc.Call) else None
    reason, metadata = code.name, {}
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return CallError(code.name, reason, details or "", metadata)


def capture(session: pb.LivenessSession, frames: Sequence[tuple[bytes, int]]
            ) -> pb.LivenessCapture:
    """A burst of (image, milliseconds into the challenge) for ``session``."""
    return pb.LivenessCapture(session_id=session.session_id, nonce=session.nonce,
                              frames=[pb.LivenessFrame(image=image, offset_ms=ms)
                                      for image, ms in frames])


class FaceVerifyClient:
    """Blocking client for ``faceverify.v1.FaceVerification``.

    Raises:
        CallError: from every method when the server returns an error status.
    """

    def __init__(self, target: str, timeout: float = 30.0, tls: ClientTls | None = None,
                 api_key: str | None = None) -> None:
        """``tls`` None: plaintext (a server started with ``--insecure``).  ``api_key``
        is sent as ``authorization: Bearer`` metadata on every call."""
        # A client is a connection of its own (gRPC otherwise shares one between
        # channels to the same target, so a new client could reach the same one
        # of several server processes on a port).
        self.channel = channel(target, tls, [
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.use_local_subchannel_pool", 1)])
        self.stub = pb_grpc.FaceVerificationStub(self.channel)  # type: ignore[no-untyped-call]
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout,
                                              metadata=self.metadata)
        except grpc.RpcError as exc:
            raise call_error(exc) from None

    def verify(self, selfie: bytes, reference: bytes, request_id: str = "",
               id_card: bool = False, liveness: pb.LivenessCapture | None = None
               ) -> pb.VerifyResponse:
        """``id_card``: the reference is an identity card's portrait (its own
        operating point); ``liveness``: a session's burst in place of the selfie
        (:func:`capture`)."""
        response: pb.VerifyResponse = self._call("Verify", pb.VerifyRequest(
            selfie=selfie, reference=reference, request_id=request_id,
            reference_kind=pb.ID_CARD if id_card else pb.PHOTO, liveness=liveness))
        return response

    def enroll(self, nik: str, selfie: bytes, reference: bytes = b"",
               metadata: dict[str, str] | None = None, request_id: str = "",
               id_card: bool = False, liveness: pb.LivenessCapture | None = None
               ) -> pb.EnrollResponse:
        response: pb.EnrollResponse = self._call("Enroll", pb.EnrollRequest(
            nik=nik, selfie=selfie, reference=reference, metadata=metadata or {},
            request_id=request_id, reference_kind=pb.ID_CARD if id_card else pb.PHOTO,
            liveness=liveness))
        return response

    def start_liveness(self) -> pb.LivenessSession:
        session: pb.LivenessSession = self._call("StartLiveness", pb.StartLivenessRequest())
        return session

    def search(self, image: bytes, top_k: int = 5) -> pb.SearchResponse:
        response: pb.SearchResponse = self._call("Search", pb.SearchRequest(image=image,
                                                                            top_k=top_k))
        return response

    def get_enrollment(self, nik: str) -> pb.Enrollment:
        response: pb.Enrollment = self._call("GetEnrollment", pb.GetEnrollmentRequest(nik=nik))
        return response

    def delete_enrollment(self, nik: str) -> pb.DeleteEnrollmentResponse:
        response: pb.DeleteEnrollmentResponse = self._call(
            "DeleteEnrollment", pb.DeleteEnrollmentRequest(nik=nik))
        return response

    def list_reviews(self, page_size: int = 0, page_token: str = ""
                     ) -> pb.ListReviewsResponse:
        response: pb.ListReviewsResponse = self._call("ListReviews", pb.ListReviewsRequest(
            page_size=page_size, page_token=page_token))
        return response

    def resolve_review(self, nik: str, confirm: bool, reviewer: str, note: str = ""
                       ) -> pb.Enrollment:
        decision = (pb.ResolveReviewRequest.CONFIRM_DUPLICATE if confirm
                    else pb.ResolveReviewRequest.CLEAR)
        response: pb.Enrollment = self._call("ResolveReview", pb.ResolveReviewRequest(
            nik=nik, decision=decision, reviewer=reviewer, note=note))
        return response

    def server_info(self) -> pb.ServerInfo:
        info: pb.ServerInfo = self._call("GetServerInfo", pb.GetServerInfoRequest())
        return info

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> FaceVerifyClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
