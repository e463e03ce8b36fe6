"""Simple, explainable face-quality measures computed on the aligned chip."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.pipeline.types import DetectedFace


@dataclass(frozen=True)
class Quality:
    """Quality measures a caller can turn into advice for the applicant.

    Attributes:
        face_width, face_height: detected box size in image pixels.
        sharpness: variance of the Laplacian of the grey chip (higher is sharper;
            below about 50 is visibly blurred).
        brightness: mean grey level of the chip, 0-255.
        detector_score: the detector's raw confidence.
    """

    face_width: float
    face_height: float
    sharpness: float
    brightness: float
    detector_score: float


def measure(face: DetectedFace, chip: np.ndarray) -> Quality:
    """Quality of one face from its detection and aligned (S, S, 3) uint8 chip."""
    gray = chip.sum(axis=2, dtype=np.uint16).astype(np.float32) / 3
    lap = (gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:]
           - 4 * gray[1:-1, 1:-1])
    return Quality(
        face_width=face.width,
        face_height=face.height,
        sharpness=float(lap.var()),
        brightness=float(gray.mean()),
        detector_score=face.score,
    )
