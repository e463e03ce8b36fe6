"""Registry, FAISS index, snapshots and recovery: nothing acknowledged is lost."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from index.enrolling import (
    ALREADY,
    CONFLICT,
    ENROLLED,
    FLAGGED,
    REFUSED,
    Decision,
    Enroller,
    Request,
)
from index.gallery import SNAPSHOT_DIR, Gallery
from index.registry import RegistryMismatch
from index.sqlite_registry import SqliteRegistry as Registry
from index.vectors import SNAPSHOT, IndexSpec, ReadWriteLock, VectorIndex

DIM = 16
MODEL = "test-model"


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def nik(i: int) -> str:
    """A valid NIK, distinct for each i < 10,000."""
    return f"317401150590{i + 1:04d}"


def test_registry_round_trip_and_change_log(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.sqlite3", MODEL, DIM)
    v = unit(np.random.default_rng(0), 2)
    a = reg.add(nik(1), v[0], metadata={"channel": "web"})
    b = reg.add(nik(2), v[1], flagged=True, candidates=[(nik(1), 0.97)])
    assert reg.get(nik(2)).candidates == [(nik(1), pytest.approx(0.97))]
    assert reg.get(nik(1)).metadata == {"channel": "web"}
    np.testing.assert_array_equal(reg.get(nik(1)).embedding, v[0])
    with pytest.raises(sqlite3.IntegrityError):
        reg.add(nik(1), v[1])
    assert reg.remove(nik(1)).id == a.id and reg.get(nik(1)) is None
    assert reg.remove(nik(1)) is None
    ops = [(c.op, c.id, c.embedding is not None) for c in reg.changes_since(0)]
    assert ops == [("add", a.id, False), ("add", b.id, True), ("remove", a.id, False)]
    assert reg.count() == 1 and reg.last_seq() == 3


def test_registry_refuses_another_model(tmp_path: Path) -> None:
    Registry(tmp_path / "r.sqlite3", MODEL, DIM).close()
    with pytest.raises(RegistryMismatch, match="other-model"):
        Registry(tmp_path / "r.sqlite3", "other-model", DIM)
    with pytest.raises(RegistryMismatch):
        Registry(tmp_path / "r.sqlite3", MODEL, DIM + 1)


# The registry's first schema, as versions before reviews wrote it.
FIRST_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE enrollments (
    id INTEGER PRIMARY KEY AUTOINCREMENT, nik TEXT NOT NULL UNIQUE, embedding BLOB NOT NULL,
    flagged INTEGER NOT NULL DEFAULT 0, candidates TEXT NOT NULL DEFAULT '[]',
    metadata TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL);
CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL CHECK (op IN ('add', 'remove')), id INTEGER NOT NULL);
"""


def test_a_registry_from_before_reviews_gains_them_and_loses_nothing(tmp_path: Path) -> None:
    v = unit(np.random.default_rng(3), 2)
    db = sqlite3.connect(tmp_path / "r.sqlite3")
    db.executescript(FIRST_SCHEMA)
    db.executemany("INSERT INTO meta VALUES (?, ?)", [("model_version", MODEL), ("dim", "16")])
    db.executemany("INSERT INTO enrollments (nik, embedding, flagged, candidates, created_at) "
                   "VALUES (?, ?, ?, ?, 1.0)",
                   [(nik(1), v[0].tobytes(), 0, "[]"),
                    (nik(2), v[1].tobytes(), 1, f'[["{nik(1)}", 0.97]]')])
    db.executemany("INSERT INTO changes (op, id) VALUES ('add', ?)", [(1,), (2,)])
    db.commit()
    db.close()
    reg = Registry(tmp_path / "r.sqlite3", MODEL, DIM)
    assert reg.get(nik(1)).review == "none"
    flagged = reg.get(nik(2))
    assert flagged.review == "pending" and flagged.candidates == [(nik(1), pytest.approx(0.97))]
    np.testing.assert_array_equal(flagged.embedding, v[1])
    page, total = reg.review_queue(0, 10)
    assert [e.nik for e in page] == [nik(2)] and total == reg.count_pending() == 1
    decided = reg.resolve_review(nik(2), "confirmed", "auditor", "same person")
    assert decided is not None and decided.review == "confirmed" and decided.reviewed_at
    assert reg.count_pending() == 0 and reg.last_seq() == 2  # the index sees no change
    reg.close()
    reopened = Registry(tmp_path / "r.sqlite3", MODEL, DIM)  # a second open changes nothing
    assert reopened.get(nik(2)).review_note == "same person" and reopened.count() == 2


