"""Per-request plumbing: request ids and the one place errors become gRPC statuses."""

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

from server.access import OPEN_SERVICES, AccessControl
from server.audit import AUDITED, AuditLog, Event
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

log = logging.getLogger(__name__)

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,64}$")


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every log record (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


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
    status = status_pb2.Status(code=getattr(code_pb2, error.code.name),
                               message=f"{error.reason}: {error.message}", details=details)
    return rpc_status.to_status(status)


def _request_id(request: Any, context: grpc.aio.ServicerContext) -> str:
    rid = getattr(request, "request_id", "") or dict(context.invocation_metadata() or ()).get(
        REQUEST_ID_HEADER, "")
    if not rid:
        return uuid.uuid4().hex
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


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The one place every unary call passes: identity, access, request ids,
    errors to statuses, metrics, audit.

    In order: the caller is identified and its role and rate checked
    (:class:`~server.access.AccessControl`; the health service is open to all);
    calls beyond ``max_in_flight`` are refused with OVERLOADED; a malformed or
    oversized message is refused with INVALID_ARGUMENT / REQUEST_TOO_LARGE.
    ``RequestError`` -> its code and reason.  Anything else -> ``INTERNAL``
    with a generic message; the stack trace is logged under the request id.
    Every call is counted by method and status code and timed; its deadline,
    if any, is published in :data:`server.batching.deadline_var` so that work
    queued for it is dropped once nobody waits for the answer.  Calls refused
    by access control, and every outcome of the calls in
    :data:`server.audit.AUDITED`, go to the audit log.
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

    async def _audit(self, name: str, identity: str, context: grpc.aio.ServicerContext,
                     rid: str, code: grpc.StatusCode, reason: str, request: Any = None,
                     outcome: str = "") -> None:
        if self.audit is None:
            return
        nik = getattr(request, "nik", "") if not isinstance(request, Malformed) else ""
        try:
            await self.audit.record(Event(name, identity, context.peer() or "", rid, code.name,
                                          reason, outcome, nik if isinstance(nik, str) else ""))
        except OSError:
            # The call's effect stands (an enrolment is already committed): answer it,
            # and make the gap in the trail loud.
            log.exception("the audit log could not be written for %s", name)
            self.metrics.audit_failures.inc()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if (handler is None or handler.unary_unary is None
                or not inspect.iscoroutinefunction(handler.unary_unary)):
            return handler
        inner: Handler = handler.unary_unary
        method = handler_call_details.method
        name = method.rsplit("/", 1)[-1]
        open_method = method.startswith(OPEN_SERVICES)
        latency = self.metrics.latency.labels(name)

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = request_id_var.set("-")
            remaining = context.time_remaining()
            deadline = deadline_var.set(None if remaining is None
                                        else time.monotonic() + remaining)
            start = time.perf_counter()
            self.metrics.in_flight.inc()
            self._in_flight += 1
            identity = "-"

            def answered(code: grpc.StatusCode) -> None:
                # Counted before the status is sent, so a caller that then
                # scrapes the metrics sees its own call.
                self.metrics.in_flight.dec()
                self._in_flight -= 1
                self.metrics.requests.labels(name, code.name).inc()
                latency.observe(time.perf_counter() - start)

            async def refuse(exc: RequestError, rid: str) -> None:
                status = status_for(exc, rid)
                answered(exc.code)
                await context.abort(status.code, status.details, status.trailing_metadata)

            try:
                if not open_method:
                    try:
                        client = self.access.identify(_auth_context(context),
                                                      context.invocation_metadata() or ())
                        identity = client.name
                        self.access.authorize(client, name)
                    except (Unauthenticated, PermissionDenied, RateLimited) as exc:
                        self.metrics.refused.labels(name, exc.reason).inc()
                        log.warning("refused %s from %s (%s): %s", name, identity,
                                    context.peer(), exc.reason)
                        await self._audit(name, identity, context, "-", exc.code, exc.reason,
                                          request)
                        await refuse(exc, "-")
                try:
                    if self.max_in_flight and self._in_flight > self.max_in_flight:
                        raise Overloaded(f"more than {self.max_in_flight} calls in flight; "
                                         "retry with backoff", limit="max_concurrent_rpcs")
                    if isinstance(request, Malformed):
                        log.warning("malformed %s request (%s)", name, request.why)
                        if request.size > self.max_message_bytes > 0:
                            raise RequestTooLarge(
                                f"the {name} message is {request.size} bytes, over the limit "
                                f"of {self.max_message_bytes}", field="message")
                        raise InvalidRequest(f"the request is not a valid {name} message "
                                             f"({request.why}); check the client's .proto",
                                             field="message")
                    rid = _request_id(request, context)
                except (InvalidRequest, Overloaded, RequestTooLarge) as exc:
                    await refuse(exc, "-")
                request_id_var.set(rid)
                context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
                try:
                    response = await inner(request, context)
                except RequestError as exc:
                    status, code, reason = status_for(exc, rid), exc.code, exc.reason
                except asyncio.CancelledError:
                    answered(grpc.StatusCode.CANCELLED)
                    raise
                except Exception:
                    log.exception("unhandled error in %s", method)
                    status = status_for(InternalError("internal error; quote the request id "
                                                      "to the operator"), rid)
                    code, reason = grpc.StatusCode.INTERNAL, "INTERNAL"
                else:
                    if name in AUDITED:
                        await self._audit(name, identity, context, rid, grpc.StatusCode.OK,
                                          "", request, getattr(response, "outcome", ""))
                    answered(grpc.StatusCode.OK)
                    return response
                if name in AUDITED:
                    await self._audit(name, identity, context, rid, code, reason, request)
                answered(code)
                await context.abort(status.code, status.details,
                                    (*status.trailing_metadata, (REQUEST_ID_HEADER, rid)))
            finally:
                deadline_var.reset(deadline)
                request_id_var.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            wrapper,
            request_deserializer=lenient(handler.request_deserializer, self.max_message_bytes),
            response_serializer=handler.response_serializer,
        )
