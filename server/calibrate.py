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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from server.duplicates import fuse
from server.errors import FaceVerifyError, ModelError
from server.pipeline.faces import FacePipeline

log = logging.getLogger(__name__)

DEFAULT_FMRS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
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
    embs, labels, names = [], [], []
    attempted = failed = 0
    for identity, path in items:
        attempted += 1
        if attempted % 500 == 0:
            log.info("embedded %d images (%d without a usable face)", attempted, failed)
        try:
            face = pipeline.analyse(path.read_bytes(), "image", refuse_ambiguous=False)
        except FaceVerifyError as exc:
            failed += 1
            log.debug("%s: %s", path.name, exc)
            continue
        embs.append(face.embedding)
        labels.append(ids.setdefault(identity, len(ids)))
        names.append(path.name)
    dim = pipeline.dim
    return Embedded(np.asarray(embs, dtype=np.float32).reshape(-1, dim),
                    np.asarray(labels, dtype=np.int64), attempted, failed, tuple(names),
                    tuple(ids))


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
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


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
