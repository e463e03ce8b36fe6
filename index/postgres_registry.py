"""The shared registry: PostgreSQL, for servers on many machines (see
:mod:`index.registry` for the interface).

The writer lock is a session-level advisory lock taken on one dedicated
connection, and every write that logs a change is made on that same
connection while it holds the lock.  So de-duplication's search and insert
are atomic across every server, and change-log sequence numbers commit in
order (a replica that has applied change N never later finds an N - 1).  If
that connection breaks while the lock is held, PostgreSQL releases the lock
and the write fails: it is never retried elsewhere without the lock.  Each
change is announced with ``NOTIFY faceverify_changes`` (see
:mod:`index.follower`).

Reads use a small pool whose connections are checked before use.  When
PostgreSQL is down or unreachable, every call that needs it fails within the
connect timeout with :class:`~index.registry.RegistryUnavailable`
(``UNAVAILABLE``, retryable); the pool and the writer reconnect by themselves
once it is back.  Nothing acknowledged is lost: an enrolment is acknowledged
only after its transaction committed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from index.errors import ConfigurationError, RegistryUnavailable, StartupError
from index.registry import (
    COLUMNS,
    ERASED,
    Change,
    ChangeListener,
    Enrollment,
    NotPending,
    RowCodec,
    WriterLock,
    audit_var,
    redact,
)
from index.sealing import Sealer

log = logging.getLogger(__name__)

CHANNEL = "faceverify_changes"
# The advisory lock key of the writer lock (any 64-bit number, ours alone).
LOCK_KEY = 0x66766572696679  # "fverify"

SCHEMA = """
CREATE TABLE IF NOT EXISTS faceverify_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS faceverify_enrollments (
    id BIGSERIAL PRIMARY KEY,
    nik TEXT NOT NULL UNIQUE,
    embedding BYTEA NOT NULL,
    flagged BOOLEAN NOT NULL DEFAULT FALSE,
    candidates BYTEA NOT NULL,
    metadata BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    review TEXT NOT NULL DEFAULT 'none',
    reviewed_by TEXT NOT NULL DEFAULT '',
    reviewed_at DOUBLE PRECISION,
    review_note TEXT NOT NULL DEFAULT '',
    photos INTEGER NOT NULL DEFAULT 1
);
ALTER TABLE faceverify_enrollments ADD COLUMN IF NOT EXISTS tag BYTEA;
CREATE INDEX IF NOT EXISTS faceverify_enrollments_review
    ON faceverify_enrollments (review, id);
