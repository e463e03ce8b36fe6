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
from dataclasses import dataclass, replace
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from index.registry import AuditEntry, audit_var
from server.api.access import AccessControl, Client, caller_var
from server.api.audit import AuditLog, Event
from server.api.audit import AuditUnavailable as AuditDown
from server.api.refusals import Tally, source_of
from server.api.rpcs import ADMIN, AUDITED, DURABLE, OPEN_SERVICES, RPCS
from server.core.metrics import Metrics
from server.errors import (
    DOMAIN,
    AuditUnavailable,
    InternalError,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    RateLimited,
    RequestError,
    RequestTooLarge,
    Unauthenticated,
)
from server.pipeline.batching import deadline_var

log = logging.getLogger(__name__)

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
REQUEST_ID_HEADER = "x-request-id"
# Refusals logged one by one per source address, identity, method and reason in
# each interval (seconds); the rest are counted in one line at its end.
REFUSALS_LOGGED = 10
REFUSAL_INTERVAL = 60.0
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
    "INVALID_REQUEST": _C.INVALID_ARGUMENT, "SELFIE_IS_REFERENCE_COPY": _C.INVALID_ARGUMENT,
    "SELFIE_NOT_LIVE": _C.INVALID_ARGUMENT, "CHALLENGE_NOT_FOLLOWED": _C.INVALID_ARGUMENT,
    "FACE_IS_FLAT": _C.INVALID_ARGUMENT, "FACE_CHANGED": _C.INVALID_ARGUMENT,
    "FRAME_REPLAYED": _C.INVALID_ARGUMENT,
    "SESSION_EXPIRED": _C.FAILED_PRECONDITION, "SESSION_USED": _C.FAILED_PRECONDITION,
    "LIVENESS_SESSION_UNKNOWN": _C.NOT_FOUND, "LIVENESS_NOT_AVAILABLE": _C.FAILED_PRECONDITION,
    "NOT_ENROLLED": _C.NOT_FOUND,
    "NIK_CONFLICT": _C.ALREADY_EXISTS,
    "REFERENCE_KIND_NOT_CALIBRATED": _C.FAILED_PRECONDITION,
    "NOT_PENDING_REVIEW": _C.FAILED_PRECONDITION,
    "OVERLOADED": _C.RESOURCE_EXHAUSTED, "REQUEST_TOO_LARGE": _C.RESOURCE_EXHAUSTED,
    "RATE_LIMITED": _C.RESOURCE_EXHAUSTED,
    "UNAUTHENTICATED": _C.UNAUTHENTICATED,
    "PERMISSION_DENIED": _C.PERMISSION_DENIED,
    "DEADLINE_EXPIRED_IN_QUEUE": _C.DEADLINE_EXCEEDED,
    "REGISTRY_UNAVAILABLE": _C.UNAVAILABLE, "AUDIT_UNAVAILABLE": _C.UNAVAILABLE,
    "ENROLLMENT_QUARANTINED": _C.DATA_LOSS,
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


@dataclass(frozen=True)
class Unparsed:
    """A request left unparsed because the messages of the calls in flight already
    fill :class:`MessageBudget` (answered RESOURCE_EXHAUSTED / OVERLOADED)."""

    size: int