def test_registry_is_durable_and_uses_wal(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.sqlite3", MODEL, DIM)
    assert reg._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert reg._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_flat_index_exact_search_and_removal() -> None:
    rng = np.random.default_rng(1)
    v = unit(rng, 200)
    idx = VectorIndex(DIM, IndexSpec("flat"))
    idx.add(np.arange(100, 300), v)
    scores, ids = idx.search(v[:5], 3)
    assert ids[:, 0].tolist() == [100, 101, 102, 103, 104]
    assert scores[:, 0] == pytest.approx(1.0, abs=1e-5)
    assert idx.remove(np.array([100])) == 1
    assert idx.search(v[:1], 1)[1][0, 0] != 100
    empty = VectorIndex(DIM, IndexSpec("flat"))
    assert empty.search(v[:1], 2)[1].tolist() == [[-1, -1]]


def test_ivf_trains_when_large_enough_and_keeps_recall() -> None:
    rng = np.random.default_rng(2)
    v = unit(rng, 2000)
    spec = IndexSpec("ivf", nlist=16, nprobe=8)
    idx = VectorIndex(DIM, spec)
    idx.add(np.arange(2000), v)
    assert idx.maybe_train(iter([(np.arange(2000), v)]))
    assert idx.trained_ivf and len(idx) == 2000
    queries = v[:200] + 0.05 * unit(rng, 200)
    _, got = idx.search(queries, 1)
    assert (got[:, 0] == np.arange(200)).mean() >= 0.95
    assert idx.remove(np.arange(10)) == 10 and len(idx) == 1990


def test_snapshot_round_trip_and_corruption(tmp_path: Path) -> None:
    v = unit(np.random.default_rng(3), 10)
    idx = VectorIndex(DIM, IndexSpec())
    idx.add(np.arange(10), v)
    manifest = idx.save(tmp_path, MODEL, last_seq=10)
    assert manifest["count"] == 10 and manifest["last_seq"] == 10
    loaded = VectorIndex.load(tmp_path, MODEL, DIM, IndexSpec())
    assert loaded is not None and len(loaded[0]) == 10
    assert VectorIndex.load(tmp_path, "other-model", DIM, IndexSpec()) is None
    data = bytearray((tmp_path / SNAPSHOT).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / SNAPSHOT).write_bytes(bytes(data))
    assert VectorIndex.load(tmp_path, MODEL, DIM, IndexSpec()) is None


def test_gallery_replays_changes_after_its_snapshot(tmp_path: Path) -> None:
    v = unit(np.random.default_rng(4), 30)
    g = Gallery(tmp_path, MODEL, DIM, IndexSpec(), snapshot_every=10_000)
    for i in range(20):
        g.add(nik(i), v[i])
    g.snapshot()
    for i in range(20, 30):
        g.add(nik(i), v[i])
    g.remove(nik(3))
    # Simulate a crash after a durable registry commit but before indexing.
    g.registry.add(nik(99), unit(np.random.default_rng(9), 1)[0])
    g.registry.close()  # no snapshot at exit: a crash

    g2 = Gallery(tmp_path, MODEL, DIM, IndexSpec())
    assert g2.in_sync() and len(g2) == 30
    assert g2.search(v[25], 1)[0].nik == nik(25)
    assert all(m.nik != nik(3) for m in g2.search(v[3], 5))
    assert g2.get(nik(99)) is not None and g2.search(g2.get(nik(99)).embedding, 1)[0].nik == nik(99)


def test_gallery_rebuilds_without_a_usable_snapshot(tmp_path: Path) -> None:
    v = unit(np.random.default_rng(5), 5)
    g = Gallery(tmp_path, MODEL, DIM, IndexSpec())
    for i in range(5):
        g.add(nik(i), v[i])
    g.close()
    (tmp_path / SNAPSHOT_DIR / SNAPSHOT).write_bytes(b"garbage")
    g2 = Gallery(tmp_path, MODEL, DIM, IndexSpec())
    assert g2.in_sync() and len(g2) == 5


def test_erased_face_is_absent_from_the_next_snapshot(tmp_path: Path) -> None:
    v = unit(np.random.default_rng(6), 3)
    g = Gallery(tmp_path, MODEL, DIM, IndexSpec())
    for i in range(3):
        g.add(nik(i), v[i])
    g.snapshot()
    g.remove(nik(1))
    g.snapshot()
    loaded = VectorIndex.load(tmp_path / SNAPSHOT_DIR, MODEL, DIM, IndexSpec(),
                              registry_id=g.registry.registry_id)
    assert loaded is not None and len(loaded[0]) == 2
    erased_id = 2  # the second enrolment's id
    assert erased_id not in loaded[0].search(v[1:2], 3)[1][0].tolist()


def test_read_write_lock_excludes_writers_from_readers() -> None:
    lock = ReadWriteLock()
    inside = threading.Event()
    release = threading.Event()
    wrote = threading.Event()

    def reader() -> None:
        with lock.read():
            inside.set()
            release.wait(5)

    def writer() -> None:
        with lock.write():
            wrote.set()

    t1 = threading.Thread(target=reader)
    t1.start()
    inside.wait(5)
    t2 = threading.Thread(target=writer)
    t2.start()
    assert not wrote.wait(0.2)  # blocked while the reader holds the lock
    release.set()
    assert wrote.wait(5)
    t1.join()
    t2.join()


def test_ivf_retrains_after_the_gallery_grows() -> None:
    rng = np.random.default_rng(7)
    v = unit(rng, 3000)
    spec = IndexSpec("ivf", nlist=8, nprobe=8, retrain_growth=4.0)
    idx = VectorIndex(DIM, spec)
    idx.add(np.arange(400), v[:400])
    assert idx.maybe_train(iter([(np.arange(400), v[:400])])) and idx.trained_on == 400
    idx.add(np.arange(400, 1500), v[400:1500])
    assert not idx.needs_training()
    idx.add(np.arange(1500, 1600), v[1500:1600])
    assert idx.needs_training()
    assert idx.maybe_train(iter([(np.arange(1600), v[:1600])])) and idx.trained_on == 1600
    assert len(idx) == 1600 and idx.search(v[1599:1600], 1)[1][0, 0] == 1599


def test_the_data_directory_is_private_whatever_the_umask(tmp_path: Path) -> None:
    import os
    import stat

    data = tmp_path / "data"
    old = os.umask(0o022)
    try:
        data.mkdir(mode=0o755)  # left loose by an earlier version, say
        gallery = Gallery(data, MODEL, DIM, IndexSpec("flat"), snapshot_every=1)
        gallery.add(nik(1), unit(np.random.default_rng(6), 1)[0])
        gallery.close()
    finally:
        os.umask(old)
    entries = [data, *data.rglob("*")]
    assert len(entries) >= 6  # registry, its WAL and SHM, lock, snapshot dir and files
    for entry in entries:
        want = 0o700 if entry.is_dir() else 0o600
        assert stat.S_IMODE(entry.stat().st_mode) == want, entry


def test_a_round_decides_each_enrolment_against_those_before_it(tmp_path: Path) -> None:
    g = Gallery(tmp_path, MODEL, DIM, IndexSpec())
    rng = np.random.default_rng(9)
    face, other, third = unit(rng, 3)
    with g.write_lock:
        g.add(nik(0), third)
    enroller = Enroller(g)

    def req(i: int, v: np.ndarray, refuse: bool = True) -> Request:
        return Request(nik(i), v, 1, (0.9, 0.9), 0.9, refuse, 5)

    decided = enroller._round([req(1, face), req(2, face), req(1, face), req(1, other),
                               req(3, face, refuse=False), req(4, third), req(5, other)])
    outcomes = [d.outcome if isinstance(d, Decision) else d for d in decided]
    assert outcomes == [ENROLLED, REFUSED, ALREADY, CONFLICT, FLAGGED, REFUSED, ENROLLED]
    first, refused, again, _, flagged, known, _ = decided
    assert isinstance(first, Decision) and first.enrollment is not None
    assert isinstance(again, Decision) and again.enrollment == first.enrollment
    for d, who in ((refused, nik(1)), (flagged, nik(1)), (known, nik(0))):
        assert isinstance(d, Decision) and [m.nik for m in d.candidates] == [who]
    assert isinstance(flagged, Decision) and flagged.enrollment is not None
    assert flagged.candidates[0].enrollment_id == first.enrollment.id
    assert flagged.enrollment.flagged and g.get(nik(3)).candidates[0][0] == nik(1)  # type: ignore[union-attr]
    assert all(isinstance(d, Decision) and d.round == 7 for d in decided)
    assert len(g) == 4 and g.registry.count() == 4  # 0, 1, 3, 5
    with pytest.raises(ValueError):
        enroller.enrol(Request(nik(6), np.ones(DIM + 1, np.float32), 1, (0.9,), 0.9, True))
    g.close()
