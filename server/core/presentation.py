"""Presentation-attack results: is the selfie a live person's photo, or a copy?

Today's checks (:mod:`server.pipeline.replay`):

* ``SELFIE_IS_REFERENCE_COPY``: the selfie is a copy of the reference photo
  sent with it (re-encoded, resized, cropped, turned, cut from a photograph
  of the card), in ``Verify`` and ``Enroll``.
* ``SELFIE_IS_ENROLLED_COPY``: an ``Enroll`` for a NIK already enrolled whose
  face is a copy of the stored template (only the embedding is stored, so
  this is judged on embeddings).  A client's retry of the same request is
  such a copy too, so this one is always only reported.

The policy (``FACEVERIFY_PRESENTATION_ATTACK_POLICY``): ``report`` (the
default: the result rides on the answer, decisions unchanged) or ``refuse``
(a suspected reference copy is refused with ``INVALID_ARGUMENT`` /
``SELFIE_IS_REFERENCE_COPY``, nothing stored).
"""

from __future__ import annotations

import asyncio
import enum
from concurrent.futures import Executor
from dataclasses import dataclass

from server.core.metrics import Metrics
from server.errors import SelfieIsReferenceCopy
from server.pipeline import replay
from server.pipeline.faces import AnalysedFace

REFERENCE_COPY = "SELFIE_IS_REFERENCE_COPY"
ENROLLED_COPY = "SELFIE_IS_ENROLLED_COPY"


class AttackPolicy(enum.Enum):
    """What a suspected presentation attack does."""

    REPORT = "report"  # answered as usual, with the result
    REFUSE = "refuse"  # refused (SELFIE_IS_REFERENCE_COPY), nothing stored


@dataclass(frozen=True)
class Presentation:
    """The presentation-attack result of one selfie.

    Attributes:
        reasons: why it is suspected (empty: nothing found).
        reference_copy_score: the copy score against the reference, where one was
            sent and the check is calibrated.
        checks: which checks ran, with their measure's version.
    """

    reasons: tuple[str, ...] = ()
    reference_copy_score: float | None = None
    checks: tuple[str, ...] = ()

    @property
    def suspected(self) -> bool:
        return bool(self.reasons)

    def adding(self, reason: str, check: str) -> Presentation:
        return Presentation((*self.reasons, reason), self.reference_copy_score,
                            (*self.checks, check))


class PresentationChecks:
    """Runs the calibrated checks and applies the policy.

    Args:
        replay_check: the calibrated thresholds; None where the calibration has
            none (nothing is checked, and GetServerInfo says so).
        cpu_pool: where the image work runs.
    """

    def __init__(self, replay_check: replay.ReplayCheck | None, policy: AttackPolicy,
                 cpu_pool: Executor, metrics: Metrics) -> None:
        self.replay = replay_check
        self.policy = policy
        self.cpu_pool = cpu_pool
        self.metrics = metrics

    @property
    def version(self) -> str:
        return f"replay:{replay.MEASURE}" if self.replay else ""

    async def against_reference(self, rpc: str, selfie: AnalysedFace,
                                reference: AnalysedFace) -> Presentation:
        """The selfie's result against the reference sent with it.

        Raises:
            SelfieIsReferenceCopy: a copy, under the ``refuse`` policy.
        """
        if self.replay is None:
            return Presentation()
        score = await asyncio.get_running_loop().run_in_executor(
            self.cpu_pool, replay.copy_score, selfie.chip, reference.chip)
        if not self.replay.is_copy(score):
            self.metrics.presentation_checks.labels(rpc, "bona_fide").inc()
            return Presentation((), score, (self.version,))
        self.metrics.presentation_checks.labels(rpc, "suspected").inc()
        self.metrics.presentation_attacks.labels(rpc, REFERENCE_COPY).inc()
        if self.policy is AttackPolicy.REFUSE:
            raise SelfieIsReferenceCopy(
                "selfie: it is a copy of the reference photo, not a photo of the applicant "
                "taken now; take a new selfie", image="selfie", score=f"{score:.4f}")
        return Presentation((REFERENCE_COPY,), score, (self.version,))

    def enrolled_copy(self, cosine: float) -> bool:
        """Whether a face whose cosine with the same NIK's stored template is
        ``cosine`` is a copy of the enrolled photo."""
        return self.replay is not None and cosine >= self.replay.template_threshold
