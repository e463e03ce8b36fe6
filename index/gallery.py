"""The gallery: the SQLite registry (truth) plus the FAISS index derived from it.

Writes go to the registry first (a durable commit), then to the index.  The
index is snapshotted atomically with the sequence number of the last change
it contains; at start the snapshot is loaded and newer registry changes are
replayed, or, when there is no usable snapshot, the index is rebuilt from the
registry.  A crash between the two writes therefore loses nothing: the
registry has the change and the next start replays it.

Several server processes may share one data directory (``--processes``):
SQLite serialises their writes, a file lock makes each check-and-insert
atomic across them, and each process's index catches up with the change log
before every search and write.
"""

from __future__ import annotations

import fcntl
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.registry import Enrollment, Registry
from index.sealing import Sealer
from index.vectors import IndexSpec, VectorIndex
from server.durable import private_file

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.sqlite3"
SNAPSHOT_DIR = "index"
LOCK_FILE = "gallery.lock"


@dataclass(frozen=True)
class Match:
    """A gallery entry similar to a probe."""

    nik: str
    score: float
    enrollment_id: int
    photos: int = 1  # photos the enrolment's template fuses


class GalleryLock:
    """Exclusive across threads *and* processes: a re-entrant thread lock, then an
    ``flock`` on a file in the data directory (several server processes may
    share one gallery).  ``on_acquire`` runs each time the outermost holder
    gets the lock (the gallery catches up with other processes' writes).
    """

    def __init__(self, path: Path) -> None:
        self._thread_lock = threading.RLock()
        self._file = open(private_file(path), "a+b")  # noqa: SIM115 - held for the gallery's life
        self._depth = 0
        self.on_acquire: Callable[[], None] = lambda: None

    def __enter__(self) -> GalleryLock:
        self._thread_lock.acquire()
        if self._depth == 0:
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
                self.on_acquire()
            except BaseException:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
                self._thread_lock.release()
                raise
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._thread_lock.release()

    def close(self) -> None:
        self._file.close()


