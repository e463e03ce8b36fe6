"""The embedded registry: SQLite (see :mod:`index.registry` for the interface).

One row per enrolled NIK with its embedding (never the image), plus an
append-only change log whose sequence numbers let the FAISS index, a derived
structure, catch up from a snapshot.  Several processes on one machine share
it; an ``flock`` on a file beside it is the writer lock.  WAL journal with ``synchronous=FULL``: a
commit that returned is on disk, so every enrolment acknowledged to a caller
survives a crash.  ``secure_delete`` overwrites erased rows' bytes.  With a
data key, embeddings, candidate lists and metadata are sealed (AES-GCM, see
:mod:`index.sealing`).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from index.durable import FileLock, private_dir, private_file
from index.errors import StartupError
from index.registry import WriterLock
from index.rules import SqlRegistry
from index.sealing import Sealer

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS enrollments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    nik TEXT NOT NULL UNIQUE,
    embedding BLOB NOT NULL,
    flagged INTEGER NOT NULL DEFAULT 0,
    candidates TEXT NOT NULL DEFAULT '[]',
    metadata TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    review TEXT NOT NULL DEFAULT 'none',
    reviewed_by TEXT NOT NULL DEFAULT '',
    reviewed_at REAL,
    review_note TEXT NOT NULL DEFAULT '',
    photos INTEGER NOT NULL DEFAULT 1,
    tag BLOB,
    version INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL CHECK (op IN ('add', 'remove')),
    id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    origin TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS row_versions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS row_versions_id ON row_versions (id, seq);
CREATE TABLE IF NOT EXISTS pseudonyms (
    handle TEXT PRIMARY KEY,
    secret BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_heads (
    origin TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
);
"""


# Columns added since the first schema, with their definitions: a registry
# written by an older version gains them at open (nothing else changes).
ADDED_COLUMNS = {
    "review": "TEXT NOT NULL DEFAULT 'none'",
    "reviewed_by": "TEXT NOT NULL DEFAULT ''",
    "reviewed_at": "REAL",
    "review_note": "TEXT NOT NULL DEFAULT ''",
    "photos": "INTEGER NOT NULL DEFAULT 1",
    "tag": "BLOB",
    "version": "INTEGER NOT NULL DEFAULT 0",
}
LOCK_FILE = "gallery.lock"


class SqliteRegistry(SqlRegistry):
    """Thread-safe access to the SQLite registry (one connection, one lock); the
    rules are :class:`index.rules.SqlRegistry`'s.

    Raises:
        RegistryMismatch: at open, when the file belongs to another model.
    """

    TABLES: ClassVar[dict[str, str]] = {"enrollments": "enrollments", "changes": "changes",
                                        "outbox": "audit_outbox", "heads": "audit_heads",
                                        "versions": "row_versions", "pseudonyms": "pseudonyms",
                                        "meta": "meta"}
    MARK = "?"
    FOR_UPDATE = ""  # the transaction is BEGIN IMMEDIATE: no other writer meanwhile
    UNLIMITED = -1

    def __init__(self, path: Path, model_version: str, dim: int,
                 sealer: Sealer | None = None) -> None:
        # Biometric data: the directory and every file only the owner's. SQLite
        # gives its -wal and -shm files the database file's rights.
        private_dir(path.parent)
        private_file(path)
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                private_file(side)
        self.path = path
        self.dim = dim
        self.sealer = sealer or Sealer()
        self.quarantined = set()
        self.unindexed = set()
        self._lock = threading.Lock()
        # Other processes sharing the file may hold the write lock briefly.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._check_meta(model_version, dim)
        self._check_key()
        self._tag_untagged()
        self.lock: WriterLock = FileLock(path.parent / LOCK_FILE)
        self.distributed = False

    def _migrate(self) -> None:
        """Add the columns a registry from an older version lacks (one transaction)."""
        with self._tx():
            have = {r[1] for r in self._db.execute("PRAGMA table_info(enrollments)")}
            missing = [c for c in ADDED_COLUMNS if c not in have]
            for column in missing:
                self._db.execute(f"ALTER TABLE enrollments ADD COLUMN {column} "
                                 f"{ADDED_COLUMNS[column]}")
            if "review" in missing:  # enrolments flagged before reviews existed await one
                self._db.execute("UPDATE enrollments SET review = 'pending' WHERE flagged = 1")
            self._db.execute("CREATE INDEX IF NOT EXISTS enrollments_review "
                             "ON enrollments (review, id)")
            self._db.execute("CREATE INDEX IF NOT EXISTS enrollments_flagged "
                             "ON enrollments (id) WHERE flagged")

    def _check_meta(self, model_version: str, dim: int) -> None:
        with self._tx():
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                meta = {"model_version": model_version, "dim": str(dim)}
                self._db.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
            if "registry_id" not in meta:  # registries from before it existed gain one
                meta["registry_id"] = uuid.uuid4().hex
                self._db.execute("INSERT INTO meta VALUES ('registry_id', ?)",
                                 (meta["registry_id"],))
        self.registry_id = meta["registry_id"]
        self._check_meta_values(str(self.path), meta, model_version, dim)

    def listen(self, decisions: bool = False) -> None:
        """None: every writer of a SQLite registry shares this machine's files, so
        the gallery sees their changes when it next takes the writer lock."""
        return None

    @staticmethod
    def read_meta(path: Path) -> tuple[str, int]:
        """The model version and dimension a registry file was written with.

        Raises:
            StartupError: no registry there.
        """
        if not path.is_file():
            raise StartupError(f"no registry at {path}")
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        finally:
            db.close()
        return str(meta["model_version"]), int(meta["dim"])

    @staticmethod
    def read_audit_head(path: Path, origin: str) -> tuple[int, str] | None:
        """The audit head anchored for ``origin`` (:meth:`audit_anchor`), read only;
        None where there is none (or no registry)."""
        if not path.is_file():
            return None
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT seq, hash FROM audit_heads WHERE origin = ?",
                             (origin,)).fetchone()
        except sqlite3.OperationalError:  # written before heads were anchored
            return None
        finally:
            db.close()
        return None if row is None else (int(row[0]), str(row[1]))

    def _check_key(self) -> None:
        """Refuse to start with no data key, or the wrong one, for sealed data.

        Raises:
            ConfigurationError: naming what to configure.
        """
        self._check_key_opens(str(self.path), self._newest_row())

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self._lock)

    # -- what the shared rules (index.rules) need of this backend -------------------------

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._tx():
            yield self._db

    _exclusive = _writing  # BEGIN IMMEDIATE excludes every other writer of the file

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    def _after_erase(self) -> None:
        """The write-ahead log still holds an erased row's old pages: copy it into
        the database (``secure_delete`` overwrites them there) and empty it."""
        self._truncate_wal()

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self.lock.close()

    def _truncate_wal(self) -> None:
        """Copy the write-ahead log into the database and empty it; another process
        reading at that moment can hold it up, so it is retried for a while."""
        for _ in range(100):
            with self._lock:
                busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                return
            time.sleep(0.05)
        log.warning("the write-ahead log could not be truncated after an erasure (another "
                    "process kept reading): the next erasure or checkpoint empties it")

class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK``) under the registry lock."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self.db = db
        self.lock = lock

    def __enter__(self) -> None:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()
