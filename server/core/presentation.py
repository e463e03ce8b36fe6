"""Presentation-attack results: is the selfie a live person's photo, or a copy?

The checks:

* ``SELFIE_IS_REFERENCE_COPY`` (:mod:`server.pipeline.replay`): the selfie is a
  copy of the reference photo sent with it (re-encoded, resized, cropped,
  turned, mirrored, noised, cut from a photograph of the card), in ``Verify`` and
  ``Enroll``: alike as pictures, or a face that matches the reference better than
  two photos of one person do.
* ``SELFIE_NOT_LIVE`` (:mod:`server.pipeline.pad`, where the operator has added
  presentation-attack models to the model set): the selfie's live score is
  under the threshold calibrated for the set's bona fide rejection rate (a
  photo of a print or a screen, as those models see it).
* A liveness session's burst (:mod:`server.core.liveness`), where the selfie is
  one: ``CHALLENGE_NOT_FOLLOWED``, ``FACE_IS_FLAT``, ``FACE_CHANGED``,
  ``FRAME_REPLAYED``, ``SESSION_EXPIRED``, ``SESSION_USED``.  A single still is
  not checked for liveness (and the answer says so).
* ``SELFIE_IS_ENROLLED_COPY``: an ``Enroll`` for a NIK already enrolled whose
  face is a copy of the stored template (only the embedding is stored, so
  this is judged on embeddings).  A client's retry of the same request is
  such a copy too, so this one is always only reported.

The policy (``FACEVERIFY_PRESENTATION_ATTACK_POLICY``): ``report`` (the
default: the result rides on the answer, decisions unchanged), ``flag`` (as
report, and an ``Enroll`` of a suspected selfie is enrolled awaiting review,
its review note saying why) or ``refuse`` (a suspected selfie is refused with
``INVALID_ARGUMENT`` and the first reason found, nothing stored).
"""

from __future__ import annotations

import asyncio
import enum
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from server.core.liveness import LivenessOutcome, LivenessSessions
from server.core.metrics import Metrics
from server.errors import (
    ChallengeNotFollowed,
    FaceChanged,
    FaceIsFlat,
    FrameReplayed,
    RequestError,
    SelfieIsReferenceCopy,
    SelfieNotLive,
    SessionExpired,
    SessionUsed,
)
from server.pipeline import liveness as lv
from server.pipeline import replay
from server.pipeline.faces import AnalysedFace
from server.pipeline.pad import PresentationStage, Threshold

REFERENCE_COPY = "SELFIE_IS_REFERENCE_COPY"
NOT_LIVE = "SELFIE_NOT_LIVE"
ENROLLED_COPY = "SELFIE_IS_ENROLLED_COPY"

# A burst's reason refused under ``refuse``: the error and what it tells the applicant.
BURST_REFUSALS: dict[str, tuple[type[RequestError], str]] = {
    lv.SESSION_USED: (SessionUsed, "this liveness session has been used; start a new one"),
    lv.SESSION_EXPIRED: (SessionExpired, "this liveness session has expired; start a new one"),
    lv.FRAME_REPLAYED: (FrameReplayed, "a frame of this capture was sent before; capture "
                        "again"),
    lv.CHALLENGE_NOT_FOLLOWED: (ChallengeNotFollowed, "the frames do not show the movements "
                                "asked for, in order; follow the instructions and capture "
                                "again"),
    lv.FACE_IS_FLAT: (FaceIsFlat, "the face moved as a picture does, not as a head; capture "
                      "again with your own face"),
    lv.FACE_CHANGED: (FaceChanged, "the frames show more than one face; capture again, alone"),
}


class AttackPolicy(enum.Enum):
    """What a suspected presentation attack does."""

    REPORT = "report"  # answered as usual, with the result
    FLAG = "flag"  # as report; an Enroll is enrolled awaiting review
    REFUSE = "refuse"  # refused (INVALID_ARGUMENT, the reason), nothing stored


@dataclass(frozen=True)
class Presentation:
    """The presentation-attack result of one selfie.

    Attributes:
        reasons: why it is suspected (empty: nothing found).
        reference_copy_score: the copy score against the reference, where one was
            sent and the check is calibrated.
        live_score: the presentation-attack models' score, where the set has them.
        checks: which checks ran, with their measure's or models' version.
        burst: a liveness session's result, where the selfie was a burst (None: a
            single still, not checked for liveness).
    """

    reasons: tuple[str, ...] = ()
    reference_copy_score: float | None = None
    checks: tuple[str, ...] = ()
    live_score: float | None = None
    burst: LivenessOutcome | None = None

    @property
    def suspected(self) -> bool:
        return bool(self.reasons)

    def adding(self, reason: str, check: str) -> Presentation:
        return Presentation((*self.reasons, reason), self.reference_copy_score,
                            (*self.checks, check), self.live_score, self.burst)


@dataclass(frozen=True)
class LivenessCheck:
    """The model set's presentation-attack stage and its threshold."""

    version: str
    threshold: Threshold

    @staticmethod
    def of(stages: tuple[Any, ...], manifest: dict[str, Any]) -> LivenessCheck | None:
        """The check of the ``presentation`` stage among ``stages``, its threshold from
        the manifest that declared it; None where the set has none."""
        stage = next((s for s in stages if isinstance(s, PresentationStage)), None)
        if stage is None:
            return None
        return LivenessCheck(stage.version,
                             Threshold.from_manifest(manifest[stage.name]["threshold"]))