class Gallery:
    """Enrolled faces: add, remove, search, snapshot.

    The index changes only by applying the registry's change log in order
    (:meth:`refresh`), so every process sharing the data directory converges
    on the registry, and each change is applied exactly once.  Writers (add,
    remove, snapshot) hold ``write_lock``, which also excludes other
    processes; searches run concurrently and first catch up with the log.
    Callers that must check and then insert atomically (de-duplication) hold
    ``write_lock`` across both.
    """

    def __init__(self, data_dir: Path, model_version: str, dim: int, spec: IndexSpec,
                 snapshot_every: int = 1000, sealer: Sealer | None = None) -> None:
        self.data_dir = data_dir
        self.model_version = model_version
        self.dim = dim
        self.spec = spec
        self.snapshot_every = snapshot_every
        self.sealer = sealer or Sealer()
        self.registry = Registry(data_dir / REGISTRY_FILE, model_version, dim, self.sealer)
        self._apply_lock = threading.Lock()
        self._applied = 0  # the last registry change the index holds
        self._changes_since_snapshot = 0
        self.write_lock = GalleryLock(data_dir / LOCK_FILE)
        with self.write_lock:  # no other process writes while the index is built
            self.index = self._load_index()
        self.write_lock.on_acquire = self.refresh

    def _load_index(self) -> VectorIndex:
        last = self.registry.last_seq()
        loaded = VectorIndex.load(self.data_dir / SNAPSHOT_DIR, self.model_version, self.dim,
                                  self.spec, self.sealer)
        if loaded is not None and loaded[1]["last_seq"] <= last:
            index, manifest = loaded
            self._applied = int(manifest["last_seq"])
            replayed = self._apply(index)
            log.info("index snapshot loaded (%d vectors), %d newer changes replayed",
                     manifest["count"], replayed)
        else:
            if loaded is not None:
                log.warning("index snapshot is newer than the registry; rebuilding")
            index = VectorIndex(self.dim, self.spec)
            for ids, vectors in self.registry.iter_embeddings():
                index.add(ids, vectors)
            self._applied = last
            log.info("index rebuilt from the registry (%d vectors)", len(index))
        index.maybe_train(self.registry.iter_embeddings())
        return index

    def _apply(self, index: VectorIndex) -> int:
        """Apply the registry changes after ``_applied`` to ``index``; how many."""
        with self._apply_lock:
            changes = self.registry.changes_since(self._applied)
            for c in changes:
                if c.op == "add" and c.embedding is not None:
                    index.add(np.array([c.id]), c.embedding[None])
                elif c.op == "remove":
                    index.remove(np.array([c.id]))
                self._applied = c.seq
            return len(changes)

    def refresh(self) -> None:
        """Catch up with changes written since (by this or another process)."""
        self._apply(self.index)

    def in_sync(self) -> bool:
        """True when the index holds exactly the registry's enrolments."""
        with self.write_lock:
            return len(self.index) == self.registry.count()

    def __len__(self) -> int:
        return len(self.index)

    def search(self, embedding: np.ndarray, k: int) -> list[Match]:
        """The ``k`` most similar enrolments, best first."""
        self.refresh()
        scores, ids = self.index.search(embedding[None], k)
        found = [int(i) for i in ids[0] if i >= 0]
        by_id = self.registry.get_by_ids(found)
        return [Match(by_id[int(i)].nik, float(s), int(i), by_id[int(i)].photos)
                for s, i in zip(scores[0], ids[0], strict=True) if int(i) in by_id]

    def get(self, nik: str) -> Enrollment | None:
        return self.registry.get(nik)

    def resolve_review(self, nik: str, decision: str, reviewer: str, note: str
                       ) -> Enrollment | None:
        """See :meth:`Registry.resolve_review` (the index is not touched)."""
        with self.write_lock:
            return self.registry.resolve_review(nik, decision, reviewer, note)

    def add(self, nik: str, embedding: np.ndarray, flagged: bool = False,
            candidates: list[tuple[str, float]] | None = None,
            metadata: dict[str, str] | None = None, photos: int = 1) -> Enrollment:
        """Enrol durably, then index; may snapshot."""
        with self.write_lock:
            e = self.registry.add(nik, embedding, flagged, candidates, metadata, photos)
            self._after_change()
            return e

    def remove(self, nik: str) -> Enrollment | None:
        """Erase from the registry and the index, and rewrite the index snapshot at
        once: when this returns, no file of the data directory holds the NIK or
        its embedding (see :meth:`Registry.remove`)."""
        with self.write_lock:
            e = self.registry.remove(nik)
            if e is not None:
                self.refresh()
                self.snapshot()
            return e

    def _after_change(self) -> None:
        self.refresh()
        self._changes_since_snapshot += 1
        if self.index.maybe_train(self.registry.iter_embeddings()):
            log.info("gallery reached %d vectors: switched to an IVF index", len(self.index))
        if self._changes_since_snapshot >= self.snapshot_every:
            self.snapshot()

    def snapshot(self) -> None:
        """Save the index with the sequence number of the last change it holds."""
        with self.write_lock:
            manifest = self.index.save(self.data_dir / SNAPSHOT_DIR, self.model_version,
                                       self._applied, self.sealer)
            self._changes_since_snapshot = 0
        log.info("index snapshot saved: %d vectors up to change %d", manifest["count"],
                 manifest["last_seq"])

    def reseal(self) -> int:
        """Seal the registry and the snapshot with the current data key (see
        :mod:`index.sealing`); how many enrolments changed."""
        with self.write_lock:
            changed = self.registry.reseal()
        self.snapshot()
        return changed

    def close(self) -> None:
        self.snapshot()
        self.registry.close()
        self.write_lock.close()
