"""The duplicate threshold for a target false-positive identification rate.

De-duplication compares a new applicant's face with every face in the
gallery, so a pairwise false-match rate (FMR) says little on its own: with N
faces enrolled, an attempt by someone not enrolled raises a false alarm with
probability FPIR = 1 - (1 - FMR)^N, about N x FMR.  The operator sets the
FPIR they can review (``FACEVERIFY_DEDUP_FPIR``); the threshold follows the
gallery's size: each attempt uses the pairwise FMR its FPIR needs at the
current size, looked up in the calibration's impostor tail
(:func:`server.calibrate.impostor_tail`, 10 thresholds a decade) for what is
compared (a photo, or a two-photo template: fused embeddings score higher
against everyone, so they have tails of their own), and extrapolated along
its fitted line below the lowest rate the calibration measured (reported as
extrapolated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.errors import ModelError

# What a duplicate search compares: one photo's embedding with another's, a
# two-photo template (selfie and reference, fused) with one photo, or two
# templates.  Each has its own impostor distribution (fused embeddings sit
# closer to everyone), so each its own tail.
KINDS = ("single", "fused_single", "fused_fused")


def fuse(embeddings: np.ndarray) -> np.ndarray:
    """One template from several embeddings of a face: their normalised mean."""
    mean = embeddings.mean(axis=0)
    unit: np.ndarray = (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
    return unit


@dataclass(frozen=True)
class DuplicatePoint:
    """The duplicate decision for a gallery of ``comparisons`` faces."""

    threshold: float
    pairwise_fmr: float
    comparisons: int
    extrapolated: bool  # below the lowest FMR the calibration measured


def pairwise_fmr(fpir: float, comparisons: int) -> float:
    """The pairwise FMR at which ``comparisons`` independent comparisons give ``fpir``."""
    return -math.expm1(math.log1p(-fpir) / max(comparisons, 1))


Grid = list[tuple[float, float]]  # (FMR, threshold) pairs
Fit = tuple[float, float] | None  # log10(FMR) = slope * threshold + intercept


def _tail(tail: dict[str, Any]) -> tuple[Grid, Fit]:
    fit = tail.get("fit")
    return ([(float(p["fmr"]), float(p["threshold"])) for p in tail["grid"]],
            (float(fit["slope"]), float(fit["intercept"])) if fit else None)


def _points(points: list[dict[str, Any]]) -> tuple[Grid, Fit]:
    """A calibration from before tails: its points, and a line through the two lowest."""
    grid = [(float(p["fmr"]), float(p["threshold"])) for p in points]
    low = sorted(grid)[:2]
    if len(low) < 2 or low[0][1] == low[1][1]:
        return grid, None
    (f0, t0), (f1, t1) = low
    slope = (math.log10(f0) - math.log10(f1)) / (t0 - t1)
    return grid, (slope, math.log10(f0) - slope * t0)


class DuplicateThreshold:
    """Thresholds for a target FPIR, by gallery size and by what is compared
    (:data:`KINDS`: one photo with one, a two-photo template
    with one photo, two templates).

    Args:
        fpir: the target false-positive identification rate per attempt.
        tails: per kind, (FMR, threshold) pairs in any order and the line below them.
    """

    def __init__(self, fpir: float, tails: dict[str, tuple[Grid, Fit]]) -> None:
        if not 0 < fpir < 1:
            raise ModelError(f"the target FPIR {fpir:g} must be between 0 and 1")
        if not tails.get("single", ([], None))[0]:
            raise ModelError("the calibration has no thresholds")
        self.fpir = fpir
        # FMR falling, threshold rising
        self.tails = {kind: (sorted(grid, reverse=True), fit)
                      for kind, (grid, fit) in tails.items()}

    @classmethod
    def from_calibration(cls, calibration: dict[str, Any], fpir: float) -> DuplicateThreshold:
        """From a calibration's ``tails``; one from before them falls back to its
        ``points`` (one-photo comparisons only)."""
        tails = calibration.get("tails")
        if tails:
            return cls(fpir, {kind: _tail(tail) for kind, tail in tails.items()})
        return cls(fpir, {"single": _points(calibration["points"])})

    @property
    def fuses(self) -> bool:
        """Whether two-photo templates are calibrated (else only selfies are enrolled)."""
        return {"fused_single", "fused_fused"} <= set(self.tails)

    def at(self, comparisons: int, kind: str = "single") -> DuplicatePoint:
        """The threshold for an attempt against ``comparisons`` gallery faces, for a
        comparison of ``kind``."""
        grid, fit = self.tails[kind]
        fmr = pairwise_fmr(self.fpir, comparisons)
        top_fmr, top_t = grid[0]
        if fmr >= top_fmr:  # a tiny gallery: the grid's highest rate (stricter)
            return DuplicatePoint(top_t, fmr, comparisons, False)
        for (f0, t0), (f1, t1) in zip(grid, grid[1:], strict=False):
            if f1 <= fmr <= f0:
                w = (math.log10(f0) - math.log10(fmr)) / (math.log10(f0) - math.log10(f1))
                return DuplicatePoint(t0 + w * (t1 - t0), fmr, comparisons, False)
        low_t = grid[-1][1]
        if fit is None or fit[0] >= 0:
            return DuplicatePoint(low_t, fmr, comparisons, True)
        slope, intercept = fit
        t = (math.log10(fmr) - intercept) / slope
        return DuplicatePoint(min(max(t, low_t), 1.0), fmr, comparisons, True)


def kind(photos_a: int, photos_b: int) -> str:
    """What comparing a template of ``photos_a`` photos with one of ``photos_b`` is."""
    return KINDS[(photos_a > 1) + (photos_b > 1)]