class PresentationChecks:
    """Runs the checks and applies the policy.

    Args:
        replay_check: the calibrated copy thresholds; None where the calibration has
            none (not checked, and GetServerInfo says so).
        liveness: the presentation-attack models' check; None where the set has none.
        cpu_pool: where the image work runs.
        sessions: the liveness sessions (None: a server without them, as in tests
            of the rules).
    """

    def __init__(self, replay_check: replay.ReplayCheck | None, liveness: LivenessCheck | None,
                 policy: AttackPolicy, cpu_pool: Executor, metrics: Metrics,
                 sessions: LivenessSessions | None = None) -> None:
        self.replay = replay_check
        self.liveness = liveness
        self.sessions = sessions
        self.policy = policy
        self.cpu_pool = cpu_pool
        self.metrics = metrics

    @property
    def compares_views(self) -> bool:
        """Whether the replay check runs: a selfie and its reference are then analysed
        with their views (:attr:`AnalysedFace.view`)."""
        return self.replay is not None

    @property
    def version(self) -> str:
        """The replay measure's version (empty where it is not calibrated)."""
        return f"replay:{replay.MEASURE}" if self.replay else ""

    def _counted(self, rpc: str, check: str, suspected: bool) -> bool:
        self.metrics.presentation_checks.labels(rpc, check,
                                                "suspected" if suspected else "bona_fide").inc()
        return suspected

    async def check(self, rpc: str, selfie: AnalysedFace, reference: AnalysedFace | None,
                    burst: LivenessOutcome | None = None) -> Presentation:
        """The selfie's result: a copy of ``reference`` (where one was sent), live
        (``burst``: the liveness session's result, where the selfie is a burst's
        frame).

        Raises:
            SelfieIsReferenceCopy, SelfieNotLive, and a burst's reason's error
                (:data:`BURST_REFUSALS`): a suspected selfie, under the ``refuse``
                policy (a burst's reason first, then a copy of the reference).
        """
        reasons: list[str] = []
        checks: list[str] = []
        copy_score = live_score = None
        if burst is not None:
            checks.append(f"liveness-session:{lv.MEASURE}")
            reasons += sorted(burst.reasons, key=lv.BURST_REASONS.index)
            self._counted(rpc, "liveness_session", bool(burst.reasons))
        if self.replay is not None and reference is not None:
            copy_score = await asyncio.get_running_loop().run_in_executor(
                self.cpu_pool, replay.copy_score, selfie.kept_view(), reference.kept_view())
            checks.append(self.version)
            face_score = float(selfie.embedding @ reference.embedding)
            if self._counted(rpc, "reference_copy", self.replay.is_copy(copy_score, face_score)):
                reasons.append(REFERENCE_COPY)
        if self.liveness is not None and (live := selfie.stages.get("presentation")) is not None:
            live_score = float(live)
            checks.append(f"liveness:{self.liveness.version}")
            self.metrics.live_score.labels(rpc).observe(live_score)
            if self._counted(rpc, "liveness", live_score < self.liveness.threshold.value):
                reasons.append(NOT_LIVE)
        for reason in reasons:
            self.metrics.presentation_attacks.labels(rpc, reason).inc()
        if reasons and self.policy is AttackPolicy.REFUSE:
            if reasons[0] in BURST_REFUSALS:
                error, advice = BURST_REFUSALS[reasons[0]]
                raise error(f"liveness: {advice}", image="liveness")
            if reasons[0] == REFERENCE_COPY:
                raise SelfieIsReferenceCopy(
                    "selfie: it is a copy of the reference photo, not a photo of the applicant "
                    "taken now; take a new selfie", image="selfie", score=f"{copy_score:.4f}")
            raise SelfieNotLive(
                "selfie: it looks like a photo of a printed picture or a screen, not of the "
                "applicant; take a new selfie of yourself, in good light", image="selfie",
                score=f"{live_score:.4f}")
        return Presentation(tuple(reasons), copy_score, tuple(checks), live_score, burst)

    def review_note(self, p: Presentation) -> str | None:
        """Under the ``flag`` policy, why an enrolment of a suspected selfie awaits
        review; None where it is not to be flagged for its presentation."""
        if self.policy is not AttackPolicy.FLAG or not p.suspected:
            return None
        found = [REFERENCE_COPY + (f" (copy score {p.reference_copy_score:.4f})"
                                   if p.reference_copy_score is not None else "")
                 if r == REFERENCE_COPY else
                 NOT_LIVE + (f" (live score {p.live_score:.4f})" if p.live_score is not None
                             else "") if r == NOT_LIVE else r for r in p.reasons]
        return "presentation attack suspected at enrolment: " + ", ".join(found)

    def enrolled_copy(self, cosine: float) -> bool:
        """Whether a face whose cosine with the same NIK's stored template is
        ``cosine`` is a copy of the enrolled photo."""
        return self.replay is not None and cosine >= self.replay.template_threshold