CREATE TABLE IF NOT EXISTS faceverify_changes (
    seq BIGSERIAL PRIMARY KEY,
    op TEXT NOT NULL CHECK (op IN ('add', 'remove')),
    id BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS faceverify_audit_outbox (
    id BIGSERIAL PRIMARY KEY,
    origin TEXT NOT NULL,
    record TEXT NOT NULL
);
"""

_DOWN = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    """PostgreSQL down or unreachable -> RegistryUnavailable (retryable)."""
    try:
        yield
    except _DOWN as exc:
        log.warning("registry unavailable (%s): %s", what, str(exc).splitlines()[0] if str(exc)
                    else type(exc).__name__)
        raise RegistryUnavailable(f"the shared registry cannot be reached ({what}); retry "
                                  "shortly") from exc


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


class AdvisoryLock:
    """The writer lock: a re-entrant thread lock, then ``pg_advisory_lock`` on the
    registry's writer connection (see the module docstring)."""

    def __init__(self, registry: PostgresRegistry) -> None:
        self._registry = registry
        self._thread_lock = threading.RLock()
        self._depth = 0
        self.on_acquire: Callable[[], None] = lambda: None

    @property
    def held(self) -> bool:
        return self._depth > 0

    def __enter__(self) -> AdvisoryLock:
        self._thread_lock.acquire()
        if self._depth == 0:
            locked = False
            try:
                with _unavailable("writer lock"):
                    conn = self._registry.writer(reconnect=True)
                    conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
                    locked = True
                self.on_acquire()
            except BaseException:
                if locked:
                    self._unlock()
                self._thread_lock.release()
                raise
        self._depth += 1
        return self

    def _unlock(self) -> None:
        try:
            self._registry.writer().execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
        except (*_DOWN, RegistryUnavailable):
            # The session is gone, and PostgreSQL released its lock with it.
            self._registry.drop_writer()

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._unlock()
        self._thread_lock.release()

    def close(self) -> None:
        pass


class _Listener:
    """A connection that ``LISTEN``s on :data:`CHANNEL` (see :meth:`PostgresRegistry.listen`)."""

    def __init__(self, url: str, connect_timeout: float) -> None:
        try:
            self._conn: psycopg.Connection[Any] = psycopg.connect(
                url, autocommit=True, connect_timeout=max(1, round(connect_timeout)))
            self._conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as exc:
            raise RegistryUnavailable(f"cannot listen to the registry's changes "
                                      f"({type(exc).__name__})") from exc

    def wait(self, timeout: float) -> None:
        try:
            for _ in self._conn.notifies(timeout=timeout, stop_after=1):
                pass
        except psycopg.Error as exc:
            raise RegistryUnavailable(f"lost the registry's change notices "
                                      f"({type(exc).__name__})") from exc

    def close(self) -> None:
        self._conn.close()


class PostgresRegistry(RowCodec):
    """Thread-safe access to a PostgreSQL registry shared by many servers.

    Raises:
        ConfigurationError: at open, PostgreSQL cannot be reached.
        RegistryMismatch: at open, it holds another model's embeddings.
    """

    @staticmethod
    def read_meta(url: str) -> tuple[str, int]:
        """The model version and dimension the registry at ``url`` was written with.

        Raises:
            StartupError: no readable registry there.
        """
        try:
            with psycopg.connect(url, connect_timeout=5) as conn:
                meta: dict[str, str] = dict(
                    conn.execute("SELECT key, value FROM faceverify_meta").fetchall())
        except psycopg.Error as exc:
            raise StartupError(f"no readable registry at {redact(url)}: "
                               f"{str(exc).splitlines()[0]}") from exc
        return str(meta["model_version"]), int(meta["dim"])

    def listen(self) -> ChangeListener:
        """A connection of its own that ``LISTEN``s for the change notices.

        Raises:
            RegistryUnavailable: PostgreSQL cannot be reached.
        """
        return _Listener(self.url, self.connect_timeout)

    def __init__(self, url: str, model_version: str, dim: int, sealer: Sealer | None = None,
                 connect_timeout: float = 3.0) -> None:
        self.url = url
        self.dim = dim
        self.sealer = sealer or Sealer()
        self.quarantined = set()
        self.unindexed = set()
        self.connect_timeout = connect_timeout
        self._connect_kwargs: dict[str, Any] = {
            "autocommit": True, "connect_timeout": max(1, round(connect_timeout)),
            # A lost peer is noticed in seconds, not at the kernel's TCP timeout.
            "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
            "keepalives_count": 2, "options": "-c lock_timeout=30s"}
        self._writer: psycopg.Connection[Any] | None = None
        self.lock: WriterLock = AdvisoryLock(self)
        self.distributed = True
        try:
            self._writer = psycopg.connect(url, **self._connect_kwargs)
        except psycopg.Error as exc:
            raise ConfigurationError(f"cannot reach the registry at {redact(url)}: "
                                     f"{str(exc).splitlines()[0]}") from exc
        self.pool = ConnectionPool(url, kwargs=self._connect_kwargs, min_size=1, max_size=8,
                                   timeout=connect_timeout, check=ConnectionPool.check_connection,
                                   reconnect_timeout=float("inf"), name="faceverify-registry",
                                   open=True)
        try:
            self._create(model_version, dim)
            self._check_key()
            self._tag_untagged()
        except BaseException:
            self.close()
            raise

    # -- connections --------------------------------------------------------------------

    def writer(self, reconnect: bool = False) -> psycopg.Connection[Any]:
        """The writer connection; a new one only when ``reconnect`` (never while
        the lock is held: a write must happen on the session that holds it)."""
        conn = self._writer
        if conn is None or conn.closed or conn.broken:
            if not reconnect:
                raise RegistryUnavailable("the shared registry's connection was lost; retry")
            with _unavailable("connect"):
                conn = self._writer = psycopg.connect(self.url, **self._connect_kwargs)
        return conn

    def drop_writer(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(psycopg.Error):
                self._writer.close()
            self._writer = None

    @contextlib.contextmanager
    def _read(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        with _unavailable(what), self.pool.connection() as conn:
            yield conn

    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        """A transaction on the writer connection (the lock must be held)."""
        if not isinstance(self.lock, AdvisoryLock) or not self.lock.held:
            raise RuntimeError(f"{what} outside the writer lock")
        with _unavailable(what):
            conn = self.writer()
            with conn.transaction():
                yield conn

    def close(self) -> None:
        self.pool.close()
        self.drop_writer()

    # -- schema ---------------------------------------------------------------------------

    def _create(self, model_version: str, dim: int) -> None:
        conn = self.writer()
        with conn.transaction():
            # Servers starting together must not create the tables twice.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            conn.execute(SCHEMA)
            meta = dict(conn.execute("SELECT key, value FROM faceverify_meta").fetchall())
            if not meta:
                meta = {"model_version": model_version, "dim": str(dim),
                        "registry_id": uuid.uuid4().hex}
                conn.cursor().executemany("INSERT INTO faceverify_meta VALUES (%s, %s)",
                                          list(meta.items()))
        self.registry_id = meta["registry_id"]
        self._check_meta_values(redact(self.url), meta, model_version, dim)

    def _check_key(self) -> None:
        with self._read("open") as conn:
            row = conn.execute(f"SELECT {COLUMNS} FROM faceverify_enrollments "
                               "ORDER BY id DESC LIMIT 1").fetchone()
        self._check_key_opens(f"at {redact(self.url)}", row)

    def _tag_untagged(self) -> None:
        """See :meth:`index.registry.RowCodec._tag_all_or_none`."""
        if not self.sealer.enabled:
            return
        with self.lock, self._write("tag") as conn:
            untagged = [r[0] for r in conn.execute(
                "SELECT id FROM faceverify_enrollments WHERE tag IS NULL").fetchall()]
            tagged = conn.execute("SELECT 1 FROM faceverify_enrollments WHERE tag IS NOT NULL "
                                  "LIMIT 1").fetchone() is not None
            self._tag_all_or_none(untagged, tagged, lambda rid: self._retag(conn, rid))

    def _retag(self, conn: psycopg.Connection[Any], rid: int) -> None:
        """Write row ``rid``'s tag (in the transaction under way)."""
        if not self.sealer.enabled:
            return
        row = conn.execute(f"SELECT {COLUMNS} FROM faceverify_enrollments WHERE id = %s",
                           (rid,)).fetchone()
        if row is not None:
            conn.execute("UPDATE faceverify_enrollments SET tag = %s WHERE id = %s",
                         (self._tag(row), rid))

    def scan_rows(self, batch: int = 10_000) -> int:
        """Check every row's integrity; how many are quarantined."""
        def batches() -> Iterator[list[Any]]:
            last = 0
            while True:
                with self._read("integrity scan") as conn:
                    rows = conn.execute(f"SELECT {COLUMNS} FROM faceverify_enrollments "
                                        "WHERE id > %s ORDER BY id LIMIT %s",
                                        (last, batch)).fetchall()
                if not rows:
                    return
                yield rows
                last = rows[-1][0]
        return self.scan(batches())

    # -- writes (under the lock) ------------------------------------------------------------

    def add(self, nik: str, embedding: np.ndarray, flagged: bool = False,
            candidates: list[tuple[str, float]] | None = None,
            metadata: dict[str, str] | None = None, photos: int = 1) -> Enrollment:
        """Insert an enrolment and log it; committed when this returns."""
        vec = np.ascontiguousarray(embedding, dtype=np.float32)
        if vec.shape != (self.dim,):
            raise ValueError(f"embedding shape {vec.shape} != ({self.dim},)")
        now = time.time()
        cands = candidates or []
        review = "pending" if flagged else "none"
        with self._write("enrol") as conn:
            new_id = int(conn.execute(
                "INSERT INTO faceverify_enrollments (nik, embedding, flagged, candidates, "
                "metadata, created_at, review, photos) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                "RETURNING id",
                (nik, self._seal("embedding", nik, vec.tobytes()), flagged,
                 _bytes(self._sealed_json("candidates", nik, cands)),
                 _bytes(self._sealed_json("metadata", nik, metadata or {})), now, review,
                 photos)).fetchone()[0])  # type: ignore[index]
            self._retag(conn, new_id)
            self._log_change(conn, "add", new_id)
            self._audit(conn, "enrolled_flagged" if flagged else "enrolled")
        return Enrollment(new_id, nik, vec.copy(), flagged, list(cands), dict(metadata or {}),
                          now, review, photos=photos)

    @staticmethod
    def _log_change(conn: psycopg.Connection[Any], op: str, rid: int) -> None:
        seq = conn.execute("INSERT INTO faceverify_changes (op, id) VALUES (%s, %s) "
                           "RETURNING seq", (op, rid)).fetchone()[0]  # type: ignore[index]
        # Delivered to listeners when the transaction commits.
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(seq)))

    @staticmethod
    def _audit(conn: psycopg.Connection[Any], outcome: str) -> None:
        """The call's audit record, in the transaction under way (see
        :class:`index.registry.AuditEntry`)."""
        entry = audit_var.get()
        if entry is not None:
            entry.outbox_id = int(conn.execute(
                "INSERT INTO faceverify_audit_outbox (origin, record) VALUES (%s, %s) "
                "RETURNING id", (entry.origin, entry.record(outcome))
            ).fetchone()[0])  # type: ignore[index]

    def audit_pending(self, origin: str, limit: int) -> list[tuple[int, str]]:
        with self._read("audit outbox") as conn:
            rows = conn.execute("SELECT id, record FROM faceverify_audit_outbox WHERE "
                                "origin = %s ORDER BY id LIMIT %s", (origin, limit)).fetchall()
        return [(int(i), str(r)) for i, r in rows]

    def audit_exported(self, origin: str, upto: int) -> None:
        with self._read("audit outbox") as conn:
            conn.execute("DELETE FROM faceverify_audit_outbox WHERE origin = %s AND id <= %s",
                         (origin, upto))

    def resolve_review(self, nik: str, decision: str, reviewer: str, note: str
                       ) -> Enrollment | None:
        if decision not in ("confirmed", "cleared"):
            raise ValueError(f"unknown review decision {decision!r}")
        with self._write("review") as conn:
            row = conn.execute(f"SELECT {COLUMNS} FROM faceverify_enrollments WHERE nik = %s "
                               "FOR UPDATE", (nik,)).fetchone()
            if row is None:
                return None
            if not self._authentic(row):
                raise self._quarantine(row, "its tag does not match its columns")
            if row[7] != "pending":
                raise NotPending(f"this enrolment awaits no review (it is {row[7]})")
            conn.execute(
                "UPDATE faceverify_enrollments SET review = %s, reviewed_by = %s, "
                "reviewed_at = %s, review_note = %s WHERE id = %s",
                (decision, reviewer, time.time(), note, row[0]))
            self._retag(conn, row[0])
            row = conn.execute(f"SELECT {COLUMNS} FROM faceverify_enrollments WHERE id = %s",
                               (row[0],)).fetchone()
            self._audit(conn, decision)
        return self._row(row)

    def remove(self, nik: str) -> Enrollment | None:
        """Erase an enrolment, log the removal, strike the NIK from other enrolments'
        candidate lists and review notes (``erased`` stands in); None if the NIK is
        not enrolled."""
        with self._write("erase") as conn:
            row = conn.execute(f"DELETE FROM faceverify_enrollments WHERE nik = %s "
                               f"RETURNING {COLUMNS}", (nik,)).fetchone()
            if row is None:
                return None
            self._log_change(conn, "remove", int(row[0]))
            self._audit(conn, "erased")
            for other, other_nik, sealed in conn.execute(
                    "SELECT id, nik, candidates FROM faceverify_enrollments WHERE flagged"
            ).fetchall():
                candidates = self._candidates(other, other_nik, sealed)
                if any(n == nik for n, _ in candidates):
                    struck = [[ERASED if n == nik else n, s] for n, s in candidates]
                    conn.execute("UPDATE faceverify_enrollments SET candidates = %s "
                                 "WHERE id = %s",
                                 (_bytes(self._sealed_json("candidates", other_nik, struck)),
                                  other))
                    self._retag(conn, other)
            for (other,) in conn.execute(
                    "UPDATE faceverify_enrollments SET review_note = replace(review_note, %s, "
                    "%s) WHERE strpos(review_note, %s) > 0 RETURNING id",
                    (nik, ERASED, nik)).fetchall():
                self._retag(conn, other)
        return self._match_row(row)  # erasing a quarantined enrolment is allowed

    def reseal(self, batch: int = 1000) -> int:
        """Seal every value with the current data key; how many rows changed."""
        changed, last = 0, 0
        while True:
            with self._write("reseal") as conn:
                rows = conn.execute(
                    f"SELECT {COLUMNS} FROM faceverify_enrollments WHERE id > %s "
                    "ORDER BY id LIMIT %s", (last, batch)).fetchall()
                for row in rows:
                    values = self._resealed(row)
                    if values is None:
                        continue
                    conn.execute("UPDATE faceverify_enrollments SET embedding = %s, "
                                 "candidates = %s, metadata = %s WHERE id = %s",
                                 (values[0], _bytes(values[1]), _bytes(values[2]), row[0]))
                    self._retag(conn, row[0])
                    changed += 1
            if not rows:
                return changed
            last = rows[-1][0]

    # -- reads ----------------------------------------------------------------------------

    def pending_reviews(self, after_id: int, limit: int) -> list[Enrollment]:
        with self._read("reviews") as conn:
            rows = conn.execute(f"SELECT {COLUMNS} FROM faceverify_enrollments WHERE "
                                "review = 'pending' AND id > %s ORDER BY id LIMIT %s",
                                (after_id, limit)).fetchall()
        return [self._row(r) for r in rows]

    def count_pending(self) -> int:
        with self._read("reviews") as conn:
            return int(conn.execute("SELECT COUNT(*) FROM faceverify_enrollments "
                                    "WHERE review = 'pending'").fetchone()[0])  # type: ignore[index]

    def get(self, nik: str) -> Enrollment | None:
        with self._read("look-up") as conn:
            row = conn.execute(f"SELECT {COLUMNS} FROM faceverify_enrollments WHERE nik = %s",
                               (nik,)).fetchone()
        return self._row(row) if row else None

    def get_by_ids(self, ids: list[int]) -> dict[int, Enrollment]:
        if not ids:
            return {}
        with self._read("look-up") as conn:
            rows = conn.execute(f"SELECT {COLUMNS} FROM faceverify_enrollments "
                                "WHERE id = ANY(%s)", (ids,)).fetchall()
        return {int(r[0]): self._match_row(r) for r in rows}

    def count(self) -> int:
        with self._read("count") as conn:
            return int(conn.execute("SELECT COUNT(*) FROM faceverify_enrollments"
                                    ).fetchone()[0])  # type: ignore[index]

    def last_seq(self) -> int:
        with self._read("change log") as conn:
            row = conn.execute("SELECT MAX(seq) FROM faceverify_changes").fetchone()
        return int(row[0] or 0) if row else 0

    def changes_since(self, seq: int, limit: int | None = None) -> list[Change]:
        """Changes after ``seq`` in order (at most ``limit``), with the current
        embedding of added ids."""
        with self._read("change log") as conn:
            rows = conn.execute(
                "SELECT c.seq, c.op, c.id, e.nik, e.embedding FROM faceverify_changes c "
                "LEFT JOIN faceverify_enrollments e ON e.id = c.id AND c.op = 'add' "
                "WHERE c.seq > %s ORDER BY c.seq LIMIT %s", (seq, limit)).fetchall()
        return self._changes(rows)

    def iter_embeddings(self, batch: int = 50_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All (ids, embeddings) in id order, in batches (for rebuilding the index)."""
        last = 0
        while True:
            with self._read("embeddings") as conn:
                rows = conn.execute("SELECT id, nik, embedding FROM faceverify_enrollments "
                                    "WHERE id > %s ORDER BY id LIMIT %s", (last, batch)).fetchall()
            if not rows:
                return
            ids, embs = self._embeddings(rows, self.dim)
            yield ids, embs
            last = int(ids[-1])
