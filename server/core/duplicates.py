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
threshold is interpolated in log N.  Beyond the largest size N0 no search
measures it, and two union bounds hold instead (reported as extrapolated):
a gallery of N faces is N / N0 galleries of N0, so N0's searches at the rate
FPIR x N0 / N keep the target; and it is N single comparisons, so a
threshold whose pairwise FMR (the impostor tail, along its fitted line below
the lowest rate measured) is FPIR / N would keep it too, were the tail's
pairs weighted as a registry's are.  They are not quite (an identity with
many photos has many pairs; a registry has one enrolment a person, and the
lookalikes sit among people with one photo), so the searches' FPIR can
exceed N x FMR: the bound is held to FPIR / (excess x N), the excess being
the most the searches exceeded it by at any size that measured the rate.
The lower of the two thresholds is used, never below the curve's last
measured one.  The second is the one that counts for large galleries: N0's
searches measure rates down to about 1e-4 only, and the line through their
last decade falls far too steeply below it, while the tails are measured on
millions of pairs (docs/deduplication.md).
Each comparison kind (a photo, or a two-photo template: fused embeddings
score higher against everyone) has its own searches and its own tail, so
a template's threshold follows from its own comparisons, never from the
smaller galleries its searches could draw alone.

What a threshold catches is read from the calibration's genuine comparisons
(:func:`server.models.calibrate.genuine_distributions`): the share of two
enrolments of one person, of each kind, scoring at or above it.

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
# How each is named where people read it (GetServerInfo, metrics, docs).
COMPARISONS = {"single": "photo/photo", "fused_single": "template/photo",
               "fused_fused": "template/template"}


