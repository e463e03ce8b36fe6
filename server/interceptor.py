"""The gRPC server interceptor every call passes, and the one place errors become
gRPC statuses; request ids and lenient message parsing."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.access import AccessControl
from server.audit import AuditLog, Event
from server.batching import deadline_var
from server.errors import (
    DOMAIN,
    InternalError,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    RateLimited,
    RequestError,
    RequestTooLarge,
    Unauthenticated,
)
from server.metrics import Metrics
from server.rpcs import AUDITED, OPEN_SERVICES

log = logging.getLogger(__name__)

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,64}$")


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every log record (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


# The one place a reason becomes a gRPC status code (tests/test_errors.py checks
# that every RequestError's reason is here).
_C = grpc.StatusCode
STATUS: dict[str, grpc.StatusCode] = {
    "INVALID_IMAGE": _C.INVALID_ARGUMENT, "IMAGE_TOO_LARGE": _C.INVALID_ARGUMENT,
    "INVALID_NIK": _C.INVALID_ARGUMENT, "NO_FACE_DETECTED": _C.INVALID_ARGUMENT,
    "MULTIPLE_FACES": _C.INVALID_ARGUMENT, "FACE_TOO_SMALL": _C.INVALID_ARGUMENT,
    "INVALID_REQUEST": _C.INVALID_ARGUMENT,
    "NOT_ENROLLED": _C.NOT_FOUND,
    "NIK_CONFLICT": _C.ALREADY_EXISTS,
    "REFERENCE_KIND_NOT_CALIBRATED": _C.FAILED_PRECONDITION,
    "NOT_PENDING_REVIEW": _C.FAILED_PRECONDITION,
    "OVERLOADED": _C.RESOURCE_EXHAUSTED, "REQUEST_TOO_LARGE": _C.RESOURCE_EXHAUSTED,
    "RATE_LIMITED": _C.RESOURCE_EXHAUSTED,
    "UNAUTHENTICATED": _C.UNAUTHENTICATED,
    "PERMISSION_DENIED": _C.PERMISSION_DENIED,
    "DEADLINE_EXPIRED_IN_QUEUE": _C.DEADLINE_EXCEEDED,
    "REGISTRY_UNAVAILABLE": _C.UNAVAILABLE,
    "INTERNAL": _C.INTERNAL,
}


def code_of(error: RequestError) -> grpc.StatusCode:
    """The gRPC status code of ``error``'s reason (INTERNAL for one not in the table)."""
    return STATUS.get(error.reason, grpc.StatusCode.INTERNAL)


def status_for(error: RequestError, request_id: str) -> grpc.Status:
    """A rich gRPC status: code, 'REASON: message', and an ErrorInfo detail."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN,
                                       metadata={**error.metadata, "request_id": request_id})
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if error.retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(max(1, round(error.retry_after * 1000)))
        details.append(any_pb2.Any())
        details[-1].Pack(retry)
    status = status_pb2.Status(code=getattr(code_pb2, code_of(error).name),
                               message=f"{error.reason}: {error.message}", details=details)
    return rpc_status.to_status(status)


def _request_id(request: Any, context: grpc.aio.ServicerContext, generated: str) -> str:
    """The caller's request id (message field, else ``x-request-id`` metadata), or
    ``generated`` when it sent none.

    Raises:
        InvalidRequest: not 1-64 printable ASCII characters.
    """
    rid = getattr(request, "request_id", "") or dict(context.invocation_metadata() or ()).get(
        REQUEST_ID_HEADER, "")
    if not rid:
        return generated
    if not isinstance(rid, str) or not _REQUEST_ID.match(rid):
        raise InvalidRequest("request_id must be 1-64 printable ASCII characters")
    return rid


Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes did not parse as its message (answered INVALID_ARGUMENT
    rather than gRPC's UNKNOWN with a traceback)."""

    why: str
    size: int


