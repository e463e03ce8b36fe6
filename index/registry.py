"""The enrolment registry, the source of truth for who is enrolled: one
interface, two implementations.

* SQLite (:class:`index.sqlite_registry.SqliteRegistry`): embedded, one
  machine; several processes share it through the data directory.
* PostgreSQL (:class:`index.postgres_registry.PostgresRegistry`): any number
  of servers on any number of machines share one registry.

Both hold one row per NIK (its template embedding, never an image) and an
append-only change log whose sequence numbers let each server's FAISS index,
a derived structure, catch up from its own snapshot.  Each has a writer
lock, exclusive across every process that shares the registry: the
de-duplication search and the insert run under it, so they are atomic, and
change-log entries commit in sequence order.  Chosen by ``--registry-url``
(:func:`index.backends.open_registry`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from index.errors import ConfigurationError, Quarantined, StartupError
from index.sealing import SealAltered, Sealer, SealError

log = logging.getLogger(__name__)

# What an erased NIK becomes in other enrolments' candidate lists and review notes.
ERASED = "erased"
# Sixteen digits, whatever spaces or punctuation a person put between them
# ("3174 0145 0590 0051", "3174-0145-0590-0051"): a NIK as text.
NIK_LIKE = re.compile(r"(?<!\d)\d(?:[^\w\n]{0,3}\d){15}(?!\d)")


def strike_nik(text: str, nik: str) -> str:
    """``text`` with every writing of ``nik`` (:data:`NIK_LIKE`) replaced by
    :data:`ERASED`."""
    return NIK_LIKE.sub(lambda m: ERASED if re.sub(r"\D", "", m.group()) == nik
                        else m.group(), text)
# Review states of an enrolment: none (never flagged), pending (flagged, awaiting a
# person), confirmed (a person confirmed the duplicate), cleared (not a duplicate).
REVIEW_STATES = ("none", "pending", "confirmed", "cleared")
# The columns every implementation selects, in this order (see RowCodec.row).
COLUMNS = ("id, nik, embedding, flagged, candidates, metadata, created_at, review, "
           "reviewed_by, reviewed_at, review_note, photos, tag, version")
# Read beside them where a row is shown or checked: the newest version the
# registry gave the row (see RowCodec); SQL with ``{enrollments}`` and ``{versions}``.
LATEST = "(SELECT MAX(v.seq) FROM {versions} v WHERE v.id = {enrollments}.id)"
# The heads table's entry that holds the sealed head of the rows (RowsHead).
ROWS_HEAD = "registry:rows"


class NotPending(Exception):
    """A review decision for an enrolment that awaits none."""


class RegistryMismatch(StartupError):
    """The registry was written with another model version or embedding size."""


@dataclass(frozen=True)
class Enrollment:
    """One enrolled NIK.

    Attributes:
        id: our own int64 id (also the FAISS id); never the NIK.
        flagged: enrolled although suspected to duplicate ``candidates``.
        candidates: [(nik, score)] suspected duplicates found at enrolment.
        review: one of :data:`REVIEW_STATES`; who decided, when, and their note.
        photos: how many photos ``embedding`` fuses (a selfie alone: 1; with the
            reference photo: 2).
    """

    id: int
    nik: str
    embedding: np.ndarray
    flagged: bool
    candidates: list[tuple[str, float]]
    metadata: dict[str, str]
    created_at: float
    review: str = "none"
    reviewed_by: str = ""
    reviewed_at: float | None = None
    review_note: str = ""
    photos: int = 1


@dataclass(frozen=True)
class NewEnrollment:
    """An enrolment to insert (:meth:`index.rules.WriteBatch.add_many`); ``audit``:
    whose call it is, its record written with it (none where None)."""

    nik: str
    embedding: np.ndarray
    flagged: bool = False
    candidates: list[tuple[str, float]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    photos: int = 1
    note: str = ""
    audit: AuditEntry | None = None

    @property
    def outcome(self) -> str:
        """What its audit record says became of the call."""
        return "enrolled_flagged" if self.flagged else "enrolled"

    def enrolled(self, new_id: int, created_at: float) -> Enrollment:
        """The enrolment as inserted, with id ``new_id``."""
        return Enrollment(new_id, self.nik, np.array(self.embedding, np.float32), self.flagged,
                          list(self.candidates), dict(self.metadata), created_at,
                          "pending" if self.flagged else "none", review_note=self.note,
                          photos=self.photos)


@dataclass
class AuditEntry:
    """Who asked for the state change under way: the registry writes its audit
    record in the change's own transaction (table ``audit_outbox``), so that no
    change commits without its record and no record claims a change that did not
    commit.  The audit log (:mod:`server.api.audit`) exports the rows of its
    ``origin`` into its chain and then deletes them.

    Attributes:
        nik_hash: the NIK's pseudonym (never the NIK itself: see
            :meth:`server.api.audit.AuditLog.name`).
        origin: the audit log the record is for (one per data directory).
        outbox_id: set by the registry once the record is written.
    """

    method: str
    identity: str
    peer: str
    request_id: str
    nik_hash: str
    origin: str
    outbox_id: int | None = None

    def record(self, outcome: str) -> str:
        return json.dumps({"method": self.method, "identity": self.identity, "peer": self.peer,
                           "request_id": self.request_id, "nik_hash": self.nik_hash,
                           "outcome": outcome, "time": time.time()}, sort_keys=True)


# The audit entry of the call being served, if it changes state (set by the
# gRPC edge; read by the registry's write methods, in the thread they run in).
audit_var: ContextVar[AuditEntry | None] = ContextVar("audit_entry", default=None)


@dataclass(frozen=True)
class RowsHead:
    """What the registry's rows must add up to, sealed in its heads table and
    written in the transaction of every change to a row: the newest version
    given (``seq``), how many rows there are and how many are flagged, and the
    XOR of a digest of each row's (id, version).  Rows deleted, inserted or put
    back at an earlier version behind the service's back no longer add up."""

    seq: int = 0
    count: int = 0
    flagged: int = 0
    xor: bytes = bytes(32)

    @staticmethod
    def term(rid: int, version: int) -> bytes:
        return hashlib.sha256(f"row {rid} {version}".encode()).digest()

    def changed(self, gone: tuple[int, int, bool] | None = None,
                new: tuple[int, int, bool] | None = None) -> RowsHead:
        """This head with row ``gone`` (id, version, flagged) taken out and ``new`` put in."""
        xor, count, flagged, seq = int.from_bytes(self.xor), self.count, self.flagged, self.seq
        for row, sign in ((gone, -1), (new, 1)):
            if row is not None:
                xor ^= int.from_bytes(self.term(row[0], row[1]))
                count += sign
                flagged += sign * bool(row[2])
                seq = max(seq, row[1])
        return RowsHead(seq, count, flagged, xor.to_bytes(32))

    def to_json(self) -> bytes:
        return json.dumps({"seq": self.seq, "count": self.count, "flagged": self.flagged,
                           "xor": self.xor.hex()}).encode()

    @classmethod
    def from_json(cls, text: bytes) -> RowsHead:
        d = json.loads(text)
        return cls(int(d["seq"]), int(d["count"]), int(d["flagged"]), bytes.fromhex(d["xor"]))


