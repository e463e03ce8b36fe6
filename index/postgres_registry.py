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
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from index.durable import ProcessesLock
from index.errors import ConfigurationError, RegistryUnavailable, StartupError
from index.registry import ChangeListener, Enrollment, NewEnrollment, WriterLock, redact
from index.rules import Executor, SqlRegistry
from index.sealing import Sealer, SealError

log = logging.getLogger(__name__)

CHANNEL = "faceverify_changes"
DECIDED = "faceverify_decided"  # pending enrolments were decided (index.enrolling)
# The advisory lock key of the writer lock (any 64-bit number, ours alone).
LOCK_KEY = 0x66766572696679  # "fverify"
# A decision its requester never collected (it stopped) is deleted after this long.
UNCOLLECTED_S = 60.0

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
ALTER TABLE faceverify_enrollments ADD COLUMN IF NOT EXISTS version BIGINT NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS faceverify_row_versions (
    seq BIGSERIAL PRIMARY KEY,
    id BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS faceverify_enrollments_flagged
    ON faceverify_enrollments (id) WHERE flagged;
CREATE INDEX IF NOT EXISTS faceverify_row_versions_id ON faceverify_row_versions (id, seq);
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
CREATE TABLE IF NOT EXISTS faceverify_pseudonyms (
    handle TEXT PRIMARY KEY,
    secret BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS faceverify_pending (
    id BIGSERIAL PRIMARY KEY,
    nik TEXT NOT NULL,
    request BYTEA NOT NULL,
    decision BYTEA,
    submitted_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS faceverify_pending_undecided
    ON faceverify_pending (id) WHERE decision IS NULL;
CREATE INDEX IF NOT EXISTS faceverify_pending_nik ON faceverify_pending (nik);
CREATE TABLE IF NOT EXISTS faceverify_audit_heads (
    origin TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL
);
"""

_DOWN = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


def _returned(cur: psycopg.Cursor[Any], query: str, params: list[tuple[Any, ...]]) -> list[int]:
    """``query`` run for each of ``params`` (pipelined), the first column it returned
    for each, in order."""
    cur.executemany(query, params, returning=True)
    out = []
    while True:
        row = cur.fetchone()
        if row is not None:
            out.append(int(row[0]))
        if not cur.nextset():
            return out


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


class AdvisoryLock(ProcessesLock):
    """The writer lock: a re-entrant thread lock, then ``pg_advisory_lock`` on the
    registry's writer connection (see the module docstring)."""

    def __init__(self, registry: PostgresRegistry) -> None:
        super().__init__()
        self._registry = registry

    def _take(self, blocking: bool) -> bool:
        with _unavailable("writer lock"):
            conn = self._registry.writer(reconnect=True)
            if blocking:
                conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
                return True
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
            return bool(row and row[0])

    def _drop(self) -> None:
        try:
            self._registry.writer().execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
        except (*_DOWN, RegistryUnavailable):
            # The session is gone, and PostgreSQL released its lock with it.
            self._registry.drop_writer()

    def close(self) -> None:
        pass


class _Listener:
    """A connection that ``LISTEN``s on a channel (see :meth:`PostgresRegistry.listen`)."""

    def __init__(self, url: str, connect_timeout: float, channel: str) -> None:
        try:
            self._conn: psycopg.Connection[Any] = psycopg.connect(
                url, autocommit=True, connect_timeout=max(1, round(connect_timeout)))
            self._conn.execute(f"LISTEN {channel}")
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


class PostgresRegistry(SqlRegistry):
    """Thread-safe access to a PostgreSQL registry shared by many servers; the rules
    are :class:`index.rules.SqlRegistry`'s.

    Raises:
        ConfigurationError: at open, PostgreSQL cannot be reached.
        RegistryMismatch: at open, it holds another model's embeddings.
    """

    TABLES: ClassVar[dict[str, str]] = {"enrollments": "faceverify_enrollments",
                                        "changes": "faceverify_changes",
                                        "outbox": "faceverify_audit_outbox",
                                        "heads": "faceverify_audit_heads",
                                        "versions": "faceverify_row_versions",
                                        "pseudonyms": "faceverify_pseudonyms",
                                        "meta": "faceverify_meta"}
    MARK = "%s"
    FOR_UPDATE = " FOR UPDATE"
    UNLIMITED = None

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

    @staticmethod
    def read_audit_head(url: str, origin: str) -> tuple[int, str] | None:
        """The audit head anchored for ``origin`` (:meth:`audit_anchor`); None where
        there is none.

        Raises:
            StartupError: no readable registry there.
        """
        try:
            with psycopg.connect(url, connect_timeout=5) as conn:
                row = conn.execute("SELECT seq, hash FROM faceverify_audit_heads "
                                   "WHERE origin = %s", (origin,)).fetchone()
        except psycopg.errors.UndefinedTable:
            return None
        except psycopg.Error as exc:
            raise StartupError(f"no readable registry at {redact(url)}: "
                               f"{str(exc).splitlines()[0]}") from exc
        return None if row is None else (int(row[0]), str(row[1]))

    def listen(self, decisions: bool = False) -> ChangeListener:
        """A connection of its own that ``LISTEN``s for the change notices, or with
        ``decisions`` for the notices that pending enrolments were decided.

        Raises:
            RegistryUnavailable: PostgreSQL cannot be reached.
        """
        return _Listener(self.url, self.connect_timeout, DECIDED if decisions else CHANNEL)

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

    # -- what the shared rules (index.rules) need of this backend -------------------------

    _writing = _write
    _reading = _read

    @contextlib.contextmanager
    def _exclusive(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        with self.lock, self._write(what) as conn:
            yield conn

    def _blob(self, value: bytes | str) -> bytes:
        return _bytes(value)

    # -- enrolments pending a decision (see index.enrolling) ------------------------------

    def submit(self, requests: list[tuple[str, bytes]]) -> list[int]:
        """Leave enrolment requests, (NIK, request) each, for whichever server next
        holds the writer lock to decide (no lock needed); their ids, in order."""
        with self._read("submit") as conn, conn.cursor() as cur:
            return _returned(cur, "INSERT INTO faceverify_pending (nik, request, submitted_at) "
                             "VALUES (%s, %s, %s) RETURNING id",
                             [(nik, self._seal("pending", nik, request), time.time())
                              for nik, request in requests])

    def _pending(self, ex: Executor, limit: int) -> list[tuple[int, str, bytes]]:
        # Locked until the deciding transaction ends: a requester withdrawing its
        # request (:meth:`withdraw`) waits for it, and then finds it decided.
        ex.execute("DELETE FROM faceverify_pending WHERE decision IS NOT NULL "
                   "AND submitted_at < %s", (time.time() - UNCOLLECTED_S,))
        rows = ex.execute("SELECT id, nik, request FROM faceverify_pending WHERE "
                          "decision IS NULL ORDER BY id LIMIT %s FOR UPDATE",
                          (limit,)).fetchall()
        out = []
        for pid, nik, sealed in rows:
            try:
                out.append((int(pid), nik, self._open("pending", nik, sealed)))
            except SealError:
                log.error("pending enrolment %d does not open with the data key: dropped", pid)
                ex.execute("DELETE FROM faceverify_pending WHERE id = %s", (pid,))
        return out

    def withdraw(self, ids: list[int]) -> set[int]:
        """Take back those of this server's requests ``ids`` not decided yet (one being
        decided now is waited for); the ids taken back."""
        with self._read("withdraw") as conn:
            rows = conn.execute("DELETE FROM faceverify_pending WHERE id = ANY(%s) AND "
                                "decision IS NULL RETURNING id", (ids,)).fetchall()
        return {int(r[0]) for r in rows}

    def collect(self, ids: list[int]) -> dict[int, bytes]:
        """The decisions taken on those of this server's requests ``ids`` another
        server decided, each deleted as it is read."""
        with self._read("decisions") as conn:
            rows = conn.execute("DELETE FROM faceverify_pending WHERE id = ANY(%s) AND "
                                "decision IS NOT NULL RETURNING id, nik, decision",
                                (ids,)).fetchall()
        return {int(pid): self._open("decision", nik, sealed) for pid, nik, sealed in rows}

    def _settle(self, ex: Executor, decisions: Sequence[tuple[int, str, bytes]]) -> None:
        cur = ex.execute("UPDATE faceverify_pending p SET decision = d.decision FROM "
                         "unnest(%s::bigint[], %s::bytea[]) AS d(id, decision) WHERE p.id = d.id",
                         ([pid for pid, _, _ in decisions],
                          [self._seal("decision", nik, d) for _, nik, d in decisions]))
        if cur.rowcount:  # delivered at the commit
            ex.execute("SELECT pg_notify(%s, '')", (DECIDED,))

    def _forget(self, ex: Executor, pending_ids: Sequence[int]) -> None:
        ex.execute("DELETE FROM faceverify_pending WHERE id = ANY(%s)", (list(pending_ids),))

    def _insert_many(self, ex: Executor, rows: Sequence[NewEnrollment]) -> list[Enrollment]:
        """As :meth:`SqlRegistry._insert_many`, each kind of statement pipelined for all
        the rows (with a data key, each row is tagged in turn: as there)."""
        if self.sealer.enabled or len(rows) == 1 or not isinstance(ex, psycopg.Connection):
            return super()._insert_many(ex, rows)
        now = time.time()
        with ex.cursor() as cur:
            ids = _returned(cur, self._q(self.INSERT), [self._values(r, now) for r in rows])
            seqs = _returned(cur, "INSERT INTO faceverify_changes (op, id) VALUES ('add', %s) "
                             "RETURNING seq", [(i,) for i in ids])
            self._announce(ex, max(seqs))
            audited = [r for r in rows if r.audit is not None]
            if audited:
                outbox = _returned(cur, "INSERT INTO faceverify_audit_outbox (origin, record) "
                                   "VALUES (%s, %s) RETURNING id",
                                   [(r.audit.origin, r.audit.record(r.outcome))
                                    for r in audited if r.audit is not None])
                for r, outbox_id in zip(audited, outbox, strict=True):
                    if r.audit is not None:
                        r.audit.outbox_id = outbox_id
        return [r.enrolled(i, now) for i, r in zip(ids, rows, strict=True)]

    def remove(self, nik: str) -> Enrollment | None:
        """See :meth:`SqlRegistry.remove`; the NIK's pending requests and decisions
        go too."""
        erased = super().remove(nik)
        with self._read("erase") as conn:
            conn.execute("DELETE FROM faceverify_pending WHERE nik = %s", (nik,))
        return erased

    def _announce(self, ex: Executor, seq: int) -> None:
        # Delivered to listeners when the transaction commits.
        ex.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(seq)))

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
        self._check_key_opens(f"at {redact(self.url)}", self._newest_row())
