"""``faceverify calibrate``: decision thresholds for target false-match rates.

Embeds every image of a labelled folder (one sub-folder per identity), scores
all same-identity pairs (genuine) and all cross-identity pairs (impostor), and
for each target false-match rate (FMR) picks the lowest threshold at which at
most that fraction of impostor pairs match.  The result is written as
``calibration.json`` beside the model manifest, tied to the model version.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from server.errors import FaceVerifyError, ModelError
from server.pipeline import replay
from server.pipeline.faces import FacePipeline
from server.pipeline.recognizers import fuse

log = logging.getLogger(__name__)

DEFAULT_FMRS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
# The share of genuine pairs (two photos of one person) the replay check may take for
# a copy of each other.
REPLAY_GENUINE_RATE = 1e-3
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


@dataclass(frozen=True)
class Embedded:
    """Embeddings of a labelled image set."""

    embeddings: np.ndarray  # (n, dim) float32, L2-normalised
    labels: np.ndarray  # (n,) int identity index
    images: int  # images attempted
    failed: int  # images without a usable face
    names: tuple[str, ...] = ()  # (n,) file names, where known
    identities: tuple[str, ...] = ()  # identity name of each label, where known
    bands: np.ndarray | None = None  # (n, SIDE, SIDE) faces as the replay check sees them


def read_excluded_pairs(path: Path) -> set[frozenset[str]]:
    """Image pairs to leave out of the impostor statistics: a tab-separated file of
    two image file names a line (``#`` comments), such as lfw-dev's
    ``LABEL_ERRORS.tsv`` (pairs filed under two names that show one person).

    Raises:
        ModelError: unreadable, or a line without two names.
    """
    pairs: set[frozenset[str]] = set()
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ModelError(f"cannot read the excluded pairs {path}: {exc}") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        names = line.split("\t")
        if len(names) != 2 or not all(names):
            raise ModelError(f"{path.name}:{n}: expected two image names separated by a tab")
        pairs.add(frozenset(name.strip() for name in names))
    return pairs


def labelled_images(dataset: Path, max_per_identity: int | None = None,
                    max_identities: int | None = None) -> list[tuple[str, Path]]:
    """(identity, path) for every image in ``dataset/<identity>/``, sorted."""
    out: list[tuple[str, Path]] = []
    dirs = sorted(d for d in dataset.iterdir() if d.is_dir())
    if max_identities is not None:
        dirs = dirs[:max_identities]
    for d in dirs:
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        out.extend((d.name, f) for f in files[:max_per_identity])
    return out


def impostor_pairs(identities: Iterable[str]) -> int:
    """Cross-identity pairs among images of these identities (one per image)."""
    counts = np.unique(np.asarray(list(identities)), return_counts=True)[1].astype(np.int64)
    n = int(counts.sum())
    return n * (n - 1) // 2 - int((counts * (counts - 1) // 2).sum())


def check_enough_impostors(items: list[tuple[str, Path]], fmrs: Iterable[float]) -> None:
    """Refuse, before embedding anything, a dataset that cannot hold enough impostor
    pairs for the lowest rate even if every image had a face.

    Raises:
        ModelError: how many pairs there would be, how many are needed.
    """
    lowest = min(fmrs)
    have = impostor_pairs(identity for identity, _ in items)
    if have < 10 / lowest:
        raise ModelError(f"{len(items)} images give at most {have} impostor pairs, too few to "
                         f"calibrate FMR {lowest:g}: at least {math.ceil(10 / lowest)} are "
                         "needed (more images or identities, or a higher --fmr)")


def embed_labelled(pipeline: FacePipeline, items: Iterable[tuple[str, Path]]) -> Embedded:
    """Embed each image's most prominent face; images without one are counted, not used."""
    ids: dict[str, int] = {}
    embs, labels, names, bands = [], [], [], []
    attempted = failed = 0
    for identity, path in items:
        attempted += 1
        if attempted % 500 == 0:
            log.info("embedded %d images (%d without a usable face)", attempted, failed)
        try:
            face = pipeline.analyse(path.read_bytes(), "image", refuse_ambiguous=False,
                                    view=True)
        except FaceVerifyError as exc:
            failed += 1
            log.debug("%s: %s", path.name, exc)
            continue
        embs.append(face.embedding)
        labels.append(ids.setdefault(identity, len(ids)))
        names.append(path.name)
        bands.append(replay.band(face.kept_view()))
    dim = pipeline.dim
    return Embedded(np.asarray(embs, dtype=np.float32).reshape(-1, dim),
                    np.asarray(labels, dtype=np.int64), attempted, failed, tuple(names),
                    tuple(ids), np.asarray(bands, np.float32).reshape(-1, replay.SIDE,
                                                                    replay.SIDE))


def _excluded_indices(names: tuple[str, ...], exclude: Collection[frozenset[str]]
                      ) -> list[tuple[int, int]]:
    where: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        where.setdefault(name, []).append(i)
    out = []
    for pair in exclude:
        if len(pair) != 2:
            continue
        a, b = sorted(pair)
        out += [(min(i, j), max(i, j)) for i in where.get(a, []) for j in where.get(b, [])]
    return out


def pair_scores(emb: Embedded, exclude: Collection[frozenset[str]] = ()
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """All genuine and all impostor cosine scores (each unordered pair once), and how
    many impostor pairs ``exclude`` (image file name pairs) left out."""
    n = len(emb.labels)
    sims = emb.embeddings @ emb.embeddings.T
    keep = np.triu(np.ones((n, n), dtype=bool), k=1)
    dropped = 0
    for i, j in _excluded_indices(emb.names, exclude):
        if keep[i, j] and emb.labels[i] != emb.labels[j]:
            keep[i, j] = False
            dropped += 1
    iu = np.nonzero(keep)
    same = emb.labels[iu[0]] == emb.labels[iu[1]]
    scores = sims[iu]
    return scores[same], scores[~same], dropped


def descending(scores: np.ndarray) -> np.ndarray:
    sorted_desc: np.ndarray = -np.sort(-scores)
    return sorted_desc


def _threshold_at(desc: np.ndarray, fmr: float) -> float:
    """:func:`threshold_for_fmr` of scores already sorted highest first."""
    allowed = math.floor(fmr * len(desc))
    if allowed >= len(desc):
        return float(desc[-1])
    return float(np.nextafter(np.float32(desc[allowed]), np.float32(np.inf)))


def threshold_for_fmr(impostor: np.ndarray, fmr: float) -> float:
    """The lowest threshold t with (impostor >= t).mean() <= fmr."""
    return _threshold_at(descending(impostor), fmr)


TAIL_STEPS_PER_DECADE = 10
TAIL_TOP = 1e-2  # the tail's grid starts at this FMR


def impostor_tail(desc: np.ndarray) -> dict[str, Any]:
    """The upper tail of impostor scores ``desc`` (sorted highest first, see
    :func:`descending`), for thresholds at any pairwise FMR.

    ``grid``: thresholds on a log grid of FMRs (10 a decade) from 1e-2 down to
    the lowest rate that at least 10 impostor pairs measure.  ``fit``: a line
    through log10(FMR) against threshold over that last measured decade (the
    highest-scoring impostor pairs), to extrapolate below it; used, and
    reported as extrapolated, only where a gallery is too large for the grid.
    """
    total = len(desc)
    grid = []
    step = 0
    while (fmr := TAIL_TOP * 10 ** (-step / TAIL_STEPS_PER_DECADE)) * total >= 10:
        grid.append({"fmr": fmr, "threshold": _threshold_at(desc, fmr)})
        step += 1
    lowest = grid[-1]["fmr"] if grid else 1.0
    ranks = np.arange(max(1, math.floor(lowest * total)),
                      min(total, math.floor(10 * lowest * total)) + 1)
    fit = None
    if len(ranks) >= 10:
        slope, intercept = np.polyfit(desc[ranks - 1].astype(np.float64),
                                      np.log10(ranks / total), 1)
        fit = {"slope": float(slope), "intercept": float(intercept),
               "fmr_range": [float(ranks[0] / total), float(ranks[-1] / total)]}
    return {"impostor_pairs": total, "grid": grid, "fit": fit}


def two_photo_impostors(emb: Embedded, exclude: Collection[frozenset[str]] = ()
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Impostor scores of two-photo templates (each identity's first two images,
    fused) against single images of other identities, and against each other's
    templates; pairs involving an excluded image pair are left out."""
    first: dict[int, list[int]] = {}
    for i, label in enumerate(emb.labels):
        first.setdefault(int(label), [])
        if len(first[int(label)]) < 2:
            first[int(label)].append(i)
    owners = [ids for ids in first.values() if len(ids) == 2]
    if len(owners) < 2:
        return np.empty(0, np.float32), np.empty(0, np.float32)
    templates = np.stack([fuse(emb.embeddings[ids]) for ids in owners])
    labels = np.array([emb.labels[ids[0]] for ids in owners])
    vs_single = templates @ emb.embeddings.T
    keep = labels[:, None] != emb.labels[None, :]
    vs_fused = templates @ templates.T
    keep_fused = np.triu(np.ones_like(vs_fused, dtype=bool), k=1)
    if exclude and emb.names:
        row = {i: r for r, ids in enumerate(owners) for i in ids}
        for i, j in _excluded_indices(emb.names, exclude):
            for a, b in ((i, j), (j, i)):
                if a in row:
                    keep[row[a], b] = False
                    if b in row:
                        keep_fused[min(row[a], row[b]), max(row[a], row[b])] = False
    return vs_single[keep], vs_fused[keep_fused]


# Denser near the top of what lfw-dev allows (802 identities with two photos,
# 2,820 in all), so that its galleries of a few thousand are interpolated.
SEARCH_SIZES = (1, 3, 10, 30, 100, 300, 500, 700, 1000, 1500, 2000, 2500, 3000, 10000,
                30000, 100000)
SEARCHES_PER_SIZE = 100_000  # non-mated searches simulated per gallery size
SEARCH_DRAWS = 400  # at most this many random galleries per size
SEARCH_STEPS_PER_DECADE = 10
SEARCH_TOP = 1e-1  # the FPIR grid starts here


@dataclass(frozen=True)
class _Units:
    """What a simulated gallery or search is made of: photos, or two-photo templates."""

    embeddings: np.ndarray  # (n, dim)
    labels: np.ndarray  # (n,) identity
    images: list[tuple[int, ...]]  # the Embedded rows each is made of


def _photo_units(emb: Embedded) -> _Units:
    return _Units(emb.embeddings, emb.labels, [(i,) for i in range(len(emb.labels))])


def _template_units(emb: Embedded) -> _Units:
    """Each identity's first two photos fused, as :func:`two_photo_impostors` makes them."""
    first: dict[int, list[int]] = {}
    for i, label in enumerate(emb.labels):
        if len(ids := first.setdefault(int(label), [])) < 2:
            ids.append(i)
    owners = [tuple(ids) for ids in first.values() if len(ids) == 2]
    dim = emb.embeddings.shape[1]
    return _Units(np.stack([fuse(emb.embeddings[list(ids)]) for ids in owners]).reshape(-1, dim)
                  if owners else np.empty((0, dim), np.float32),
                  np.array([emb.labels[ids[0]] for ids in owners], dtype=np.int64), owners)


def _excluded_unit_pairs(emb: Embedded, probes: _Units, gallery: _Units,
                         exclude: Collection[frozenset[str]]) -> set[tuple[int, int]]:
    """(probe unit, gallery unit) pairs that involve an excluded image pair."""
    rows = _excluded_indices(emb.names, exclude) if exclude and emb.names else []
    if not rows:
        return set()
    of_probe: dict[int, list[int]] = {}
    of_gallery: dict[int, list[int]] = {}
    for u, images in enumerate(probes.images):
        for i in images:
            of_probe.setdefault(i, []).append(u)
    for u, images in enumerate(gallery.images):
        for i in images:
            of_gallery.setdefault(i, []).append(u)
    return {(p, g) for i, j in rows for a, b in ((i, j), (j, i))
            for p in of_probe.get(a, []) for g in of_gallery.get(b, [])}


def _grid(desc: np.ndarray) -> list[dict[str, float]]:
    """Thresholds on a log grid of FPIRs (10 a decade from 1e-1) down to the lowest
    rate that at least 10 of the best non-mated scores ``desc`` measure."""
    grid = []
    step = 0
    while (rate := SEARCH_TOP * 10 ** (-step / SEARCH_STEPS_PER_DECADE)) * len(desc) >= 10:
        grid.append({"fpir": rate, "threshold": _threshold_at(desc, rate)})
        step += 1
    return grid


def simulated_searches(emb: Embedded, probes: _Units, gallery: _Units,
                       exclude: Collection[frozenset[str]] = (), seed: int = 0,
                       searches: int = SEARCHES_PER_SIZE) -> list[dict[str, Any]]:
    """The best non-mated score of searches against simulated galleries, by size.

    For each size N of :data:`SEARCH_SIZES` that leaves enough identities to
    search with (at least 50, and a tenth of them), galleries of N identities
    (one unit each, drawn at random) are searched with every probe unit of an
    identity not in that gallery, until ``searches`` searches (or
    :data:`SEARCH_DRAWS` galleries); a gallery unit that an excluded image pair
    ties to the probe is left out of that search.  This measures the
    false-positive identification rate directly, as NIST's 1:N evaluations do,
    rather than deriving it from pairwise rates as if comparisons were
    independent (they are not: some faces score high against everyone).

    Returns:
        Per size: ``gallery`` (N), ``searches``, ``draws`` and ``grid`` (FPIR,
        threshold) pairs (see :func:`_grid`).
    """
    rng = np.random.default_rng(seed)
    skip = _excluded_unit_pairs(emb, probes, gallery, exclude)
    by_identity: dict[int, list[int]] = {}
    for u, label in enumerate(gallery.labels):
        by_identity.setdefault(int(label), []).append(u)
    identities = np.array(sorted(by_identity))
    everyone = len(set(map(int, gallery.labels)) | set(map(int, probes.labels)))
    out = []
    for size in SEARCH_SIZES:
        if size > len(identities) or everyone - size < max(50, everyone // 10):
            break
        best: list[np.ndarray] = []
        count = draws = 0
        while count < searches and draws < SEARCH_DRAWS:
            draws += 1
            chosen = rng.choice(identities, size, replace=False)
            units = np.array([by_identity[int(i)][rng.integers(len(by_identity[int(i)]))]
                              for i in chosen])
            probe_rows = np.nonzero(~np.isin(probes.labels, chosen))[0]
            scores = probes.embeddings[probe_rows] @ gallery.embeddings[units].T
            if skip:
                col = {int(u): c for c, u in enumerate(units)}
                row = {int(p): r for r, p in enumerate(probe_rows)}
                for p, g in skip:
                    if p in row and g in col:
                        scores[row[p], col[g]] = -np.inf
            best.append(scores.max(axis=1))
            count += len(probe_rows)
        desc = descending(np.concatenate(best))
        out.append({"gallery": size, "searches": int(len(desc)), "draws": draws,
                    "grid": _grid(desc)})
    return out


def search_distributions(emb: Embedded, exclude: Collection[frozenset[str]] = (),
                         searches: int = SEARCHES_PER_SIZE) -> dict[str, Any]:
    """:func:`simulated_searches` for each comparison kind the calibration set allows:
    photos searched among photos (``single``); two-photo templates among photos and
    photos among templates, pooled (``fused_single``); templates among templates
    (``fused_fused``)."""
    photos, templates = _photo_units(emb), _template_units(emb)
    out = {"single": simulated_searches(emb, photos, photos, exclude, 0, searches)}
    if len(templates.labels) >= 100:
        pooled = [simulated_searches(emb, a, b, exclude, seed, searches // 2)
                  for seed, (a, b) in enumerate(((templates, photos), (photos, templates)), 1)]
        out["fused_single"] = _pool(*pooled)
        out["fused_fused"] = simulated_searches(emb, templates, templates, exclude, 3,
                                                searches)
    return out


GENUINE_PHOTOS = 12  # an identity's first photos its genuine comparisons use, at most
GENUINE_STEP = 0.005  # the genuine curves' threshold step


def genuine_distributions(emb: Embedded) -> dict[str, Any]:
    """What a duplicate threshold catches: for each comparison kind, the share of
    genuine comparisons (two enrolments of one person) scoring at or above each
    threshold, every identity counted once however many photos it has.

    Of each identity's first :data:`GENUINE_PHOTOS` photos: ``single``, every
    two photos; two-photo templates are its disjoint consecutive pairs (first and
    second, third and fourth, ...) fused as ``Enroll`` fuses a selfie and its
    reference; ``fused_single``, each template against each photo not in it (three
    photos or more); ``fused_fused``, every two of its templates (four or more).

    Returns:
        Per kind: ``identities``, ``comparisons`` and ``grid``, (threshold, share)
        points every :data:`GENUINE_STEP` from where the share falls below 1 to
        where it reaches 0.
    """
    scores: dict[str, list[np.ndarray]] = {kind: [] for kind in
                                           ("single", "fused_single", "fused_fused")}
    for label in np.unique(emb.labels):
        members = np.nonzero(emb.labels == label)[0][:GENUINE_PHOTOS]
        photos = emb.embeddings[members]
        n = len(members)
        if n < 2:
            continue
        upper = np.triu_indices(n, 1)
        scores["single"].append((photos @ photos.T)[upper])
        pairs = [(i, i + 1) for i in range(0, n - 1, 2)]
        templates = np.stack([fuse(photos[list(p)]) for p in pairs])
        if n >= 3:
            outside = np.ones((len(pairs), n), bool)
            for t, p in enumerate(pairs):
                outside[t, list(p)] = False
            scores["fused_single"].append((templates @ photos.T)[outside])
        if len(pairs) >= 2:
            scores["fused_fused"].append(
                (templates @ templates.T)[np.triu_indices(len(pairs), 1)])
    out: dict[str, Any] = {}
    steps = np.arange(0, round(1 / GENUINE_STEP) + 1) * GENUINE_STEP
    for kind, per_identity in scores.items():
        if not per_identity:
            continue
        # The share at each step, each identity weighing 1 / its comparisons.
        share = np.mean([(s[None, :] >= steps[:, None]).mean(axis=1) for s in per_identity],
                        axis=0)
        first = max(int(np.argmax(share < 1.0)) - 1, 0)
        last = int(np.argmax(share <= 0.0)) if (share <= 0.0).any() else len(steps) - 1
        out[kind] = {"identities": len(per_identity),
                     "comparisons": int(sum(len(s) for s in per_identity)),
                     "grid": [{"threshold": round(float(steps[i]), 6), "share": float(share[i])}
                              for i in range(first, last + 1)]}
    return out


def _pool(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Two directions of one comparison kind: at a size both searched, the stricter
    threshold of the two at each rate both measure; at a size only one searched
    (a gallery of templates is smaller than one of photos), that one's."""
    by_size = {int(e["gallery"]): e for e in b}
    out = []
    for x in a:
        y = by_size.pop(int(x["gallery"]), None)
        if y is None:
            out.append(x)
            continue
        rates = {round(p["fpir"], 12): p["threshold"] for p in y["grid"]}
        grid = [{"fpir": p["fpir"], "threshold": max(p["threshold"], rates[round(p["fpir"], 12)])}
                for p in x["grid"] if round(p["fpir"], 12) in rates]
        out.append({"gallery": x["gallery"], "searches": min(x["searches"], y["searches"]),
                    "draws": x["draws"] + y["draws"], "grid": grid})
    return sorted(out + list(by_size.values()), key=lambda e: int(e["gallery"]))


def _points(genuine: np.ndarray, desc: np.ndarray, fmrs: Iterable[float]
            ) -> list[dict[str, Any]]:
    """The threshold, measured FMR and TMR at each target FMR, from impostor scores
    ``desc`` sorted highest first.

    Raises:
        ModelError: too few impostor pairs for one of the rates (10 / fmr needed).
    """
    points = []
    for fmr in sorted(fmrs, reverse=True):
        if len(desc) < 10 / fmr:
            raise ModelError(f"{len(desc)} impostor pairs are too few to calibrate FMR "
                             f"{fmr:g}: at least {math.ceil(10 / fmr)} are needed")
        t = _threshold_at(desc, fmr)
        points.append({
            "fmr": fmr,
            "threshold": t,
            "measured_fmr": float((desc >= t).mean()),
            "tmr": float((genuine >= t).mean()) if len(genuine) else None,
        })
    return points



def calibrate_reference_kind(selfies: Embedded, references: Embedded, fmrs: Iterable[float],
                             dataset_name: str, exclude: Collection[frozenset[str]] = ()
                             ) -> dict[str, Any]:
    """An operating point for selfies verified against references of one kind:
    every selfie scored against every reference (genuine when both show the same
    identity, by folder name), leaving out a reference with the same file name
    as the selfie (a copy of that very photo) and the impostor pairs in
    ``exclude`` (by file name, as :func:`calibrate`).

    Raises:
        ModelError: too few impostor pairs for one of the rates, or no identity
            in common.
    """
    scores = selfies.embeddings @ references.embeddings.T
    ids_s = np.array(selfies.identities)[selfies.labels]
    ids_r = np.array(references.identities)[references.labels]
    same = ids_s[:, None] == ids_r[None, :]
    copy = np.array(selfies.names)[:, None] == np.array(references.names)[None, :]
    if not same.any():
        raise ModelError("the selfies and the references share no identity (sub-folder name)")
    impostor_mask = ~same
    if exclude:
        where_s = {n: i for i, n in enumerate(selfies.names)}
        where_r = {n: i for i, n in enumerate(references.names)}
        for pair in exclude:
            for a in pair:
                for b in pair - {a}:
                    if a in where_s and b in where_r:
                        impostor_mask[where_s[a], where_r[b]] = False
    genuine, impostor = scores[same & ~copy], scores[impostor_mask]
    return {
        "dataset": dataset_name,
        "selfies": len(selfies.labels),
        "references": len(references.labels),
        "references_without_face": references.failed,
        "genuine_pairs": int(len(genuine)),
        "impostor_pairs": int(len(impostor)),
        "points": _points(genuine, descending(impostor), fmrs),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def calibrate(emb: Embedded, fmrs: Iterable[float], dataset_name: str,
              model_version: str, exclude: Collection[frozenset[str]] = (),
              excluded_from: str | None = None) -> dict[str, Any]:
    """The calibration record for ``emb``, leaving the impostor pairs in ``exclude``
    (image file names; see :func:`read_excluded_pairs`, read from ``excluded_from``)
    out.

    Raises:
        ModelError: too few impostor pairs to estimate one of the rates (at
            least 10 / fmr are required).
    """
    genuine, impostor, dropped = pair_scores(emb, exclude)
    desc = descending(impostor)  # sorted once: every threshold below reads it
    tails = {"single": impostor_tail(desc)}
    fused_single, fused_fused = two_photo_impostors(emb, exclude)
    if min(len(fused_single), len(fused_fused)) >= 10 / TAIL_TOP:
        tails.update(fused_single=impostor_tail(descending(fused_single)),
                     fused_fused=impostor_tail(descending(fused_fused)))
    else:
        log.warning("too few identities with two images to calibrate two-photo templates: "
                    "enrolments will keep the selfie only")
    return {
        "model_version": model_version,
        "dataset": dataset_name,
        "images": emb.images,
        "images_without_face": emb.failed,
        "identities": int(len(np.unique(emb.labels))),
        "genuine_pairs": int(len(genuine)),
        "impostor_pairs": int(len(impostor)),
        "excluded_impostor_pairs": dropped,
        "excluded_from": excluded_from,
        "points": _points(genuine, desc, fmrs),
        "tails": tails,
        "searches": search_distributions(emb, exclude),
        "genuine": genuine_distributions(emb),
        **({"replay": replay_record(emb, genuine)}
           if emb.bands is not None and len(emb.bands) else {}),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def genuine_copy_scores(emb: Embedded) -> tuple[np.ndarray, np.ndarray]:
    """The replay check's copy score (:mod:`server.pipeline.replay`) and the face
    score (embeddings' cosine) of every genuine pair, two different photos of one
    person, in the same order."""
    assert emb.bands is not None
    copies: list[float] = []
    faces: list[float] = []
    for label in np.unique(emb.labels):
        members = np.nonzero(emb.labels == label)[0]
        if len(members) < 2:
            continue
        moved = [replay.spectra(emb.bands[i]) for i in members]
        for x in range(len(members)):
            fixed = replay.fixed_sides(emb.bands[members[x]])
            copies += [replay.compare_sides(fixed, moved[y]) for y in range(x + 1, len(members))]
            faces += [float(emb.embeddings[members[x]] @ emb.embeddings[members[y]])
                      for y in range(x + 1, len(members))]
    return np.asarray(copies, np.float64), np.asarray(faces, np.float64)


def _lowest_reached_by(scores: np.ndarray, allowed: int) -> tuple[float, int]:
    """The lowest threshold at most ``allowed`` of ``scores`` reach, and how many do."""
    desc = descending(scores)
    above = float(np.nextafter(desc[allowed], np.inf)) if allowed < len(desc) else 1.0
    threshold = math.ceil(above * 1e6) / 1e6  # as stored: six decimals, never lower
    return threshold, int((desc >= threshold).sum())


def joint_thresholds(copies: np.ndarray, faces: np.ndarray, rate: float
                     ) -> tuple[float, float, int]:
    """Thresholds on the copy score and the face score, each reached by the same
    number of genuine pairs, the most for which at most ``rate`` of the pairs reach
    either; and how many pairs reach either."""
    allowed = int(np.floor(rate * len(copies)))
    best = (_lowest_reached_by(copies, 0)[0], _lowest_reached_by(faces, 0)[0], 0)
    low, high = 0, allowed
    while low <= high:  # the union only grows with each rule's share
        each = (low + high) // 2
        copy_t, face_t = _lowest_reached_by(copies, each)[0], _lowest_reached_by(faces, each)[0]
        either = int(((copies >= copy_t) | (faces >= face_t)).sum())
        if either <= allowed:
            best, low = (copy_t, face_t, either), each + 1
        else:
            high = each - 1
    return best


def replay_record(emb: Embedded, genuine: np.ndarray, rate: float = REPLAY_GENUINE_RATE
                  ) -> dict[str, Any]:
    """The replay check's thresholds (see :class:`server.pipeline.replay.ReplayCheck`):
    on the copy score and the face score together, so that at most ``rate`` of the
    genuine pairs (two photos of one person) reach either; and on the embeddings'
    cosine alone (``genuine``, every genuine pair), which is all a stored template
    keeps."""
    copies, faces = genuine_copy_scores(emb)
    threshold, face_threshold, either = joint_thresholds(copies, faces, rate)
    template, template_above = _lowest_reached_by(genuine, int(np.floor(rate * len(genuine))))
    return {"measure": replay.MEASURE, "threshold": threshold, "face_threshold": face_threshold,
            "genuine_pairs": int(len(copies)), "target_genuine_rate": rate,
            "genuine_at_or_above": either,
            "genuine_copy_max": float(copies.max()) if len(copies) else None,
            "genuine_face_max": float(faces.max()) if len(faces) else None,
            "template_threshold": template,
            "template_genuine_at_or_above": template_above}


def operating_point(calibration: dict[str, Any], fmr: float) -> dict[str, Any]:
    """The calibrated point for ``fmr`` (``FACEVERIFY_DECISION_FMR``).

    Raises:
        ModelError: the calibration has no point for that rate.
    """
    for p in calibration["points"]:
        if math.isclose(p["fmr"], fmr, rel_tol=1e-9):
            return dict(p)
    have = ", ".join(f"{p['fmr']:g}" for p in calibration["points"])
    raise ModelError(f"the calibration has no threshold for FMR {fmr:g}, which "
                     f"FACEVERIFY_DECISION_FMR asks for (it has {have}); run `faceverify "
                     f"calibrate --fmr {fmr:g}` or set FACEVERIFY_DECISION_FMR to one of those")
