"""The gallery: the registry (truth) plus the FAISS index derived from it.

Writes go to the registry first (a durable commit), then to the index.  The
index is snapshotted atomically with the sequence number of the last change
it contains; at start the snapshot is loaded and newer registry changes are
replayed, or, when there is no usable snapshot, the index is rebuilt from the
registry.  A crash between the two writes therefore loses nothing: the
registry has the change and the next start replays it.

Several server processes may share one registry — SQLite in one data
directory (``--processes``), or PostgreSQL for servers on many machines: the
registry's writer lock makes each check-and-insert atomic across all of them,
and each process's index catches up with the change log before every search
and write (and, with PostgreSQL, when notified of a change; see
:mod:`index.follower`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.backends import open_registry
from index.durable import FileLock, private_dir
from index.registry import Enrollment
from index.sealing import Sealer
from index.vectors import IndexSpec, VectorIndex

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.sqlite3"
SNAPSHOT_DIR = "index"
SNAPSHOT_LOCK = "snapshot.lock"


@dataclass(frozen=True)
class Match:
    """A gallery entry similar to a probe."""

    nik: str
    score: float
    enrollment_id: int
    photos: int = 1  # photos the enrolment's template fuses


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
                 snapshot_every: int = 1000, sealer: Sealer | None = None,
                 registry_url: str = "") -> None:
        self.data_dir = data_dir
        self.model_version = model_version
        self.dim = dim
        self.spec = spec
        self.snapshot_every = snapshot_every
        self.sealer = sealer or Sealer()
        self.registry = open_registry(registry_url, data_dir, model_version, dim, self.sealer)
        self._apply_lock = threading.Lock()
        self._applied = 0  # the last registry change the index holds
        self._changes_since_snapshot = 0
        self._erased = False  # a removal applied since the last snapshot
        self.write_lock = self.registry.lock
        # Snapshots of one data directory, one at a time (processes may share it).
        self._snapshot_lock = FileLock(private_dir(data_dir) / SNAPSHOT_LOCK)
        if self.registry.distributed:
            # Replayed from the change log, which commits in order: no need to stop
            # every other server's writes while this one catches up.
            self.index = self._load_index()
        else:
            with self.write_lock:  # no other process writes while the index is built
                self.index = self._load_index()
        self.write_lock.on_acquire = self.refresh

    def _load_index(self) -> VectorIndex:
        last = self.registry.last_seq()
        loaded = VectorIndex.load(self.data_dir / SNAPSHOT_DIR, self.model_version, self.dim,
                                  self.spec, self.sealer, self.registry.registry_id)
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
            self._applied = 0
            self._apply(index)
            log.info("index rebuilt from the registry's change log (%d vectors)", len(index))
        index.maybe_train(self.registry.iter_embeddings())
        return index

    def _apply(self, index: VectorIndex, batch: int = 50_000) -> int:
        """Apply the registry changes after ``_applied`` to ``index``, in batches;
        how many.  Consecutive adds go to FAISS together."""
        applied = 0
        with self._apply_lock:
            while True:
                changes = self.registry.changes_since(self._applied, batch)
                adds: list[tuple[int, np.ndarray]] = []
                for c in changes:
                    if c.op == "add" and c.embedding is not None:
                        adds.append((c.id, c.embedding))
                    elif c.op == "remove":
                        self._add(index, adds)
                        index.remove(np.array([c.id]))
                        self._erased = True
                self._add(index, adds)
                if changes:
                    self._applied = changes[-1].seq
                applied += len(changes)
                self._changes_since_snapshot += len(changes)
                if len(changes) < batch:
                    return applied

    @staticmethod
    def _add(index: VectorIndex, adds: list[tuple[int, np.ndarray]]) -> None:
        if adds:
            index.add(np.array([i for i, _ in adds], dtype=np.int64),
                      np.stack([e for _, e in adds]))
            adds.clear()

    def refresh(self) -> None:
        """Catch up with changes written since (by this or another process).  An
        erasure among them rewrites the snapshot at once, so that the erased
        embedding leaves this data directory too."""
        self._apply(self.index)
        if self._erased:
            self.snapshot()

    def lag(self) -> int:
        """Registry changes the index does not hold yet."""
        return max(0, self.registry.last_seq() - self._applied)

    def in_sync(self) -> bool:
        """True when the index holds exactly the registry's enrolments (but those
        quarantined whose embedding could not be opened)."""
        with self.write_lock:
            return len(self.index) == self.registry.count() - len(self.registry.unindexed)

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
            metadata: dict[str, str] | None = None, photos: int = 1,
            note: str = "") -> Enrollment:
        """Enrol durably, then index; may snapshot."""
        with self.write_lock:
            e = self.registry.add(nik, embedding, flagged, candidates, metadata, photos, note)
            self.after_write()
            return e

    def remove(self, nik: str) -> Enrollment | None:
        """Erase from the registry and the index, and rewrite the index snapshot at
        once: when this returns, no file of the data directory holds the NIK or
        its embedding (see :meth:`Registry.remove`)."""
        with self.write_lock:
            e = self.registry.remove(nik)
            if e is not None:
                self.refresh()  # applies the removal, so rewrites the snapshot
            return e

    def after_write(self) -> None:
        """After a write under ``write_lock``: the index catches up with it (and
        is trained, and snapshotted, when due)."""
        self.refresh()
        if self.index.maybe_train(self.registry.iter_embeddings()):
            log.info("gallery reached %d vectors: switched to an IVF index", len(self.index))
        if self._changes_since_snapshot >= self.snapshot_every:
            self.snapshot()

    def snapshot_if_due(self) -> None:
        """A snapshot once ``snapshot_every`` changes (anyone's) have been applied."""
        if self._changes_since_snapshot >= self.snapshot_every:
            self.snapshot()

    def snapshot(self) -> None:
        """Save the index with the sequence number of the last change it holds."""
        with self._snapshot_lock, self._apply_lock:
            manifest = self.index.save(self.data_dir / SNAPSHOT_DIR, self.model_version,
                                       self._applied, self.sealer, self.registry.registry_id)
            self._changes_since_snapshot = 0
            self._erased = False
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
        self._snapshot_lock.close()
