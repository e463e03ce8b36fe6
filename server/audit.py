"""The audit trail: an append-only, tamper-evident record of who did what.

One JSON line per audited call: every enrolment, erasure, review decision,
lookup of personal data (GetEnrollment, Search), and every call refused by
access control.  A record holds who (the policy identity and the peer address),
what (the RPC and its outcome), when, and the request id; never an image, an
embedding or a NIK in clear.  A NIK appears only as a keyed hash
(:meth:`AuditKey.nik`), so an auditor holding the key can find a person's
records and nobody else can read them.

Each record carries the MAC of the one before and its own MAC over both
(HMAC-SHA256 with the audit key): changing, removing or reordering any record
breaks the chain from there on, and without the key the chain cannot be
rewritten.  ``faceverify audit verify`` checks it.  Several server processes
append to one file under an exclusive file lock, each reading the last record
before writing the next.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from index.durable import private_file
from server.errors import ConfigurationError
from server.rpcs import DURABLE

AUDIT_FILE = "audit.log"
KEY_FILE = "audit.key"
GENESIS = "0" * 64


class AuditKey:
    """The secret behind the chain's MACs and the NIKs' keyed hashes."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ConfigurationError("the audit key must be at least 32 bytes")
        self.key = key

    @classmethod
    def load(cls, path: Path, create: bool) -> AuditKey:
        """The key in ``path``; a new random one written there (0600) when ``create``
        and the file does not exist."""
        if create and not path.exists():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process made it first
                pass
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_bytes(32))
                    f.flush()
                    os.fsync(f.fileno())
        try:
            return cls(path.read_bytes())
        except OSError as exc:
            raise ConfigurationError(f"cannot read the audit key {path}: {exc.strerror}") from exc

    def nik(self, nik: str) -> str:
        return hmac.new(self.key, b"nik:" + nik.encode(), hashlib.sha256).hexdigest()[:32]

    def mac(self, prev: str, body: bytes) -> str:
        return hmac.new(self.key, prev.encode() + b"\n" + body, hashlib.sha256).hexdigest()


def _body(record: dict[str, Any]) -> bytes:
    fields = {k: v for k, v in record.items() if k != "mac"}
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _last_line(f: BinaryIO) -> bytes:
    f.seek(0, os.SEEK_END)
    end = f.tell()
    pos, tail = end, b""
    while pos > 0:
        step = min(4096, pos)
        pos -= step
        f.seek(pos)
        tail = f.read(step) + tail
        lines = tail.rstrip(b"\n").split(b"\n")
        if len(lines) > 1 or pos == 0:
            return lines[-1]
    return b""


@dataclass(frozen=True)
class Event:
    """One audited call, as the interceptor saw it."""

    method: str
    identity: str
    peer: str
    request_id: str
    code: str
    reason: str
    outcome: str = ""
    nik: str = ""


class AuditLog:
    """Appends events to ``path`` (see the module docstring).  Writes run on one
    thread of their own so that the event loop never waits for the disk."""

    def __init__(self, path: Path, key: AuditKey) -> None:
        self.path = path
        self.key = key
        private_file(path)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="audit")

    def _append(self, event: Event, durable: bool) -> None:
        with open(self.path, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                last = _last_line(f)
                prev: dict[str, Any] = (json.loads(last) if last
                                        else {"seq": 0, "mac": GENESIS})
                record: dict[str, Any] = {
                    "seq": prev["seq"] + 1,
                    "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                    "method": event.method, "identity": event.identity, "peer": event.peer,
                    "request_id": event.request_id, "code": event.code, "reason": event.reason,
                    "prev": prev["mac"],
                }
                if event.outcome:
                    record["outcome"] = event.outcome
                if event.nik:
                    record["nik_hash"] = self.key.nik(event.nik)
                record["mac"] = self.key.mac(prev["mac"], _body(record))
                f.seek(0, os.SEEK_END)
                f.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    async def record(self, event: Event) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._pool, self._append, event, event.method in DURABLE)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass(frozen=True)
class ChainReport:
    records: int
    broken_at: int | None  # line number (1-based) of the first bad record
    why: str = ""


def read_records(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line.rstrip(b"\n")


def verify_chain(path: Path, key: AuditKey) -> ChainReport:
    """Check every record's MAC and its link to the one before."""
    prev, seq, count = GENESIS, 0, 0
    for n, line in read_records(path):
        try:
            record = json.loads(line)
            ok_shape = isinstance(record, dict) and "mac" in record
        except ValueError:
            ok_shape = False
        if not ok_shape:
            return ChainReport(count, n, "not a record")
        if record.get("prev") != prev:
            return ChainReport(count, n, "does not follow the record before it")
        if record.get("seq") != seq + 1:
            return ChainReport(count, n, f"sequence {record.get('seq')} after {seq}")
        if not hmac.compare_digest(record["mac"], key.mac(prev, _body(record))):
            return ChainReport(count, n, "MAC does not match its contents (altered, or "
                                         "another key)")
        prev, seq, count = record["mac"], record["seq"], count + 1
    return ChainReport(count, None)


def find_nik(path: Path, key: AuditKey, nik: str) -> list[dict[str, Any]]:
    """Every record about ``nik``."""
    digest = key.nik(nik)
    out = []
    for _, line in read_records(path):
        record = json.loads(line)
        if record.get("nik_hash") == digest:
            out.append(record)
    return out
