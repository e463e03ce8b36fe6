"""The duplicate threshold for a target false-positive identification rate.

De-duplication compares a new applicant's face with every face in the
gallery, so a pairwise false-match rate (FMR) says little on its own: with N
faces enrolled, an attempt by someone not enrolled raises a false alarm with
probability FPIR = 1 - (1 - FMR)^N, about N x FMR.  The operator sets the
FPIR they can review (``FACEVERIFY_DEDUP_FPIR``); the threshold follows the
gallery's size: each attempt uses the pairwise FMR its FPIR needs at the
current size, looked up in the calibration's impostor tail
(:func:`server.calibrate.impostor_tail`, 10 thresholds a decade), and
extrapolated along its fitted line below the lowest rate the calibration
measured (reported as extrapolated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from server.errors import ModelError


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


class DuplicateThreshold:
    """Thresholds for a target FPIR, by gallery size.

    Args:
        fpir: the target false-positive identification rate per attempt.
        grid: (FMR, threshold) pairs, any order.
        fit: ``log10(FMR) = slope * threshold + intercept`` below the grid, or None.
    """

    def __init__(self, fpir: float, grid: list[tuple[float, float]],
                 fit: tuple[float, float] | None) -> None:
        if not 0 < fpir < 1:
            raise ModelError(f"the target FPIR {fpir:g} must be between 0 and 1")
        if not grid:
            raise ModelError("the calibration has no thresholds")
        self.fpir = fpir
        self.grid = sorted(grid, reverse=True)  # FMR falling, threshold rising
        self.fit = fit

    @classmethod
    def from_calibration(cls, calibration: dict[str, Any], fpir: float) -> DuplicateThreshold:
        """From a calibration's ``tail``; an older one without it falls back to its
        ``points`` and a line through the two lowest."""
        tail = calibration.get("tail")
        if tail and tail.get("grid"):
            grid = [(float(p["fmr"]), float(p["threshold"])) for p in tail["grid"]]
            fit = tail.get("fit")
            return cls(fpir, grid, (float(fit["slope"]), float(fit["intercept"]))
                       if fit else None)
        grid = [(float(p["fmr"]), float(p["threshold"])) for p in calibration["points"]]
        low = sorted(grid)[:2]
        line = None
        if len(low) == 2 and low[0][1] != low[1][1]:
            (f0, t0), (f1, t1) = low
            slope = (math.log10(f0) - math.log10(f1)) / (t0 - t1)
            line = (slope, math.log10(f0) - slope * t0)
        return cls(fpir, grid, line)

    def at(self, comparisons: int) -> DuplicatePoint:
        """The threshold for an attempt against ``comparisons`` gallery faces."""
        fmr = pairwise_fmr(self.fpir, comparisons)
        top_fmr, top_t = self.grid[0]
        if fmr >= top_fmr:  # a tiny gallery: the grid's highest rate (stricter)
            return DuplicatePoint(top_t, fmr, comparisons, False)
        for (f0, t0), (f1, t1) in zip(self.grid, self.grid[1:], strict=False):
            if f1 <= fmr <= f0:
                w = (math.log10(f0) - math.log10(fmr)) / (math.log10(f0) - math.log10(f1))
                return DuplicatePoint(t0 + w * (t1 - t0), fmr, comparisons, False)
        low_t = self.grid[-1][1]
        if self.fit is None or self.fit[0] >= 0:
            return DuplicatePoint(low_t, fmr, comparisons, True)
        slope, intercept = self.fit
        t = (math.log10(fmr) - intercept) / slope
        return DuplicatePoint(min(max(t, low_t), 1.0), fmr, comparisons, True)
