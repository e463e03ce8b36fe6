"""The transport-independent core: verification decisions over the face pipeline.

gRPC lives in :mod:`server.servicer`; this module knows nothing of it, so it
can be tested and benchmarked directly.  Blocking work runs in the
:class:`~server.inference.InferenceEngine`'s thread pools; the event loop only awaits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from server.errors import InvalidRequest
from server.inference import InferenceEngine
from server.metrics import Metrics
from server.pipeline.faces import AnalysedFace
from server.pipeline.loader import LoadedModels


async def analyse_both(selfie: Awaitable[AnalysedFace], other: Awaitable[AnalysedFace]
                       ) -> tuple[AnalysedFace, AnalysedFace]:
    """Analyse two images concurrently; on failure raise the selfie's error first
    (that is the photo the applicant can retake)."""
    a, b = await asyncio.gather(selfie, other, return_exceptions=True)
    for r in (a, b):
        if isinstance(r, BaseException):
            raise r
    assert isinstance(a, AnalysedFace) and isinstance(b, AnalysedFace)
    return a, b


@dataclass(frozen=True)
class OperatingPoint:
    """The decision threshold and what it was calibrated for."""

    threshold: float
    fmr: float
    dataset: str
    impostor_pairs: int

    @classmethod
    def from_calibration(cls, calibration: dict[str, Any], point: dict[str, Any]) -> OperatingPoint:
        return cls(float(point["threshold"]), float(point["fmr"]), str(calibration["dataset"]),
                   int(calibration["impostor_pairs"]))


@dataclass(frozen=True)
class Verification:
    """The outcome of one 1:1 comparison."""

    match: bool
    score: float
    selfie: AnalysedFace
    reference: AnalysedFace


class VerificationService:
    """1:1 verification of a selfie against a reference photo."""

    def __init__(self, models: LoadedModels, point: OperatingPoint,
                 engine: InferenceEngine, metrics: Metrics) -> None:
        self.models = models
        self.metrics = metrics
        self.point = point
        self.engine = engine

    @property
    def model_version(self) -> str:
        return self.models.model_version

    async def verify(self, selfie: bytes, reference: bytes) -> Verification:
        """Compare the selfie's face with the reference photo's.

        Raises:
            InvalidRequest: an image is missing.
            RequestError: the selfie's image or face problem if it has one,
                else the reference's (see :mod:`server.errors`).
        """
        if not selfie:
            raise InvalidRequest("selfie is required", field="selfie")
        if not reference:
            raise InvalidRequest("reference is required", field="reference")
        a, b = await analyse_both(self.engine.analyse(selfie, "selfie", True),
                                  self.engine.analyse(reference, "reference", False))
        score = float(a.embedding @ b.embedding)
        match = score >= self.point.threshold
        self.metrics.outcomes.labels("Verify", "match" if match else "no_match").inc()
        return Verification(match, score, a, b)

