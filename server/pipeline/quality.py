"""Simple, explainable face-quality measures computed on the aligned chip."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.pipeline.types import DLIB5, DetectedFace


@dataclass(frozen=True)
class Quality:
    """Quality measures a caller can turn into advice for the applicant.

    Attributes:
        face_width, face_height: detected box size in image pixels.
        sharpness: variance of the Laplacian of the grey chip, as a percentage of
            the chip's own grey variance (contrast-free; higher is sharper; see
            :data:`BLURRED_BELOW`).
        brightness: mean grey level of the chip, 0-255.
        detector_score: the detector's raw confidence.
        turn: how far the face is turned left or right: the nose's offset from
            the middle of the eyes along the line between them, in eye
            distances (0 frontal, about 0.5 in profile; the sign says which way).
    """

    face_width: float
    face_height: float
    sharpness: float
    brightness: float
    detector_score: float
    turn: float = 0.0


# Advice an applicant can act on, each where a selfie's false non-match rate
# doubles (5 % to 10 % at FMR 1e-3 with the default models, 300 lfw-dev pairs,
# the selfie blurred, darkened or over-exposed step by step:
# `python -m benchmarks.quality`).  A turned face gave no such rise on lfw-dev
# (too few turned faces there), and closed eyes cannot be told from five
# landmarks: neither is advised on.
BLURRED_BELOW = 0.30  # sharpness; clean lfw-dev selfies: median 1.8
TOO_DARK_BELOW = 22.0  # brightness; clean: median 116
TOO_BRIGHT_ABOVE = 221.0


def advice(q: Quality) -> list[str]:
    """``BLURRED``, ``TOO_DARK``, ``TOO_BRIGHT``: what to fix in a retake, if anything."""
    out = []
    if q.sharpness < BLURRED_BELOW:
        out.append("BLURRED")
    if q.brightness < TOO_DARK_BELOW:
        out.append("TOO_DARK")
    if q.brightness > TOO_BRIGHT_ABOVE:
        out.append("TOO_BRIGHT")
    return out


def turn_of(landmarks: np.ndarray, scheme: str) -> float:
    """:attr:`Quality.turn` from five landmarks of ``scheme``."""
    if scheme == DLIB5:  # eye corners (image-right eye, image-left eye), below the nose
        right, left, nose = landmarks[0:2].mean(0), landmarks[2:4].mean(0), landmarks[4]
    else:  # arcface5: image-left eye, image-right eye, nose tip, mouth corners
        left, right, nose = landmarks[0], landmarks[1], landmarks[2]
    across = right - left
    span = float(across @ across)
    return 0.0 if span == 0 else float((nose - (left + right) / 2) @ across / span)


def measure(face: DetectedFace, chip: np.ndarray, scheme: str) -> Quality:
    """Quality of one face from its detection (landmarks of ``scheme``) and aligned
    (H, W, 3) uint8 chip."""
    gray = chip.sum(axis=2, dtype=np.uint16).astype(np.float32) / 3
    lap = (gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:]
           - 4 * gray[1:-1, 1:-1])
    return Quality(
        face_width=face.width,
        face_height=face.height,
        # Relative to the face's contrast, so that a dark photo does not pass for
        # a blurred one.
        sharpness=float(100 * lap.var() / max(float(gray.var()), 1e-6)),
        brightness=float(gray.mean()),
        detector_score=face.score,
        turn=turn_of(face.landmarks, scheme),
    )
