"""The registry's rules, written once over SQL: enrolment, review, erasure (and
its strikes), reseal, row tags, the change log, the audit outbox and the reads.

A backend (:mod:`index.sqlite_registry`, :mod:`index.postgres_registry`)
supplies what differs: its table names, its parameter mark, whether a read
for update locks the row, how a transaction is opened (and what the writer
lock is), how a change is announced, and what an erasure must do after it
commits.  Statements are written here with ``?`` marks and ``{enrollments}``,
``{changes}``, ``{outbox}``, ``{heads}``, ``{versions}``, ``{pseudonyms}``,
``{meta}`` for the tables; both SQLite (3.35 or later: ``RETURNING``) and PostgreSQL run them
as written.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import astuple
from typing import Any, ClassVar, Protocol

import numpy as np

from index.errors import Quarantined
from index.registry import (
    COLUMNS,
    ERASED,
    LATEST,
    ROWS_HEAD,
    AuditEntry,
    Change,
    Enrollment,
    NewEnrollment,
    NotPending,
    RowCodec,
    RowsHead,
    audit_var,
    strike_nik,
)
from index.sealing import SealAltered

log = logging.getLogger(__name__)

# A row as it is read to be shown or checked: its columns and its newest version.
READ = f"{COLUMNS}, {LATEST}"


class Cursor(Protocol):
    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Executor(Protocol):
    """A connection as the rules use it (``sqlite3.Connection``, ``psycopg.Connection``)."""

    def execute(self, query: Any, params: Any = ..., /) -> Any: ...


class SqlRegistry(RowCodec, abc.ABC):
    """The :class:`~index.registry.Registry` rules over a backend's SQL.

    A subclass sets :attr:`TABLES`, :attr:`MARK`, :attr:`FOR_UPDATE` and
    :attr:`UNLIMITED`, and provides :meth:`_writing`, :meth:`_reading` and
    :meth:`_exclusive`; it may override :meth:`_blob`, :meth:`_announce` and
    :meth:`_after_erase`.
    """

    # enrollments, changes, outbox, heads, versions, pseudonyms, meta -> table names
    TABLES: ClassVar[dict[str, str]]
    MARK: ClassVar[str]  # the parameter mark: "?" or "%s"
    FOR_UPDATE: ClassVar[str]  # appended to a read that precedes a write of the row
    UNLIMITED: ClassVar[int | None]  # a LIMIT value meaning none
    dim: int
    head_fault: str | None = None  # why the rows do not add up to their head (check_head)
    _pseudonym_key: bytes | None = None  # see _handle

    @abc.abstractmethod
    def _writing(self, what: str) -> contextlib.AbstractContextManager[Executor]:
        """A write transaction; the caller holds the writer lock where the backend
        needs it held (committed when the block ends, rolled back on an error)."""

    @abc.abstractmethod
    def _reading(self, what: str) -> contextlib.AbstractContextManager[Executor]:
        """A connection for reads and single-statement writes (each its own transaction)."""

    @abc.abstractmethod
    def _exclusive(self, what: str) -> contextlib.AbstractContextManager[Executor]:
        """A write transaction that takes the writer lock itself (at open)."""

    def _blob(self, value: bytes | str) -> Any:
        """A sealed-or-JSON value as its column stores it."""
        return value

    def _announce(self, ex: Executor, seq: int) -> None:
        """Tell other servers of change ``seq`` (in the transaction under way)."""

    def _after_erase(self) -> None:
        """What must follow a committed erasure or reseal (old pages, say)."""

    # -- statements ------------------------------------------------------------------

    def _q(self, template: str) -> str:
        return template.format(**self.TABLES).replace("?", self.MARK)

    def _run(self, ex: Executor, template: str, params: Sequence[Any] = ()) -> Any:
        return ex.execute(self._q(template), tuple(params))

    def _select_row(self, ex: Executor, where: str, params: Sequence[Any],
                    lock: bool = False) -> Any:
        return self._run(ex, f"SELECT {READ} FROM {{enrollments}} WHERE {where}"
                         + (self.FOR_UPDATE if lock else ""), params).fetchone()

    def _retag(self, ex: Executor, rid: int, added: bool = False) -> None:
        """Give row ``rid`` (just written; ``added``: inserted) its next version and
        its tag, and the rows' head its new sum (in the transaction under way)."""
        if not self.sealer.enabled:
            return
        row = self._select_row(ex, "id = ?", (rid,))
        if row is None:
            return
        version = int(self._run(ex, "INSERT INTO {versions} (id) VALUES (?) RETURNING seq",
                                (rid,)).fetchone()[0])
        self._run(ex, "UPDATE {enrollments} SET version = ?, tag = ? WHERE id = ?",
                  (version, self._tag((*row[:13], version)), rid))
        self._move_head(ex, None if added else (rid, int(row[13] or 0), bool(row[3])),
                        (rid, version, bool(row[3])))

    def _move_head(self, ex: Executor, gone: tuple[int, int, bool] | None,
                   new: tuple[int, int, bool] | None = None) -> None:
        """The rows' head with row ``gone`` (id, version, flagged) taken out and ``new``
        put in (in the transaction under way)."""
        self._write_head(ex, (self._read_head(ex) or RowsHead()).changed(gone, new))

    def _read_head(self, ex: Executor) -> RowsHead | None:
        row = self._run(ex, "SELECT hash FROM {heads} WHERE origin = ?", (ROWS_HEAD,)).fetchone()
        return None if row is None else self._open_head(row[0])

    def _open_head(self, text: str) -> RowsHead | None:
        """The head sealed in ``text``; None (a fault) if it does not open."""
        try:
            return RowsHead.from_json(self.sealer.open(base64.b64decode(text), ROWS_HEAD.encode()))
        except (SealAltered, ValueError, KeyError):
            return None

    def _write_head(self, ex: Executor, head: RowsHead) -> None:
        sealed = base64.b64encode(self.sealer.seal(head.to_json(), ROWS_HEAD.encode())).decode()
        self._run(ex, "INSERT INTO {heads} (origin, seq, hash) VALUES (?, ?, ?) "
                  "ON CONFLICT (origin) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                  (ROWS_HEAD, head.seq, sealed))

    def _log_change(self, ex: Executor, op: str, rid: int) -> None:
        seq = self._run(ex, "INSERT INTO {changes} (op, id) VALUES (?, ?) RETURNING seq",
                        (op, rid)).fetchone()[0]
        self._announce(ex, int(seq))

    def _audit(self, ex: Executor, outcome: str) -> None:
        """The call's audit record, in the transaction under way (see
        :class:`index.registry.AuditEntry`)."""
        self._audit_as(ex, audit_var.get(), outcome)

    def _audit_as(self, ex: Executor, entry: AuditEntry | None, outcome: str) -> None:
        """``entry``'s audit record (none where it is None), in the transaction under way."""
        if entry is not None:
            entry.outbox_id = int(self._run(
                ex, "INSERT INTO {outbox} (origin, record) VALUES (?, ?) RETURNING id",
                (entry.origin, entry.record(outcome))).fetchone()[0])

    def _tag_untagged(self) -> None:
        """At open, with a data key: the rows' head sealed if there is none yet (a
        registry from before row versions, or sealing just turned on: nothing has a
        version), or its absence noted (:attr:`head_fault`); then
        :meth:`index.registry.RowCodec._tag_all_or_none`."""
        if not self.sealer.enabled:
            return
        with self._exclusive("tag") as ex:
            if self._run(ex, "SELECT 1 FROM {heads} WHERE origin = ?",
                         (ROWS_HEAD,)).fetchone() is None:
                if self._run(ex, "SELECT 1 FROM {versions} LIMIT 1").fetchone() is not None \
                        or self._run(ex, "SELECT 1 FROM {enrollments} WHERE version <> 0 "
                                     "LIMIT 1").fetchone() is not None:
                    self.head_fault = "its sealed head was deleted"
                    log.error("the registry's sealed head was deleted behind the service's "
                              "back: deleted or rolled-back rows cannot be ruled out")
                else:
                    rows = self._run(ex, "SELECT id, version, flagged FROM {enrollments}"
                                     ).fetchall()
                    self._write_head(ex, _sum(rows))
            untagged = [r[0] for r in self._run(
                ex, "SELECT id FROM {enrollments} WHERE tag IS NULL").fetchall()]
            tagged = self._run(ex, "SELECT 1 FROM {enrollments} WHERE tag IS NOT NULL "
                               "LIMIT 1").fetchone() is not None
            self._tag_all_or_none(untagged, tagged, lambda rid: self._retag(ex, rid))

    def _newest_row(self) -> Any:
        with self._reading("open") as ex:
            return self._run(ex, f"SELECT {COLUMNS} FROM {{enrollments}} ORDER BY id DESC "
                             "LIMIT 1").fetchone()

    # -- writes -----------------------------------------------------------------------

    def add(self, nik: str, embedding: np.ndarray, flagged: bool = False,
            candidates: list[tuple[str, float]] | None = None,
            metadata: dict[str, str] | None = None, photos: int = 1,
            note: str = "") -> Enrollment:
        """Insert an enrolment, log the change and its audit record (the call's:
        :data:`~index.registry.audit_var`); committed when this returns.  ``note``
        starts a flagged enrolment's review note (why it was flagged beyond its
        candidates); the reviewer's note is added to it.

        Raises:
            ValueError: the embedding is not of the registry's dimension.
            the backend's integrity error: the NIK is already enrolled.
        """
        with self.batch() as batch:
            return batch.add_many([NewEnrollment(nik, embedding, flagged, candidates or [],
                                                 metadata or {}, photos, note,
                                                 audit_var.get())])[0]

    @contextlib.contextmanager
    def batch(self) -> Iterator[WriteBatch]:
        """Enrolments written in one transaction (:class:`WriteBatch`; the caller
        holds the writer lock where the backend needs it), committed when the block
        ends, none of them if it raises."""
        with self._writing("enrol") as ex:
            yield WriteBatch(self, ex)

    def _insert_many(self, ex: Executor, rows: Sequence[NewEnrollment]) -> list[Enrollment]:
        """Insert ``rows``, each with its change logged and its audit record written,
        in the transaction under way.

        Raises:
            ValueError: an embedding is not of the registry's dimension.
        """
        return [self._insert(ex, row, time.time()) for row in rows]

    def _values(self, row: NewEnrollment, now: float) -> tuple[Any, ...]:
        """The columns an insert of ``row`` writes (see :meth:`_insert`)."""
        nik = row.nik
        return (nik, self._seal("embedding", nik, _vector(row, self.dim).tobytes()),
                row.flagged, self._blob(self._sealed_json("candidates", nik, row.candidates)),
                self._blob(self._sealed_json("metadata", nik, row.metadata)), now,
                "pending" if row.flagged else "none", row.photos,
                self._seal_text("review_note", nik, row.note))

    INSERT = ("INSERT INTO {enrollments} (nik, embedding, flagged, candidates, metadata, "
              "created_at, review, photos, review_note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
              "RETURNING id")

    def _insert(self, ex: Executor, row: NewEnrollment, now: float) -> Enrollment:
        new_id = int(self._run(ex, self.INSERT, self._values(row, now)).fetchone()[0])
        self._retag(ex, new_id, added=True)
        self._log_change(ex, "add", new_id)
        self._audit_as(ex, row.audit, row.outcome)
        return row.enrolled(new_id, now)

    def submit(self, requests: list[tuple[str, bytes]]) -> list[int]:
        """See :class:`index.registry.Registry` (a shared registry only)."""
        raise TypeError("only a shared registry takes enrolment requests")

    def withdraw(self, ids: list[int]) -> set[int]:
        raise TypeError("only a shared registry takes enrolment requests")

    def collect(self, ids: list[int]) -> dict[int, bytes]:
        raise TypeError("only a shared registry takes enrolment requests")

    def _settle(self, ex: Executor, decisions: Sequence[tuple[int, str, bytes]]) -> None:
        """Write the decisions (pending id, NIK, decision) on other servers' pending
        enrolments (a shared registry only: :mod:`index.postgres_registry`)."""
        raise TypeError("only a shared registry holds other servers' pending enrolments")

    def _pending(self, ex: Executor, limit: int) -> list[tuple[int, str, bytes]]:
        """Undecided requests of every server, oldest first (a shared registry only)."""
        raise TypeError("only a shared registry holds pending enrolments")

    def _forget(self, ex: Executor, pending_ids: Sequence[int]) -> None:
        """Delete this server's own pending enrolments, decided (a shared registry only)."""
        raise TypeError("only a shared registry holds pending enrolments")

    def resolve_review(self, nik: str, decision: str, reviewer: str, note: str
                       ) -> Enrollment | None:
        """Record a person's decision on a pending enrolment (``confirmed`` or
        ``cleared``); None if the NIK is not enrolled.  The embedding and the
        index are untouched: a confirmed duplicate stays findable.

        Raises:
            NotPending: the enrolment awaits no review (never flagged, or decided).
            Quarantined: its stored record fails authentication.
        """
        if decision not in ("confirmed", "cleared"):
            raise ValueError(f"unknown review decision {decision!r}")
        with self._writing("review") as ex:
            row = self._select_row(ex, "nik = ?", (nik,), lock=True)
            if row is None:
                return None
            why = self._fault(row)
            if why:
                raise self._quarantine(row, why)
            if row[7] != "pending":
                raise NotPending(f"this enrolment awaits no review (it is {row[7]})")
            # A note written at enrolment (why it was flagged) is kept before the reviewer's.
            before = self._open_text("review_note", nik, row[10])
            joined = f"{before} | {note}" if before and note else before or note
            self._run(ex, "UPDATE {enrollments} SET review = ?, reviewed_by = ?, "
                      "reviewed_at = ?, review_note = ? WHERE id = ?",
                      (decision, self._seal_text("reviewed_by", nik, reviewer), time.time(),
                       self._seal_text("review_note", nik, joined), row[0]))
            self._retag(ex, row[0])
            self._audit(ex, decision)
            row = self._select_row(ex, "id = ?", (row[0],))
        return self._row(row)

    def remove(self, nik: str) -> Enrollment | None:
        """Erase an enrolment, log the removal and its audit record, destroy the
        secret of its audit pseudonym (enrolled or not), and strike the NIK from
        other enrolments' candidate lists and review notes (``erased`` stands in);
        None if the NIK is not enrolled."""
        with self._writing("erase") as ex:
            shredded = self._run(ex, "DELETE FROM {pseudonyms} WHERE handle = ?",
                                 (self._handle(ex, nik),)).rowcount > 0
            rows = self._run(ex, f"DELETE FROM {{enrollments}} WHERE nik = ? "
                             f"RETURNING {COLUMNS}", (nik,)).fetchall()
            if rows:
                self._erased(ex, nik, rows[0])
        if rows or shredded:
            self._after_erase()
        return self._match_row(rows[0]) if rows else None  # a quarantined one too

    def _erased(self, ex: Executor, nik: str, row: Any) -> None:
        """What an erasure of ``row`` does beside deleting it (in its transaction):
        the head, the change log, the audit record, and the strikes."""
        if self.sealer.enabled:
            self._move_head(ex, (int(row[0]), int(row[13] or 0), bool(row[3])))
        self._log_change(ex, "remove", int(row[0]))
        self._audit(ex, "erased")
        # Only flagged enrolments have candidates.
        for other, other_nik, sealed in self._run(
                ex, "SELECT id, nik, candidates FROM {enrollments} WHERE flagged"
        ).fetchall():
            candidates = self._candidates(other, other_nik, sealed)
            if any(n == nik for n, _ in candidates):
                struck = [[ERASED if n == nik else n, s] for n, s in candidates]
                self._run(ex, "UPDATE {enrollments} SET candidates = ? WHERE id = ?",
                          (self._blob(self._sealed_json("candidates", other_nik, struck)),
                           other))
                self._retag(ex, other)
        # A reviewer's note may name it too, in any spacing (notes written since
        # refuse NIKs: see server.core.enrolment).
        for other, other_nik, stored in self._run(
                ex, "SELECT id, nik, review_note FROM {enrollments} WHERE review_note <> ''"
        ).fetchall():
            try:
                note = self._open_text("review_note", other_nik, stored)
            except SealAltered as exc:
                self._quarantine((other,), str(exc))
                continue
            kept = strike_nik(note, nik)
            if kept != note:
                self._run(ex, "UPDATE {enrollments} SET review_note = ? WHERE id = ?",
                          (self._seal_text("review_note", other_nik, kept), other))
                self._retag(ex, other)

    def reseal(self, batch: int = 1000) -> int:
        """Seal every value with the current data key (opening it with whichever
        key sealed it); how many rows changed."""
        changed, last = 0, 0
        while True:
            with self._writing("reseal") as ex:
                rows = self._run(ex, f"SELECT {READ} FROM {{enrollments}} WHERE id > ? "
                                 "ORDER BY id LIMIT ?", (last, batch)).fetchall()
                for row in rows:
                    values = self._resealed(row)
                    if values is None:
                        continue
                    self._run(ex, "UPDATE {enrollments} SET embedding = ?, candidates = ?, "
                              "metadata = ?, reviewed_by = ?, review_note = ? WHERE id = ?",
                              (values[0], self._blob(values[1]), self._blob(values[2]),
                               values[3], values[4], row[0]))
                    self._retag(ex, row[0])
                    changed += 1
            if not rows:
                break
            last = rows[-1][0]
        with self._writing("reseal") as ex:  # the audit pseudonyms' secrets (a few per NIK)
            for handle, secret in self._run(ex, "SELECT handle, secret FROM {pseudonyms}"
                                            ).fetchall():
                if self.sealer.needs_reseal(bytes(secret)):
                    self._run(ex, "UPDATE {pseudonyms} SET secret = ? WHERE handle = ?",
                              (self._blob(self._seal("pseudonym", handle,
                                                     self._open("pseudonym", handle, secret))),
                               handle))
        self._after_erase()
        return changed

    def _handle(self, ex: Executor, nik: str) -> str:
        """Where ``nik``'s pseudonym secret is kept: a keyed hash of the NIK with a
        random key of the registry's own (made once, in its meta table), the same for
        every server that shares the registry, so that any one's erasure finds it."""
        if self._pseudonym_key is None:
            query = "SELECT value FROM {meta} WHERE key = 'pseudonym_key'"
            row = self._run(ex, query).fetchone()
            if row is None:
                self._run(ex, "INSERT INTO {meta} (key, value) VALUES ('pseudonym_key', ?) "
                          "ON CONFLICT (key) DO NOTHING", (os.urandom(32).hex(),))
                row = self._run(ex, query).fetchone()  # another's, if first
            self._pseudonym_key = bytes.fromhex(row[0])
        return hmac.new(self._pseudonym_key, nik.encode(), hashlib.sha256).hexdigest()[:32]

    def pseudonym_secret(self, nik: str, create: bool = True) -> bytes | None:
        """See :meth:`index.registry.Registry.pseudonym_secret` (sealed with the data
        key where there is one, bound to its handle).

        Raises:
            SealError: the stored secret does not open (altered or moved).
        """
        query = "SELECT secret FROM {pseudonyms} WHERE handle = ?"
        with self._reading("pseudonym") as ex:
            handle = self._handle(ex, nik)
            row = self._run(ex, query, (handle,)).fetchone()
            if row is None and create:
                secret = self._seal("pseudonym", handle, os.urandom(32))
                self._run(ex, "INSERT INTO {pseudonyms} (handle, secret) VALUES (?, ?) "
                          "ON CONFLICT (handle) DO NOTHING", (handle, self._blob(secret)))
                row = self._run(ex, query, (handle,)).fetchone()  # another's, if first
        return None if row is None else self._open("pseudonym", handle, row[0])

    def audit_pending(self, origin: str, limit: int) -> list[tuple[int, str]]:
        with self._reading("audit outbox") as ex:
            rows = self._run(ex, "SELECT id, record FROM {outbox} WHERE origin = ? "
                             "ORDER BY id LIMIT ?", (origin, limit)).fetchall()
        return [(int(i), str(r)) for i, r in rows]

    def audit_exported(self, origin: str, upto: int) -> None:
        with self._reading("audit outbox") as ex:
            self._run(ex, "DELETE FROM {outbox} WHERE origin = ? AND id <= ?", (origin, upto))

    def audit_anchor(self, origin: str, seq: int, head_hash: str) -> None:
        with self._reading("audit head") as ex:
            self._run(ex, "INSERT INTO {heads} (origin, seq, hash) VALUES (?, ?, ?) "
                      "ON CONFLICT (origin) DO UPDATE SET seq = excluded.seq, "
                      "hash = excluded.hash WHERE excluded.seq > {heads}.seq",
                      (origin, seq, head_hash))

    def audit_head(self, origin: str) -> tuple[int, str] | None:
        with self._reading("audit head") as ex:
            row = self._run(ex, "SELECT seq, hash FROM {heads} WHERE origin = ?",
                            (origin,)).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    # -- reads ------------------------------------------------------------------------

    def _batches(self, what: str, where: str, batch: int) -> Iterator[list[Any]]:
        """The rows ``where`` holds (SQL, true for all: ``TRUE``), in id order, ``batch``
        at a time, each batch read in a transaction of its own."""
        last = 0
        while True:
            with self._reading(what) as ex:
                rows = self._run(ex, f"SELECT {READ} FROM {{enrollments}} WHERE {where} "
                                 "AND id > ? ORDER BY id LIMIT ?", (last, batch)).fetchall()
            if not rows:
                return
            yield rows
            last = rows[-1][0]

    def check_head(self) -> str | None:
        """Whether the rows add up to their sealed head (:class:`index.registry.RowsHead`),
        read with them under the writer lock; rows at an earlier version than the
        registry gave them are quarantined on the way.  Sets and returns
        :attr:`head_fault`: None, or what does not add up."""
        if not self.sealer.enabled:
            return None
        with self._exclusive("integrity head") as ex:
            stored = self._run(ex, "SELECT hash FROM {heads} WHERE origin = ?",
                               (ROWS_HEAD,)).fetchone()
            rows = self._run(ex, "SELECT id, version, flagged FROM {enrollments}").fetchall()
            last = int(self._run(ex, "SELECT MAX(seq) FROM {versions}").fetchone()[0] or 0)
            stale = self._run(ex, f"SELECT {READ} FROM {{enrollments}} "
                              f"WHERE version < {LATEST}").fetchall()
        for row in stale:
            self._quarantine(row, self._fault(row) or "an earlier copy was put back")
        head = None if stored is None else self._open_head(stored[0])
        found = _sum(rows)
        if stored is None:
            fault: str | None = "its sealed head was deleted"
        elif head is None:
            fault = "its sealed head does not open (altered)"
        elif (found.count, found.flagged, found.xor) != (head.count, head.flagged, head.xor):
            fault = (f"its {found.count} rows ({found.flagged} flagged) do not add up to its "
                     f"sealed head ({head.count}, {head.flagged} flagged): rows deleted, "
                     "inserted or put back behind the service's back")
        elif last != head.seq:
            fault = (f"its versions end at {last} but its sealed head at {head.seq}: "
                     "cut back or written behind the service's back")
        else:
            fault = None
        self.head_fault = fault
        return fault

    def accept_head(self) -> RowsHead:
        """Seal the head over the rows as they are now (an operator's decision after
        :meth:`check_head` found a fault and what could be restored was)."""
        with self._exclusive("accept head") as ex:
            rows = self._run(ex, "SELECT id, version, flagged FROM {enrollments}").fetchall()
            last = int(self._run(ex, "SELECT MAX(seq) FROM {versions}").fetchone()[0] or 0)
            head = RowsHead(last, *astuple(_sum(rows))[1:])
            self._write_head(ex, head)
        self.head_fault = None
        return head

    def scan_rows(self, batch: int = 10_000, head: bool = True) -> int:
        """Check the rows' head (:meth:`check_head`; not if ``head`` is false) and
        every row's integrity; how many rows are quarantined."""
        if head:
            self.check_head()
        return self.scan(self._batches("integrity scan", "TRUE", batch))

    def review_queue(self, after_id: int, limit: int, batch: int = 1000
                     ) -> tuple[list[Enrollment], int]:
        """Enrolments awaiting review, oldest first, after the one with id ``after_id``
        (at most ``limit``), and how many await review in all.

        Every flagged row is authenticated on the way, whatever its review state
        says: a pending row set to cleared (or confirmed) behind the service's back
        is quarantined and counted now, not left out of the queue unseen; only
        authentic rows are listed or counted."""
        if self.sealer.enabled:
            with self._reading("reviews") as ex:  # one statement: one snapshot
                stored, flagged = self._run(
                    ex, "SELECT (SELECT hash FROM {heads} WHERE origin = ?), "
                    "(SELECT COUNT(*) FROM {enrollments} WHERE flagged)", (ROWS_HEAD,)).fetchone()
            head = None if stored is None else self._open_head(stored)
            if head is None or head.flagged != int(flagged):
                # A flag cleared on disk takes its row out of what is read below:
                # find it now, not at the next start.
                self.scan_rows()
        page: list[Enrollment] = []
        total = 0
        for rows in self._batches("reviews", "flagged", batch):
            for row in rows:
                try:
                    enrolment = self._row(row)
                except Quarantined:
                    continue
                if enrolment.review == "pending":
                    total += 1
                    if enrolment.id > after_id and len(page) < limit:
                        page.append(enrolment)
        return page, total

    def count_pending(self) -> int:
        with self._reading("reviews") as ex:
            return int(self._run(ex, "SELECT COUNT(*) FROM {enrollments} "
                                 "WHERE review = 'pending'").fetchone()[0])

    def get(self, nik: str) -> Enrollment | None:
        with self._reading("look-up") as ex:
            row = self._select_row(ex, "nik = ?", (nik,))
        return self._row(row) if row else None

    def _rows_where_in(self, column: str, values: Sequence[Any]) -> list[Any]:
        if not values:
            return []
        marks = ",".join("?" * len(values))
        with self._reading("look-up") as ex:
            rows: list[Any] = self._run(ex, f"SELECT {READ} FROM {{enrollments}} "
                                        f"WHERE {column} IN ({marks})", values).fetchall()
        return rows

    def get_by_ids(self, ids: list[int]) -> dict[int, Enrollment]:
        return {int(r[0]): self._match_row(r) for r in self._rows_where_in("id", ids)}

    def get_many(self, niks: list[str]) -> dict[str, Enrollment | Quarantined]:
        """The enrolments of those of ``niks`` enrolled, each NIK's
        :class:`~index.errors.Quarantined` in place of one that fails authentication."""
        found: dict[str, Enrollment | Quarantined] = {}
        for row in self._rows_where_in("nik", niks):
            try:
                found[row[1]] = self._row(row)
            except Quarantined as exc:
                found[row[1]] = exc
        return found

    def count(self) -> int:
        with self._reading("count") as ex:
            return int(self._run(ex, "SELECT COUNT(*) FROM {enrollments}").fetchone()[0])

    def last_seq(self) -> int:
        with self._reading("change log") as ex:
            row = self._run(ex, "SELECT MAX(seq) FROM {changes}").fetchone()
        return int(row[0] or 0) if row else 0

    def changes_since(self, seq: int, limit: int | None = None) -> list[Change]:
        """Changes after ``seq`` in order (at most ``limit``), with the current
        embedding of added ids."""
        with self._reading("change log") as ex:
            rows = self._run(
                ex, "SELECT c.seq, c.op, c.id, e.nik, e.embedding FROM {changes} c "
                "LEFT JOIN {enrollments} e ON e.id = c.id AND c.op = 'add' "
                "WHERE c.seq > ? ORDER BY c.seq LIMIT ?",
                (seq, self.UNLIMITED if limit is None else limit)).fetchall()
        return self._changes(rows)

    def iter_embeddings(self, batch: int = 50_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All (ids, embeddings) in id order, in batches (for rebuilding the index)."""
        last = 0
        while True:
            with self._reading("embeddings") as ex:
                rows = self._run(ex, "SELECT id, nik, embedding FROM {enrollments} "
                                 "WHERE id > ? ORDER BY id LIMIT ?", (last, batch)).fetchall()
            if not rows:
                return
            ids, embs = self._embeddings(rows, self.dim)
            yield ids, embs
            last = int(ids[-1])


def _sum(rows: Sequence[Any]) -> RowsHead:
    """What rows of (id, version, flagged) add up to (their head's ``seq`` aside)."""
    xor, flagged = 0, 0
    for rid, version, f in rows:
        xor ^= int.from_bytes(RowsHead.term(int(rid), int(version or 0)))
        flagged += bool(f)
    return RowsHead(0, len(rows), flagged, xor.to_bytes(32))


class WriteBatch:
    """Writes in one transaction of a :class:`SqlRegistry` (:meth:`SqlRegistry.batch`)."""

    def __init__(self, registry: SqlRegistry, ex: Executor) -> None:
        self._registry = registry
        self._ex = ex

    def add_many(self, rows: Sequence[NewEnrollment]) -> list[Enrollment]:
        """Insert enrolments, each with its change logged and its ``audit`` record
        written (the entry's ``outbox_id`` set).

        Raises:
            ValueError: an embedding is not of the registry's dimension.
            the backend's integrity error: a NIK is already enrolled.
        """
        return self._registry._insert_many(self._ex, rows) if rows else []

    def pending(self, limit: int) -> list[tuple[int, str, bytes]]:
        """Requests left by every server (``submit``) not decided yet, oldest first, at
        most ``limit``: (id, NIK, request), each locked until the transaction ends.  A
        request that does not open with the data key is dropped, and a decision
        nobody collected within a minute (its requester stopped) deleted."""
        return self._registry._pending(self._ex, limit)

    def settle(self, decisions: Sequence[tuple[int, str, bytes]]) -> None:
        """Write the decisions (pending id, NIK, decision) on other servers' requests."""
        if decisions:
            self._registry._settle(self._ex, decisions)

    def forget(self, pending_ids: Sequence[int]) -> None:
        """Delete this server's own requests, decided."""
        if pending_ids:
            self._registry._forget(self._ex, pending_ids)


def _vector(row: NewEnrollment, dim: int) -> np.ndarray:
    vec = np.ascontiguousarray(row.embedding, dtype=np.float32)
    if vec.shape != (dim,):
        raise ValueError(f"embedding shape {vec.shape} != ({dim},)")
    return vec

