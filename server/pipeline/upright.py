"""Upright faces: a photo turned by a quarter or half turn is turned back first.

Detectors and dlib's landmark model are trained on upright faces.  A selfie
sent sideways (a phone's rotation not written into EXIF, or on purpose) is
either missed or, worse, found with landmarks placed as if upright, which
gives an embedding that matches nobody: a duplicate would slip through.  So
when an image has no face, or its most prominent face's own keypoints point
sideways or up (:attr:`~server.pipeline.types.DetectedFace.down`), the image
is turned by quarter turns and detected again (:meth:`FacePipeline.steps`);
what is reported is mapped back into the uploaded image's pixels.
"""

from __future__ import annotations

import numpy as np


def arcface5_down(points: np.ndarray) -> np.ndarray:
    """From between the eyes to between the mouth corners, for arcface5 points."""
    return np.asarray((points[3] + points[4]) / 2 - (points[0] + points[1]) / 2,
                      dtype=np.float64)


def _turn_vector(v: np.ndarray, k: int) -> np.ndarray:
    """A direction in an image after ``k`` counter-clockwise quarter turns (y down)."""
    for _ in range(k % 4):
        v = np.array([v[1], -v[0]])
    return v


def turns_to_upright(down: np.ndarray) -> int:
    """Counter-clockwise quarter turns (0-3) after which ``down`` points most nearly down."""
    return max(range(4), key=lambda k: float(_turn_vector(down, k)[1]))


def turn(pixels: np.ndarray, k: int) -> np.ndarray:
    """The image turned by ``k`` counter-clockwise quarter turns (lossless)."""
    return np.ascontiguousarray(np.rot90(pixels, k))


def unturn_points(points: np.ndarray, k: int, width: int, height: int,
                  centres: bool = True) -> np.ndarray:
    """Points (..., 2) of an image turned by ``k`` quarter turns, whose size after the
    turn is ``width`` x ``height``, in the pixels of the image before it.

    Args:
        centres: points are pixel centres (pixel i at i); else edges (pixel i spans
            i to i + 1), as a box's corners are.
    """
    p = np.array(points, dtype=np.float64)
    last = 1.0 if centres else 0.0
    for _ in range(k % 4):
        # A turn took (x, y) of the w x h image before it to (y, w - 1 - x): undo it.
        # Here the turned image is width x height, so the one before it was
        # height wide.
        p = np.stack([height - last - p[..., 1], p[..., 0]], axis=-1)
        width, height = height, width
    return p


def unturn_box(box: np.ndarray, k: int, width: int, height: int) -> np.ndarray:
    """The box (x0, y0, x1, y1) of a turned image, in the image before it."""
    corners = unturn_points(np.array([[box[0], box[1]], [box[2], box[3]]]), k, width, height,
                            centres=False)
    return np.concatenate([corners.min(axis=0), corners.max(axis=0)])
