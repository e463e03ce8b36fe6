"""Presentation-attack results: is the selfie a live person's photo, or a copy?

The checks:

* ``SELFIE_IS_REFERENCE_COPY`` (:mod:`server.pipeline.replay`): the selfie is a
  copy of the reference photo sent with it (re-encoded, resized, cropped,
  turned, cut from a photograph of the card), in ``Verify`` and ``Enroll``.
* ``SELFIE_NOT_LIVE`` (:mod:`server.pipeline.pad`, where the operator has added
  presentation-attack models to the model set): the selfie's live score is
  under the threshold calibrated for the set's bona fide rejection rate (a
  photo of a print or a screen, as those models see it).
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

from server.core.metrics import Metrics
from server.errors import SelfieIsReferenceCopy, SelfieNotLive
from server.pipeline import replay
from server.pipeline.faces import AnalysedFace
from server.pipeline.pad import PresentationStage, Threshold

REFERENCE_COPY = "SELFIE_IS_REFERENCE_COPY"
NOT_LIVE = "SELFIE_NOT_LIVE"
ENROLLED_COPY = "SELFIE_IS_ENROLLED_COPY"


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
    """

    reasons: tuple[str, ...] = ()
    reference_copy_score: float | None = None
    checks: tuple[str, ...] = ()
    live_score: float | None = None

    @property
    def suspected(self) -> bool:
        return bool(self.reasons)

    def adding(self, reason: str, check: str) -> Presentation:
        return Presentation((*self.reasons, reason), self.reference_copy_score,
                            (*self.checks, check), self.live_score)


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
    """

    def __init__(self, replay_check: replay.ReplayCheck | None, liveness: LivenessCheck | None,
                 policy: AttackPolicy, cpu_pool: Executor, metrics: Metrics) -> None:
        self.replay = replay_check
        self.liveness = liveness
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

    async def check(self, rpc: str, selfie: AnalysedFace, reference: AnalysedFace | None
                    ) -> Presentation:
        """The selfie's result: a copy of ``reference`` (where one was sent), live.

        Raises:
            SelfieIsReferenceCopy, SelfieNotLive: a suspected selfie, under the
                ``refuse`` policy (a copy of the reference is named first).
        """
        reasons: list[str] = []
        checks: list[str] = []
        copy_score = live_score = None
        if self.replay is not None and reference is not None:
            copy_score = await asyncio.get_running_loop().run_in_executor(
                self.cpu_pool, replay.copy_score, selfie.kept_view(), reference.kept_view())
            checks.append(self.version)
            if self._counted(rpc, "reference_copy", self.replay.is_copy(copy_score)):
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
            if reasons[0] == REFERENCE_COPY:
                raise SelfieIsReferenceCopy(
                    "selfie: it is a copy of the reference photo, not a photo of the applicant "
                    "taken now; take a new selfie", image="selfie", score=f"{copy_score:.4f}")
            raise SelfieNotLive(
                "selfie: it looks like a photo of a printed picture or a screen, not of the "
                "applicant; take a new selfie of yourself, in good light", image="selfie",
                score=f"{live_score:.4f}")
        return Presentation(tuple(reasons), copy_score, tuple(checks), live_score)

    def review_note(self, p: Presentation) -> str | None:
        """Under the ``flag`` policy, why an enrolment of a suspected selfie awaits
        review; None where it is not to be flagged for its presentation."""
        if self.policy is not AttackPolicy.FLAG or not p.suspected:
            return None
        found = [REFERENCE_COPY + (f" (copy score {p.reference_copy_score:.4f})"
                                   if p.reference_copy_score is not None else "")
                 if r == REFERENCE_COPY else
                 NOT_LIVE + (f" (live score {p.live_score:.4f})" if p.live_score is not None
                             else "") for r in p.reasons]
        return "presentation attack suspected at enrolment: " + ", ".join(found)

    def enrolled_copy(self, cosine: float) -> bool:
        """Whether a face whose cosine with the same NIK's stored template is
        ``cosine`` is a copy of the enrolled photo."""
        return self.replay is not None and cosine >= self.replay.template_threshold
