"""dlib's MMOD CNN face detector: image pyramid + ONNX scorer + NMS, then 5 landmarks.

The scorer is fully convolutional.  As in dlib, the pyramid levels (scale 5/6
each) are tiled into one canvas with zero gaps so that a single forward pass
scores every scale; each positive cell is an 80x80 window at its level,
mapped back to image coordinates.  Landmarks come from dlib's 5-point shape
predictor run on the detection box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from server.models.convert import portable
from server.pipeline.geometry import nms
from server.pipeline.landmarks import ShapePredictor
from server.pipeline.types import DLIB5, UNSET, DetectedFace, DetectorInput

MEAN_RGB = np.array([122.782, 117.001, 104.298], dtype=np.float32)
WINDOW = 80
PADDING = 10
OUTER_PADDING = 11
NMS_IOU = 0.3382761351109955


def resize_graph() -> onnx.ModelProto:
    """A corner-aligned bilinear ``Resize`` of a [1, C, H, W] float tensor to ``sizes``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "C", "H", "W"])
    sizes = helper.make_tensor_value_info("sizes", TensorProto.INT64, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "C", "h", "w"])
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear",
                            coordinate_transformation_mode="align_corners")
    graph = helper.make_graph([node], "resize", [x, sizes], [y])
    return portable(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


class _Resizer:
    """Corner-aligned bilinear resizing of (C, H, W) float32 arrays.

    An onnxruntime ``Resize`` (``align_corners``), which is what the image
    pyramid needs, several times faster than the same arithmetic in numpy.
    The graph is built here, from no weights.
    """

    def __init__(self) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(resize_graph().SerializeToString(), opts,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
        c = img.shape[0]
        out: np.ndarray = self.session.run(None, {
            "x": img[None], "sizes": np.array([1, c, out_h, out_w], dtype=np.int64)})[0][0]
        return out


@dataclass(frozen=True)
class _Tile:
    level: int
    x: int
    y: int
    h: int
    w: int


def _layout(h: int, w: int, min_side: int) -> tuple[list[_Tile], int, int]:
    """Place pyramid levels on a canvas: level 0 and 1 side by side, the rest on shelves below."""
    sizes = [(h, w)]
    while True:
        nh, nw = sizes[-1][0] * 5 // 6, sizes[-1][1] * 5 // 6
        if min(nh, nw) < min_side:
            break
        sizes.append((nh, nw))
    width = sizes[0][1] + (sizes[1][1] + PADDING if len(sizes) > 1 else 0)
    tiles = [_Tile(0, OUTER_PADDING, OUTER_PADDING, *sizes[0])]
    x = OUTER_PADDING + sizes[0][1] + PADDING
    shelf_y, shelf_h = OUTER_PADDING, sizes[0][0]
    for level, (lh, lw) in enumerate(sizes[1:], start=1):
        if x + lw > OUTER_PADDING + width:
            shelf_y += shelf_h + PADDING
            shelf_h = lh
            x = OUTER_PADDING
        tiles.append(_Tile(level, x, shelf_y, lh, lw))
        x += lw + PADDING
    canvas_h = shelf_y + shelf_h + OUTER_PADDING
    return tiles, canvas_h, width + 2 * OUTER_PADDING


class MmodDetector:
    """The default detector: dlib MMOD scorer (ONNX) + dlib 5-point landmarks.

    Args:
        session: onnxruntime session of the converted scorer.
        shape_predictor: the 5-point landmark predictor.
        threshold: minimum raw detection score (dlib's default is 0).
        max_side: images whose longer side exceeds this are scanned downscaled
            (faces stay findable down to about ``80 * long_side / max_side`` px).
        upsample_small: when nothing is found in an image whose longer side is at
            most half ``max_side``, scan it once more at twice the size, which
            finds faces down to about 40 px.
    """

    landmark_scheme = DLIB5
    name = "dlib-mmod"
    upright_score: float | None = None

    def __init__(self, session: ort.InferenceSession, shape_predictor: ShapePredictor,
                 threshold: float = 0.0, max_side: int = 800, upsample_small: bool = True) -> None:
        self.session = session
        self.landmarker = shape_predictor
        self.threshold = threshold
        self.max_side = max_side
        self.upsample_small = upsample_small
        self.resize = _Resizer()

    def prepare(self, image: np.ndarray, attempt: int) -> DetectorInput | None:
        """Scan 0 at ``max_side``; scan 1, only for small images, at twice the size."""
        h, w = image.shape[:2]
        long_side = max(h, w)
        if attempt == 0:
            scale = min(1.0, self.max_side / long_side)
        elif attempt == 1 and self.upsample_small and long_side * 2 <= self.max_side:
            scale = 2.0
        else:
            return None
        th, tw = max(int(round(h * scale)), 2), max(int(round(w * scale)), 2)
        level0 = (image.astype(np.float32) - MEAN_RGB) / 256.0
        level0 = np.ascontiguousarray(level0.transpose(2, 0, 1))
        if (th, tw) != (h, w):
            level0 = self.resize(level0, th, tw)
        tiles, ch, cw = _layout(th, tw, WINDOW // 2)
        canvas = np.zeros((3, ch, cw), dtype=np.float32)
        prev = level0
        for tile in tiles:
            if tile.level:
                prev = self.resize(prev, tile.h, tile.w)
            canvas[:, tile.y:tile.y + tile.h, tile.x:tile.x + tile.w] = prev
        return DetectorInput(canvas, (tiles, scale))

    def infer(self, tensors: list[np.ndarray]) -> list[np.ndarray]:
        scores = self.session.run(None, {"canvas": np.stack(tensors)})[0]
        return list(scores[:, 0])

    def finish(self, image: np.ndarray, prepared: DetectorInput, output: np.ndarray
               ) -> list[DetectedFace]:
        tiles, scale = prepared.context
        boxes, scores = self._windows(output, tiles, scale)
        if len(scores) == 0:
            return []
        faces = []
        for box, score in zip(boxes, scores, strict=True):
            faces.append(DetectedFace(box=box, score=float(score), landmarks=UNSET,
                                      landmark_box=np.round(box)))
        return faces

    def _windows(self, scores: np.ndarray, tiles: list[_Tile], scale: float
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (in image coordinates) and scores of windows above threshold, after NMS."""
        rows, cols = np.nonzero(scores > self.threshold)
        if rows.size == 0:
            return np.zeros((0, 4)), np.zeros(0)
        values = scores[rows, cols].astype(np.float64)
        cx = 8.0 * cols + 14.0
        cy = 8.0 * rows + 14.0
        # The tile containing each window centre (else the nearest one).
        tx = np.array([t.x for t in tiles], dtype=np.float64)
        ty = np.array([t.y for t in tiles], dtype=np.float64)
        tw_ = np.array([t.w for t in tiles], dtype=np.float64)
        th_ = np.array([t.h for t in tiles], dtype=np.float64)
        dx = np.maximum(np.maximum(tx[None] - cx[:, None], cx[:, None] - (tx + tw_ - 1)[None]), 0)
        dy = np.maximum(np.maximum(ty[None] - cy[:, None], cy[:, None] - (ty + th_ - 1)[None]), 0)
        which = np.argmin(dx + dy, axis=1)
        level = np.array([t.level for t in tiles])[which]
        factor = (6.0 / 5.0) ** level
        # Window corners in tile coordinates, scaled up to level 0 then to the image.
        half = (WINDOW - 1) / 2.0
        x0 = (cx - half - tx[which]) * factor / scale
        y0 = (cy - half - ty[which]) * factor / scale
        x1 = (cx + half - tx[which]) * factor / scale
        y1 = (cy + half - ty[which]) * factor / scale
        boxes = np.stack([x0, y0, x1, y1], axis=1)
        keep = nms(boxes, values, NMS_IOU)
        return boxes[keep], values[keep]

