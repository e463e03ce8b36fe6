"""``faceverify models presentation``: add an operator's presentation-attack models to a
model set, validated, with a threshold measured on bona fide photos.

The models (:mod:`server.pipeline.pad`; MiniFASNet V2 and V1SE are the ones the
project tests with) are copied into the model directory, listed with their sha256
in its manifest like every other file, and declared in its ``presentation``
section: each model's crop scale and input layout, and the threshold on the
averaged live score.  The threshold is set for a bona fide rejection rate
(BPCER, ISO/IEC 30107-3): the selfie-like photos given (a folder for each
capture condition) are run through the set's own detector, and the threshold is
the score below which so few of them fall that the rate is at most the target
with 95 % confidence (``--confidence``), in every condition.  The recognizer's
model version is unchanged: stored enrolments and the calibration stay valid.
No model ships with the project: the operator brings them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from index.durable import write_bytes_atomically
from server.errors import ModelError, RequestError
from server.models.manifest import MANIFEST, read_manifest, sha256_file, write_json_atomic
from server.pipeline.faces import FacePipeline, FacePolicy
from server.pipeline.image import ImageLimits
from server.pipeline.loader import load_models
from server.pipeline.pad import (
    CONFIDENCE,
    PRESETS,
    CropClassifier,
    CropSpec,
    PresentationStage,
    threshold_for,
)

log = logging.getLogger(__name__)

SECTION = "presentation"
KIND = "crop-classifier"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class Scored:
    """Live scores of bona fide photos, and the photos that had no usable face."""

    scores: np.ndarray
    skipped: int


def model_spec(path: Path, crop_scale: float, preset: str = "minifasnet",
               overrides: dict[str, Any] | None = None) -> tuple[CropSpec, CropClassifier]:
    """The spec of one model file (input size read from the model, layout from the
    preset and ``overrides``) and the model, run on two random crops.

    Raises:
        ModelError: an unreadable model, a layout that does not fit it, or outputs
            that are not probabilities (names the file).
    """
    if preset not in PRESETS:
        raise ModelError(f"unknown presentation-attack preset {preset!r}; known: "
                         f"{', '.join(PRESETS)}")
    if not path.is_file():
        raise ModelError(f"presentation-attack model {path} does not exist")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"{path.name} is not an ONNX model onnxruntime can load: "
                         f"{str(exc).splitlines()[0][:200]}") from exc
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
        raise ModelError(f"{path.name}: input must be [N, 3, H, W] with H and W fixed, "
                         f"got {shape}")
    entry = {**PRESETS[preset], **(overrides or {}), "file": path.name,
             "crop_scale": crop_scale, "height": shape[2], "width": shape[3]}
    spec = CropSpec.from_manifest(entry)
    model = CropClassifier(session, spec)
    crops = np.random.default_rng(0).integers(0, 256, (2, spec.height, spec.width, 3),
                                              dtype=np.uint8)
    try:
        live = model.live(crops)
    except Exception as exc:  # onnxruntime's errors
        raise ModelError(f"{path.name} fails on a {spec.width}x{spec.height} crop: "
                         f"{str(exc).splitlines()[0][:200]}") from exc
    if live.shape != (2,) or not (np.isfinite(live).all() and (live >= 0).all()
                                  and (live <= 1).all()):
        raise ModelError(f"{path.name}: its live scores {live} are not probabilities; check "
                         "--live-class and --activation")
    return spec, model


def bona_fide_photos(folder: Path, limit: int) -> list[Path]:
    """Up to ``limit`` image files under ``folder``, spread evenly over them in name order."""
    photos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not photos:
        raise ModelError(f"no photos (.jpg, .png, .webp) under {folder}")
    if len(photos) > limit:
        photos = [photos[i] for i in np.linspace(0, len(photos) - 1, limit).astype(int)]
    return photos


def live_scores(pipeline: FacePipeline, photos: list[Path]) -> Scored:
    """The presentation stage's score of each photo's subject face (photos without a
    usable face are skipped and counted); read one at a time."""
    scores, skipped = [], 0
    for photo in photos:
        try:
            face = pipeline.analyse(photo.read_bytes(), "selfie", False, selfie=True)
        except RequestError:
            skipped += 1
            continue
        scores.append(float(face.stages[SECTION]))
    return Scored(np.array(scores), skipped)


def add_presentation_models(model_dir: Path, models: list[tuple[Path, float]],
                            bona_fide: Sequence[Path], bpcer: float = 0.05,
                            preset: str = "minifasnet", overrides: dict[str, Any] | None = None,
                            limit: int = 2000, dataset: str | None = None,
                            confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Validate the models, measure the threshold on the ``bona_fide`` photos and
    declare the stage in ``model_dir``'s manifest (replacing any stage declared
    before); returns the manifest's new ``presentation`` section.

    Args:
        models: each model file with its crop scale.
        bona_fide: folders of bona fide photos, one a capture condition (say, selfies
            from the app and from the web page): the threshold holds ``bpcer`` in
            each, so the lowest of their thresholds is kept.
        bpcer: the share of bona fide photos the threshold may reject.
        limit: the most photos scored from each folder.
        confidence: how sure the measurement must make it that the rate is at most
            ``bpcer`` (one-sided Clopper-Pearson bound); 0 sets the plain quantile.

    Raises:
        ModelError: a model fails its check, or too few photos of a folder have a
            face for the rate asked (at least 20 / ``bpcer``).
    """
    manifest = read_manifest(model_dir)
    if not models:
        raise ModelError("give at least one presentation-attack model")
    if not bona_fide:
        raise ModelError("give at least one folder of bona fide photos")
    if not 0 < bpcer < 0.5:
        raise ModelError(f"--bpcer {bpcer} must be between 0 and 0.5")
    if not 0 <= confidence < 1:
        raise ModelError(f"--confidence {confidence} must be at least 0 and under 1")
    checked = [model_spec(path, scale, preset, overrides) for path, scale in models]
    names = [spec.file for spec, _ in checked]
    if len(set(names)) != len(names) or set(names) & (set(manifest["files"]) - set(
            manifest.get(SECTION, {}).get("files", []))):
        raise ModelError(f"model file names must be distinct and not the set's own: "
                         f"{', '.join(names)}")
    # The server's own face policy: the faces scored are those it would accept (the
    # embedding, computed on the way, is not used: no mirrored pass).
    loaded = load_models(model_dir, "cpu", 0, ImageLimits(), FacePolicy(), flip=False)
    stage = PresentationStage([m for _, m in checked], {p.name: sha256_file(p) for p, _ in models})
    pipeline = FacePipeline(loaded.pipeline.detector, loaded.pipeline.recognizer,
                            ImageLimits(), FacePolicy(), [stage])
    need = int(np.ceil(20 / bpcer))
    conditions = []
    for folder in bona_fide:
        photos = bona_fide_photos(folder, limit)
        log.info("scoring %d bona fide photos from %s", len(photos), folder)
        scored = live_scores(pipeline, photos)
        if len(scored.scores) < need:
            raise ModelError(f"{len(scored.scores)} of the bona fide photos in {folder} have a "
                             f"usable face; a BPCER of {bpcer:g} needs at least {need}")
        try:
            value = threshold_for(scored.scores, bpcer, confidence)
        except ValueError as exc:
            raise ModelError(f"{folder}: {exc}") from exc
        conditions.append((folder, scored, value))
    value = min(v for _, _, v in conditions)
    pooled = np.concatenate([scored.scores for _, scored, _ in conditions])
    rates = [float(np.mean(scored.scores < value)) for _, scored, _ in conditions]
    section = {
        "kind": KIND,
        "models": [spec.to_manifest() for spec, _ in checked],
        "files": names,
        "threshold": {"value": value, "bpcer_target": bpcer, "confidence": confidence,
                      "bpcer": max(rates), "bona_fide": len(pooled),
                      "skipped": sum(scored.skipped for _, scored, _ in conditions),
                      "dataset": dataset or ", ".join(f.name for f, _, _ in conditions),
                      "conditions": [{"folder": folder.name, "bona_fide": len(scored.scores),
                                      "skipped": scored.skipped, "threshold": v, "bpcer": rate}
                                     for (folder, scored, v), rate in zip(conditions, rates,
                                                                          strict=True)],
                      "score_quantiles": {f"p{q}": round(float(np.percentile(pooled, q)), 6)
                                          for q in (1, 5, 10, 50)}},
        "added_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    files = {k: v for k, v in manifest["files"].items()
             if k not in manifest.get(SECTION, {}).get("files", [])}
    for path, _ in models:
        write_bytes_atomically(model_dir / path.name, path.read_bytes())
        files[path.name] = {"sha256": sha256_file(model_dir / path.name),
                            "bytes": (model_dir / path.name).stat().st_size}
    write_json_atomic(model_dir / MANIFEST, {**manifest, "files": files, SECTION: section})
    log.info("presentation-attack stage %s: threshold %.6f (BPCER at most %.2f %% in %d "
             "conditions, %d photos)", stage.version, value, 100 * max(rates), len(conditions),
             len(pooled))
    return section


