"""The transport-independent core: verification decisions over the face pipeline.

gRPC lives in :mod:`server.api.servicer`; this module knows nothing of it, so it
can be tested and benchmarked directly.  Blocking work runs in the
:class:`~server.core.inference.InferenceEngine`'s thread pools; the event loop only awaits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from server.core.inference import InferenceEngine
from server.core.liveness import Capture, LivenessOutcome
from server.core.metrics import Metrics
from server.core.presentation import Presentation, PresentationChecks
from server.errors import (
    InvalidRequest,
    LivenessNotAvailable,
    ModelError,
    ReferenceKindNotCalibrated,
)
from server.models.calibrate import operating_point
from server.pipeline.faces import AnalysedFace
from server.pipeline.loader import LoadedModels
from server.pipeline.recognizers import l2_normalise
from server.pipeline.types import BOTH, MIRRORED, PLAIN

log = logging.getLogger(__name__)


Selfie = tuple[AnalysedFace, LivenessOutcome | None]  # the face, and its burst's result


async def analyse_both(selfie: Awaitable[Selfie], other: Awaitable[AnalysedFace]
                       ) -> tuple[Selfie, AnalysedFace]:
    """Analyse two images concurrently; on failure raise the selfie's error first
    (that is the photo the applicant can retake)."""
    a, b = await asyncio.gather(selfie, other, return_exceptions=True)
    error = a if isinstance(a, BaseException) else b if isinstance(b, BaseException) else None
    if error is not None:
        # Raised with no reference left in this frame: its traceback holds the frame,
        # and a cycle through the locals would keep the request's images until the
        # garbage collector's next full pass.
        del a, b
        try:
            raise error
        finally:
            del error
    assert isinstance(a, tuple) and isinstance(b, AnalysedFace)
    return a, b


async def analyse_selfie(engine: InferenceEngine, presentation: PresentationChecks,
                         selfie: bytes, burst: Capture | None, view: bool,
                         half: str = BOTH) -> Selfie:
    """The selfie's face: a single still (its embedding of the recognizer's passes
    ``half`` names), or the matched frame of a liveness session's burst with the
    burst's result.

    Raises:
        InvalidRequest: neither or both sent.
        LivenessNotAvailable, LivenessSessionUnknown: a burst this server cannot take.
        RequestError: the image's (or a frame's) own problem.
    """
    if burst is not None:
        if selfie:
            raise InvalidRequest("send a selfie or a liveness capture, not both",
                                 field="selfie")
        if presentation.sessions is None:
            raise LivenessNotAvailable("this server runs no liveness sessions")
        return await presentation.sessions.analyse(burst, view)
    if not selfie:
        raise InvalidRequest("selfie is required (or a liveness capture)", field="selfie")
    return await engine.analyse(selfie, "selfie", True, selfie=True, view=view, half=half), None


@dataclass(frozen=True)
class MirrorRule:
    """When a 1:1 decision needs the recognizer's mirror pass.

    A flipping recognizer's embedding averages a face's pass with its mirror
    image's: twice the work, and what the thresholds were calibrated on.  A score
    of the plain passes alone differs from it by at most ``margin`` (the largest
    difference seen over the calibration's pairs, with a safety factor: the
    calibration's ``mirror`` record, ``benchmarks.mirror``), so a decision whose
    plain score is further than that from every threshold it is held to comes
    out the same without the mirror pass; only the rest take it.
    """

    margin: float

    @staticmethod
    def from_calibration(calibration: dict[str, Any]) -> MirrorRule | None:
        record = calibration.get("mirror")
        return MirrorRule(float(record["margin"])) if isinstance(record, dict) else None

    def needed(self, score: float, thresholds: Iterable[float]) -> bool:
        return any(abs(score - t) <= self.margin for t in thresholds)


@dataclass(frozen=True)
class OperatingPoint:
    """The decision threshold and what it was calibrated for."""

    threshold: float
    fmr: float
    dataset: str
    impostor_pairs: int
    reference_kind: str = "photo"

    @classmethod
    def from_calibration(cls, calibration: dict[str, Any], point: dict[str, Any],
                         reference_kind: str = "photo") -> OperatingPoint:
        """``calibration``: the whole record, or one of its ``reference_kinds``."""
        return cls(float(point["threshold"]), float(point["fmr"]), str(calibration["dataset"]),
                   int(calibration["impostor_pairs"]), reference_kind)


def operating_points(calibration: dict[str, Any], fmr: float) -> dict[str, OperatingPoint]:
    """The decision point for ordinary photos and for every calibrated reference kind
    that has one at ``fmr`` (a kind without is left out and logged).

    Raises:
        ModelError: the main calibration has no point at ``fmr``.
    """
    points = {"photo": OperatingPoint.from_calibration(calibration,
                                                       operating_point(calibration, fmr))}
    for kind, record in calibration.get("reference_kinds", {}).items():
        try:
            points[kind] = OperatingPoint.from_calibration(record, operating_point(record, fmr),
                                                           kind)
        except ModelError:
            log.warning("the %s calibration has no point at FMR %g: %s references are refused",
                        kind, fmr, kind)
    return points


@dataclass(frozen=True)
class Verification:
    """The outcome of one 1:1 comparison."""

    match: bool
    score: float
    selfie: AnalysedFace
    reference: AnalysedFace
    point: OperatingPoint  # what it was decided at
    presentation: Presentation = Presentation()


class VerificationService:
    """1:1 verification of a selfie against a reference photo.

    Args:
        points: the decision point per kind of reference photo (``photo`` at least).
    """

    def __init__(self, models: LoadedModels, points: dict[str, OperatingPoint],
                 engine: InferenceEngine, metrics: Metrics,
                 presentation: PresentationChecks, mirror: MirrorRule | None = None) -> None:
        self.models = models
        self.metrics = metrics
        self.presentation = presentation
        self.points = points
        self.engine = engine
        # The mirror pass only where a decision needs it (a flipping recognizer with
        # the margin calibrated); else every face takes both passes.
        self.mirror = mirror if models.flip else None

    @property
    def point(self) -> OperatingPoint:
        """The decision point for ordinary photos."""
        return self.points["photo"]

    def point_for(self, reference_kind: str) -> OperatingPoint:
        """The decision point for a reference photo of ``reference_kind``.

        Raises:
            ReferenceKindNotCalibrated: this server has none for that kind.
        """
        point = self.points.get(reference_kind)
        if point is None:
            raise ReferenceKindNotCalibrated(
                f"no operating point is calibrated for {reference_kind} references; "
                f"calibrate with `faceverify calibrate --references DIR --reference-kind "
                f"{reference_kind}`", reference_kind=reference_kind)
        return point

    @property
    def model_version(self) -> str:
        return self.models.model_version

    async def verify(self, selfie: bytes, reference: bytes, reference_kind: str = "photo",
                     burst: Capture | None = None) -> Verification:
        """Compare the selfie's face (or the matched frame of ``burst``, a liveness
        session's capture, checked for liveness) with the reference photo's, at
        the operating point of ``reference_kind``.

        Raises:
            InvalidRequest: an image is missing (or both a selfie and a burst sent).
            LivenessNotAvailable, LivenessSessionUnknown: see :func:`analyse_selfie`.
            ReferenceKindNotCalibrated: no operating point for ``reference_kind``.
            RequestError: the selfie's image or face problem if it has one,
                else the reference's (see :mod:`server.errors`).
            SelfieIsReferenceCopy, SelfieNotLive, a burst's reason: a suspected
                presentation attack, under the ``refuse`` presentation-attack policy.
        """
        if not reference:
            raise InvalidRequest("reference is required", field="reference")
        point = self.point_for(reference_kind)
        view = self.presentation.compares_views
        half = PLAIN if self.mirror is not None else BOTH
        (a, outcome), b = await analyse_both(
            analyse_selfie(self.engine, self.presentation, selfie, burst, view, half),
            self.engine.analyse(reference, "reference", False, view=view, half=half))
        if self.mirror is not None:
            a, b = await self._mirrored_where_needed(a, b, point)
        presentation = await self.presentation.check("Verify", a, b, outcome)
        score = float(a.embedding @ b.embedding)
        match = score >= point.threshold
        self.metrics.outcomes.labels("Verify", "match" if match else "no_match").inc()
        return Verification(match, score, a, b, point, presentation)

    async def _mirrored_where_needed(self, a: AnalysedFace, b: AnalysedFace,
                                     point: OperatingPoint) -> tuple[AnalysedFace, AnalysedFace]:
        """``a`` and ``b`` with the mirror pass added to their plain embeddings where
        their score is within the margin of a threshold it is held to (the match's,
        and the copy check's face rule); as they are elsewhere (:class:`MirrorRule`)."""
        assert self.mirror is not None
        thresholds = [point.threshold]
        if self.presentation.replay is not None:
            thresholds.append(self.presentation.replay.face_threshold)
        needed = self.mirror.needed(float(a.embedding @ b.embedding), thresholds)
        self.metrics.mirror_passes.labels("taken" if needed else "skipped").inc()
        if not needed:
            return a, b
        halves = [f for f in (a, b) if f.half == PLAIN]
        mirrored = await asyncio.gather(*(self.engine.embed(f.chip, MIRRORED) for f in halves))
        whole = {id(f): replace(f, embedding=l2_normalise((f.embedding + m)[None])[0], half=BOTH)
                 for f, m in zip(halves, mirrored, strict=True)}
        return whole.get(id(a), a), whole.get(id(b), b)

