"""Liveness sessions: a challenge given out, a burst of frames taken back once.

:meth:`LivenessSessions.start` draws a challenge (:func:`server.pipeline.liveness.new_challenge`)
and keeps it, with a nonce's digest and an expiry, in ``liveness.sqlite3`` in the
data directory (shared by the server's processes on this machine; a session
started on one machine is unknown to another: route a client's calls to one).
:meth:`LivenessSessions.analyse` takes a burst back: the session is claimed in
one transaction (a second claim finds it used), every frame's digest is kept
for a day (a frame sent before is ``FRAME_REPLAYED``), the frames taken during
the look at the camera are analysed as selfies (one of them is matched) and the
others only located, the geometry decides (:mod:`server.pipeline.liveness`) and
the frames that moved most are embedded.  The reasons it finds are judged
with the other presentation-attack reasons, under the same policy
(:class:`server.core.presentation.PresentationChecks`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from server.core.inference import InferenceEngine
from server.core.metrics import Metrics
from server.errors import (
    InvalidRequest,
    LivenessNotAvailable,
    LivenessSessionUnknown,
    RegistryUnavailable,
)
from server.pipeline import liveness as lv
from server.pipeline.faces import AnalysedFace, FacePipeline
from server.pipeline.types import ARCFACE5

log = logging.getLogger(__name__)

T = TypeVar("T")
SESSION_FILE = "liveness.sqlite3"
KEEP_SECONDS = 86400  # sessions and frame digests are forgotten after a day


@dataclass(frozen=True)
class Limits:
    """What a burst must respect (else ``INVALID_REQUEST``)."""

    min_frames: int = 5  # the look at the camera and one frame per movement
    max_frames: int = 16
    max_frame_bytes: int = 1 << 20  # sixteen fit in a request (twice the image limit)
    max_span_ms: int = 20000


@dataclass(frozen=True)
class Session:
    session_id: str
    nonce: bytes
    challenge: list[lv.Step]
    expires_at: float


@dataclass(frozen=True)
class Capture:
    """A burst sent in place of a selfie."""

    session_id: str
    nonce: bytes
    frames: list[tuple[bytes, int]]  # (encoded image, milliseconds into the challenge)


@dataclass(frozen=True)
class LivenessOutcome:
    """What a burst showed: its reasons (empty: live) and the evidence."""

    reasons: tuple[str, ...]
    assessment: lv.Assessment | None  # None where the session was not usable
    frames: int


class SessionStore:
    """The sessions and the frame digests, in SQLite (one immediate transaction a
    call, off the event loop: :class:`LivenessSessions` calls it in a thread)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=2.0)
        os.chmod(path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, "
                         "nonce_sha256 BLOB, challenge TEXT, started REAL, expires REAL, "
                         "used REAL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS frames (sha256 BLOB PRIMARY KEY, "
                         "seen REAL)")
        self._transaction(self._purge)

    def _purge(self, db: sqlite3.Connection) -> None:
        old = self.clock() - KEEP_SECONDS
        db.execute("DELETE FROM sessions WHERE expires < ?", (old,))
        db.execute("DELETE FROM frames WHERE seen < ?", (old,))

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    out = work(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as e:  # locked past the timeout, disk full
                log.warning("liveness session store: %s", e)
                raise RegistryUnavailable("the liveness session store is busy; retry") from e
            return out

    def add(self, session: Session, started: float) -> None:
        challenge = json.dumps([[s.action.value, s.duration_ms] for s in session.challenge])
        self._transaction(lambda db: db.execute(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, NULL)",
            (session.session_id, hashlib.sha256(session.nonce).digest(), challenge, started,
             session.expires_at)))

    def claim(self, session_id: str, nonce: bytes) -> tuple[list[lv.Step], float, str | None]:
        """The session's challenge and start, and what is wrong with using it now
        (None, ``SESSION_EXPIRED`` or ``SESSION_USED``); it is used from now on.

        Raises:
            LivenessSessionUnknown: no session with this id and nonce.
        """
        def work(db: sqlite3.Connection) -> tuple[list[lv.Step], float, str | None]:
            row = db.execute("SELECT nonce_sha256, challenge, started, expires, used FROM "
                             "sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None or not hmac.compare_digest(row[0], hashlib.sha256(nonce).digest()):
                raise LivenessSessionUnknown(
                    "no liveness session with this session_id and nonce; start one with "
                    "StartLiveness", field="liveness.session_id")
            now = self.clock()
            problem = lv.SESSION_USED if row[4] is not None else (
                lv.SESSION_EXPIRED if now > row[3] else None)
            if row[4] is None:
                db.execute("UPDATE sessions SET used = ? WHERE id = ?", (now, session_id))
            steps = [lv.Step(lv.Action(a), int(ms)) for a, ms in json.loads(row[1])]
            return steps, float(row[2]), problem
        return self._transaction(work)

    def seen(self, digests: list[bytes]) -> bool:
        """Whether any of the frames was seen before (or twice among these); all
        of them are remembered from now on."""
        def work(db: sqlite3.Connection) -> bool:
            before = any(db.execute("SELECT 1 FROM frames WHERE sha256 = ?", (d,)).fetchone()
                         for d in digests)
            db.executemany("INSERT OR REPLACE INTO frames VALUES (?, ?)",
                           [(d, self.clock()) for d in digests])
            return before or len(set(digests)) < len(digests)
        return self._transaction(work)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def chip_template(pipeline: FacePipeline) -> np.ndarray | None:
    """Where the pipeline's recognizer aligns arcface5 landmarks in its chip; None
    where its detector gives other landmarks (no mouth corners) or the
    recognizer aligns otherwise."""
    spec = getattr(pipeline.recognizer, "spec", None)
    if pipeline.detector.landmark_scheme != ARCFACE5 or spec is None:
        return None
    template: np.ndarray = np.asarray(spec.template, np.float64)
    return template


class LivenessSessions:
    """Starts sessions and judges their bursts.

    Args:
        thresholds: the calibration's liveness record; None where it has none
            (then, or with a detector without mouth corners, sessions are not
            available).
        template: where the recognizer aligns the five arcface5 landmarks in its
            chip (:func:`chip_template`); None for a set without them.
        ttl_seconds: how long a session stays open.
        store_pool: where the session store's calls run (off the event loop).
    """

    def __init__(self, store: SessionStore, thresholds: lv.Thresholds | None,
                 template: np.ndarray | None, engine: InferenceEngine, cpu_pool: Executor,
                 store_pool: Executor, metrics: Metrics, ttl_seconds: int = 120,
                 limits: Limits = Limits()) -> None:
        self.store = store
        self.thresholds = thresholds
        self.template = template
        self.available = thresholds is not None and template is not None
        self.engine = engine
        self.cpu_pool = cpu_pool
        self.store_pool = store_pool
        self.metrics = metrics
        self.ttl_seconds = ttl_seconds
        self.limits = limits
        self._random = random.SystemRandom()

    def why_not(self) -> str:
        """Why sessions are not available."""
        if self.thresholds is None:
            return ("the calibration has no liveness record for this measure; run "
                    "`python -m benchmarks.liveness --write-calibration`")
        return "this model set's detector gives no mouth corners (liveness needs arcface5)"

    async def _in_store(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.store_pool, work)

    async def start(self) -> Session:
        """A new session.

        Raises:
            LivenessNotAvailable: the model set cannot run sessions.
        """
        if not self.available:
            raise LivenessNotAvailable(self.why_not())
        now = self.store.clock()
        session = Session(secrets.token_urlsafe(24), secrets.token_bytes(16),
                          lv.new_challenge(self._random), now + self.ttl_seconds)
        await self._in_store(lambda: self.store.add(session, now))
        self.metrics.liveness_sessions.inc()
        return session

    def _check_frames(self, capture: Capture) -> None:
        limits, frames = self.limits, capture.frames
        if not limits.min_frames <= len(frames) <= limits.max_frames:
            raise InvalidRequest(f"liveness.frames: {len(frames)} frames; send "
                                 f"{limits.min_frames} to {limits.max_frames}",
                                 field="liveness.frames")
        for i, (data, _) in enumerate(frames):
            if not data:
                raise InvalidRequest(f"liveness.frames[{i}].image is empty",
                                     field=f"liveness.frames[{i}]")
            if len(data) > limits.max_frame_bytes:
                raise InvalidRequest(f"liveness.frames[{i}].image is {len(data)} bytes; at most "
                                     f"{limits.max_frame_bytes}", field=f"liveness.frames[{i}]")
        offsets = [ms for _, ms in frames]
        if any(b <= a for a, b in zip(offsets, offsets[1:], strict=False)):
            raise InvalidRequest("liveness.frames: offset_ms must increase",
                                 field="liveness.frames")
        if offsets[-1] > limits.max_span_ms:
            raise InvalidRequest(f"liveness.frames span {offsets[-1]} ms; at most "
                                 f"{limits.max_span_ms}", field="liveness.frames")

    async def analyse(self, capture: Capture, view: bool) -> tuple[AnalysedFace, LivenessOutcome]:
        """The frame to match, analysed as a selfie (with its view where ``view``),
        and what the burst showed.

        Raises:
            LivenessNotAvailable, LivenessSessionUnknown, InvalidRequest: as they say.
            RequestError: a frame's own problem (no face, two faces, ...), its
                field ``liveness.frames[i]``.
        """
        if not self.available:
            raise LivenessNotAvailable(self.why_not())
        assert self.thresholds is not None and self.template is not None
        t = self.thresholds
        self._check_frames(capture)
        challenge, started, problem = await self._in_store(
            lambda: self.store.claim(capture.session_id, capture.nonce))
        digests = [hashlib.sha256(data).digest() for data, _ in capture.frames]
        replayed = await self._in_store(lambda: self.store.seen(digests))
        # The frames taken during the look at the camera, one of which is matched,
        # are analysed as selfies at once; the others only located, upright as
        # the first of those was found to be (one camera).
        looking = lv.looking_frames(challenge, [ms for _, ms in capture.frames])
        seen = dict(zip(looking, await asyncio.gather(*(
            self.engine.analyse(capture.frames[i][0], f"liveness.frames[{i}]", True,
                                selfie=True, view=view, frame=True) for i in looking)),
            strict=True))
        turns = seen[looking[0]].turns
        rest = [i for i in range(len(capture.frames)) if i not in seen]
        seen.update(zip(rest, await asyncio.gather(*(
            self.engine.analyse(capture.frames[i][0], f"liveness.frames[{i}]", True,
                                embed=False, turns=turns, frame=True) for i in rest)),
            strict=True))
        faces = [seen[i] for i in range(len(capture.frames))]
        frames = [lv.Frame(f.face.landmarks, tuple(f.face.box), f.chip,
                           lv.in_chip(f.face.landmarks, self.template), ms)
                  for f, (_, ms) in zip(faces, capture.frames, strict=True)]
        a = await asyncio.get_running_loop().run_in_executor(
            self.cpu_pool, lv.geometry, challenge, frames, t)
        best = faces[a.matched]
        others = await asyncio.gather(*(self.engine.embed(frames[i].chip)
                                        for i in a.depth_frames))
        a = a.with_faces([best.embedding, *others])
        reasons = [r for r in (problem, lv.FRAME_REPLAYED if replayed else None) if r]
        # A capture cannot take longer than the session has been open.
        if capture.frames[-1][1] / 1000 > self.store.clock() - started + 1.0:
            reasons.append(lv.CHALLENGE_NOT_FOLLOWED)
        reasons += [r for r in a.reasons(t) if r not in reasons]
        return best, LivenessOutcome(tuple(reasons), a, len(frames))
