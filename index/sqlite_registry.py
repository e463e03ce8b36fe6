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

import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from index.durable import FileLock, private_dir, private_file
from index.errors import StartupError
from index.registry import (
    COLUMNS,
    ERASED,
    Change,
    Enrollment,
    NotPending,
    RowCodec,
    WriterLock,
    audit_var,
)
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
    tag BLOB
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
}
LOCK_FILE = "gallery.lock"


class SqliteRegistry(RowCodec):
    """Thread-safe access to the SQLite registry (one connection, one lock).

    Raises:
        RegistryMismatch: at open, when the file belongs to another model.
    """

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

    def listen(self) -> None:
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

    def _check_key(self) -> None:
        """Refuse to start with no data key, or the wrong one, for sealed data.

        Raises:
            ConfigurationError: naming what to configure.
        """
        with self._lock:
            row = self._db.execute(f"SELECT {COLUMNS} FROM enrollments ORDER BY id DESC LIMIT 1"
                                   ).fetchone()
        self._check_key_opens(str(self.path), row)

    def _tag_untagged(self) -> None:
        """See :meth:`index.registry.RowCodec._tag_all_or_none`."""
        if not self.sealer.enabled:
            return
        with self._tx():
            untagged = [r[0] for r in self._db.execute(
                "SELECT id FROM enrollments WHERE tag IS NULL")]
            tagged = self._db.execute("SELECT 1 FROM enrollments WHERE tag IS NOT NULL "
                                      "LIMIT 1").fetchone() is not None
            self._tag_all_or_none(untagged, tagged, self._retag)

    def _retag(self, rid: int) -> None:
        """Write row ``rid``'s tag (in the transaction under way)."""
        if not self.sealer.enabled:
            return
        row = self._db.execute(f"SELECT {COLUMNS} FROM enrollments WHERE id = ?",
                               (rid,)).fetchone()
        if row is not None:
            self._db.execute("UPDATE enrollments SET tag = ? WHERE id = ?",
                             (self._tag(row), rid))

    def scan_rows(self, batch: int = 10_000) -> int:
        """Check every row's integrity; how many are quarantined."""
        def batches() -> Iterator[list[Any]]:
            last = 0
            while True:
                with self._lock:
                    rows = self._db.execute(f"SELECT {COLUMNS} FROM enrollments WHERE id > ? "
                                            "ORDER BY id LIMIT ?", (last, batch)).fetchall()
                if not rows:
                    return
                yield rows
                last = rows[-1][0]
        return self.scan(batches())

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self._lock)

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self.lock.close()

    def add(self, nik: str, embedding: np.ndarray, flagged: bool = False,
            candidates: list[tuple[str, float]] | None = None,
            metadata: dict[str, str] | None = None, photos: int = 1) -> Enrollment:
        """Insert an enrolment and log it; durable when this returns.

        Raises:
            sqlite3.IntegrityError: the NIK is already enrolled.
        """
        vec = np.ascontiguousarray(embedding, dtype=np.float32)
        if vec.shape != (self.dim,):
            raise ValueError(f"embedding shape {vec.shape} != ({self.dim},)")
        now = time.time()
        cands = candidates or []
        with self._tx():
            review = "pending" if flagged else "none"
            cur = self._db.execute(
                "INSERT INTO enrollments (nik, embedding, flagged, candidates, metadata, "
                "created_at, review, photos) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (nik, self._seal("embedding", nik, vec.tobytes()), int(flagged),
                 self._sealed_json("candidates", nik, cands),
                 self._sealed_json("metadata", nik, metadata or {}), now, review, photos))
            new_id = int(cur.lastrowid or 0)
            self._retag(new_id)
            self._db.execute("INSERT INTO changes (op, id) VALUES ('add', ?)", (new_id,))
            self._audit("enrolled_flagged" if flagged else "enrolled")
        return Enrollment(new_id, nik, vec.copy(), flagged, list(cands), dict(metadata or {}), now,
                          review, photos=photos)

    def resolve_review(self, nik: str, decision: str, reviewer: str, note: str
                       ) -> Enrollment | None:
        """Record a person's decision on a pending enrolment (``confirmed`` or
        ``cleared``); None if the NIK is not enrolled.  The embedding and the
        index are untouched: a confirmed duplicate stays findable.

        Raises:
            NotPending: the enrolment awaits no review (never flagged, or decided).
        """
        if decision not in ("confirmed", "cleared"):
            raise ValueError(f"unknown review decision {decision!r}")
        with self._tx():
            row = self._db.execute(f"SELECT {COLUMNS} FROM enrollments WHERE nik = ?",
                                   (nik,)).fetchone()
            if row is None:
                return None
            if not self._authentic(row):
                raise self._quarantine(row, "its tag does not match its columns")
            if row[7] != "pending":
                raise NotPending(f"this enrolment awaits no review (it is {row[7]})")
            self._db.execute("UPDATE enrollments SET review = ?, reviewed_by = ?, "
                             "reviewed_at = ?, review_note = ? WHERE id = ?",
                             (decision, reviewer, time.time(), note, row[0]))
            self._retag(row[0])
            self._audit(decision)
            row = self._db.execute(f"SELECT {COLUMNS} FROM enrollments WHERE id = ?",
                                   (row[0],)).fetchone()
        return self._row(row)

    def pending_reviews(self, after_id: int, limit: int) -> list[Enrollment]:
        """Enrolments awaiting review, oldest first, after the one with id ``after_id``."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {COLUMNS} FROM enrollments WHERE review = 'pending' AND id > ? "
                "ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
        return [self._row(r) for r in rows]

    def count_pending(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM enrollments "
                                        "WHERE review = 'pending'").fetchone()[0])

    def remove(self, nik: str) -> Enrollment | None:
        """Erase an enrolment (and log the removal); None if the NIK is not enrolled.

        When this returns the NIK and the embedding are in no file: the row's
        bytes are overwritten (``secure_delete``), the NIK is struck from the
        candidate lists of enrolments flagged against it and from review notes
        (``erased`` stands in),
        and the write-ahead log, which still held the old pages, is checkpointed
        into the database and truncated.
        """
        with self._tx():
            row = self._db.execute(f"SELECT {COLUMNS} FROM enrollments WHERE nik = ?",
                                   (nik,)).fetchone()
            if row is None:
                return None
            self._db.execute("DELETE FROM enrollments WHERE id = ?", (row[0],))
            self._db.execute("INSERT INTO changes (op, id) VALUES ('remove', ?)", (row[0],))
            self._audit("erased")
            # Only flagged enrolments have candidates (sealed ones cannot be searched).
            flagged = self._db.execute(
                "SELECT id, nik, candidates FROM enrollments WHERE flagged = 1").fetchall()
            for other, other_nik, sealed in flagged:
                candidates = self._candidates(other, other_nik, sealed)
                if not any(n == nik for n, _ in candidates):
                    continue
                struck = [[ERASED if n == nik else n, s] for n, s in candidates]
                self._db.execute("UPDATE enrollments SET candidates = ? WHERE id = ?",
                                 (self._sealed_json("candidates", other_nik, struck), other))
                self._retag(other)
            # A reviewer's note may name it too.
            noted = [r[0] for r in self._db.execute(
                "SELECT id FROM enrollments WHERE instr(review_note, ?) > 0", (nik,))]
            self._db.execute("UPDATE enrollments SET review_note = replace(review_note, ?, ?) "
                             "WHERE instr(review_note, ?) > 0", (nik, ERASED, nik))
            for other in noted:
                self._retag(other)
        self._truncate_wal()
        return self._match_row(row)  # erasing a quarantined enrolment is allowed

    def _audit(self, outcome: str) -> None:
        """The call's audit record, in the transaction under way (see
        :class:`index.registry.AuditEntry`)."""
        entry = audit_var.get()
        if entry is not None:
            cur = self._db.execute("INSERT INTO audit_outbox (origin, record) VALUES (?, ?)",
                                   (entry.origin, entry.record(outcome)))
            entry.outbox_id = int(cur.lastrowid or 0)

    def audit_pending(self, origin: str, limit: int) -> list[tuple[int, str]]:
        with self._lock:
            rows = self._db.execute("SELECT id, record FROM audit_outbox WHERE origin = ? "
                                    "ORDER BY id LIMIT ?", (origin, limit)).fetchall()
        return [(int(i), str(r)) for i, r in rows]

    def audit_exported(self, origin: str, upto: int) -> None:
        with self._tx():
            self._db.execute("DELETE FROM audit_outbox WHERE origin = ? AND id <= ?",
                             (origin, upto))

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

    def get(self, nik: str) -> Enrollment | None:
        with self._lock:
            row = self._db.execute(f"SELECT {COLUMNS} FROM enrollments WHERE nik = ?",
                                   (nik,)).fetchone()
        return self._row(row) if row else None

    def get_by_ids(self, ids: list[int]) -> dict[int, Enrollment]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._db.execute(f"SELECT {COLUMNS} FROM enrollments WHERE id IN ({marks})",
                                    ids).fetchall()
        return {r[0]: self._match_row(r) for r in rows}

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM enrollments").fetchone()[0])

    def last_seq(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM changes").fetchone()
        return int(row[0] or 0)

    def changes_since(self, seq: int, limit: int | None = None) -> list[Change]:
        """Changes after ``seq`` in order (at most ``limit``), with the current
        embedding of added ids."""
        with self._lock:
            rows = self._db.execute(
                "SELECT c.seq, c.op, c.id, e.nik, e.embedding FROM changes c "
                "LEFT JOIN enrollments e ON e.id = c.id AND c.op = 'add' "
                "WHERE c.seq > ? ORDER BY c.seq LIMIT ?", (seq, limit or -1)).fetchall()
        return self._changes(rows)

    def iter_embeddings(self, batch: int = 50_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All (ids, embeddings) in id order, in batches (for rebuilding the index)."""
        last = 0
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT id, nik, embedding FROM enrollments WHERE id > ? ORDER BY id "
                    "LIMIT ?", (last, batch)).fetchall()
            if not rows:
                return
            ids, embs = self._embeddings(rows, self.dim)
            yield ids, embs
            last = int(ids[-1])


    def reseal(self, batch: int = 1000) -> int:
        """Seal every value with the current data key (opening it with whichever
        key sealed it), then empty the write-ahead log; how many rows changed."""
        changed, last = 0, 0
        while True:
            with self._tx():
                rows = self._db.execute(
                    f"SELECT {COLUMNS} FROM enrollments WHERE id > ? ORDER BY id LIMIT ?",
                    (last, batch)).fetchall()
                for row in rows:
                    values = self._resealed(row)
                    if values is None:
                        continue
                    self._db.execute("UPDATE enrollments SET embedding = ?, candidates = ?, "
                                     "metadata = ? WHERE id = ?", (*values, row[0]))
                    self._retag(row[0])
                    changed += 1
            if not rows:
                break
            last = rows[-1][0]
        self._truncate_wal()
        return changed


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
