"""The duplicate threshold for a target false-positive identification rate.

De-duplication compares a new applicant's face with every face in the
gallery, so a pairwise false-match rate (FMR) says little on its own: an
attempt by someone not enrolled raises a false alarm when its best score
against the N enrolled faces reaches the threshold.  The operator sets the
false-positive identification rate (FPIR) they can review
(``FACEVERIFY_DEDUP_FPIR``); the threshold follows the gallery's size.

It is read from searches the calibration measured
(:func:`server.models.calibrate.simulated_searches`): for galleries of several sizes
drawn from the calibration set, the distribution of the best non-mated score,
as NIST's 1:N evaluations measure FPIR.  Between measured sizes the
threshold is interpolated in log N.  Beyond the largest size N0 it is read
from N0's searches at the rate FPIR x N0 / N: a gallery of N faces is N / N0
galleries of N0, and by the union bound the false alarms of the whole are at
most the sum of its parts', so the target holds (reported as extrapolated;
below the lowest rate N0's searches measure, along the line through their
last decade).
Each comparison kind (a photo, or a two-photo template: fused embeddings
score higher against everyone) has its own searches.

A calibration made before searches were measured falls back to the pairwise
rule: FPIR = 1 - (1 - FMR)^N, as if the N comparisons were independent, with
the pairwise FMR read from the calibration's impostor tail
(:func:`server.models.calibrate.impostor_tail`) and extrapolated along its fitted
line below the lowest rate measured.  Comparisons are not independent (some
faces score high against everyone), so that rule is stricter than it needs
to be: on lfw-dev with SFace it caught 72.0 % of duplicates at FPIR 1e-3 where
the measured searches catch 93.7 % (docs/figures.md).
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


@dataclass(frozen=True)
class DuplicatePoint:
    """The duplicate decision for a gallery of ``comparisons`` faces.

    ``pairwise_fmr`` is the false-match rate of one comparison at ``threshold``
    (from the impostor tail); ``extrapolated``: the gallery is larger than any
    the calibration searched (or, under the pairwise rule, the rate is below
    the lowest it measured)."""

    threshold: float
    pairwise_fmr: float
    comparisons: int
    extrapolated: bool


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


def _interpolate(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear ``y(x)`` through ascending ``xs`` (clamped at the ends)."""
    return float(np.interp(x, xs, ys))


SearchCurve = list[tuple[float, float]]  # (log10 gallery size, threshold), size rising
SearchGrid = list[tuple[float, float]]  # (log10 FPIR, threshold), FPIR rising


def _grid(entry: dict[str, Any]) -> SearchGrid:
    return sorted((math.log10(float(p["fpir"])), float(p["threshold"])) for p in entry["grid"])


def _threshold_at(grid: SearchGrid, fpir: float) -> float | None:
    """The threshold for ``fpir`` on one size's grid, interpolated in log FPIR;
    None below the lowest rate it measured."""
    if not grid or math.log10(fpir) < grid[0][0]:
        return None
    return _interpolate(math.log10(fpir), [f for f, _ in grid], [t for _, t in grid])


def _below_grid(grid: SearchGrid, fpir: float) -> float:
    """Below a grid's lowest rate: along the line through its last decade."""
    low = [(f, t) for f, t in grid if f <= grid[0][0] + 1.0]
    if len(low) < 2 or low[-1][1] == low[0][1]:
        return grid[0][1]
    slope, intercept = np.polyfit([t for _, t in low], [f for f, _ in low], 1)
    if slope >= 0:
        return grid[0][1]
    return max(grid[0][1], float((math.log10(fpir) - intercept) / slope))


def search_curve(sizes: list[dict[str, Any]], fpir: float) -> SearchCurve:
    """The threshold for ``fpir`` at each searched gallery size that measured that
    rate, never falling as the gallery grows.

    Raises:
        ModelError: no size measured that rate (too few searches for it).
    """
    curve: SearchCurve = []
    for entry in sorted(sizes, key=lambda e: int(e["gallery"])):
        t = _threshold_at(_grid(entry), fpir)
        if t is None:
            continue
        curve.append((math.log10(int(entry["gallery"])), max([t, *(c[1] for c in curve)])))
    if not curve:
        raise ModelError(f"the calibration's searches do not measure FPIR {fpir:g}: "
                         "calibrate on a larger set, or set a higher FACEVERIFY_DEDUP_FPIR")
    return curve


