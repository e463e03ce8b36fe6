"""An InsightFace-layout SCRFD detector with 5 keypoints (operator-supplied model).

The image is scaled so its longer side is ``input_size`` and padded to an
``input_size`` square (the shape such models are exported with).  The model
emits, per stride (8, 16, 32), scores [N, 1], box distances [N, 4] and
keypoint offsets [N, 10] for two anchors per cell, all in units of the stride.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from server.errors import ModelError
from server.pipeline.geometry import fit_within, nms
from server.pipeline.runtime import fixed_batch, run_batched
from server.pipeline.types import ARCFACE5, DetectedFace, DetectorInput
from server.pipeline.upright import arcface5_down

STRIDES = (8, 16, 32)
ANCHORS = 2


class ScrfdDetector:
    """SCRFD detector: scores, boxes and arcface5 landmarks."""

    landmark_scheme = ARCFACE5
    landmarker = None  # the model's own keypoints
    name = "scrfd"
    upright_score: float | None = None

    def __init__(self, session: ort.InferenceSession, threshold: float = 0.5,
                 nms_iou: float = 0.4, input_size: int = 640) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.batch = fixed_batch(session)
        if len(session.get_outputs()) != 9:
            raise ModelError("SCRFD model must have 9 outputs: scores, boxes and keypoints "
                             "for each of 3 strides")
        self.threshold = threshold
        self.nms_iou = nms_iou
        self.input_size = input_size

    def prepare(self, image: np.ndarray, attempt: int) -> DetectorInput | None:
        """One scan: the image scaled to ``input_size`` and padded to that square."""
        if attempt > 0:
            return None
        resized, scale = fit_within(image, self.input_size)
        nh, nw = resized.shape[:2]
        side = -(-self.input_size // 32) * 32
        blob = np.zeros((3, side, side), dtype=np.float32)
        blob[:, :nh, :nw] = (resized.transpose(2, 0, 1).astype(np.float32) - 127.5) / 128.0
        return DetectorInput(blob, scale)

    def infer(self, tensors: list[np.ndarray]) -> list[list[np.ndarray]]:
        """Per image, the model's nine outputs (an exported batch axis may be flattened
        into the anchor axis, so outputs are split evenly)."""
        outputs = run_batched(self.session, self.input_name, np.stack(tensors), self.batch)
        n = len(tensors)
        return [[out.reshape(n, -1, out.shape[-1])[i] for out in outputs] for i in range(n)]

    def finish(self, image: np.ndarray, prepared: DetectorInput, output: list[np.ndarray]
               ) -> list[DetectedFace]:
        scale = float(prepared.context)
        ph = pw = prepared.tensor.shape[1]
        by_kind: dict[int, dict[int, np.ndarray]] = {1: {}, 4: {}, 10: {}}
        for out in output:
            cells = out.shape[0] // ANCHORS
            stride = next(s for s in STRIDES if (ph // s) * (pw // s) == cells)
            by_kind[out.shape[-1]][stride] = out
        boxes, scores, kps = [], [], []
        for s in STRIDES:
            fh, fw = ph // s, pw // s
            ys, xs = np.mgrid[0:fh, 0:fw]
            centres = np.repeat(np.stack([xs, ys], -1).reshape(-1, 2) * s, ANCHORS, axis=0)
            sc = by_kind[1][s][:, 0]
            keep = sc >= self.threshold
            if not keep.any():
                continue
            c = centres[keep].astype(np.float32)
            d = by_kind[4][s][keep] * s
            boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
            kps.append(c[:, None, :] + by_kind[10][s][keep].reshape(-1, 5, 2) * s)
            scores.append(sc[keep])
        if not scores:
            return []
        all_boxes = np.concatenate(boxes) / scale
        all_scores = np.concatenate(scores).astype(np.float64)
        all_kps = np.concatenate(kps) / scale
        order = nms(all_boxes, all_scores, self.nms_iou)
        return [DetectedFace(box=all_boxes[i].astype(np.float64), score=float(all_scores[i]),
                             landmarks=all_kps[i].astype(np.float64),
                             down=arcface5_down(all_kps[i])) for i in order]
