"""The FAISS embedding index: our int64 ids, inner product on unit vectors.

``flat`` is exact search (``IndexFlatIP`` in an ``IndexIDMap2``).  ``ivf`` is
an inverted-file index with 8-bit scalar quantisation
(``IndexIVFScalarQuantizer``) for galleries where exact search is too slow; it
is trained on the gallery itself and stays exact (flat) until the gallery has
enough vectors to train on.  Searches run concurrently (FAISS releases the
GIL); adds, removals and saves are exclusive.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# FAISS's OpenMP threads spin for a while after each parallel region; with several
# server processes on a few cores (or onnxruntime beside them) the spinning takes
# the CPU that the registry's lock holder needs: four servers sharing one registry
# on two cores enrolled 3.2 times slower (docs/figures.md, "Shared registry").
# Read when libgomp loads, so set before FAISS is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import faiss  # noqa: E402

from index.durable import private_dir, write_bytes_atomically
from index.errors import ConfigurationError
from index.sealing import Sealer, SealError

log = logging.getLogger(__name__)

SNAPSHOT_CONTEXT = b"index-snapshot"
SNAPSHOT = "index.faiss"
SNAPSHOT_MANIFEST = "index.json"


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


INDEX_KINDS = ("flat", "ivf")


@dataclass(frozen=True)
class IndexSpec:
    """Which index to build.

    Attributes:
        kind: ``flat`` (exact) or ``ivf`` (approximate, IVF + SQ8).
        nlist: IVF cells; trained once the gallery holds ``39 * nlist`` vectors.
        nprobe: IVF cells visited per search (recall versus speed).
        retrain_growth: retrain the IVF cells when the gallery has grown this many
            times beyond the size they were trained on (their centroids go stale).
    """

    kind: str = "flat"
    nlist: int = 1024
    nprobe: int = 32
    retrain_growth: float = 4.0

    def validate(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ConfigurationError(f"index kind {self.kind!r}: choose flat or ivf")
        if self.nlist < 1 or self.nprobe < 1:
            raise ConfigurationError("index nlist and nprobe must be >= 1")
        if self.retrain_growth <= 1:
            raise ConfigurationError("index retrain_growth must be > 1")

    @property
    def min_train(self) -> int:
        return 39 * self.nlist


def _flat(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


class VectorIndex:
    """A thread-safe id-mapped FAISS index."""

    def __init__(self, dim: int, spec: IndexSpec, index: faiss.Index | None = None) -> None:
        spec.validate()
        self.dim = dim
        self.spec = spec
        self.index = index if index is not None else _flat(dim)
        self.lock = ReadWriteLock()
        self.trained_on = 0
        if isinstance(self.index, faiss.IndexIVF):
            self.index.nprobe = spec.nprobe
            self.trained_on = int(self.index.ntotal)

    @property
    def trained_ivf(self) -> bool:
        return isinstance(self.index, faiss.IndexIVF)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        with self.lock.write():
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                    np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> int:
        with self.lock.write():
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
            return int(self.index.remove_ids(selector))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, ids) per query; missing neighbours have id -1."""
        with self.lock.read():
            if self.index.ntotal == 0:
                n = len(queries)
                return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
            scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, ids

    def needs_training(self) -> bool:
        if self.spec.kind != "ivf" or len(self) < self.spec.min_train:
            return False
        return not self.trained_ivf or len(self) >= self.spec.retrain_growth * self.trained_on

    def maybe_train(self, vectors: Iterator[tuple[np.ndarray, np.ndarray]]) -> bool:
        """Build a (re)trained IVF index from the whole gallery when due; True if it did.

        Due when an ``ivf`` gallery first reaches ``min_train`` vectors, and again
        each time it grows ``retrain_growth`` times past its last training.
        ``vectors`` yields every (ids, embeddings) of the gallery (the registry).
        """
        if not self.needs_training():
            return False
        batches = list(vectors)
        all_ids = np.concatenate([b[0] for b in batches])
        all_vecs = np.concatenate([b[1] for b in batches])
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, self.spec.nlist,
                                            faiss.ScalarQuantizer.QT_8bit,
                                            faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = all_vecs[rng.choice(len(all_vecs), min(len(all_vecs), 256 * self.spec.nlist),
                                     replace=False)]
        ivf.train(sample)
        ivf.add_with_ids(all_vecs, all_ids)
        ivf.nprobe = self.spec.nprobe
        with self.lock.write():
            self.index = ivf
            self.trained_on = len(all_ids)
        return True

    # -- persistence ----------------------------------------------------------------------

    def save(self, directory: Path, model_version: str, last_seq: int,
             sealer: Sealer | None = None, registry_id: str = "") -> dict[str, Any]:
        """Write the snapshot atomically (temp file, fsync, rename, fsync dir), manifest
        last; sealed with the data key when ``sealer`` has one."""
        private_dir(directory)
        with self.lock.read():
            data = faiss.serialize_index(self.index)  # uint8 array; no further copies
            count = int(self.index.ntotal)
        blob: bytes | memoryview = data.data
        if sealer is not None and sealer.enabled:
            blob = sealer.seal(bytes(blob), SNAPSHOT_CONTEXT)
        write_bytes_atomically(directory / SNAPSHOT, blob, 0o600)
        manifest = {"model_version": model_version, "dim": self.dim, "count": count,
                    "last_seq": last_seq, "kind": "ivf" if self.trained_ivf else "flat",
                    "registry_id": registry_id,
                    "sha256": hashlib.sha256(blob).hexdigest()}
        write_bytes_atomically(directory / SNAPSHOT_MANIFEST,
                               (json.dumps(manifest, indent=2) + "\n").encode(), 0o600)
        return manifest

    @classmethod
    def load(cls, directory: Path, model_version: str, dim: int, spec: IndexSpec,
             sealer: Sealer | None = None, registry_id: str = ""
             ) -> tuple[VectorIndex, dict[str, Any]] | None:
        """The snapshot in ``directory``, or None when absent, corrupt or of another model.

        A snapshot is only a cache of the registry: any doubt means rebuild.
        """
        try:
            manifest = json.loads((directory / SNAPSHOT_MANIFEST).read_text())
            blob = (directory / SNAPSHOT).read_bytes()
        except (OSError, ValueError):
            return None
        if manifest.get("model_version") != model_version or manifest.get("dim") != dim:
            log.warning("index snapshot in %s was built with model %r (dimension %s), not %r "
                        "(dimension %d): ignoring it", directory, manifest.get("model_version"),
                        manifest.get("dim"), model_version, dim)
            return None
        if manifest.get("registry_id", "") != registry_id:
            log.warning("index snapshot in %s follows another registry: rebuilding", directory)
            return None
        if hashlib.sha256(blob).hexdigest() != manifest.get("sha256"):
            log.warning("index snapshot in %s is corrupt (checksum mismatch): ignoring it",
                        directory)
            return None
        if manifest.get("kind") == "ivf" and spec.kind != "ivf":
            return None
        try:
            blob = (sealer or Sealer()).open(blob, SNAPSHOT_CONTEXT)
        except SealError as exc:
            log.warning("index snapshot in %s does not open (%s): rebuilding", directory, exc)
            return None
        index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
        if index.ntotal != manifest["count"] or index.d != dim:
            return None
        return cls(dim, spec, index), manifest