@dataclass(frozen=True)
class DuplicatePoint:
    """The duplicate decision for a gallery of ``comparisons`` faces.

    ``pairwise_fmr`` is the false-match rate of one comparison at ``threshold``
    (from the impostor tail); ``extrapolated``: the gallery is larger than any
    the calibration searched (or, under the pairwise rule, the rate is below
    the lowest it measured); ``expected_catch``: the share of genuine
    comparisons of this kind (two enrolments of one person) the calibration
    saw at or above ``threshold``, None where it recorded none."""

    threshold: float
    pairwise_fmr: float
    comparisons: int
    extrapolated: bool
    expected_catch: float | None = None


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
        genuine: per kind, the calibration's genuine comparisons (their share at or
            above each threshold); a kind without them has no expected catch.

    Raises:
        ModelError: an FPIR out of range, no thresholds, or searches that do not
            measure the FPIR.
    """

    def __init__(self, fpir: float, tails: dict[str, tuple[Grid, Fit]],
                 searches: dict[str, list[dict[str, Any]]] | None = None,
                 genuine: dict[str, dict[str, Any]] | None = None) -> None:
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
        # How far the searches' FPIR went beyond N x FMR (the union bound over single
        # comparisons), at most, where they measured this rate: the bound beyond them
        # is held to FPIR / (excess x N).
        self.excess = {kind: max([1.0, *(r for _, _, r in self._measured(sizes, kind))])
                       for kind, sizes in (searches or {}).items() if kind in self.curves}
        # threshold rising, share falling
        self.genuine = {kind: ([float(p["threshold"]) for p in entry["grid"]],
                               [float(p["share"]) for p in entry["grid"]])
                        for kind, entry in (genuine or {}).items()
                        if kind in self.tails and entry.get("grid")}
        self.identities = {kind: int((genuine or {})[kind]["identities"])
                           for kind in self.genuine}

    @classmethod
    def from_calibration(cls, calibration: dict[str, Any], fpir: float) -> DuplicateThreshold:
        """From a calibration's ``searches`` and ``tails``; one from before tails
        falls back to its ``points`` (one-photo comparisons only)."""
        tails = calibration.get("tails")
        if tails:
            return cls(fpir, {kind: _tail(tail) for kind, tail in tails.items()},
                       calibration.get("searches"), calibration.get("genuine"))
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
    def kinds(self) -> tuple[str, ...]:
        """The comparisons the server makes: photos, and templates where calibrated."""
        return KINDS if self.fuses else KINDS[:1]

    def genuine_identities(self, kind: str) -> int:
        """The people the expected catch of ``kind`` is read from (0: none)."""
        return self.identities.get(kind, 0)

    @property
    def fuses(self) -> bool:
        """Whether two-photo templates are calibrated (else only selfies are enrolled)."""
        return {"fused_single", "fused_fused"} <= set(self.tails)

    def catch(self, threshold: float, kind: str = "single") -> float | None:
        """The share of the calibration's genuine comparisons of ``kind`` scoring at or
        above ``threshold``; None where it recorded none."""
        if kind not in self.genuine:
            return None
        ts, shares = self.genuine[kind]
        return _interpolate(threshold, ts, shares)

    def at(self, comparisons: int, kind: str = "single") -> DuplicatePoint:
        """The threshold for an attempt against ``comparisons`` gallery faces, for a
        comparison of ``kind``, and what it is expected to catch."""
        curve = self.curves.get(kind)
        t, extrapolated = (self._searched(curve, comparisons, kind) if curve is not None
                           else self._pairwise(comparisons, kind))
        return DuplicatePoint(t, pairwise_fmr(self.fpir, comparisons)
                              if curve is None else self.fmr_at(t, kind),
                              comparisons, extrapolated, self.catch(t, kind))

    def _searched(self, curve: SearchCurve, comparisons: int, kind: str
                  ) -> tuple[float, bool]:
        x = math.log10(max(comparisons, 1))
        xs, ts = [c[0] for c in curve], [c[1] for c in curve]
        size, grid = self.largest[kind]
        if comparisons <= size:
            return _interpolate(x, xs, ts), False
        # Two union bounds (see the module docstring): over galleries of `size`, and
        # over single comparisons.
        rate = self.fpir * size / comparisons
        at = _threshold_at(grid, rate)
        by_galleries = at if at is not None else _below_grid(grid, rate)
        return min(max(min(by_galleries, self._by_pairs(comparisons, kind)), ts[-1]), 1.0), True

    def _by_pairs(self, comparisons: int, kind: str) -> float:
        """The union bound over single comparisons: the threshold at pairwise FMR
        FPIR / N, N held to the most the searches exceeded it by (see the module
        docstring)."""
        return self._for_fmr(self.fpir / (self.excess.get(kind, 1.0) * comparisons), kind)[0]

    def _measured(self, sizes: list[dict[str, Any]], kind: str
                  ) -> list[tuple[int, float, float]]:
        """(N, threshold, FPIR over N x FMR) at each searched size that measured the
        target rate."""
        out = []
        for entry in sorted(sizes, key=lambda e: int(e["gallery"])):
            t = _threshold_at(_grid(entry), self.fpir)
            if t is not None:
                n = int(entry["gallery"])
                out.append((n, t, self.fpir / (n * self.fmr_at(t, kind))))
        return out

    def _pairwise(self, comparisons: int, kind: str) -> tuple[float, bool]:
        return self._for_fmr(pairwise_fmr(self.fpir, comparisons), kind)

    def _for_fmr(self, fmr: float, kind: str) -> tuple[float, bool]:
        """The threshold at which one comparison of ``kind`` matches at rate ``fmr``,
        and whether that rate is below those the tail measured."""
        grid, fit = self.tails[kind]
        top_fmr, top_t = grid[0]
        if fmr >= top_fmr:  # a tiny gallery: the grid's highest rate (stricter)
            return top_t, False
        for (f0, t0), (f1, t1) in zip(grid, grid[1:], strict=False):
            if f1 <= fmr <= f0:
                w = (math.log10(f0) - math.log10(fmr)) / (math.log10(f0) - math.log10(f1))
                return t0 + w * (t1 - t0), False
        low_t = grid[-1][1]
        if fit is None or fit[0] >= 0:
            return low_t, True
        slope, intercept = fit
        return min(max((math.log10(fmr) - intercept) / slope, low_t), 1.0), True


def kind(photos_a: int, photos_b: int) -> str:
    """What comparing a template of ``photos_a`` photos with one of ``photos_b`` is."""
    return KINDS[(photos_a > 1) + (photos_b > 1)]


def plan(calibration: dict[str, Any], galleries: list[int], fpirs: list[float]
         ) -> list[dict[str, Any]]:
    """What a registry of each size would catch at each target FPIR, by comparison:
    the threshold, its pairwise FMR, whether it is extrapolated and the expected
    catch (None where the calibration recorded no genuine comparisons).

    Raises:
        ModelError: as :class:`DuplicateThreshold`.
    """
    rows = []
    for fpir in fpirs:
        dedup = DuplicateThreshold.from_calibration(calibration, fpir)
        for size in galleries:
            rows.append({"gallery": size, "fpir": fpir, "comparisons": {
                COMPARISONS[k]: {"threshold": round(p.threshold, 4),
                                 "pairwise_fmr": float(f"{p.pairwise_fmr:.3g}"),
                                 "extrapolated": p.extrapolated,
                                 "expected_catch": None if p.expected_catch is None
                                 else round(p.expected_catch, 4)}
                for k in dedup.kinds for p in [dedup.at(size, k)]}})
    return rows


def bound_check(calibration: dict[str, Any], fpir: float) -> list[dict[str, Any]]:
    """How close the union bound over single comparisons (the rule beyond the
    searched galleries) comes to the searches where they measured: for each kind
    and searched size, the measured threshold, the plain bound's (FMR = FPIR / N),
    and the measured FPIR over N x FMR at the measured threshold (1 where the bound
    is exact, under 1 where it is conservative, over 1 where the searches found
    more than it allows: the largest is the excess the rule corrects by)."""
    dedup = DuplicateThreshold.from_calibration(calibration, fpir)
    return [{"comparison": COMPARISONS[k], "gallery": n, "measured": round(t, 4),
             "union_bound": round(dedup._for_fmr(fpir / n, k)[0], 4),
             "fpir_over_n_fmr": round(ratio, 3)}
            for k, sizes in (calibration.get("searches") or {}).items() if k in dedup.curves
            for n, t, ratio in dedup._measured(sizes, k)]
