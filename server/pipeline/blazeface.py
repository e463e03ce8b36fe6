"""MediaPipe's BlazeFace detector (converted to ONNX), then dlib's 5 landmarks.

The image is letterboxed into the model's square input (uint8; the model
scales it and decodes its anchors itself, see
:mod:`server.models.convert_tflite`).  Candidates above the score threshold
are merged by MediaPipe's weighted non-maximum suppression: overlapping
detections are averaged, weighted by score, which steadies the box and its
six keypoints (eyes, nose tip, mouth, ear tragions).

The dlib recognizer aligns on dlib's 5 landmarks, so the face box handed to
dlib's shape predictor is placed from BlazeFace's eye and mouth keypoints
(:data:`DLIB_BOX`): where the MMOD detector would put its box on the same
face, which is what the shape predictor was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from server.pipeline.geometry import fit_within, iou
from server.pipeline.landmarks import ShapePredictor
from server.pipeline.types import DLIB5, UNSET, DetectedFace, DetectorInput

# The MMOD box in a face frame from BlazeFace keypoints: origin at the middle of
# the eyes, unit = eye-middle-to-mouth distance, y along eye-middle -> mouth.
# (centre x, centre y, side): medians over the 1,500 lfw-dev images' faces both
# detectors found (`python -m benchmarks.detectors`).
DLIB_BOX = (0.072, 0.277, 2.028)


@dataclass(frozen=True)
class _Letterbox:
    scale: float  # model input pixels per image pixel
    pad_x: float  # in model input pixels
    pad_y: float


def weighted_nms(dets: np.ndarray, scores: np.ndarray, threshold: float
                 ) -> list[tuple[np.ndarray, float]]:
    """MediaPipe's WEIGHTED suppression: each cluster (IoU above ``threshold`` with its
    best member) becomes the score-weighted mean of its members, with the best score.

    Args:
        dets: (K, 16) decoded detections: centre x, y, width, height, 6 keypoints.
        scores: (K,) their scores.
    """
    boxes = np.concatenate([dets[:, :2] - dets[:, 2:4] / 2, dets[:, :2] + dets[:, 2:4] / 2],
                           axis=1)
    order = np.argsort(-scores, kind="stable")
    out = []
    while order.size:
        best = order[0]
        overlap = iou(boxes[best], boxes[order]) > threshold
        members = order[overlap]
        w = scores[members]
        out.append(((dets[members] * w[:, None]).sum(0) / w.sum(), float(scores[best])))
        order = order[~overlap]
    return out


@dataclass(frozen=True)
class BlazeFaceModel:
    """One converted BlazeFace model and its score threshold."""

    session: ort.InferenceSession
    threshold: float

    @property
    def input_size(self) -> int:
        return int(self.session.get_inputs()[0].shape[1])


class BlazeFaceDetector:
    """BlazeFace boxes and keypoints; dlib5 landmarks from the shape predictor.

    Scan 0 runs the short-range model (faces of about a fifth of the image or
    more: selfies, portraits); only when it finds nothing does scan 1 run the
    full-range model, which finds faces down to about 1/20 of the image (a
    face far from the camera, the portrait on a photographed ID card), so that
    such a photo gets FACE_TOO_SMALL or a match rather than NO_FACE_DETECTED.

    Args:
        models: the scans in order (short range, then full range).
        shape_predictor: dlib's 5-point predictor.
        nms_iou: suppression overlap.
    """

    landmark_scheme = DLIB5
    name = "blazeface"
    # BlazeFace finds most upside-down faces with upright keypoints, scoring them
    # lower: on 60 lfw-dev images, upside down 0.65 median, 0.78 at the 99th
    # percentile; upright 0.93 median, 0.85 at the 1st.
    upright_score: float | None = 0.8

    def __init__(self, models: list[BlazeFaceModel], shape_predictor: ShapePredictor,
                 nms_iou: float = 0.3) -> None:
        self.models = models
        # Model calls are batched by input shape; each model has its own size.
        self.by_size = {m.input_size: m for m in models}
        if len(self.by_size) != len(models):
            raise ValueError("BlazeFace scans must have distinct input sizes")
        self.landmarker = shape_predictor
        self.nms_iou = nms_iou

    def prepare(self, image: np.ndarray, attempt: int) -> DetectorInput | None:
        """Scan ``attempt``: the whole image letterboxed into that model's square."""
        if attempt >= len(self.models):
            return None
        size = self.models[attempt].input_size
        small, _ = fit_within(image, size)
        nh, nw = small.shape[:2]
        px, py = (size - nw) // 2, (size - nh) // 2
        tensor = np.zeros((size, size, 3), dtype=np.uint8)
        tensor[py:py + nh, px:px + nw] = small
        return DetectorInput(tensor, _Letterbox(nw / image.shape[1], px, py))

    def infer(self, tensors: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Model outputs for same-size inputs (a batch never mixes scans)."""
        model = self.by_size[tensors[0].shape[0]]
        dets, scores = model.session.run(None, {"image": np.stack(tensors)})
        return list(zip(dets, scores, strict=True))

    def keypoints(self, prepared: DetectorInput, output: tuple[np.ndarray, np.ndarray]
                  ) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """(box x0 y0 x1 y1, (6, 2) keypoints, score) per face, in image pixels."""
        dets, scores = output
        size = prepared.tensor.shape[0]
        keep = scores >= self.by_size[size].threshold
        if not keep.any():
            return []
        lb: _Letterbox = prepared.context
        faces = []
        for det, score in weighted_nms(dets[keep].astype(np.float64),
                                       scores[keep].astype(np.float64), self.nms_iou):
            pts = det.reshape(8, 2) * size - np.array([lb.pad_x, lb.pad_y])
            pts /= lb.scale
            centre, half = pts[0], pts[1] / 2
            faces.append((np.concatenate([centre - half, centre + half]), pts[2:], score))
        return faces

    def finish(self, image: np.ndarray, prepared: DetectorInput,
               output: tuple[np.ndarray, np.ndarray]) -> list[DetectedFace]:
        found = self.keypoints(prepared, output)
        if not found:
            return []
        faces = []
        for _, kps, score in found:
            # Reported and gated (FACE_TOO_SMALL) as the tight face box dlib's
            # detector gives, not BlazeFace's head box (about 1.6 times wider), so
            # a face's size means the same whichever built-in detector found it.
            box = dlib_box(kps)
            faces.append(DetectedFace(box=box, score=score, landmarks=UNSET,
                                      landmark_box=np.round(box),
                                      down=kps[3] - (kps[0] + kps[1]) / 2))
        return faces


def dlib_box(keypoints: np.ndarray) -> np.ndarray:
    """The square box (x0, y0, x1, y1) dlib's shape predictor expects for a face with
    these BlazeFace keypoints (see :data:`DLIB_BOX`)."""
    eyes = (keypoints[0] + keypoints[1]) / 2
    down = keypoints[3] - eyes
    unit = float(np.hypot(*down)) or 1.0
    across = np.array([-down[1], down[0]])  # ``down`` turned by 90 degrees
    cx, cy, side = DLIB_BOX
    centre = eyes + cx * across + cy * down
    half = side * unit / 2
    return np.concatenate([centre - half, centre + half])
