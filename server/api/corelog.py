"""gRPC core's own log lines, with refused TLS handshakes summarised.

gRPC core (C++) writes straight to the process's standard error, one line for
every TLS handshake it refuses: a client without a certificate under mutual TLS,
a plaintext client on a TLS port, a certificate from another CA.  A scanner or a
misconfigured client retrying every second fills the log with them.
:class:`CoreLog` takes over file descriptor 2 while the server runs: those lines
are counted by what went wrong (``PEER_DID_NOT_RETURN_A_CERTIFICATE``,
``WRONG_VERSION_NUMBER``, ...) and logged as one line per interval; every other
line passes through unchanged.  gRPC core's line names no peer address, so the
count is per kind of failure, not per client.
"""

from __future__ import annotations

import logging
import os
import re
import select
import sys
import threading
import time
from collections import Counter
from typing import TextIO

log = logging.getLogger(__name__)

# I1207 06:54:55.606364 6465 ssl_transport_security.cc:2563] Handshake failed with error
# SSL_ERROR_SSL: error:100000c0:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE: ...
_HANDSHAKE = re.compile(r"\] Handshake failed with (?:fatal )?error (\w+)(?:: error:[0-9a-f]+:"
                        r"[^:]*:[^:]*:(\w+))?")


def refused_handshake(line: str) -> str | None:
    """What went wrong, where *line* is gRPC core's line for a refused TLS handshake."""
    found = _HANDSHAKE.search(line)
    if found is None:
        return None
    return found.group(2) or found.group(1)


class CoreLog:
    """Standard error (fd 2) through a pipe read by one thread, refused TLS handshakes
    counted and summarised every ``every`` seconds (and at :meth:`stop`).

    Python's own logging keeps writing to the real standard error directly (the
    handlers' streams are moved to it), so nothing of ours waits on the thread.
    """

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._since = time.monotonic()
        self._saved = -1
        self._thread: threading.Thread | None = None
        self._stream: TextIO | None = None

    def start(self) -> None:
        sys.stderr.flush()
        self._saved = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self._stream = open(self._saved, "w", buffering=1, closefd=False)  # noqa: SIM115
        self._move_handlers(sys.stderr, self._stream)
        sys.stderr = self._stream
        self._thread = threading.Thread(target=self._pump, args=(read,), daemon=True,
                                        name="grpc-core-log")
        self._thread.start()

    def stop(self) -> None:
        """Restore standard error and log what is still counted."""
        if self._thread is None:
            return
        assert self._stream is not None
        # The pipe's only writer is fd 2: pointing it back ends the thread's input.
        os.dup2(self._saved, 2)
        self._thread.join(timeout=5)
        self._thread = None
        self._summarise()
        restored = sys.__stderr__
        assert restored is not None
        sys.stderr = restored
        self._move_handlers(self._stream, restored)
        self._stream.close()
        os.close(self._saved)

    @staticmethod
    def _move_handlers(old: TextIO, new: TextIO) -> None:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                handler.setStream(new)

    def _pump(self, read: int) -> None:
        pending = b""
        try:
            while True:
                # Wakes at least once an interval, so a burst is reported when it ends.
                ready, _, _ = select.select([read], [], [], self.every)
                if ready:
                    chunk = os.read(read, 65536)
                    if not chunk:
                        break
                    lines = (pending + chunk).split(b"\n")
                    pending = lines.pop()
                    self._take(lines)
                if time.monotonic() - self._since >= self.every:
                    self._summarise()
            if pending:
                self._take([pending])
        finally:
            os.close(read)

    def _take(self, lines: list[bytes]) -> None:
        passed = []
        for line in lines:
            reason = refused_handshake(line.decode("utf-8", "replace"))
            if reason is None:
                passed.append(line + b"\n")
            else:
                with self._lock:
                    self._counts[reason] += 1
        data = memoryview(b"".join(passed))
        while data:
            data = data[os.write(self._saved, data):]

    def _summarise(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, Counter()
            seconds, self._since = time.monotonic() - self._since, time.monotonic()
        if counts:
            log.warning("refused %d TLS handshakes in the last %.0f s: %s (gRPC core's "
                        "line for each is summarised here)", sum(counts.values()), seconds,
                        ", ".join(f"{reason} x{n}" for reason, n in counts.most_common()))
