"""Several galleries (one per server, each with its own data directory) on one
real PostgreSQL registry: what one enrols the others see, a check-and-insert is
atomic across them, erasure reaches all, a replica restarted without a clean
shutdown catches up, and the change log is followed by notification."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from index.enrolling import ENROLLED, REFUSED, Decision, Enroller, Request
from index.follower import Follower
from index.gallery import Gallery
from index.registry import AuditEntry, NewEnrollment
from index.vectors import IndexSpec
from server.errors import RegistryUnavailable

DIM = 16
MODEL = "test-model"


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def nik(i: int) -> str:
    return f"317401150590{i + 1:04d}"


@pytest.fixture
def replicas(registry_url: str, tmp_path: Path) -> Iterator[list[Gallery]]:
    galleries = [Gallery(tmp_path / f"replica-{i}", MODEL, DIM, IndexSpec(),
                         registry_url=registry_url) for i in range(3)]
    yield galleries
    for g in galleries:
        g.close()


def test_what_one_replica_enrols_the_others_find(replicas: list[Gallery]) -> None:
    a, b, c = replicas
    v = unit(np.random.default_rng(1), 5)
    for i in range(5):
        with a.write_lock:
            a.add(nik(i), v[i])
    for g in (b, c):
        top = g.search(v[3], 1)[0]
        assert (top.nik, round(top.score, 4)) == (nik(3), 1.0)
        assert g.get(nik(4)) is not None and len(g) == 5


def request(i: int, face: np.ndarray) -> Request:
    return Request(nik(i), face, 1, (0.9, 0.9), 0.9, True, 5)


def test_concurrent_enrolments_of_one_face_through_three_replicas_enrol_it_once(
        replicas: list[Gallery]) -> None:
    face = unit(np.random.default_rng(2), 1)[0]
    enrollers = [Enroller(g) for g in replicas]
    start = threading.Barrier(12)
    outcomes: dict[str, Decision] = {}

    def enrol(i: int) -> None:
        start.wait()
        outcomes[nik(100 + i)] = enrollers[i % 3].enrol(request(100 + i, face))

    threads = [threading.Thread(target=enrol, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    enrolled = [n for n, d in outcomes.items() if d.outcome == ENROLLED]
    assert len(outcomes) == 12 and len(enrolled) == 1
    assert all(d.outcome == REFUSED and [m.nik for m in d.candidates] == enrolled
               for n, d in outcomes.items() if n not in enrolled)
    for g in replicas:
        g.refresh()
        assert len(g) == 1 and g.registry.count() == 1
    for e in enrollers:
        e.close()


def test_a_request_one_server_leaves_is_decided_by_another_in_its_round(
        replicas: list[Gallery]) -> None:
    a, b, _ = replicas
    rng = np.random.default_rng(3)
    stranger, face = unit(rng, 2)
    left = a.registry.submit([(nik(1), request(1, face).to_bytes())])
    taken_back = a.registry.submit([(nik(2), request(2, stranger).to_bytes())])
    assert a.registry.withdraw(taken_back) == set(taken_back)
    enroller = Enroller(b)
    # b's own request, of the same face, comes second in the round: a's was left first.
    mine = enroller.enrol(request(3, face))
    assert (mine.outcome, mine.round, [m.nik for m in mine.candidates]) == (REFUSED, 2, [nik(1)])
    decided = json.loads(a.registry.collect(left)[left[0]])
    assert (decided["outcome"], decided["round"]) == (ENROLLED, 2)
    assert a.registry.collect(left) == {}  # collected once
    assert a.registry.withdraw(left) == set()  # decided: nothing to take back
    assert b.get(nik(1)) is not None and b.get(nik(2)) is None  # the withdrawn one: never
    enroller.close()


def test_a_server_whose_requests_another_decided_collects_them(
        replicas: list[Gallery]) -> None:
    a, b, _ = replicas
    face = unit(np.random.default_rng(4), 1)[0]
    first = Enroller(a)
    with b.write_lock:  # b holds the lock: a's request waits for it...
        waiting = threading.Thread(target=lambda: outcome.append(first.enrol(request(5, face))))
        outcome: list[Decision] = []
        waiting.start()
        time.sleep(0.5)
        assert not outcome
        second = Enroller(b)  # ...and b's round decides it, with b's own
        assert second.enrol(request(6, face)).outcome == REFUSED
    waiting.join(10)
    assert outcome[0].outcome == ENROLLED and outcome[0].enrollment is not None
    assert outcome[0].enrollment.id == a.get(nik(5)).id  # type: ignore[union-attr]
    first.close()
    second.close()




def test_an_erasure_through_one_is_gone_from_all(replicas: list[Gallery]) -> None:
    a, b, c = replicas
    v = unit(np.random.default_rng(3), 3)
    with a.write_lock:
        for i in range(3):
            a.add(nik(i), v[i], flagged=i == 2, candidates=[(nik(0), 0.95)] if i == 2 else None)
    assert b.remove(nik(0)) is not None
    for g in (a, c):
        assert g.get(nik(0)) is None
        assert nik(0) not in [m.nik for m in g.search(v[0], 3)]
        assert g.get(nik(2)).candidates == [("erased", 0.95)]  # type: ignore[union-attr]


def test_a_replica_restarted_without_a_clean_stop_catches_up(registry_url: str,
                                                             tmp_path: Path) -> None:
    v = unit(np.random.default_rng(4), 60)
    a = Gallery(tmp_path / "a", MODEL, DIM, IndexSpec(), snapshot_every=10,
                registry_url=registry_url)
    b = Gallery(tmp_path / "b", MODEL, DIM, IndexSpec(), registry_url=registry_url)
    for i in range(20):
        with a.write_lock:
            a.add(nik(i), v[i])
    # b "dies": no close, no final snapshot, its connections just dropped.
    b.registry.close()
    for i in range(20, 60):
        with a.write_lock:
            a.add(nik(i), v[i])
    a.remove(nik(5))
    restarted = Gallery(tmp_path / "b", MODEL, DIM, IndexSpec(), registry_url=registry_url)
    assert len(restarted) == 59 and restarted.lag() == 0
    assert restarted.search(v[42], 1)[0].nik == nik(42)
    a.close()
    restarted.close()


def test_the_follower_applies_changes_when_notified(replicas: list[Gallery]) -> None:
    a, b, _ = replicas
    follower = Follower(b, poll=30.0).start()  # a long poll: only NOTIFY can be in time
    try:
        deadline = time.time() + 10
        while not follower.connected and time.time() < deadline:
            time.sleep(0.02)
        v = unit(np.random.default_rng(5), 1)[0]
        with a.write_lock:
            a.add(nik(7), v)
        deadline = time.time() + 5
        while len(b) < 1 and time.time() < deadline:
            time.sleep(0.02)
        assert len(b) == 1 and follower.lag == 0
    finally:
        follower.close()


def test_an_unreachable_registry_fails_fast_and_is_reconnected(
        postgres: object, replicas: list[Gallery]) -> None:
    a = replicas[0]
    v = unit(np.random.default_rng(6), 2)
    with a.write_lock:
        a.add(nik(1), v[0])
    postgres.stop()  # type: ignore[attr-defined]
    try:
        started = time.time()
        with pytest.raises(RegistryUnavailable), a.write_lock:
            a.add(nik(2), v[1])
        with pytest.raises(RegistryUnavailable):
            a.get(nik(1))
        assert time.time() - started < 15
        # The index itself still answers (it is this process's).
        assert len(a) == 1
    finally:
        postgres.resume()  # type: ignore[attr-defined]
    deadline = time.time() + 20
    while True:
        try:
            with a.write_lock:
                a.add(nik(2), v[1])
            break
        except RegistryUnavailable:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
    assert a.get(nik(1)) is not None and a.registry.count() == 2  # nothing lost


def test_each_servers_audit_head_is_anchored_in_the_shared_registry(
        replicas: list[Gallery], registry_url: str, tmp_path: Path) -> None:
    """One row per origin (data directory), moved forward only, and read back by
    `audit verify` without opening the registry for writing."""
    from index.backends import backend

    a, b = replicas[0].registry, replicas[1].registry
    a.audit_anchor("origin-a", 10, "h10")
    b.audit_anchor("origin-b", 3, "h3")
    a.audit_anchor("origin-a", 7, "an older head")  # never back
    b.audit_anchor("origin-a", 12, "h12")  # another server of the same directory: forward
    assert a.audit_head("origin-a") == (12, "h12") and a.audit_head("origin-b") == (3, "h3")
    assert a.audit_head("origin-c") is None
    read = backend(registry_url).read_audit_head
    assert read(registry_url, tmp_path, "origin-a") == (12, "h12")
    assert read(registry_url, tmp_path, "origin-c") is None


def test_a_round_writes_each_enrolments_audit_record_with_it(replicas: list[Gallery]) -> None:
    a = replicas[0]
    faces = unit(np.random.default_rng(6), 3)
    entries = [AuditEntry("Enroll", "client", "peer", f"r{i}", f"hash{i}", "origin-a")
               for i in range(2)]
    rows = [NewEnrollment(nik(40 + i), faces[i], audit=entries[i]) for i in range(2)]
    with a.write_lock, a.registry.batch() as tx:
        added = tx.add_many([*rows, NewEnrollment(nik(42), faces[2], flagged=True)])
    assert [e.nik for e in added] == [nik(40), nik(41), nik(42)]
    assert [a.get(nik(40 + i)).id for i in range(3)] == [e.id for e in added]  # type: ignore[union-attr]
    records = a.registry.audit_pending("origin-a", 10)
    assert [i for i, _ in records] == [e.outbox_id for e in entries]
    assert [json.loads(r)["request_id"] for _, r in records] == ["r0", "r1"]
    a.refresh()
    assert len(a) == 3 and a.lag() == 0
