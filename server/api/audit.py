"""The audit trail: an append-only, tamper-evident record of who did what.

One JSON line per audited call: every enrolment, erasure, review decision,
lookup of personal data (GetEnrollment, Search), and the calls refused by
access control (the first ten of each source address, identity, method and
reason a minute one by one, the rest as one count: :mod:`server.api.refusals`).
A record holds who (the policy identity, or what an unknown
caller presented, and the peer address), what (the RPC and its outcome), when,
and the request id; never an image, an embedding or a NIK in clear.  A NIK
appears only as its pseudonym (:meth:`AuditLog.name`): a keyed hash with a
secret of the NIK's own, kept in the registry, so that an auditor holding the
audit key and the registry can find a living person's records, nobody else can
read them, and once the NIK is erased (its secret destroyed) nobody can link
them to it again.

Part of the transaction.  The record of a state change is written by the
registry in the change's own transaction (:class:`index.registry.AuditEntry`)
and exported from there into this log (``kind: change``): no change commits
without its record, and no record claims a change that did not commit.  A
change whose export failed (a full disk, a crash) stays in the registry and is
exported at the next append and at start-up.  A lookup (GetEnrollment, Search)
whose record cannot be written is not answered (``AUDIT_UNAVAILABLE``).

Tamper evidence, three layers:

* Each record carries ``prev``, the MAC of the one before, and ``mac``, its
  own HMAC-SHA256 over both with the audit key: without the key no record
  can be changed, removed or reordered unseen.
* ``hash`` chains the records with plain SHA-256: anyone can recompute it.
* Signed checkpoints (``audit.checkpoints``): every :data:`CHECKPOINT_RECORDS`
  records or :data:`CHECKPOINT_SECONDS` seconds, the count and the head's
  ``hash``, signed with an Ed25519 key whose private half may live off the
  data volume (``--audit-signing-key-file``).  The public key is all
  ``faceverify audit verify`` needs to find records missing or rewritten up to
  the last checkpoint, as Certificate Transparency's signed tree heads or
  CloudTrail's digest files do; records after it are reported as not covered.
* The head anchored outside both files: the registry holds the last record's
  sequence number and hash (:meth:`index.registry.Registry.audit_anchor`),
  moved forward as each change's record is exported and at every checkpoint
  (the log synced to disk first), never back.  The log and its checkpoints cut
  back together (or emptied) vouch for each other, but no longer reach the
  registry's head: found at start (health ``NOT_SERVING``, an error logged, the
  anchor held where it was) and by ``faceverify audit verify``.

Records are read strictly: a duplicated key, an unknown field, a wrong type or a
line not in canonical form is not a record.  A damaged tail (a torn last line, a
file cut short) is found when the log is opened and at each append: the bytes
are set aside in a file beside it, and a ``damaged`` record chains over the
gap saying what was found.  Several server processes append to one file under
an exclusive file lock, each catching up with the others' records first.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from index.durable import check_private, private_file
from index.errors import RegistryUnavailable
from index.registry import Registry
from server import strict
from server.api.refusals import Tally, source_of
from server.core.nik import validate_nik
from server.errors import ConfigurationError, InvalidNik

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.log"
KEY_FILE = "audit.key"
CHECKPOINT_FILE = "audit.checkpoints"
SIGNING_KEY_FILE = "audit-signing.key"
PUBLIC_KEY_FILE = "audit-signing.pub"
ORIGIN_FILE = "audit.origin"
GENESIS = "0" * 64
CHECKPOINT_RECORDS = 100
CHECKPOINT_SECONDS = 10.0
# Consecutive failures of the audit path after which health turns NOT_SERVING.
UNHEALTHY_AFTER = 3

# Every field a record may have, with its type, by kind (``kind`` and the
# chain's fields aside).  Anything else is not a record.
_CHAIN: dict[str, type] = {"seq": int, "time": str, "kind": str, "prev": str, "mac": str,
                           "hash": str}
_CALL: dict[str, type] = {"method": str, "identity": str, "peer": str, "request_id": str,
                          "code": str, "reason": str}
KINDS: dict[str, tuple[dict[str, type], dict[str, type]]] = {
    # kind: (required fields, optional fields)
    "call": (_CALL, {"outcome": str, "nik_hash": str, "presented": str}),
    "change": ({**_CALL, "outcome": str, "outbox": int, "committed": str},
               {"nik_hash": str}),
    # peer: the source address (no port); identity "-" for a caller without one
    "refusals": ({"peer": str, "method": str, "reason": str, "count": int, "since": str},
                 {"presented": str, "identity": str}),
    "damaged": ({"bytes": int, "sha256": str, "set_aside": str, "missing": int}, {}),
}


class AuditUnavailable(Exception):
    """The audit log cannot be written now (the caller answers AUDIT_UNAVAILABLE)."""


class AuditKey:
    """The secret behind the chain's MACs (and the NIKs' names in records written
    before pseudonyms, :meth:`AuditLog.name`)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ConfigurationError("the audit key must be at least 32 bytes")
        self.key = key

    @classmethod
    def load(cls, path: Path, create: bool) -> AuditKey:
        """The key in ``path``; a new random one written there (0600) when ``create``
        and the file does not exist.

        Raises:
            ConfigurationError: unreadable, or writable by others (see
                :func:`server.control.check_private`).
        """
        if create and not path.exists():
            _create_private(path, secrets.token_bytes(32))
        check_private(path, "the audit key")
        try:
            return cls(path.read_bytes())
        except OSError as exc:
            raise ConfigurationError(f"cannot read the audit key {path}: {exc.strerror}") from exc

    def nik(self, nik: str) -> str:
        return hmac.new(self.key, b"nik:" + nik.encode(), hashlib.sha256).hexdigest()[:32]

    def mac(self, prev: str, body: bytes) -> str:
        return hmac.new(self.key, prev.encode() + b"\n" + body, hashlib.sha256).hexdigest()