def remove_presentation_models(model_dir: Path) -> list[str]:
    """Take the presentation-attack stage out of ``model_dir``'s set (its files too);
    returns the files removed."""
    manifest = read_manifest(model_dir)
    section = manifest.pop(SECTION, None)
    if section is None:
        return []
    names = list(section.get("files", []))
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k not in names}
    write_json_atomic(model_dir / MANIFEST, manifest)
    for name in names:
        (model_dir / name).unlink(missing_ok=True)
    return names


def carried_over(model_dir: Path, old: dict[str, Any] | None, new: dict[str, Any]
                 ) -> dict[str, Any]:
    """``new`` (a rebuilt set's manifest) with ``old``'s presentation stage, where the
    rebuild left the model version (so the detector's boxes) as it was and the
    stage's files are still there; else ``new`` as it is."""
    if old is None or SECTION not in old or old.get("model_version") != new["model_version"]:
        return new
    section = old[SECTION]
    files = {}
    for name in section.get("files", []):
        path, recorded = model_dir / name, old["files"].get(name, {})
        if not path.is_file() or sha256_file(path) != recorded.get("sha256"):
            log.warning("the presentation-attack model %s is gone or altered: the stage is "
                        "dropped; add it again with `faceverify models presentation`", name)
            return new
        files[name] = recorded
    return {**new, "files": {**new["files"], **files}, SECTION: section}