class MessageBudget:
    """The bytes of the request messages held by calls in flight, bounded.

    gRPC reads a whole message before any handler runs, and the process then
    holds it two or three times over (the received bytes, the parsed message,
    the images taken out of it) until the call is answered: sixteen calls of two
    images each can hold hundreds of megabytes before a pixel is decoded.  A
    message that would take the total past ``capacity`` is not parsed and its
    call is refused at once, so what it would have held is let go.  Used from
    the event loop's thread only (deserialisation and the calls both run there).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._sizes: dict[int, int] = {}  # id of a parsed message in flight -> its bytes

    def admit(self, data: bytes, parse: Callable[[bytes], Any]) -> Any:
        """``parse(data)``, charged until :meth:`release`; :class:`Unparsed` if it
        would not fit (``capacity`` 0: no bound)."""
        if self.capacity and self.used + len(data) > self.capacity:
            return Unparsed(len(data))
        message = parse(data)
        if not isinstance(message, Malformed):
            self.used += len(data)
            self._sizes[id(message)] = self._sizes.get(id(message), 0) + len(data)
        return message

    def release(self, message_id: int) -> None:
        """The message whose ``id`` this was is answered."""
        self.used -= self._sizes.pop(message_id, 0)


def lenient(deserialize: Callable[[bytes], Any] | None, max_bytes: int = 0,
            budget: MessageBudget | None = None) -> Callable[[bytes], Any]:
    """``deserialize``, returning :class:`Malformed` instead of raising, and for a
    message over ``max_bytes`` (0: no limit) without parsing it; charged to
    ``budget`` where given."""
    def parse(data: bytes) -> Any:
        if max_bytes and len(data) > max_bytes:
            return Malformed("too large", len(data))
        try:
            return deserialize(data) if deserialize is not None else data
        except Exception as exc:  # protobuf's DecodeError, invalid UTF-8 in a string
            return Malformed(type(exc).__name__, len(data))

    if budget is None:
        return parse
    return lambda data: budget.admit(data, parse)


def _auth_context(context: grpc.aio.ServicerContext) -> dict[str, Any]:
    try:
        return dict(context.auth_context() or {})
    except Exception:  # an insecure connection has no auth context in some gRPC versions
        return {}


@dataclass(frozen=True)
class _Method:
    """What the interceptor knows of one RPC before any call to it."""

    name: str  # the RPC's short name, as in :data:`server.api.rpcs.RPCS`
    open: bool  # a service open to every caller (health)
    handler: Handler
    latency: Any  # its latency histogram

    @property
    def audited(self) -> bool:
        return self.name in AUDITED

    @property
    def durable(self) -> bool:
        return self.name in DURABLE


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The one place every call passes, in named stages:

    1. :meth:`_identify`: who calls, and whether their role and rate allow the
       call (:class:`~server.api.access.AccessControl`; the health service is open
       to all; any other service, reflection included, is for ``admin``).  A
       refusal is logged, counted and audited with what the caller presented.
    2. :meth:`_admit`: beyond ``max_in_flight`` calls, OVERLOADED; a malformed
       or oversized message, INVALID_ARGUMENT / REQUEST_TOO_LARGE.
    3. :meth:`_request_id`: the caller's request id if it sent a valid one, else
       the one generated when the call arrived (so every refusal carries one).
    4. The handler.  ``RequestError`` -> its code and reason; anything else ->
       ``INTERNAL`` with a generic message, the stack trace logged under the
       request id.
    5. :meth:`_audit_outcome`, for the calls in :data:`server.api.rpcs.AUDITED`: a
       state change's record was written in its own transaction (see
       :mod:`server.api.audit`) and is exported now; any other outcome is recorded,
       and a call whose record cannot be written is answered
       ``AUDIT_UNAVAILABLE`` instead.
    6. :meth:`_account`, on every path, once, before the status is sent: the
       call counted by method and status code, timed, and out of the in-flight
       count.

    The call's deadline, if any, is published in
    :data:`server.pipeline.batching.deadline_var` so that work queued for it is dropped
    once nobody waits for the answer.
    """

    def __init__(self, metrics: Metrics, access: AccessControl | None = None,
                 audit: AuditLog | None = None, max_in_flight: int = 0,
                 max_message_bytes: int = 0, messages_in_flight_bytes: int = 0) -> None:
        self.metrics = metrics
        self.access = access or AccessControl(None)
        self.audit = audit
        self.max_in_flight = max_in_flight
        self.max_message_bytes = max_message_bytes
        self.messages = MessageBudget(messages_in_flight_bytes)
        self.refusal_log = Tally(REFUSALS_LOGGED, REFUSAL_INTERVAL)
        self.answered = 0  # calls answered, ever
        self._in_flight = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        path = handler_call_details.method
        name = path.rsplit("/", 1)[-1]
        if (handler.unary_unary is None
                or not inspect.iscoroutinefunction(handler.unary_unary)):
            return self._guard_stream(path, name, handler)
        method = _Method(name, path.startswith(OPEN_SERVICES), handler.unary_unary,
                         self.metrics.latency.labels(name))

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            charged = id(request)
            answer = self._call(method, request, context)
            del request  # only the call's own frame holds it, and lets it go before aborting
            try:
                return await answer
            finally:
                self.messages.release(charged)

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=lenient(handler.request_deserializer, self.max_message_bytes,
                                         self.messages),
            response_serializer=handler.response_serializer,
        )

    def _guard_stream(self, path: str, name: str, handler: grpc.RpcMethodHandler
                      ) -> grpc.RpcMethodHandler:
        """A streaming service (reflection): open services as they are; any other
        only for a caller with the admin role."""
        stream = handler.stream_stream
        if path.startswith(OPEN_SERVICES) or not inspect.isasyncgenfunction(stream):
            if not path.startswith(OPEN_SERVICES) and handler.stream_stream is not None:
                raise RuntimeError(f"{path}: a streaming handler the access control cannot "
                                   "guard")
            return handler
        method = _Method(name, False, stream, self.metrics.latency.labels(name))

        async def guarded(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            rid = uuid.uuid4().hex
            try:
                await self._identify(method, None, context, rid)
            except RequestError as exc:
                status = status_for(exc, rid)
                await context.abort(status.code, status.details, status.trailing_metadata)
            async for response in stream(requests, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(
            guarded, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

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
        entry_token = None
        caller_token = None
        try:
            try:
                client = await self._identify(method, request, context, rid)
                if client is not None:
                    identity = client.name
                    caller_token = caller_var.set(client)
                try:
                    self._admit(method, request)
                    rid = _request_id(request, context, rid)
                except RequestError as exc:
                    if method.audited:
                        await self._record(Event(method.name, identity, context.peer() or "",
                                                 rid, code_of(exc).name, exc.reason),
                                           method.durable)
                    raise
            except RequestError as exc:
                account(code_of(exc))
                status = status_for(exc, rid)
                await context.abort(status.code, status.details, status.trailing_metadata)
            request_id_var.set(rid)
            context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
            entry = None
            try:
                if method.durable and self.audit is not None:
                    entry = await self._entry(method, request, identity,
                                              context.peer() or "", rid)
                    entry_token = audit_var.set(entry)
                response = await method.handler(request, context)
            except RequestError as exc:
                error = exc
            except Exception:
                log.exception("unhandled error in %s", method.name)
                error = InternalError("internal error; quote the request id to the operator")
            else:
                if method.audited:
                    refused = await self._audit_outcome(
                        method, entry, Event(method.name, identity, context.peer() or "", rid,
                                             "OK", "", _outcome(response), _nik(request)))
                    if refused is not None:
                        error = refused
                        response = None
                if response is not None:
                    await self._charge(method, response)
                    account(grpc.StatusCode.OK)
                    return response
            if method.audited and not isinstance(error, AuditUnavailable):
                refused = await self._audit_outcome(
                    method, entry, Event(method.name, identity, context.peer() or "", rid,
                                         code_of(error).name, error.reason, "", _nik(request)))
                error = refused or error
            account(code_of(error))
            status = status_for(error, rid)
            # gRPC keeps the abort's exception with the call, and its traceback keeps
            # this frame: nothing large may stay in it (the error's own traceback
            # holds every frame that handled the request's images).
            del error
            request = None
            await context.abort(status.code, status.details,
                                (*status.trailing_metadata, (REQUEST_ID_HEADER, rid)))
        except asyncio.CancelledError:
            account(grpc.StatusCode.CANCELLED)
            raise
        finally:
            account(grpc.StatusCode.INTERNAL)  # on every other path, once
            if entry_token is not None:
                audit_var.reset(entry_token)
            if caller_token is not None:
                caller_var.reset(caller_token)
            deadline_var.reset(deadline_token)
            request_id_var.reset(rid_token)

    async def _audit_outcome(self, method: _Method, entry: AuditEntry | None,
                             event: Event) -> AuditUnavailable | None:
        """Record an audited call's outcome; the error to answer instead if that fails.

        A state change's record is already in the registry (written in its
        transaction): it is exported now, and a failure to export only delays it
        (counted; exported at the next append or start-up).
        """
        if self.audit is None:
            return None
        if entry is not None and entry.outbox_id is not None:
            try:
                await self.audit.export()
            except AuditDown:
                self.metrics.audit_failures.labels("export").inc()
            return None
        if entry is not None:  # named once, before the call: an erasure shreds its secret
            event = replace(event, nik_hash=entry.nik_hash)
        return await self._record(event, method.durable)

    async def _entry(self, method: _Method, request: Any, identity: str, peer: str,
                     rid: str) -> AuditEntry:
        """The audit entry of a state change, its NIK named by its pseudonym (read
        from the registry, off the event loop).

        Raises:
            RegistryUnavailable: the registry, which holds the pseudonyms' secrets,
                cannot be reached now.
            AuditUnavailable: the pseudonym cannot be had otherwise (counted).
        """
        assert self.audit is not None
        nik = _nik(request)
        try:
            name = await asyncio.to_thread(self.audit.name, nik) if nik else None
        except RequestError:  # the shared registry out of reach: said as such
            raise
        except Exception as exc:
            log.error("audit: no pseudonym for a %s call's NIK: %s", method.name, exc)
            self.metrics.audit_failures.labels("record").inc()
            raise AuditUnavailable("the audit log cannot name this call's NIK now, so this "
                                   "call is not answered; retry shortly") from exc
        return AuditEntry(method.name, identity, peer, rid, name or "", self.audit.origin)

    async def _record(self, event: Event, durable: bool) -> AuditUnavailable | None:
        if self.audit is None:
            return None
        try:
            await self.audit.record(event, durable)
        except AuditDown:
            self.metrics.audit_failures.labels("record").inc()
            return AuditUnavailable("the audit log cannot be written now, so this call is "
                                    "not answered; retry shortly")
        return None

    async def _identify(self, method: _Method, request: Any,
                        context: grpc.aio.ServicerContext, rid: str) -> Client | None:
        """The caller (None for the open services), allowed to make this call now.

        Raises:
            Unauthenticated, PermissionDenied, RateLimited: logged, counted, audited
            (an unidentified caller's refusals are aggregated per peer, see
            :meth:`server.api.audit.AuditLog.refusal`).
        """
        if method.open:
            return None
        identity = "-"
        try:
            client = self.access.identify(_auth_context(context),
                                          context.invocation_metadata() or ())
            identity = client.name
            if method.name in RPCS:
                await self.access.authorize(client, method.name)
            elif ADMIN not in client.roles:
                raise PermissionDenied(f"{client.name} may not call {method.name} (only the "
                                       "admin role may)", method=method.name)
        except (Unauthenticated, PermissionDenied, RateLimited) as exc:
            self.metrics.refused.labels(method.name, exc.reason).inc()
            peer = context.peer() or ""
            presented = getattr(exc, "presented", "")
            if self.refusal_log.due():
                self.log_refusals()
            if self.refusal_log.note((source_of(peer), identity, method.name, exc.reason),
                                     presented):
                log.warning("refused %s from %s (%s): %s", method.name, identity, peer,
                            exc.reason)
            else:
                self.metrics.refusals_summarised.labels("log").inc()
            if self.audit is not None:
                event = Event(method.name, identity, peer, rid, code_of(exc).name, exc.reason,
                              "", _nik(request), presented)
                try:
                    if not await self.audit.refusal(event):
                        self.metrics.refusals_summarised.labels("audit").inc()
                except AuditDown:
                    self.metrics.audit_failures.labels("record").inc()
            raise
        return client

    def log_refusals(self) -> None:
        """One log line for each source, identity, method and reason whose refusals
        went over the allowance in the interval that ended (called as refusals come,
        by the server's periodic task and at its stop)."""
        for (source, identity, method, reason), t in self.refusal_log.take():
            log.warning("refused %d calls of %s from %s (%s) since %s: %s; the first %d "
                        "logged one by one", t.count, method, identity, source, t.since, reason,
                        self.refusal_log.per_key)

    async def _charge(self, method: _Method, response: Any) -> None:
        """Charge a response's listed NIKs past the first to the caller's rate."""
        charged = RPCS[method.name].charged if method.name in RPCS else ""
        client = caller_var.get()
        if charged and client is not None:
            await self.access.charge(client, len(getattr(response, charged)) - 1)

    def _admit(self, method: _Method, request: Any) -> None:
        """Raises Overloaded beyond ``max_in_flight``, RequestTooLarge or
        InvalidRequest for a message that did not parse."""
        if self.max_in_flight and self._in_flight > self.max_in_flight:
            raise Overloaded(f"more than {self.max_in_flight} calls in flight; "
                             "retry with backoff", limit="max_concurrent_rpcs")
        if isinstance(request, Unparsed):
            raise Overloaded(f"the messages of the calls in flight hold {self.messages.used} "
                             f"bytes: this one's {request.size} would pass the limit of "
                             f"{self.messages.capacity}; retry with backoff",
                             limit="messages_in_flight_bytes")
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
        self.answered += 1
        self.metrics.requests.labels(method.name, code.name).inc()
        method.latency.observe(time.perf_counter() - start)


def _nik(request: Any) -> str:
    nik = getattr(request, "nik", "") if not isinstance(request, Malformed) else ""
    return nik if isinstance(nik, str) else ""


def _outcome(response: Any) -> str:
    """A response's outcome as its enum name (``ENROLLED``), if it has one."""
    value = getattr(response, "outcome", None)
    if value is None or isinstance(value, str):
        return value or ""
    field = response.DESCRIPTOR.fields_by_name["outcome"]
    enum = field.enum_type
    return enum.values_by_number[value].name if enum is not None else str(value)
