"""OpenCV Zoo's YuNet detector with 5 landmarks (operator-supplied model, MIT).

The image is scaled so its longer side is ``input_size``, padded on the right
and at the bottom to multiples of 32 (a 480x640 frame is fed as 480x640, not
as a 640x640 square: a quarter less to compute, the same outputs for every
cell of the image; a model exported for one size is fed that square), as BGR
0-255.  For each stride (8, 16,
32) the model gives, per grid cell (one anchor), class and objectness scores
(the detection score is their geometric mean), a box (centre offset in cells,
log size in strides) and five keypoints (offsets in cells): eyes, nose tip,
mouth corners, in the arcface5 order.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from server.errors import ModelError
from server.pipeline.geometry import fit_within, nms
from server.pipeline.runtime import fixed_batch, run_batched
from server.pipeline.types import ARCFACE5, DetectedFace, DetectorInput

STRIDES = (8, 16, 32)
OUTPUTS = tuple(f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in STRIDES)


class YunetDetector:
    """YuNet detector: scores, boxes and arcface5 landmarks.

    YuNet places its keypoints in the upright pattern whichever way a face is
    turned (on 150 lfw-dev photos turned by each quarter turn, its keypoints said
    "upright" for every face it found), so its faces carry no ``down``: their
    orientation is told by the score instead.  Turned faces score lower: a
    quarter turn 0.72 (median; none of 150 at or above 0.9), a half turn 0.86
    (none of 300 at or above 0.92, 11 % at or above 0.9), upright 0.94 (2.7 %
    of 300 below 0.92).  A best face under :attr:`upright_score` is detected
    again at the other three turns and the best-scoring turn kept
    (:meth:`~server.pipeline.faces.FacePipeline.upright_steps`).
    """

    landmark_scheme = ARCFACE5
    landmarker = None  # the model's own keypoints
    name = "yunet"
    upright_score: float | None = 0.92

    def __init__(self, session: ort.InferenceSession, threshold: float = 0.6,
                 nms_iou: float = 0.3, input_size: int = 640) -> None:
        names = {o.name for o in session.get_outputs()}
        if not set(OUTPUTS) <= names:
            raise ModelError(f"a YuNet model has outputs {', '.join(OUTPUTS)}; "
                             f"this one has {', '.join(sorted(names))}")
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.threshold = threshold
        self.nms_iou = nms_iou
        self.batch = fixed_batch(session)
        shape = session.get_inputs()[0].shape
        fixed = [d for d in shape[2:] if isinstance(d, int)]
        # A model exported for one image size is fed that size.
        self.square = bool(fixed)
        self.input_size = max(fixed) if fixed else -(-input_size // 32) * 32

    def prepare(self, image: np.ndarray, attempt: int) -> DetectorInput | None:
        """One scan: the image scaled to ``input_size``, padded (see the module), BGR."""
        if attempt > 0:
            return None
        resized, scale = fit_within(image, self.input_size)
        nh, nw = resized.shape[:2]
        h, w = ((self.input_size, self.input_size) if self.square
                else (-(-nh // 32) * 32, -(-nw // 32) * 32))
        # Kept as bytes (a quarter of the floats) while it waits for its batch.
        blob = np.zeros((3, h, w), dtype=np.uint8)
        blob[:, :nh, :nw] = resized[..., ::-1].transpose(2, 0, 1)
        return DetectorInput(blob, scale)

    def infer(self, tensors: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        outputs = run_batched(self.session, self.input_name,
                              np.stack(tensors).astype(np.float32), self.batch, list(OUTPUTS))
        return [{name: out[i] for name, out in zip(OUTPUTS, outputs, strict=True)}
                for i in range(len(tensors))]

    def finish(self, image: np.ndarray, prepared: DetectorInput,
               output: dict[str, np.ndarray]) -> list[DetectedFace]:
        scale = float(prepared.context)
        width = prepared.tensor.shape[2]
        boxes, scores, kps = [], [], []
        for s in STRIDES:
            cols = width // s
            score = np.sqrt(np.clip(output[f"cls_{s}"][:, 0], 0, 1)
                            * np.clip(output[f"obj_{s}"][:, 0], 0, 1))
            keep = np.nonzero(score >= self.threshold)[0]
            if keep.size == 0:
                continue
            cell = np.stack([keep % cols, keep // cols], axis=1).astype(np.float32)
            b = output[f"bbox_{s}"][keep]
            centre = (cell + b[:, :2]) * s
            size = np.exp(b[:, 2:]) * s
            boxes.append(np.concatenate([centre - size / 2, centre + size / 2], axis=1))
            kps.append((cell[:, None, :] + output[f"kps_{s}"][keep].reshape(-1, 5, 2)) * s)
            scores.append(score[keep])
        if not scores:
            return []
        all_boxes = np.concatenate(boxes).astype(np.float64) / scale
        all_scores = np.concatenate(scores).astype(np.float64)
        all_kps = np.concatenate(kps).astype(np.float64) / scale
        order = nms(all_boxes, all_scores, self.nms_iou)
        return [DetectedFace(box=all_boxes[i], score=float(all_scores[i]),
                             landmarks=all_kps[i]) for i in order]