def lenient(deserialize: Callable[[bytes], Any] | None, max_bytes: int = 0
            ) -> Callable[[bytes], Any]:
    """``deserialize``, returning :class:`Malformed` instead of raising, and for a
    message over ``max_bytes`` (0: no limit) without parsing it."""
    def parse(data: bytes) -> Any:
        if max_bytes and len(data) > max_bytes:
            return Malformed("too large", len(data))
        try:
            return deserialize(data) if deserialize is not None else data
        except Exception as exc:  # protobuf's DecodeError, invalid UTF-8 in a string
            return Malformed(type(exc).__name__, len(data))
    return parse


def _auth_context(context: grpc.aio.ServicerContext) -> dict[str, Any]:
    try:
        return dict(context.auth_context() or {})
    except Exception:  # an insecure connection has no auth context in some gRPC versions
        return {}


@dataclass(frozen=True)
class _Method:
    """What the interceptor knows of one RPC before any call to it."""

    name: str  # the RPC's short name, as in :data:`server.rpcs.RPCS`
    open: bool  # a service open to every caller (health)
    handler: Handler
    latency: Any  # its latency histogram


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The one place every unary call passes, in named stages:

    1. :meth:`_identify`: who calls, and whether their role and rate allow the
       call (:class:`~server.access.AccessControl`; the health service is open
       to all).  A refusal is logged, counted and audited.
    2. :meth:`_admit`: beyond ``max_in_flight`` calls, OVERLOADED; a malformed
       or oversized message, INVALID_ARGUMENT / REQUEST_TOO_LARGE.
    3. :meth:`_request_id`: the caller's request id if it sent a valid one, else
       the one generated when the call arrived (so every refusal carries one).
    4. The handler.  ``RequestError`` -> its code and reason; anything else ->
       ``INTERNAL`` with a generic message, the stack trace logged under the
       request id.  Every outcome of the calls in :data:`server.rpcs.AUDITED`
       goes to the audit log.
    5. :meth:`_account`, on every path, once, before the status is sent: the
       call counted by method and status code, timed, and out of the in-flight
       count.

    The call's deadline, if any, is published in
    :data:`server.batching.deadline_var` so that work queued for it is dropped
    once nobody waits for the answer.
    """

    def __init__(self, metrics: Metrics, access: AccessControl | None = None,
                 audit: AuditLog | None = None, max_in_flight: int = 0,
                 max_message_bytes: int = 0) -> None:
        self.metrics = metrics
        self.access = access or AccessControl(None)
        self.audit = audit
        self.max_in_flight = max_in_flight
        self.max_message_bytes = max_message_bytes
        self._in_flight = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if (handler is None or handler.unary_unary is None
                or not inspect.iscoroutinefunction(handler.unary_unary)):
            return handler
        path = handler_call_details.method
        name = path.rsplit("/", 1)[-1]
        method = _Method(name, path.startswith(OPEN_SERVICES), handler.unary_unary,
                         self.metrics.latency.labels(name))

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await self._call(method, request, context)

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=lenient(handler.request_deserializer, self.max_message_bytes),
            response_serializer=handler.response_serializer,
        )

    async def _call(self, method: _Method, request: Any,
                    context: grpc.aio.ServicerContext) -> Any:
        rid = uuid.uuid4().hex
        rid_token = request_id_var.set(rid)
        remaining = context.time_remaining()
        deadline_token = deadline_var.set(None if remaining is None
                                          else time.monotonic() + remaining)
        start = time.perf_counter()
        self.metrics.in_flight.inc()
        self._in_flight += 1
        accounted = False

        def account(final: grpc.StatusCode) -> None:
            # Before the status is sent (abort sends it): a caller that then
            # scrapes the metrics sees its own call.
            nonlocal accounted
            if not accounted:
                accounted = True
                self._account(method, final, start)

        identity = "-"
        try:
            try:
                identity = await self._identify(method, request, context, rid)
                self._admit(method, request)
                rid = _request_id(request, context, rid)
            except RequestError as exc:
                account(code_of(exc))
                status = status_for(exc, rid)
                await context.abort(status.code, status.details, status.trailing_metadata)
            request_id_var.set(rid)
            context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
            try:
                response = await method.handler(request, context)
            except RequestError as exc:
                error = exc
            except Exception:
                log.exception("unhandled error in %s", method.name)
                error = InternalError("internal error; quote the request id to the operator")
            else:
                if method.name in AUDITED:
                    await self._audit(method.name, identity, context, rid, grpc.StatusCode.OK,
                                      "", request, getattr(response, "outcome", ""))
                account(grpc.StatusCode.OK)
                return response
            if method.name in AUDITED:
                await self._audit(method.name, identity, context, rid, code_of(error),
                                  error.reason, request)
            account(code_of(error))
            status = status_for(error, rid)
            await context.abort(status.code, status.details,
                                (*status.trailing_metadata, (REQUEST_ID_HEADER, rid)))
        except asyncio.CancelledError:
            account(grpc.StatusCode.CANCELLED)
            raise
        finally:
            account(grpc.StatusCode.INTERNAL)  # on every other path, once
            deadline_var.reset(deadline_token)
            request_id_var.reset(rid_token)

    async def _identify(self, method: _Method, request: Any,
                        context: grpc.aio.ServicerContext, rid: str) -> str:
        """The caller's identity, allowed to make this call now.

        Raises:
            Unauthenticated, PermissionDenied, RateLimited: logged, counted, audited.
        """
        if method.open:
            return "-"
        identity = "-"
        try:
            client = self.access.identify(_auth_context(context),
                                          context.invocation_metadata() or ())
            identity = client.name
            self.access.authorize(client, method.name)
        except (Unauthenticated, PermissionDenied, RateLimited) as exc:
            self.metrics.refused.labels(method.name, exc.reason).inc()
            log.warning("refused %s from %s (%s): %s", method.name, identity, context.peer(),
                        exc.reason)
            await self._audit(method.name, identity, context, rid, code_of(exc), exc.reason,
                              request)
            raise
        return identity

    def _admit(self, method: _Method, request: Any) -> None:
        """Raises Overloaded beyond ``max_in_flight``, RequestTooLarge or
        InvalidRequest for a message that did not parse."""
        if self.max_in_flight and self._in_flight > self.max_in_flight:
            raise Overloaded(f"more than {self.max_in_flight} calls in flight; "
                             "retry with backoff", limit="max_concurrent_rpcs")
        if isinstance(request, Malformed):
            log.warning("malformed %s request (%s)", method.name, request.why)
            if request.size > self.max_message_bytes > 0:
                raise RequestTooLarge(f"the {method.name} message is {request.size} bytes, "
                                      f"over the limit of {self.max_message_bytes}",
                                      field="message")
            raise InvalidRequest(f"the request is not a valid {method.name} message "
                                 f"({request.why}); check the client's .proto",
                                 field="message")

    def _account(self, method: _Method, code: grpc.StatusCode, start: float) -> None:
        self.metrics.in_flight.dec()
        self._in_flight -= 1
        self.metrics.requests.labels(method.name, code.name).inc()
        method.latency.observe(time.perf_counter() - start)

    async def _audit(self, name: str, identity: str, context: grpc.aio.ServicerContext,
                     rid: str, code: grpc.StatusCode, reason: str, request: Any = None,
                     outcome: str = "") -> None:
        if self.audit is None:
            return
        nik = getattr(request, "nik", "") if not isinstance(request, Malformed) else ""
        try:
            await self.audit.record(Event(name, identity, context.peer() or "", rid, code.name,
                                          reason, outcome, nik if isinstance(nik, str) else ""))
        except Exception:
            # The call's effect stands (an enrolment is already committed): answer it,
            # and make the gap in the trail loud.  Whatever broke the trail (a full
            # disk, a torn last line) must not turn the answer into UNKNOWN.
            log.exception("the audit log could not be written for %s", name)
            self.metrics.audit_failures.inc()