class DuplicateThreshold:
    """Thresholds for a target FPIR, by gallery size and by what is compared
    (:data:`KINDS`: one photo with one, a two-photo template
    with one photo, two templates).

    Args:
        fpir: the target false-positive identification rate per attempt.
        tails: per kind, (FMR, threshold) pairs in any order and the line below them.
        searches: per kind, the calibration's simulated searches (see the module
            docstring); a kind without them uses the pairwise rule.

    Raises:
        ModelError: an FPIR out of range, no thresholds, or searches that do not
            measure the FPIR.
    """

    def __init__(self, fpir: float, tails: dict[str, tuple[Grid, Fit]],
                 searches: dict[str, list[dict[str, Any]]] | None = None) -> None:
        if not 0 < fpir < 1:
            raise ModelError(f"the target FPIR {fpir:g} must be between 0 and 1")
        if not tails.get("single", ([], None))[0]:
            raise ModelError("the calibration has no thresholds")
        self.fpir = fpir
        # FMR falling, threshold rising
        self.tails = {kind: (sorted(grid, reverse=True), fit)
                      for kind, (grid, fit) in tails.items()}
        self.curves = {kind: search_curve(sizes, fpir)
                       for kind, sizes in (searches or {}).items() if kind in self.tails}
        # The largest gallery searched, for larger ones (see the module docstring).
        self.largest = {kind: (int(top["gallery"]), _grid(top))
                        for kind, sizes in (searches or {}).items() if kind in self.curves
                        for top in [max(sizes, key=lambda e: int(e["gallery"]))]}

    @classmethod
    def from_calibration(cls, calibration: dict[str, Any], fpir: float) -> DuplicateThreshold:
        """From a calibration's ``searches`` and ``tails``; one from before tails
        falls back to its ``points`` (one-photo comparisons only)."""
        tails = calibration.get("tails")
        if tails:
            return cls(fpir, {kind: _tail(tail) for kind, tail in tails.items()},
                       calibration.get("searches"))
        return cls(fpir, {"single": _points(calibration["points"])})

    @property
    def rule(self) -> str:
        """``searches`` (measured 1:N) or ``pairwise`` (independent comparisons)."""
        return "searches" if "single" in self.curves else "pairwise"

    def fmr_at(self, threshold: float, kind: str = "single") -> float:
        """The pairwise false-match rate of one comparison of ``kind`` at ``threshold``."""
        grid, fit = self.tails[kind]
        top_fmr, top_t = grid[0]
        if threshold <= top_t:
            return top_fmr
        ts = [t for _, t in grid]
        if threshold <= ts[-1]:
            return float(10 ** _interpolate(threshold, ts, [math.log10(f) for f, _ in grid]))
        if fit is None or fit[0] >= 0:
            return grid[-1][0]
        return float(min(grid[-1][0], 10 ** (fit[0] * threshold + fit[1])))

    @property
    def fuses(self) -> bool:
        """Whether two-photo templates are calibrated (else only selfies are enrolled)."""
        return {"fused_single", "fused_fused"} <= set(self.tails)

    def at(self, comparisons: int, kind: str = "single") -> DuplicatePoint:
        """The threshold for an attempt against ``comparisons`` gallery faces, for a
        comparison of ``kind``."""
        curve = self.curves.get(kind)
        if curve is not None:
            return self._searched(curve, comparisons, kind)
        return self._pairwise(comparisons, kind)

    def _searched(self, curve: SearchCurve, comparisons: int, kind: str) -> DuplicatePoint:
        x = math.log10(max(comparisons, 1))
        xs, ts = [c[0] for c in curve], [c[1] for c in curve]
        size, grid = self.largest[kind]
        if comparisons <= size:
            t = _interpolate(x, xs, ts)
            return DuplicatePoint(t, self.fmr_at(t, kind), comparisons, False)
        rate = self.fpir * size / comparisons  # the union bound over galleries of `size`
        at = _threshold_at(grid, rate)
        t = min(max(at if at is not None else _below_grid(grid, rate), ts[-1]), 1.0)
        return DuplicatePoint(t, self.fmr_at(t, kind), comparisons, True)

    def _pairwise(self, comparisons: int, kind: str) -> DuplicatePoint:
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
