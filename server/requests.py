"""Per-request plumbing: request ids and the one place errors become gRPC statuses."""

from __future__ import annotations

import contextvars
import inspect
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.errors import DOMAIN, InternalError, InvalidRequest, RequestError

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


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Assigns request ids and maps exceptions to statuses for unary RPCs.

    ``RequestError`` -> its code and reason.  Anything else -> ``INTERNAL``
    with a generic message; the stack trace is logged under the request id.
    """

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

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = request_id_var.set("-")
            try:
                try:
                    rid = _request_id(request, context)
                except InvalidRequest as exc:
                    status = status_for(exc, "-")
                    await context.abort(status.code, status.details, status.trailing_metadata)
                request_id_var.set(rid)
                context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
                try:
                    return await inner(request, context)
                except RequestError as exc:
                    status = status_for(exc, rid)
                except Exception:
                    log.exception("unhandled error in %s", method)
                    status = status_for(InternalError("internal error; quote the request id "
                                                      "to the operator"), rid)
                await context.abort(status.code, status.details,
                                    (*status.trailing_metadata, (REQUEST_ID_HEADER, rid)))
            finally:
                request_id_var.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            wrapper,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