@dataclass(frozen=True)
class Change:
    seq: int
    op: str
    id: int
    embedding: np.ndarray | None  # None for removals, or an add later erased


class WriterLock(Protocol):
    """Exclusive across threads and every process sharing the registry;
    re-entrant in one thread.  ``on_acquire`` runs each time the outermost
    holder gets it (the gallery catches up with other processes' writes)."""

    on_acquire: Callable[[], None]

    def __enter__(self) -> Any: ...

    def acquire(self, blocking: bool = True) -> bool:
        """``__enter__``; without ``blocking``, only if nobody holds it (False then)."""

    def release(self) -> None:
        """``__exit__``."""

    def __exit__(self, *exc: object) -> None: ...

    def close(self) -> None: ...


class ChangeListener(Protocol):
    """Other servers' changes to a shared registry, as they happen."""

    def wait(self, timeout: float) -> None:
        """Return at the next change notice, or after ``timeout`` seconds.

        Raises:
            RegistryUnavailable: the connection is lost.
        """

    def close(self) -> None: ...


class Batch(Protocol):
    """Enrolments written in one transaction (:meth:`Registry.batch`), and the
    pending requests of a shared registry decided in it (see :mod:`index.enrolling`)."""

    def add_many(self, rows: Sequence[NewEnrollment]) -> list[Enrollment]:
        """Insert enrolments, each with its change logged and its audit record."""

    def pending(self, limit: int) -> list[tuple[int, str, bytes]]:
        """Undecided requests of every server, oldest first: (id, NIK, request)."""

    def settle(self, decisions: Sequence[tuple[int, str, bytes]]) -> None:
        """Write decisions (id, NIK, decision) on other servers' requests."""

    def forget(self, pending_ids: Sequence[int]) -> None:
        """Delete this server's own requests, decided."""


