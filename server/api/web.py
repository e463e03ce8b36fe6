"""The reference capture page and the gRPC-web gateway that lets it call the server.

    faceverify web --target localhost:50051 --port 8080 [--files DIR]

A browser cannot speak gRPC (HTTP/2 trailers); it speaks gRPC-web, as the
grpc-web JavaScript client and Envoy's ``grpc_web`` filter do.  This gateway
takes unary gRPC-web calls (``application/grpc-web+proto``: a length-prefixed
message in, the message and a trailers frame out) for the methods the capture
page needs, forwards their bytes unchanged to the faceverify server over gRPC
(plaintext or TLS, an API key or the caller's ``authorization`` header), and
answers with the server's status in the trailers (``grpc-status``,
``grpc-message``, ``grpc-status-details-bin``: the ``ErrorInfo`` reason).  It
also serves the page (``server/web/``) and, with ``--files``, a folder of
sample photos at ``/files/`` (a reference to verify against).  It is for app
developers and testers; in production the app's backend calls faceverify
with the reference it holds (docs/presentation-attacks.md).
"""

from __future__ import annotations

import base64
import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import grpc

from server.api.tls import ClientTls, channel

log = logging.getLogger(__name__)

SERVICE = "/faceverify.v1.FaceVerification/"
METHODS = frozenset({"StartLiveness", "Verify", "Enroll", "GetServerInfo"})
PAGE = Path(__file__).resolve().parent.parent / "web"
MAX_BODY = 32 << 20  # sixteen 1 MiB frames and a 10 MiB reference, with room
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
         ".png": "image/png", ".webp": "image/webp"}


@dataclass(frozen=True)
class Relayed:
    """One call the gateway relayed: for its log, and for whoever observes it."""

    method: str
    code: grpc.StatusCode
    response: bytes  # the response message (empty on an error)


def frame(flags: int, payload: bytes) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def unframe(body: bytes) -> bytes:
    """The one message of a unary gRPC-web request body.

    Raises:
        ValueError: not one uncompressed, length-prefixed message.
    """
    if len(body) < 5:
        raise ValueError("a gRPC-web body starts with a 5-byte frame header")
    flags, length = struct.unpack(">BI", body[:5])
    if flags != 0 or len(body) != 5 + length:
        raise ValueError("one uncompressed message frame expected")
    return body[5:]


def percent_encoded(message: str) -> str:
    """``grpc-message`` as the gRPC protocol writes it: printable ASCII but ``%`` as
    it is, every other byte of the UTF-8 as ``%XX``."""
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}"
                   for b in message.encode())


def trailers(code: grpc.StatusCode, message: str = "", details: bytes = b"") -> bytes:
    lines = [f"grpc-status:{code.value[0]}", f"grpc-message:{percent_encoded(message)}"]
    if details:
        lines.append("grpc-status-details-bin:" + base64.b64encode(details).decode())
    return frame(0x80, ("\r\n".join(lines) + "\r\n").encode())


class Gateway:
    """Forwards gRPC-web calls to ``target``; serves the page and ``files``.

    Args:
        observe: called with each relayed call, before its answer goes back.
    """

    def __init__(self, target: str, tls: ClientTls | None = None, api_key: str | None = None,
                 files: Path | None = None, host: str = "127.0.0.1", port: int = 8080,
                 observe: Callable[[Relayed], None] | None = None) -> None:
        self.channel = channel(target, tls, [("grpc.max_send_message_length", MAX_BODY)])
        self.api_key = api_key
        self.files = files.resolve() if files else None
        self.observe = observe
        self.http = ThreadingHTTPServer((host, port), self._handler())
        self.http.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.http.server_address[1])

    def call(self, method: str, request: bytes, authorization: str | None
             ) -> tuple[grpc.StatusCode, bytes, str, bytes]:
        """The server's answer to ``method``: its status, the response message (on
        OK), the status message and the rich status details (on an error)."""
        metadata = []
        if self.api_key:
            metadata.append(("authorization", f"Bearer {self.api_key}"))
        elif authorization:
            metadata.append(("authorization", authorization))
        stub = self.channel.unary_unary(SERVICE + method)  # bytes in, bytes out
        try:
            response = stub(request, metadata=metadata, timeout=60)
        except grpc.RpcError as e:
            assert isinstance(e, grpc.Call)
            details = b""
            for key, value in e.trailing_metadata() or ():
                if key == "grpc-status-details-bin" and isinstance(value, bytes):
                    details = value
            return e.code(), b"", e.details() or "", details
        return grpc.StatusCode.OK, bytes(response), "", b""

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "faceverify-web"

            def log_message(self, format: str, *args: object) -> None:
                log.debug("%s %s", self.address_string(), format % args)

            def _send(self, status: int, body: bytes, kind: str,
                      headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = urlparse(self.path).path
                if path in ("/", "/index.html"):
                    path = "/capture.html"
                if path.startswith("/files/") and gateway.files is not None:
                    base, name = gateway.files, path[len("/files/"):]
                else:
                    base, name = PAGE, path.lstrip("/")
                target = (base / name).resolve()
                if not target.is_relative_to(base) or not target.is_file() \
                        or target.suffix not in TYPES:
                    self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
                    return
                self._send(HTTPStatus.OK, target.read_bytes(), TYPES[target.suffix])

            def do_POST(self) -> None:
                path = urlparse(self.path).path
                method = path[len(SERVICE):] if path.startswith(SERVICE) else ""
                kind = self.headers.get("Content-Type", "")
                length = int(self.headers.get("Content-Length") or 0)
                if method not in METHODS:
                    self._send(HTTPStatus.NOT_FOUND, b"not a method of this gateway\n",
                               "text/plain")
                    return
                if not kind.startswith("application/grpc-web") or kind.endswith("-text") \
                        or not 0 < length <= MAX_BODY:
                    self._send(HTTPStatus.UNSUPPORTED_MEDIA_TYPE if length else
                               HTTPStatus.BAD_REQUEST,
                               b"application/grpc-web+proto, one message, at most 32 MiB\n",
                               "text/plain")
                    return
                try:
                    request = unframe(self.rfile.read(length))
                except ValueError as e:
                    self._send(HTTPStatus.BAD_REQUEST, f"{e}\n".encode(), "text/plain")
                    return
                code, response, message, details = gateway.call(
                    method, request, self.headers.get("Authorization"))
                log.info("%s %s", method, code.name)
                if gateway.observe is not None:  # before the answer goes back
                    gateway.observe(Relayed(method, code, response))
                body = (frame(0, response) if code is grpc.StatusCode.OK else b"") + trailers(
                    code, message, details)
                self._send(HTTPStatus.OK, body, "application/grpc-web+proto")

        return Handler

    def start(self) -> Gateway:
        self._thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.http.serve_forever()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.channel.close()