def _create_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new 0600 file (no-op if another process made it first)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class SigningKey:
    """The Ed25519 key that signs checkpoints (private half) or checks them (public)."""

    def __init__(self, private: Ed25519PrivateKey | None, public: Ed25519PublicKey) -> None:
        self.private = private
        self.public = public
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = hashlib.sha256(raw).hexdigest()[:16]

    @classmethod
    def load(cls, path: Path, create: bool, public_out: Path | None = None) -> SigningKey:
        """The private key in ``path`` (PEM, PKCS#8); a new one made there when
        ``create`` and missing, its public half written to ``public_out``.

        Raises:
            ConfigurationError: unreadable, not an Ed25519 key, or writable by others.
        """
        if create and not path.exists():
            new = Ed25519PrivateKey.generate()
            _create_private(path, new.private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
        check_private(path, "the audit signing key")
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigurationError(f"cannot read the audit signing key {path}: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigurationError(f"{path} is not an Ed25519 private key")
        signing = cls(key, key.public_key())
        if public_out is not None and not public_out.exists():
            public_out.write_bytes(signing.public_pem())
        return signing

    @classmethod
    def load_public(cls, path: Path) -> SigningKey:
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read the audit public key {path}: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigurationError(f"{path} is not an Ed25519 public key")
        return cls(None, key)

    def public_pem(self) -> bytes:
        return self.public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, message: bytes) -> str:
        assert self.private is not None
        return base64.b64encode(self.private.sign(message)).decode()

    def verify(self, message: bytes, signature: str) -> bool:
        try:
            self.public.verify(base64.b64decode(signature, validate=True), message)
        except (InvalidSignature, ValueError):
            return False
        return True


# -- the record format ---------------------------------------------------------------------


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _body(record: dict[str, Any]) -> bytes:
    """What ``mac`` covers: every field but ``mac`` and ``hash``."""
    return _canonical({k: v for k, v in record.items() if k not in ("mac", "hash")})


def _hash(prev_hash: str, record: dict[str, Any]) -> str:
    """What ``hash`` is: SHA-256 over the previous hash and every other field."""
    fields = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(prev_hash.encode() + b"\n" + _canonical(fields)).hexdigest()


def parse_record(line: bytes) -> dict[str, Any]:
    """One record, read strictly.

    Raises:
        ValueError: not JSON, a duplicated key, a field unknown for its kind or
            of the wrong type, or a line that is not the record's canonical form.
    """
    record = strict.loads(line)
    if not isinstance(record, dict):
        raise ValueError("not an object")
    kind = record.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    required, optional = KINDS[kind]
    allowed = {**_CHAIN, **required, **optional}
    unknown = set(record) - set(allowed)
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    missing = set(_CHAIN) | set(required)
    missing -= set(record)
    if missing:
        raise ValueError(f"missing fields {sorted(missing)}")
    for k, v in record.items():
        want = allowed[k]
        if type(v) is not want:  # bool is not int here
            raise ValueError(f"{k} is not {want.__name__}")
    if _canonical(record) != line:
        raise ValueError("not in canonical form")
    return record


@dataclass
class Head:
    """The last record of the chain (genesis: seq 0)."""

    seq: int = 0
    mac: str = GENESIS
    hash: str = GENESIS

    @classmethod
    def of(cls, record: dict[str, Any]) -> Head:
        return cls(record["seq"], record["mac"], record["hash"])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _checkpoint_message(seq: int, head_hash: str, at: str, key_id: str) -> bytes:
    return _canonical({"seq": seq, "hash": head_hash, "time": at, "key_id": key_id})


# -- writing -------------------------------------------------------------------------------


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
    presented: str = ""  # what an unidentified caller presented (CN, key hash prefix)
    nik_hash: str = ""  # the NIK's pseudonym, where the interceptor took it already


@dataclass
class _Health:
    failures: int = 0
    healthy: bool = True
    listeners: list[Callable[[bool], None]] = field(default_factory=list)


class AuditLog:
    """Appends records to ``path`` (see the module docstring).  Writes run on one
    thread of their own so that the event loop never waits for the disk.

    Args:
        registry: where committed changes' records wait to be exported.
        signing: the checkpoint key (its private half).
        refusals_per_source: refused calls recorded one by one per source address,
            identity, method and reason in each ``refusal_interval``
            (:mod:`server.api.refusals`); beyond that they are counted and written
            as one ``refusals`` record at the interval's end.
    """

    def __init__(self, path: Path, key: AuditKey, signing: SigningKey, origin: str,
                 registry: Registry | None = None, checkpoint_records: int = CHECKPOINT_RECORDS,
                 checkpoint_seconds: float = CHECKPOINT_SECONDS, refusals_per_source: int = 10,
                 refusal_interval: float = 60.0, on_damage: Callable[[], None] = lambda: None
                 ) -> None:
        self.path = path
        self.checkpoint_path = path.with_name(CHECKPOINT_FILE)
        self.key = key
        self.signing = signing
        self.origin = origin
        self.registry = registry
        self.checkpoint_records = checkpoint_records
        self.checkpoint_seconds = checkpoint_seconds
        self.on_damage = on_damage
        private_file(path)
        private_file(self.checkpoint_path)
        # Unbuffered: reads see what other processes appended, writes go straight out.
        self._file: BinaryIO = open(path, "r+b", buffering=0)  # noqa: SIM115 - held for the log's life
        self._inode = os.fstat(self._file.fileno()).st_ino
        self._offset = 0  # bytes of the file read and found to be records
        self._head = Head()
        self._checkpointed = 0  # seq of the last checkpoint, any process's
        self._checkpointed_at = 0.0
        self._outbox_done: int | None = None  # highest outbox id in the log (None: not read)
        self._anchored = 0  # seq of the head last held in the registry
        self._anchored_at = time.time()
        self.rolled_back: str | None = None  # what the registry's head says is missing
        self._refusals = Tally(refusals_per_source, refusal_interval)
        self._health = _Health()
        self._mutex = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="audit")
        with self._locked():
            self._read_checkpoint_tail()
            self._open_tail()

    # -- state shared with other processes ---------------------------------------------

    def _locked(self) -> _FileLocked:
        return _FileLocked(self._file, self._mutex)

    def _open_tail(self) -> None:
        """At open: the last valid record is the head; anything after it is set aside.

        Raises:
            ConfigurationError: the last two records do not verify with this audit
                key (the wrong key, rather than a damaged tail).
        """
        f = self._file
        end = f.seek(0, os.SEEK_END)
        pos, refuted = 0, 0
        for start, line in _lines_backwards(f, end):
            try:
                record = parse_record(line)
            except ValueError as exc:
                log.error("audit log %s: the line at byte %d is not a record (%s)",
                          self.path, start, exc)
                continue
            if not hmac.compare_digest(record["mac"],
                                       self.key.mac(record["prev"], _body(record))):
                refuted += 1
                if refuted >= 2:
                    raise ConfigurationError(
                        f"the audit log {self.path} does not verify with the configured audit "
                        "key (the wrong key?); `faceverify audit verify` tells more")
                continue
            self._head = Head.of(record)
            pos = start + len(line)
            if pos == end:  # a valid record whose newline was lost
                f.seek(end)
                f.write(b"\n")
                f.flush()
                end += 1
            pos += 1
            break
        self._offset = pos
        if pos < end:
            self._set_aside(pos, end, missing=0)

    def _catch_up(self) -> None:
        """Read what other processes appended since we last looked (the lock held);
        set aside what does not follow the chain."""
        f = self._file
        st = os.fstat(f.fileno())
        if st.st_ino != self._inode or Path(self.path).stat().st_ino != self._inode:
            raise AuditUnavailable(f"{self.path} was replaced while the server ran")
        end = st.st_size
        if end == self._offset:
            return
        if end < self._offset:  # cut short under us: what we had seen is gone
            seen = self._head.seq
            log.error("audit log %s shrank from %d to %d bytes while the server ran",
                      self.path, self._offset, end)
            self._head = Head()
            self._open_tail()
            if self._offset == end:  # _open_tail set nothing aside: record the gap
                self._write_damaged(b"", missing=seen - self._head.seq)
            return
        f.seek(self._offset)
        data = f.read(end - self._offset)
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            line = data[pos:nl]
            try:
                record = parse_record(line)
                self._check_follows(record)
            except ValueError as exc:
                log.error("audit log %s: bytes appended at %d do not follow the chain (%s)",
                          self.path, self._offset + pos, exc)
                break
            self._learn(record)
            pos = nl + 1
        self._offset += pos
        if self._offset < end:
            self._set_aside(self._offset, end, missing=0)

    def _check_follows(self, record: dict[str, Any]) -> None:
        if record["seq"] != self._head.seq + 1 or record["prev"] != self._head.mac:
            raise ValueError(f"sequence {record['seq']} does not follow {self._head.seq}")
        if record["hash"] != _hash(self._head.hash, record):
            raise ValueError("hash does not match")
        if not hmac.compare_digest(record["mac"], self.key.mac(record["prev"], _body(record))):
            raise ValueError("MAC does not match")

    def _learn(self, record: dict[str, Any]) -> None:
        self._head = Head.of(record)
        if record["kind"] == "change" and self._outbox_done is not None:
            self._outbox_done = max(self._outbox_done, record["outbox"])

    def _set_aside(self, start: int, end: int, missing: int) -> None:
        """Move bytes ``start:end`` of the log to a file beside it, cut them off, and
        chain a ``damaged`` record over them."""
        f = self._file
        f.seek(start)
        data = f.read(end - start)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        _create_private(aside, data)
        f.truncate(start)
        os.fsync(f.fileno())
        self._offset = start
        log.error("audit log %s: %d bytes after record %d were not valid records; set aside "
                  "in %s", self.path, len(data), self._head.seq, aside.name)
        self.on_damage()
        # Records a checkpoint signed that are gone with the damage.
        self._write_damaged(data, max(missing, self._checkpointed - self._head.seq),
                            aside.name)

    def _write_damaged(self, data: bytes, missing: int, aside: str = "") -> None:
        self._write([{"kind": "damaged", "bytes": len(data),
                      "sha256": hashlib.sha256(data).hexdigest(), "set_aside": aside,
                      "missing": missing}], durable=True)

    def _read_checkpoint_tail(self) -> None:
        with open(self.checkpoint_path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            for _, line in _lines_backwards(f, end):
                try:
                    cp = parse_checkpoint(line)
                except ValueError:
                    continue
                if cp["seq"] > self._checkpointed:
                    self._checkpointed = cp["seq"]
                    self._checkpointed_at = time.time()
                return

    # -- appending ----------------------------------------------------------------------

    def _write(self, records: list[dict[str, Any]], durable: bool) -> None:
        """Chain and append ``records`` (the lock held, caught up)."""
        out = []
        head = self._head
        for fields in records:
            record: dict[str, Any] = {"seq": head.seq + 1, "time": _now(), **fields,
                                      "prev": head.mac}
            record["mac"] = self.key.mac(head.mac, _body(record))
            record["hash"] = _hash(head.hash, record)
            line = _canonical(record)
            out.append(line + b"\n")
            head = Head.of(record)
        # At the end of what is known to be records, unbuffered: whatever part of a
        # failed write reached the file is a damaged tail for the next append, and
        # nothing is left in a buffer to land later.
        data = b"".join(out)
        fd = self._file.fileno()
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], self._offset + written)
        if durable:
            os.fsync(fd)
        self._offset += len(data)
        self._head = head
        for r in records:
            if r.get("kind") == "change" and self._outbox_done is not None:
                self._outbox_done = max(self._outbox_done, int(r["outbox"]))
        if head.seq - self._checkpointed >= self.checkpoint_records:
            self._checkpoint()
        if head.seq - self._anchored >= self.checkpoint_records:
            self._anchor()

    def _checkpoint(self) -> None:
        """Sign the head into the checkpoint file (the lock held)."""
        if self.signing.private is None or self._head.seq <= self._checkpointed:
            return
        at = _now()
        message = _checkpoint_message(self._head.seq, self._head.hash, at, self.signing.key_id)
        line = _canonical({"seq": self._head.seq, "hash": self._head.hash, "time": at,
                           "key_id": self.signing.key_id,
                           "signature": self.signing.sign(message)})
        with open(self.checkpoint_path, "ab") as f:
            f.write(line + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self._checkpointed = self._head.seq
        self._checkpointed_at = time.time()

    def _anchor(self) -> None:
        """Hold the head in the registry (the lock held), the log synced first: the
        registry never holds a head the disk could still lose.  Not while a
        rollback is found (the anchor is the evidence)."""
        if (self.registry is None or self.rolled_back is not None
                or self._head.seq <= self._anchored):
            return
        os.fsync(self._file.fileno())
        try:
            self.registry.audit_anchor(self.origin, self._head.seq, self._head.hash)
        except RegistryUnavailable:
            return  # held at the next chance
        self._anchored, self._anchored_at = self._head.seq, time.time()

    def _hash_at(self, seq: int) -> str | None:
        """The hash of record ``seq`` (read back from the end); None if none."""
        for _, line in _lines_backwards(self._file, self._offset):
            try:
                record = parse_record(line)
            except ValueError:
                continue
            if record["seq"] <= seq:
                return str(record["hash"]) if record["seq"] == seq else None
        return None

    def _check_anchor(self) -> None:
        """At open (the lock held): does the log still reach the head the registry
        holds?  If not it was rolled back (cut, emptied, or replaced by an older
        copy, checkpoints and all): :attr:`rolled_back` says so, health is
        unhealthy for good, and the anchor is no longer moved."""
        if self.registry is None:
            return
        try:
            anchored = self.registry.audit_head(self.origin)
        except RegistryUnavailable:
            log.warning("audit: the registry cannot be reached; the log's head is not checked "
                        "against it now")
            return
        if anchored is None:
            return
        problem = anchor_problem(anchored, self._hash_at(anchored[0]), self._head.seq)
        if problem is None:
            self._anchored = anchored[0]
            return
        self.rolled_back = problem
        log.error("audit log %s: %s. Restore the log and its checkpoints from a backup; "
                  "health stays NOT_SERVING until then", self.path, problem)
        self._health.healthy = False

    def _append(self, fields: list[dict[str, Any]], durable: bool) -> None:
        with self._locked():
            self._catch_up()
            self._write(fields, durable)

    def _export(self) -> int:
        """Move committed changes' records from the registry into the log; how many.

        A shared registry that cannot be reached holds them until it can: that is
        no failure of the log (and nothing commits meanwhile)."""
        if self.registry is None:
            return 0
        try:
            return self._move()
        except RegistryUnavailable:
            log.info("audit: the registry cannot be reached; its pending records are "
                     "exported once it can")
            return 0

    def _move(self) -> int:
        assert self.registry is not None
        moved = 0
        with self._locked():
            self._catch_up()
            while True:
                rows = self.registry.audit_pending(self.origin, 500)
                if rows and self._outbox_done is None:
                    # The first rows since opening: the log may already hold some (a
                    # crash between appending them and forgetting them).
                    self._outbox_done = _last_outbox(self._file, self._offset, rows[0][0])
                done = self._outbox_done or 0
                fresh = [(i, r) for i, r in rows if i > done]
                if fresh:
                    self._write([_change(i, r) for i, r in fresh], durable=True)
                    self._anchor()
                    moved += len(fresh)
                if rows:
                    self.registry.audit_exported(self.origin, rows[-1][0])
                if len(rows) < 500:
                    return moved

    def _tick(self) -> None:
        """Periodic: export, flush aggregated refusals, checkpoint if due."""
        self._export()
        with self._locked():
            self._catch_up()
            if self._refusals.due():
                self._flush_refusals()
            if (self._head.seq > self._checkpointed
                    and time.time() - self._checkpointed_at >= self.checkpoint_seconds):
                self._read_checkpoint_tail()
                self._checkpoint()
            if time.time() - self._anchored_at >= self.checkpoint_seconds:
                self._anchor()

    def _flush_refusals(self) -> None:
        records = [{"kind": "refusals", "peer": source, "identity": identity, "method": method,
                    "reason": reason, "count": t.count, "since": t.since,
                    **({"presented": t.presented} if t.presented else {})}
                   for (source, identity, method, reason), t in self._refusals.take()]
        if records:
            self._write(records, durable=False)

    def _refusal(self, event: Event) -> bool:
        """A refused call: recorded one by one up to the allowance of its source,
        identity, method and reason, then only counted; whether it was recorded."""
        with self._locked():
            self._catch_up()
            if self._refusals.due():
                self._flush_refusals()
            if not self._refusals.note((source_of(event.peer), event.identity, event.method,
                                        event.reason), event.presented):
                return False
            self._write([self._call(event, create=False)], durable=False)
            return True

    def name(self, nik: str, create: bool = True) -> str | None:
        """The name ``nik`` goes by in this log: a keyed hash with a secret of the
        NIK's own kept in the registry (:meth:`index.registry.Registry.pseudonym_secret`).
        Erasing the NIK destroys the secret: the records written before no longer
        lead back to it, not even for someone holding the audit key and guessing
        NIKs.  None where the NIK has no secret and ``create`` is false, or ``nik``
        is not a well-formed NIK (its call was refused for that; no secret is made
        for it).  Blocking: the registry is read."""
        try:
            validate_nik(nik)
        except InvalidNik:
            return None
        if self.registry is None:
            return self.key.nik(nik)
        secret = self.registry.pseudonym_secret(nik, create)
        return None if secret is None else pseudonym(secret, nik)

    def _call(self, event: Event, create: bool = True) -> dict[str, Any]:
        """A call's record; a NIK without a pseudonym yet gets one if ``create``,
        else (a refused call) goes unnamed, as it does while the registry that holds
        the pseudonyms' secrets cannot be reached."""
        fields: dict[str, Any] = {"kind": "call", "method": event.method,
                                  "identity": event.identity, "peer": event.peer,
                                  "request_id": event.request_id, "code": event.code,
                                  "reason": event.reason}
        if event.outcome:
            fields["outcome"] = event.outcome
        try:
            name = event.nik_hash or (self.name(event.nik, create) if event.nik else None)
        except RegistryUnavailable:
            # Unnamed rather than unrecorded (or named by a hash erasure cannot
            # shred): a call the registry's absence failed, as its reason says.
            name = None
        if name is not None:
            fields["nik_hash"] = name
        if event.presented:
            fields["presented"] = event.presented
        return fields

    # -- the asynchronous interface ------------------------------------------------------

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except Exception as exc:
            self._failed(exc)
            raise AuditUnavailable(str(exc)) from exc
        self._succeeded()
        return result

    async def record(self, event: Event, durable: bool = False) -> None:
        """Append one call's record.

        Raises:
            AuditUnavailable: it could not be written (counted; see :meth:`watch`).
        """
        await self._run(lambda: self._append([self._call(event)], durable))

    async def refusal(self, event: Event) -> bool:
        """Append (or count, see :meth:`_refusal`) a refused call; whether appended."""
        return bool(await self._run(self._refusal, event))

    async def export(self) -> int:
        """Export committed changes' records now (after a state change)."""
        return int(await self._run(self._export))

    async def tick(self) -> None:
        await self._run(self._tick)

    def recover(self) -> int:
        """At start-up, before serving: check the log against the head the registry
        holds (:meth:`_check_anchor`), export what a crash left in the registry."""
        with self._locked():
            self._catch_up()
            self._check_anchor()
        moved = self._export()
        with self._locked():
            self._catch_up()
            self._checkpoint()
        if moved:
            log.warning("audit: exported %d records of changes committed before the last "
                        "stop (the server stopped before exporting them)", moved)
        return moved

    # -- health ---------------------------------------------------------------------------

    def watch(self, listener: Callable[[bool], None]) -> None:
        """``listener(healthy)`` on each change: unhealthy after
        :data:`UNHEALTHY_AFTER` consecutive failures, healthy at the next success."""
        self._health.listeners.append(listener)

    @property
    def healthy(self) -> bool:
        return self._health.healthy

    def _failed(self, exc: BaseException) -> None:
        log.error("the audit log could not be written: %s", exc)
        h = self._health
        h.failures += 1
        if h.healthy and h.failures >= UNHEALTHY_AFTER:
            h.healthy = False
            for listener in h.listeners:
                listener(False)

    def _succeeded(self) -> None:
        h = self._health
        h.failures = 0
        if not h.healthy and self.rolled_back is None:
            h.healthy = True
            for listener in h.listeners:
                listener(True)

    def close(self) -> None:
        """Export, flush refusals, checkpoint, close."""
        def final() -> None:
            try:
                self._export()
            finally:
                with self._locked():
                    self._catch_up()
                    self._flush_refusals()
                    self._checkpoint()
                    self._anchor()
        try:
            self._pool.submit(final).result()
        except Exception as exc:
            log.error("audit: the final checkpoint could not be written: %s", exc)
        self._pool.shutdown(wait=True)
        self._file.close()


class _FileLocked:
    """The thread mutex, then an exclusive ``flock`` on the log."""

    def __init__(self, f: BinaryIO, mutex: threading.Lock) -> None:
        self.f = f
        self.mutex = mutex

    def __enter__(self) -> None:
        self.mutex.acquire()
        try:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX)
        except BaseException:
            self.mutex.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_UN)
        finally:
            self.mutex.release()


