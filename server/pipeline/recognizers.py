"""Face recognizers: alignment to the model's chip, then an ONNX embedding model.

``DlibResnet`` reproduces dlib's ``get_face_chip_details`` /
``extract_image_chip`` (150x150, padding 0.25, from dlib's 5 landmarks).
``ArcFace`` uses the standard InsightFace 5-point template at 112x112.  Both
return L2-normalised embeddings whose size is read from the model.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort

from server.errors import ModelError
from server.pipeline.geometry import umeyama, warp_bilinear
from server.pipeline.runtime import fixed_batch, run_batched
from server.pipeline.types import ARCFACE5, DLIB5, DetectedFace

# dlib's mean 5-point face shape in the unit square (get_face_chip_details).
DLIB5_TEMPLATE = np.array([
    [0.8595674595992, 0.2134981538014],
    [0.6460604764104, 0.2289674387677],
    [0.1205750620789, 0.2137274526848],
    [0.3340850613712, 0.2290642403242],
    [0.4901123135679, 0.6277975316726],
])

# InsightFace's ArcFace alignment template for 112x112 chips.
ARCFACE_TEMPLATE = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
])

_BLUR = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _pyramid_down(img: np.ndarray) -> np.ndarray:
    """Halve an (H, W, C) float image with a separable [1 4 6 4 1] filter.

    Output pixel i is centred on input pixel 2i + 2 (valid filtering).
    """
    h, w = img.shape[:2]
    oh, ow = (h - 3) // 2, (w - 3) // 2
    rows = sum(_BLUR[k] * img[k:k + 2 * oh:2] for k in range(5))
    return sum(_BLUR[k] * rows[:, k:k + 2 * ow:2] for k in range(5))  # type: ignore[no-any-return]


def dlib_chip(image: np.ndarray, landmarks: np.ndarray, size: int = 150,
              padding: float = 0.25) -> np.ndarray:
    """dlib's aligned face chip for 5 dlib landmarks: (size, size, 3) uint8."""
    chip_pts = (padding + DLIB5_TEMPLATE) / (1 + 2 * padding) * size
    a, t = umeyama(chip_pts, np.asarray(landmarks, dtype=np.float64))
    angle = math.atan2(a[1, 0], a[0, 0])
    scale = math.hypot(a[0, 0], a[1, 0])
    centre = a @ np.array([size / 2, size / 2]) + t
    side = size * scale - 1  # dlib's rectangle: right - left = width - 1
    # Per-pixel map: chip corners go to the rectangle's rotated corners.
    step = side / (size - 1)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    m = rot * step
    t_img = centre - m @ np.array([(size - 1) / 2, (size - 1) / 2])
    # Large faces: sample from a smoothed, downsampled copy to avoid aliasing,
    # as dlib does (one halving per factor of two beyond the chip size).
    depth = 0
    while (side / 2 ** (depth + 1)) ** 2 > size * size:
        depth += 1
    if depth == 0:
        return warp_bilinear(image, m, t_img, size, size, truncate=True)
    corners = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], float)
    pts = corners @ m.T + t_img
    margin = 2 ** (depth + 2) + 2
    h, w = image.shape[:2]
    x0 = int(max(math.floor(pts[:, 0].min()) - margin, 0))
    y0 = int(max(math.floor(pts[:, 1].min()) - margin, 0))
    x1 = int(min(math.ceil(pts[:, 0].max()) + margin, w))
    y1 = int(min(math.ceil(pts[:, 1].max()) + margin, h))
    crop = image[y0:y1, x0:x1].astype(np.float64)
    t_crop = t_img - np.array([x0, y0])
    for _ in range(depth):
        if min(crop.shape[:2]) < 8:
            break
        crop = _pyramid_down(crop)
        m = m / 2
        t_crop = (t_crop - 2) / 2
    return warp_bilinear(crop, m, t_crop, size, size, truncate=True)


def arcface_chip(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """InsightFace-style aligned chip from 5 arcface5 landmarks."""
    template = ARCFACE_TEMPLATE * (size / 112.0)
    # Fit image -> chip, then sample with its inverse (chip -> image).
    a, t = umeyama(template, np.asarray(landmarks, dtype=np.float64))
    return warp_bilinear(image, a, t, size, size, truncate=False)


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit: np.ndarray = (x / np.maximum(norms, 1e-12)).astype(np.float32)
    return unit


class _OnnxRecognizer:
    """Shared session handling: input name, chip size and embedding size from the model.

    Args:
        session: the recognizer's onnxruntime session.
        flip: also embed the mirrored chip and average (test-time augmentation:
            twice the recognizer work, a steadier embedding).
    """

    def __init__(self, session: ort.InferenceSession, flip: bool = False) -> None:
        self.session = session
        self.flip = flip
        inp = session.get_inputs()[0]
        out = session.get_outputs()[0]
        self.input_name = inp.name
        shape = inp.shape
        if len(shape) != 4 or not isinstance(shape[2], int) or shape[2] != shape[3]:
            raise ModelError(f"recognizer input must be [N, 3, S, S], got {shape}")
        self.chip_size = int(shape[2])
        if len(out.shape) != 2 or not isinstance(out.shape[1], int):
            raise ModelError(f"recognizer output must be [N, D], got {out.shape}")
        self.dim = int(out.shape[1])
        self.batch = fixed_batch(session)

    def preprocess(self, chips: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 chips -> the model's input tensor."""
        raise NotImplementedError

    def embed(self, chips: np.ndarray) -> np.ndarray:
        x = self.preprocess(chips)
        if not self.flip:
            return _l2_normalise(run_batched(self.session, self.input_name, x, self.batch)[0])
        both = np.concatenate([x, x[..., ::-1]])
        out = _l2_normalise(run_batched(self.session, self.input_name, both, self.batch)[0])
        return _l2_normalise(out[: len(x)] + out[len(x):])


class DlibResnet(_OnnxRecognizer):
    """dlib's ResNet face descriptor (converted); input normalisation is in the graph."""

    landmark_scheme = DLIB5
    name = "dlib-resnet"

    def align(self, image: np.ndarray, face: DetectedFace) -> np.ndarray:
        return dlib_chip(image, face.landmarks, size=self.chip_size)

    def preprocess(self, chips: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(chips.transpose(0, 3, 1, 2), dtype=np.float32)


class ArcFace(_OnnxRecognizer):
    """An InsightFace-layout recognizer: RGB, (x - 127.5) / 128, ArcFace alignment."""

    landmark_scheme = ARCFACE5
    name = "arcface"

    def align(self, image: np.ndarray, face: DetectedFace) -> np.ndarray:
        return arcface_chip(image, face.landmarks, size=self.chip_size)

    def preprocess(self, chips: np.ndarray) -> np.ndarray:
        x = (chips.transpose(0, 3, 1, 2).astype(np.float32) - 127.5) / 128.0
        return np.ascontiguousarray(x)
