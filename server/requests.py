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

from server.batching import deadline_var
from server.errors import DOMAIN, InternalError, InvalidRequest, RequestError
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
    status = status_pb2.Status(code=getattr(code_pb2, error.code.name),
                               message=f"{error.reason}: {error.message}", details=[detail])
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


def lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """``deserialize``, returning :class:`Malformed` instead of raising."""
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data) if deserialize is not None else data
        except Exception as exc:  # protobuf's DecodeError, invalid UTF-8 in a string
            return Malformed(type(exc).__name__)
    return parse


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Assigns request ids, maps exceptions to statuses and counts unary RPCs.

    ``RequestError`` -> its code and reason.  Anything else -> ``INTERNAL``
    with a generic message; the stack trace is logged under the request id.
    Every call of this service is counted by method and status code and timed;
    its deadline, if any, is published in :data:`server.batching.deadline_var`
    so that work queued for it is dropped once nobody waits for the answer.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

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
        latency = self.metrics.latency.labels(name)

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = request_id_var.set("-")
            remaining = context.time_remaining()
            deadline = deadline_var.set(None if remaining is None
                                        else time.monotonic() + remaining)
            start = time.perf_counter()
            self.metrics.in_flight.inc()

            def answered(code: grpc.StatusCode) -> None:
                # Counted before the status is sent, so a caller that then
                # scrapes the metrics sees its own call.
                self.metrics.in_flight.dec()
                self.metrics.requests.labels(name, code.name).inc()
                latency.observe(time.perf_counter() - start)

            try:
                try:
                    if isinstance(request, Malformed):
                        log.warning("malformed %s request (%s)", name, request.why)
                        raise InvalidRequest(f"the request is not a valid {name} message "
                                             f"({request.why}); check the client's .proto",
                                             field="message")
                    rid = _request_id(request, context)
                except InvalidRequest as exc:
                    status = status_for(exc, "-")
                    answered(exc.code)
                    await context.abort(status.code, status.details, status.trailing_metadata)
                request_id_var.set(rid)
                context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
                try:
                    response = await inner(request, context)
                except RequestError as exc:
                    status, code = status_for(exc, rid), exc.code
                except asyncio.CancelledError:
                    answered(grpc.StatusCode.CANCELLED)
                    raise
                except Exception:
                    log.exception("unhandled error in %s", method)
                    status = status_for(InternalError("internal error; quote the request id "
                                                      "to the operator"), rid)
                    code = grpc.StatusCode.INTERNAL
                else:
                    answered(grpc.StatusCode.OK)
                    return response
                answered(code)
                await context.abort(status.code, status.details,
                                    (*status.trailing_metadata, (REQUEST_ID_HEADER, rid)))
            finally:
                deadline_var.reset(deadline)
                request_id_var.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            wrapper,
            request_deserializer=lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