def _change(outbox_id: int, text: str) -> dict[str, Any]:
    """A ``change`` record from a registry outbox row."""
    row = json.loads(text)
    fields: dict[str, Any] = {
        "kind": "change", "method": row["method"], "identity": row["identity"],
        "peer": row["peer"], "request_id": row["request_id"], "code": "OK", "reason": "",
        "outcome": row["outcome"], "outbox": outbox_id,
        "committed": datetime.fromtimestamp(row["time"], UTC).isoformat(
            timespec="milliseconds")}
    if row.get("nik_hash"):
        fields["nik_hash"] = row["nik_hash"]
    return fields


def _lines_backwards(f: BinaryIO, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for each line of ``f[:end]``, last first, newlines stripped;
    a final line without its newline included, blank lines skipped."""
    pos, tail = end, b""
    while True:
        cut = tail.rfind(b"\n", 0, max(0, len(tail) - 1))  # ends the line before the last
        if cut >= 0:
            line, tail, start = tail[cut + 1:], tail[:cut + 1], pos + cut + 1
        elif pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
            continue
        else:
            line, tail, start = tail, b"", 0
        text = line[:-1] if line.endswith(b"\n") else line
        if text.strip():
            yield start, text
        if not tail and pos == 0:
            return


def _last_outbox(f: BinaryIO, end: int, below: int) -> int:
    """The highest outbox id among the log's change records, searching back from
    the end until one below ``below`` is found (0 if none)."""
    best = 0
    for _, line in _lines_backwards(f, end):
        try:
            record = parse_record(line)
        except ValueError:
            continue
        if record["kind"] == "change":
            best = max(best, record["outbox"])
            if record["outbox"] < below:
                break
    return best


def parse_checkpoint(line: bytes) -> dict[str, Any]:
    cp = strict.loads(line)
    want = {"seq": int, "hash": str, "time": str, "key_id": str, "signature": str}
    if not isinstance(cp, dict) or set(cp) != set(want) or any(
            type(cp[k]) is not t for k, t in want.items()):
        raise ValueError("not a checkpoint")
    if _canonical(cp) != line:
        raise ValueError("not in canonical form")
    return cp


def load_origin(data_dir: Path) -> str:
    """This data directory's audit origin: the id under which the registry keeps
    its records until exported (several servers may share one PostgreSQL registry)."""
    path = data_dir / ORIGIN_FILE
    if not path.exists():
        _create_private(path, secrets.token_hex(16).encode())
    return path.read_text().strip()


# -- verifying ------------------------------------------------------------------------------


@dataclass
class ChainReport:
    records: int = 0
    broken_at: int | None = None  # line number (1-based) of the first bad record
    why: str = ""
    checkpoints: int = 0
    checkpointed: int = 0  # the seq the last valid checkpoint covers
    checkpointed_at: str = ""
    missing: int = 0  # records the last checkpoint covers that the log lacks
    damaged: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return self.broken_at is None and not self.problems

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "records": self.records, "intact": self.intact, "checkpoints": self.checkpoints,
            "checkpointed_records": self.checkpointed,
            "last_checkpoint": self.checkpointed_at or None,
            "not_covered": max(0, self.records - self.checkpointed),
            "missing": self.missing, "damaged_tails": self.damaged}
        if self.broken_at is not None:
            out.update(broken_at_line=self.broken_at, why=self.why)
        if self.problems:
            out["problems"] = self.problems
        return out


def read_records(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line.rstrip(b"\n")


def anchor_problem(anchored: tuple[int, str], hash_there: str | None, head_seq: int
                   ) -> str | None:
    """What is wrong where the registry holds the head ``anchored`` (sequence
    number, hash) and the log's record at that number has ``hash_there`` (None:
    the log has none) and its last is ``head_seq``; None where nothing is."""
    seq, expected = anchored
    if hash_there is None:
        return (f"the registry holds the audit head at record {seq}, and the log ends at "
                f"record {head_seq}: it was rolled back or cut short (its checkpoints with "
                "it, where they agree)")
    if not hmac.compare_digest(hash_there, expected):
        return (f"record {seq} is not the one the registry holds as the audit head: the log "
                "was rolled back and written again, or rewritten")
    return None


def verify_chain(path: Path, key: AuditKey | None, public: SigningKey | None = None,
                 checkpoints: Path | None = None,
                 anchored: tuple[int, str] | None = None) -> ChainReport:
    """Check every record (strictly read, linked, hashed; its MAC with ``key``),
    then the checkpoints with ``public``: each signed, and the log's record at
    each checkpoint's sequence number carrying the signed hash; and that the log
    reaches the head the registry holds (``anchored``), where given."""
    report = ChainReport()
    head = Head()
    hashes: dict[int, str] = {}
    for n, line in read_records(path):
        try:
            record = parse_record(line)
        except ValueError as exc:
            report.broken_at, report.why = n, f"not a record: {exc}"
            break
        if record["prev"] != head.mac or record["seq"] != head.seq + 1:
            report.broken_at = n
            report.why = (f"does not follow the record before it (sequence {record['seq']} "
                          f"after {head.seq})")
            break
        if record["hash"] != _hash(head.hash, record):
            report.broken_at, report.why = n, "hash does not match its contents"
            break
        if key is not None and not hmac.compare_digest(record["mac"],
                                                        key.mac(head.mac, _body(record))):
            report.broken_at = n
            report.why = "MAC does not match its contents (altered, or another key)"
            break
        if record["kind"] == "damaged":
            report.damaged.append({"line": n, "bytes": record["bytes"],
                                   "set_aside": record["set_aside"],
                                   "missing": record["missing"]})
        head = Head.of(record)
        hashes[head.seq] = head.hash
        report.records += 1
    if anchored is not None and report.broken_at is None:
        problem = anchor_problem(anchored, hashes.get(anchored[0]), head.seq)
        if problem is not None:
            report.problems.append(problem)
    if public is None or checkpoints is None:
        return report
    if not checkpoints.exists():
        report.problems.append(f"no checkpoint file {checkpoints.name}")
        return report
    last = 0
    for n, line in read_records(checkpoints):
        try:
            cp = parse_checkpoint(line)
        except ValueError as exc:
            report.problems.append(f"checkpoint line {n}: {exc}")
            continue
        message = _checkpoint_message(cp["seq"], cp["hash"], cp["time"], cp["key_id"])
        if cp["key_id"] != public.key_id or not public.verify(message, cp["signature"]):
            report.problems.append(f"checkpoint line {n}: signature does not verify")
            continue
        if cp["seq"] < last:
            report.problems.append(f"checkpoint line {n}: sequence {cp['seq']} after {last}")
        last = max(last, cp["seq"])
        report.checkpoints += 1
        report.checkpointed, report.checkpointed_at = last, cp["time"]
        have = hashes.get(cp["seq"])
        if have is None and report.broken_at is None:
            report.missing = max(report.missing, cp["seq"] - report.records)
        elif have is not None and have != cp["hash"]:
            report.problems.append(
                f"record {cp['seq']} is not the one checkpoint line {n} signed ("
                + ("lost with a damaged tail, or rewritten)" if report.damaged
                   else "rewritten)"))
    if report.missing:
        report.problems.append(f"{report.missing} records the last checkpoint covers are "
                               "missing (the log was cut short)")
    return report


def pseudonym(secret: bytes, nik: str) -> str:
    """``nik``'s name in the audit log, from its own secret (see :meth:`AuditLog.name`)."""
    return hmac.new(secret, b"nik:" + nik.encode(), hashlib.sha256).hexdigest()[:32]


def find_nik(path: Path, key: AuditKey, nik: str, secret: bytes | None
             ) -> list[dict[str, Any]]:
    """Every record about ``nik``: by its pseudonym from ``secret`` (the registry's,
    None once it is erased), and by the audit key's hash, which named NIKs in
    records written before pseudonyms."""
    digests = {key.nik(nik), *([pseudonym(secret, nik)] if secret is not None else [])}
    out = []
    for _, line in read_records(path):
        try:
            record = parse_record(line)
        except ValueError:
            continue
        if record.get("nik_hash") in digests:
            out.append(record)
    return out
