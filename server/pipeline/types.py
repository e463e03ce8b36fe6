"""The face pipeline's data types and the interfaces its models implement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

# Landmark schemes: which five points a detector reports, in which order.
# dlib5: outer/inner corner of the image-right eye, outer/inner corner of the
#        image-left eye, the point below the nose (dlib's 5-point predictor).
# arcface5: centre of the image-left eye, of the image-right eye, nose tip,
#        left and right mouth corner (InsightFace / RetinaFace / SCRFD order).
DLIB5 = "dlib5"
ARCFACE5 = "arcface5"


@dataclass(frozen=True, eq=False)  # identity equality: fields are arrays
class DetectedFace:
    """One face found in an image, in that image's pixel coordinates."""

    box: np.ndarray  # (4,) float: x0, y0, x1, y1
    score: float
    landmarks: np.ndarray  # (5, 2) float, in the detector's landmark scheme

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])


class Detector(Protocol):
    """Finds faces and their five landmarks in an RGB uint8 image."""

    landmark_scheme: str
    name: str

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """All faces above the detector's threshold, highest score first."""
        ...


class Recognizer(Protocol):
    """Turns one detected face into an embedding."""

    landmark_scheme: str
    name: str
    dim: int

    def align(self, image: np.ndarray, face: DetectedFace) -> np.ndarray:
        """The aligned face chip the model expects, (S, S, 3) uint8 RGB."""
        ...

    def embed(self, chips: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 chips -> (N, dim) float32 L2-normalised embeddings."""
        ...
