"""Enrolment decisions, many at a time: de-duplication's check and insert.

Two enrolments of one face under two NIKs must never both succeed, on one
server or across many: each is decided under the registry's writer lock,
with the gallery caught up with every change before it, and against the
enrolments decided before it in the same round.  Taking that lock once per
enrolment made a fleet's enrolments one queue of lock hand-offs (on one
PostgreSQL: 1,113 enrolments/s with one server, 256 with four), so a lock
holder decides every enrolment waiting at that moment, in one transaction:

* in one server, concurrent enrolments queue, and the thread whose turn it is
  decides the queue (a *round*);
* with a shared registry (PostgreSQL), a server first leaves its round's
  requests in the registry (no lock needed); then, if the lock is free, it
  takes it and decides every request waiting there, its own and other
  servers'; if another server holds it, it waits for that server's notice
  and collects the decisions taken on its requests.

Each decision reads as one taken alone: the NIK enrolled already (with this
face, or another), else the candidates (gallery faces and faces enrolled
earlier in the round, under other NIKs, at or above the requester's
thresholds), then refused, or enrolled (flagged where it has candidates or a
reason to be reviewed).
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from index.errors import Quarantined, RegistryUnavailable
from index.gallery import Gallery, Match
from index.registry import AuditEntry, Batch, ChangeListener, Enrollment, NewEnrollment

ENROLLED = "enrolled"
FLAGGED = "enrolled_flagged"
REFUSED = "duplicate_refused"
ALREADY = "already_enrolled"  # the NIK is enrolled with this face
CONFLICT = "conflict"  # the NIK is enrolled with another face
QUARANTINED = "quarantined"  # the NIK's enrolment fails authentication
ROUND_LIMIT = 256  # requests decided in one transaction, at most
# How long a server whose requests wait in a shared registry, while another holds
# the lock, waits for a decision notice before it looks again.
NOTICE_WAIT_S = 0.01
MAX_NOTICE_WAIT_S = 0.2


@dataclass(frozen=True)
class Request:
    """One enrolment to decide.

    Attributes:
        photos: how many photos ``embedding`` fuses.
        thresholds: the duplicate threshold against an enrolment of one photo,
            of two (``thresholds[photos - 1]``), at the requester's gallery size.
        same_face: the score at or above which the NIK's own enrolment is this face.
        refuse: a duplicate is refused (else enrolled, flagged for review).
        k: gallery neighbours examined.
        flag_note: flagged for review whatever the candidates, with this note
            (None: not).
        audit: whose call it is: its record is written with the enrolment.
    """

    nik: str
    embedding: np.ndarray
    photos: int
    thresholds: tuple[float, ...]
    same_face: float
    refuse: bool
    k: int = 10
    metadata: dict[str, str] = field(default_factory=dict)
    flag_note: str | None = None
    audit: AuditEntry | None = None

    def threshold(self, photos: int) -> float:
        return self.thresholds[min(max(photos, 1), len(self.thresholds)) - 1]

    def to_bytes(self) -> bytes:
        """As another server reads it (:meth:`from_bytes`)."""
        audit = None if self.audit is None else {k: v for k, v in asdict(self.audit).items()
                                                 if k != "outbox_id"}
        return json.dumps({
            "embedding": base64.b64encode(
                np.ascontiguousarray(self.embedding, np.float32).tobytes()).decode(),
            "photos": self.photos, "thresholds": list(self.thresholds),
            "same_face": self.same_face, "refuse": self.refuse, "k": self.k,
            "metadata": self.metadata, "flag_note": self.flag_note, "audit": audit}).encode()

    @classmethod
    def from_bytes(cls, nik: str, data: bytes) -> Request:
        d = json.loads(data)
        return cls(nik, np.frombuffer(base64.b64decode(d["embedding"]), np.float32).copy(),
                   int(d["photos"]), tuple(float(t) for t in d["thresholds"]),
                   float(d["same_face"]), bool(d["refuse"]), int(d["k"]), dict(d["metadata"]),
                   d["flag_note"], None if d["audit"] is None else AuditEntry(**d["audit"]))


@dataclass(frozen=True)
class Decision:
    """What became of a :class:`Request`.

    Attributes:
        outcome: :data:`ENROLLED`, :data:`FLAGGED`, :data:`REFUSED`, :data:`ALREADY`,
            :data:`CONFLICT` or :data:`QUARANTINED`.
        enrollment: the new enrolment, or the NIK's own where it is enrolled
            already with this face.
        candidates: suspected duplicates under other NIKs, best first.
        score: the face's score against the NIK's own enrolment, where it has one.
        round: how many requests were decided in the same transaction.
    """

    outcome: str
    enrollment: Enrollment | None = None
    candidates: list[Match] = field(default_factory=list)
    score: float | None = None
    round: int = 1

    def to_bytes(self, audit: AuditEntry | None) -> bytes:
        """As the requester reads it (:meth:`Enroller._received`), with the id of
        the audit record written for it."""
        e = self.enrollment
        return json.dumps({
            "outcome": self.outcome, "id": None if e is None else e.id,
            "created_at": None if e is None else e.created_at,
            "candidates": [[m.nik, m.score, m.enrollment_id, m.photos] for m in self.candidates],
            "score": self.score, "round": self.round,
            "outbox": None if audit is None else audit.outbox_id}).encode()


@dataclass(frozen=True)
class _Known:
    existing: dict[str, Enrollment | Quarantined]  # the requests' NIKs enrolled already
    scores: np.ndarray  # the index's nearest faces to each request's
    ids: np.ndarray
    hits: dict[int, Enrollment]  # those faces' enrolments


def _nik(c: int | Match, rows: list[NewEnrollment]) -> str:
    return c.nik if isinstance(c, Match) else rows[c].nik


class _Waiting:
    def __init__(self, request: Request) -> None:
        self.request = request
        self.decision: Decision | None = None
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.decision is not None or self.error is not None


class Enroller:
    """Decides enrolments in rounds (see the module docstring); thread-safe, one
    per gallery."""

    def __init__(self, gallery: Gallery, round_limit: int = ROUND_LIMIT) -> None:
        self.gallery = gallery
        self.round_limit = round_limit
        self._queue: list[_Waiting] = []
        self._changed = threading.Condition()  # the queue, a round begun or ended
        self._deciding = False  # a round is under way (one at a time in this process)
        self._listener: ChangeListener | None = None  # decision notices (shared registry)

    def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                self._listener.close()
            self._listener = None

    def enrol(self, request: Request) -> Decision:
        """Decide ``request`` (with whatever else is waiting); committed when this
        returns.

        Raises:
            ValueError: the embedding is not of the gallery's dimension.
            RegistryUnavailable: the registry cannot be reached (a request left in
                a shared registry may still be decided by another server).
        """
        if np.shape(request.embedding) != (self.gallery.dim,):
            raise ValueError(f"embedding shape {np.shape(request.embedding)} != "
                             f"({self.gallery.dim},)")
        waiting = _Waiting(request)
        with self._changed:
            self._queue.append(waiting)
            while not waiting.done:
                if self._deciding:  # another thread's round: it may take this one too
                    self._changed.wait()
                    continue
                self._deciding = True
                batch = self._queue[:self.round_limit]
                del self._queue[:len(batch)]
                self._changed.release()
                try:
                    results = self._round([w.request for w in batch])
                finally:
                    self._changed.acquire()
                    self._deciding = False
                for w, result in zip(batch, results, strict=True):
                    if isinstance(result, Decision):
                        w.decision = result
                    else:
                        w.error = result
                self._changed.notify_all()
        if waiting.error is not None:
            raise waiting.error
        assert waiting.decision is not None
        return waiting.decision

    def _round(self, requests: list[Request]) -> list[Decision | BaseException]:
        """Decide ``requests``: each one's decision, or the error that kept it
        undecided (no audit record of it is then claimed)."""
        found: dict[int, Decision | BaseException] = {}
        try:
            self._decide_round(requests, found)
        except BaseException as exc:
            for i, r in enumerate(requests):
                if i not in found:
                    found[i] = exc
                    if r.audit is not None:
                        r.audit.outbox_id = None
        return [found[i] for i in range(len(requests))]

    def _decide_round(self, requests: list[Request],
                      found: dict[int, Decision | BaseException]) -> None:
        """Fill ``found`` (the index of a request: its decision) as decisions commit."""
        g = self.gallery
        registry = g.registry
        if not registry.distributed:
            with g.write_lock:
                known = self._known(requests)  # read before the transaction: SQLite's
                with registry.batch() as tx:   # connection is the transaction's then
                    decided = self._decide(tx, [(None, r) for r in requests], set(), known)
                found.update(enumerate(decided))
                g.after_write()
            return
        if self._listener is None:  # before the requests: no notice can be missed
            self._listener = registry.listen(decisions=True)
        pids = registry.submit([(r.nik, r.to_bytes()) for r in requests])
        own = {pid: i for i, pid in enumerate(pids)}
        pause = NOTICE_WAIT_S
        try:
            while own:
                self._collect(own, requests, found, list(own))
                if not own:
                    break
                if not g.write_lock.acquire(blocking=False):
                    # Another server holds the lock, and decides what it finds waiting
                    # (a notice wakes this one at once; a long erasure, say, is looked
                    # at less and less often).
                    assert self._listener is not None
                    self._listener.wait(pause)
                    pause = min(2 * pause, MAX_NOTICE_WAIT_S)
                    continue
                try:
                    self._collect(own, requests, found, list(own))
                    if own:
                        self._decide_pending(own, requests, found)
                finally:
                    g.write_lock.release()
        except BaseException:
            self.close()  # a new listener next time: this one may be what failed
            if own:  # taken back where not decided yet; if that fails, they may still be
                with contextlib.suppress(RegistryUnavailable):
                    undecided = registry.withdraw(list(own))
                    self._collect(own, requests, found,
                                  [pid for pid in own if pid not in undecided])
            raise

    def _decide_pending(self, own: dict[int, int], requests: list[Request],
                        found: dict[int, Decision | BaseException]) -> None:
        """Decide the requests waiting in the shared registry, this server's ``own``
        among them (the writer lock held)."""
        g = self.gallery
        with g.registry.batch() as tx:
            rows = tx.pending(self.round_limit)
            items = [(pid, requests[own[pid]] if pid in own
                      else Request.from_bytes(nik, data)) for pid, nik, data in rows]
            decided = self._decide(tx, items, set(own), self._known([r for _, r in items])) \
                if items else []
        for (pid, _), decision in zip(items, decided, strict=True):
            if pid in own:
                found[own.pop(pid)] = decision
        g.after_write()
        if len(rows) < self.round_limit:
            for pid in list(own):  # neither waiting nor decided: dropped
                found[own.pop(pid)] = RuntimeError(
                    "the enrolment request left in the shared registry was dropped by another "
                    "server that could not open it: every server must have the same data keys")

    def _collect(self, own: dict[int, int], requests: list[Request],
                 found: dict[int, Decision | BaseException], pids: list[int]) -> None:
        """The decisions other servers took on this server's requests ``pids``."""
        for pid, data in self.gallery.registry.collect(pids).items():
            i = own.pop(pid)
            found[i] = self._received(requests[i], data)

    def _received(self, r: Request, data: bytes) -> Decision | BaseException:
        """A decision another server took on ``r`` (:meth:`Decision.to_bytes`)."""
        d = json.loads(data)
        if r.audit is not None and d["outbox"] is not None:
            r.audit.outbox_id = int(d["outbox"])
        candidates = [Match(n, float(s), int(i), int(p)) for n, s, i, p in d["candidates"]]
        enrollment = None
        if d["outcome"] in (ENROLLED, FLAGGED):
            flagged = d["outcome"] == FLAGGED
            enrollment = Enrollment(int(d["id"]), r.nik, np.asarray(r.embedding, np.float32),
                                    flagged, [(m.nik, m.score) for m in candidates],
                                    dict(r.metadata), float(d["created_at"]),
                                    "pending" if flagged else "none",
                                    review_note=r.flag_note or "", photos=r.photos)
        elif d["outcome"] == ALREADY:
            try:
                enrollment = self.gallery.registry.get(r.nik)
            except Quarantined as exc:
                return exc
        return Decision(d["outcome"], enrollment, candidates, d["score"], int(d["round"]))

    def _known(self, requests: list[Request]) -> _Known:
        """What the registry and the index hold for ``requests`` (the writer lock held,
        the index caught up)."""
        g = self.gallery
        scores, ids = g.index.search(np.stack([r.embedding for r in requests]),
                                     max(r.k for r in requests))
        return _Known(g.registry.get_many(sorted({r.nik for r in requests})), scores, ids,
                      g.registry.get_by_ids(sorted({int(i) for i in ids.ravel() if i >= 0})))

    def _decide(self, tx: Batch, items: Sequence[tuple[int | None, Request]],
                own: set[int], known: _Known) -> list[Decision]:
        """Decide ``items`` (a pending id, or None, and the request) in order, in the
        transaction ``tx`` (the writer lock held; ``known``: :meth:`_known` of them);
        another server's pending request gets its decision written, this server's
        is forgotten."""
        existing, hits = known.existing, known.hits
        n = len(items)
        matrix = np.zeros((n, self.gallery.dim), np.float32)  # the round's new faces
        rows: list[NewEnrollment] = []
        by_nik: dict[str, int] = {}  # NIK: its row in ``rows``
        # Each item's outcome and the rows (in ``rows``) or enrolments it refers to,
        # the round's own given ids once inserted.
        plans: list[tuple[str, int | Enrollment | None, list[tuple[int | Match, float]],
                          float | None]] = []
        for (_, r), nearest_scores, nearest_ids in zip(items, known.scores, known.ids,
                                                       strict=True):
            prior: int | Enrollment | Quarantined | None = by_nik.get(r.nik)
            if prior is None:
                prior = existing.get(r.nik)
            if isinstance(prior, Quarantined):
                plans.append((QUARANTINED, None, [], None))
                continue
            if prior is not None:
                cosine = float((matrix[prior] if isinstance(prior, int) else prior.embedding)
                               @ r.embedding)
                same = cosine >= r.same_face
                plans.append((ALREADY if same else CONFLICT, prior if same else None, [],
                              cosine))
                continue
            found: list[tuple[int | Match, float]] = []
            for score, i in zip(nearest_scores, nearest_ids, strict=True):
                m = hits.get(int(i))
                if m is not None and m.nik != r.nik and score >= r.threshold(m.photos):
                    found.append((Match(m.nik, float(score), int(i), m.photos), float(score)))
            for j, score in enumerate(matrix[:len(rows)] @ r.embedding):
                if score >= r.threshold(rows[j].photos):
                    found.append((j, float(score)))
            found = sorted(found, key=lambda c: -c[1])[:r.k]
            if found and r.refuse:
                plans.append((REFUSED, None, found, None))
                continue
            flagged = bool(found) or r.flag_note is not None
            by_nik[r.nik] = len(rows)
            matrix[len(rows)] = r.embedding
            plans.append((FLAGGED if flagged else ENROLLED, len(rows), found, None))
            rows.append(NewEnrollment(r.nik, r.embedding, flagged,
                                      [(_nik(c, rows), s) for c, s in found], r.metadata,
                                      r.photos, r.flag_note or "", r.audit))
        new = tx.add_many(rows)
        out = []
        for outcome, ref, cands, own_score in plans:
            out.append(Decision(
                outcome, new[ref] if isinstance(ref, int) else ref,
                [c if isinstance(c, Match) else Match(new[c].nik, s, new[c].id, new[c].photos)
                 for c, s in cands], own_score, n))
        tx.forget([pid for pid, _ in items if pid is not None and pid in own])
        tx.settle([(pid, r.nik, d.to_bytes(r.audit)) for (pid, r), d in zip(items, out, strict=True)
                   if pid is not None and pid not in own])
        return out