class Registry(Protocol):
    """What the gallery needs of a registry.  Writes that log a change (add,
    remove) must be made under :attr:`lock`."""

    sealer: Sealer
    lock: WriterLock
    quarantined: set[int]  # ids of enrolments that failed authentication
    unindexed: set[int]  # those of them whose embedding is not in the index
    registry_id: str  # tells one registry's snapshots from another's
    distributed: bool  # shared by servers on other machines (they NOTIFY changes)
    head_fault: str | None  # why the rows do not add up to their sealed head, at the last check

    def listen(self, decisions: bool = False) -> ChangeListener | None:
        """A connection of its own that waits for other servers' changes (see
        :mod:`index.follower`), or with ``decisions`` for the notices that pending
        enrolments were decided (:mod:`index.enrolling`), where the registry is
        shared; None where every writer shares this machine's files.

        Raises:
            RegistryUnavailable: the registry cannot be reached now.
        """

    def add(self, nik: str, embedding: np.ndarray, flagged: bool = False,
            candidates: list[tuple[str, float]] | None = None,
            metadata: dict[str, str] | None = None, photos: int = 1,
            note: str = "") -> Enrollment: ...

    def batch(self) -> contextlib.AbstractContextManager[Batch]:
        """Writes in one transaction (:class:`Batch`), under :attr:`lock`."""

    # A shared registry (distributed) holds enrolment requests left by any server
    # for whichever holds the lock next to decide (see index.enrolling).

    def submit(self, requests: list[tuple[str, bytes]]) -> list[int]:
        """Leave requests (NIK, request) to be decided; their ids, in order."""

    def withdraw(self, ids: list[int]) -> set[int]:
        """Take back the requests ``ids`` not decided yet; those taken back."""

    def collect(self, ids: list[int]) -> dict[int, bytes]:
        """The decisions taken on requests ``ids`` by others, deleted as read."""

    def resolve_review(self, nik: str, decision: str, reviewer: str, note: str
                       ) -> Enrollment | None: ...

    def review_queue(self, after_id: int, limit: int, batch: int = 1000
                     ) -> tuple[list[Enrollment], int]: ...

    def count_pending(self) -> int: ...

    def remove(self, nik: str) -> Enrollment | None: ...

    def get(self, nik: str) -> Enrollment | None: ...

    def get_by_ids(self, ids: list[int]) -> dict[int, Enrollment]: ...

    def get_many(self, niks: list[str]) -> dict[str, Enrollment | Quarantined]: ...

    def count(self) -> int: ...

    def last_seq(self) -> int: ...

    def changes_since(self, seq: int, limit: int | None = None) -> list[Change]: ...

    def iter_embeddings(self, batch: int = 50_000
                        ) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...

    def reseal(self, batch: int = 1000) -> int: ...

    def check_head(self) -> str | None:
        """Whether the rows add up to their sealed :class:`RowsHead` (with a data
        key); what does not, or None.  Sets :attr:`head_fault`."""

    def accept_head(self) -> RowsHead:
        """Seal the head over the rows as they are (an operator's decision)."""

    def scan_rows(self, batch: int = 10_000, head: bool = True) -> int:
        """Check the head (unless ``head`` is false) and every row's integrity (with a
        data key); how many rows are quarantined."""

    def pseudonym_secret(self, nik: str, create: bool = True) -> bytes | None:
        """The secret behind ``nik``'s audit pseudonym; a new random one if it has
        none and ``create``, else None.  Erasing the NIK (:meth:`remove`) destroys
        it, in the erasure's transaction, whichever server named it."""

    def audit_pending(self, origin: str, limit: int) -> list[tuple[int, str]]:
        """The audit records of ``origin``'s committed changes not yet exported,
        oldest first: (outbox id, record JSON)."""

    def audit_exported(self, origin: str, upto: int) -> None:
        """Forget ``origin``'s records up to outbox id ``upto`` (now in its log)."""

    def audit_anchor(self, origin: str, seq: int, head_hash: str) -> None:
        """Hold ``origin``'s audit log head (its last record's sequence number and
        hash) outside the log, so that a log and checkpoints rolled back together
        are found out; never moves back."""

    def audit_head(self, origin: str) -> tuple[int, str] | None:
        """The head last anchored for ``origin``; None where none was."""

    def close(self) -> None: ...


