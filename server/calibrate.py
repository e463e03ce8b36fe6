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
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

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


def embed_labelled(pipeline: FacePipeline, items: Iterable[tuple[str, Path]]) -> Embedded:
    """Embed each image's most prominent face; images without one are counted, not used."""
    ids: dict[str, int] = {}
    embs, labels = [], []
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
    dim = pipeline.dim
    return Embedded(np.asarray(embs, dtype=np.float32).reshape(-1, dim),
                    np.asarray(labels, dtype=np.int64), attempted, failed)


def pair_scores(emb: Embedded) -> tuple[np.ndarray, np.ndarray]:
    """All genuine and all impostor cosine scores (each unordered pair once)."""
    sims = emb.embeddings @ emb.embeddings.T
    iu = np.triu_indices(len(emb.labels), k=1)
    same = emb.labels[iu[0]] == emb.labels[iu[1]]
    scores = sims[iu]
    return scores[same], scores[~same]


def threshold_for_fmr(impostor: np.ndarray, fmr: float) -> float:
    """The lowest threshold t with (impostor >= t).mean() <= fmr."""
    allowed = math.floor(fmr * len(impostor))
    if allowed >= len(impostor):
        return float(impostor.min())
    desc = -np.sort(-impostor)
    return float(np.nextafter(np.float32(desc[allowed]), np.float32(np.inf)))


def calibrate(emb: Embedded, fmrs: Iterable[float], dataset_name: str,
              model_version: str) -> dict[str, Any]:
    """The calibration record for ``emb``.

    Raises:
        ModelError: too few impostor pairs to estimate one of the rates (at
            least 10 / fmr are required).
    """
    genuine, impostor = pair_scores(emb)
    points = []
    for fmr in sorted(fmrs, reverse=True):
        if len(impostor) < 10 / fmr:
            raise ModelError(f"{len(impostor)} impostor pairs are too few to calibrate FMR "
                             f"{fmr:g}: at least {math.ceil(10 / fmr)} are needed")
        t = threshold_for_fmr(impostor, fmr)
        points.append({
            "fmr": fmr,
            "threshold": t,
            "measured_fmr": float((impostor >= t).mean()),
            "tmr": float((genuine >= t).mean()) if len(genuine) else None,
        })
    return {
        "model_version": model_version,
        "dataset": dataset_name,
        "images": emb.images,
        "images_without_face": emb.failed,
        "identities": int(len(np.unique(emb.labels))),
        "genuine_pairs": int(len(genuine)),
        "impostor_pairs": int(len(impostor)),
        "points": points,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def operating_point(calibration: dict[str, Any], fmr: float) -> dict[str, Any]:
    """The calibrated point for ``fmr``.

    Raises:
        ModelError: the calibration has no point for that rate.
    """
    for p in calibration["points"]:
        if math.isclose(p["fmr"], fmr, rel_tol=1e-9):
            return dict(p)
    have = ", ".join(f"{p['fmr']:g}" for p in calibration["points"])
    raise ModelError(f"the calibration has no threshold for FMR {fmr:g} (it has {have}); "
                     f"run `faceverify calibrate --fmr {fmr:g}` or choose one of those")