def _raw(value: bytes | str | memoryview | None) -> bytes:
    if value is None:
        return b""
    return value.encode() if isinstance(value, str) else bytes(value)


class RowCodec:
    """Rows to :class:`Enrollment` and back, sealing the embedding, candidate list
    and metadata with the data key when there is one (see :mod:`index.sealing`).

    With a data key every row also carries ``tag``: a digest of all its other
    columns (the sealed bytes as stored), sealed and bound to the NIK, and
    ``version``: each write of a row gives it a new one from the registry's
    append-only versions table (the tag covers it).  A row whose tag does not
    match, whose sealed values do not open with a configured key, or whose
    version is not the newest the registry gave it, has been changed outside the
    service (a flag cleared, a review state set, embeddings swapped between rows,
    an earlier authentic copy of the row put back): it is quarantined
    (:class:`~index.errors.Quarantined` for the calls that would show it, left
    out of a rebuilt index, counted in :attr:`quarantined`), and the rest is
    served.  The review note and the reviewer's name are sealed like the
    embedding.  What no row can show (a row deleted, or put back together with
    its versions) the sealed :class:`RowsHead` does."""

    sealer: Sealer
    quarantined: set[int]
    unindexed: set[int]  # quarantined ids whose embedding could not be indexed

    def _digest(self, row: tuple[Any, ...] | Any) -> bytes:
        fields = [int(row[0]), row[1], hashlib.sha256(_raw(row[2])).hexdigest(),
                  bool(row[3]), hashlib.sha256(_raw(row[4])).hexdigest(),
                  hashlib.sha256(_raw(row[5])).hexdigest(), float(row[6]), row[7], row[8],
                  None if row[9] is None else float(row[9]), row[10], int(row[11])]
        if int(row[13] or 0):  # rows tagged before versions have none, and a tag without
            fields.append(int(row[13]))
        return hashlib.sha256(json.dumps(fields).encode()).digest()

    def _tag(self, row: tuple[Any, ...] | Any) -> bytes | None:
        """The tag of a row of :data:`COLUMNS` (its own tag aside); None unsealed."""
        if not self.sealer.enabled:
            return None
        return self.sealer.seal(self._digest(row), f"row:{row[1]}".encode())

    def _fault(self, row: tuple[Any, ...] | Any) -> str | None:
        """Why a row of :data:`COLUMNS` (and :data:`LATEST`, where read) fails
        authentication; None if it does not."""
        if not self.sealer.enabled:
            return None
        tag = row[12]
        try:
            if tag is None or self.sealer.open(_raw(tag), f"row:{row[1]}".encode()) \
                    != self._digest(row):
                return "its tag does not match its columns"
        except SealAltered:
            return "its tag does not match its columns"
        if len(row) > 14 and row[14] is not None and int(row[14]) != int(row[13] or 0):
            return (f"it is version {int(row[13] or 0)} but the registry wrote version "
                    f"{int(row[14])}: an earlier copy was put back")
        return None

    def _quarantine(self, row: tuple[Any, ...] | Any, why: str) -> Quarantined:
        rid = int(row[0])
        if rid not in self.quarantined:
            self.quarantined.add(rid)
            log.error("enrolment id %d fails authentication (%s): quarantined; restore it "
                      "from a backup or erase it", rid, why)
        return Quarantined("this enrolment's stored record fails authentication; the operator "
                           "has been alerted")

    def _resealed(self, row: tuple[Any, ...] | Any) -> tuple[bytes, Any, Any, str, str] | None:
        """A row of :data:`COLUMNS`'s embedding, candidates, metadata, reviewer and note sealed with
        the current key, or None when it needs nothing (or is altered: a reseal
        never launders one; it is quarantined)."""
        why = self._fault(row)
        if why:
            self._quarantine(row, why)
            return None
        nik, emb, cands, meta = row[1], row[2], row[4], row[5]
        texts = [self._text_blob(row[i]) for i in (8, 10)]
        if not any(self.sealer.needs_reseal(_raw(v)) for v in (emb, cands, meta, row[12])) \
                and not any(t and self.sealer.needs_reseal(t) for t in texts):
            return None
        return (self._seal("embedding", nik, self._open("embedding", nik, emb)),
                self._sealed_json("candidates", nik,
                                  json.loads(self._open("candidates", nik, cands))),
                self._sealed_json("metadata", nik, json.loads(self._open("metadata", nik, meta))),
                self._seal_text("reviewed_by", nik, self._open_text("reviewed_by", nik, row[8])),
                self._seal_text("review_note", nik, self._open_text("review_note", nik, row[10])))

    def _tag_all_or_none(self, untagged: list[int], any_tagged: bool,
                         retag: Callable[[int], None]) -> None:
        """At open, with a data key: rows without a tag are all tagged when none has
        one (a registry from before tags, or sealing just turned on); beside
        tagged rows they had theirs removed, and stay quarantined."""
        if not untagged:
            return
        if any_tagged:
            log.error("%d enrolments have no tag beside tagged ones: quarantined",
                      len(untagged))
            return
        log.warning("tagging %d enrolments (a registry from before row tags, or sealing "
                    "just turned on)", len(untagged))
        for rid in untagged:
            retag(rid)

    def scan(self, rows: Iterator[list[Any]]) -> int:
        """Check every row's tag (batches of rows of :data:`COLUMNS`: the tag covers
        the sealed values as stored, so a swapped value fails it too); how many
        are quarantined."""
        for batch in rows:
            for row in batch:
                why = self._fault(row)
                if why:
                    self._quarantine(row, why)
        return len(self.quarantined)

    def _seal(self, column: str, nik: str, value: bytes) -> bytes:
        return self.sealer.seal(value, f"{column}:{nik}".encode())

    def _open(self, column: str, nik: str, value: bytes | str | memoryview) -> bytes:
        raw = value.encode() if isinstance(value, str) else bytes(value)
        return self.sealer.open(raw, f"{column}:{nik}".encode())

    @staticmethod
    def _text_blob(value: str | None) -> bytes:
        """A text column's sealed bytes (stored as base64), or b"" for plain text."""
        if not value:
            return b""
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return b""
        return raw if Sealer.is_sealed(raw) else b""

    def _seal_text(self, column: str, nik: str, text: str) -> str:
        """``text`` sealed and bound to its place, as base64 (empty stays empty)."""
        if not self.sealer.enabled or not text:
            return text
        return base64.b64encode(self._seal(column, nik, text.encode())).decode()

    def _open_text(self, column: str, nik: str, value: str | None) -> str:
        """A text column's plain value (one written before sealing as it is)."""
        raw = self._text_blob(value)
        return self._open(column, nik, raw).decode() if raw else value or ""

    def _sealed_json(self, column: str, nik: str, value: object) -> bytes | str:
        text = json.dumps(value)
        return self._seal(column, nik, text.encode()) if self.sealer.enabled else text

    def _row(self, row: tuple[Any, ...] | Any) -> Enrollment:
        """An enrolment from a row of :data:`COLUMNS`.

        Raises:
            Quarantined: the row fails authentication (see the class docstring).
        """
        why = self._fault(row)
        if why:
            raise self._quarantine(row, why)
        try:
            return self._decode(row)
        except SealAltered as exc:
            raise self._quarantine(row, str(exc)) from exc

    def _match_row(self, row: tuple[Any, ...] | Any) -> Enrollment:
        """What a search needs of a row (NIK, photos), even a quarantined one: a face
        near it must still be held to it as a duplicate."""
        try:
            return self._row(row)
        except Quarantined:
            return Enrollment(int(row[0]), row[1], np.zeros(0, np.float32), bool(row[3]), [],
                              {}, float(row[6]), str(row[7]), photos=int(row[11]))

    def _decode(self, row: tuple[Any, ...] | Any) -> Enrollment:
        nik = row[1]
        return Enrollment(id=int(row[0]), nik=nik,
                          embedding=np.frombuffer(self._open("embedding", nik, row[2]),
                                                  dtype=np.float32).copy(),
                          flagged=bool(row[3]),
                          candidates=[(n, float(s)) for n, s in
                                      json.loads(self._open("candidates", nik, row[4]))],
                          metadata=json.loads(self._open("metadata", nik, row[5])),
                          created_at=row[6], review=row[7],
                          reviewed_by=self._open_text("reviewed_by", nik, row[8]),
                          reviewed_at=row[9],
                          review_note=self._open_text("review_note", nik, row[10]),
                          photos=int(row[11]))

    def _changes(self, rows: list[Any]) -> list[Change]:
        """Changes from rows of (seq, op, id, nik, embedding or None); an added
        embedding that does not open is left out (as if erased), quarantined."""
        return [Change(int(s), op, int(i), None if emb is None else
                       self._embedding(int(i), nik, emb))
                for s, op, i, nik, emb in rows]

    def _candidates(self, rid: int, nik: str, value: Any) -> list[list[Any]]:
        """A row's candidate list; empty (the row quarantined) if it does not open."""
        try:
            candidates: list[list[Any]] = json.loads(self._open("candidates", nik, value))
        except SealAltered as exc:
            self._quarantine((rid,), str(exc))
            return []
        return candidates

    def _embedding(self, rid: int, nik: str, value: Any) -> np.ndarray | None:
        try:
            return np.frombuffer(self._open("embedding", nik, value), np.float32).copy()
        except SealAltered as exc:
            self._quarantine((rid,), str(exc))
            self.unindexed.add(rid)
            return None

    def _embeddings(self, rows: list[Any], dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, embeddings) from rows of (id, nik, embedding), leaving out (and
        quarantining) any whose embedding does not open."""
        opened = [(int(r[0]), self._embedding(int(r[0]), r[1], r[2])) for r in rows]
        kept = [(i, e) for i, e in opened if e is not None]
        ids = np.fromiter((i for i, _ in kept), dtype=np.int64, count=len(kept))
        embs = (np.stack([e for _, e in kept]) if kept
                else np.zeros((0, dim), np.float32))
        return ids, embs.reshape(len(kept), dim)

    def _check_key_opens(self, where: str, newest: tuple[Any, ...] | Any | None) -> None:
        """Refuse to start with no data key, or the wrong one, for sealed data
        (``newest``: the newest row, or None for an empty registry).

        Raises:
            ConfigurationError: naming what to configure.
        """
        if newest is None:
            return
        raw = newest[2]
        if Sealer.is_sealed(raw.encode() if isinstance(raw, str) else bytes(raw)) \
                and not self.sealer.enabled:
            raise ConfigurationError(f"the registry {where} is encrypted: configure its data "
                                     "key (FACEVERIFY_DATA_KEY_FILE or FACEVERIFY_DATA_KEY)")
        try:
            self._row(newest)
        except Quarantined:
            pass  # the key opens other rows' values; this one was altered (logged)
        except SealError as exc:
            raise ConfigurationError(f"the registry {where} does not open with the "
                                     f"configured data keys: {exc}") from exc

    def _check_meta_values(self, where: str, meta: dict[str, str], model_version: str,
                           dim: int) -> None:
        if meta.get("model_version") != model_version or meta.get("dim") != str(dim):
            raise RegistryMismatch(
                f"registry {where} holds embeddings of model {meta.get('model_version')!r} "
                f"(dimension {meta.get('dim')}), but the server runs {model_version!r} "
                f"(dimension {dim}); point it elsewhere or re-enrol")


def redact(url: str) -> str:
    """``url`` without its password, for logs and messages."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url

