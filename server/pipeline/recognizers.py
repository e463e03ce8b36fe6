"""Face recognizers: alignment to the model's chip, then an ONNX embedding model.

``DlibResnet`` reproduces dlib's ``get_face_chip_details`` /
``extract_image_chip`` (150x150, padding 0.25, from dlib's 5 landmarks).
``TemplateRecognizer`` is any model an operator brings that aligns five
arcface5 points to a template: its :class:`ChipSpec` (chip size, template,
colour order, normalisation) is recorded in the model manifest, with presets
in :func:`layout_spec` (InsightFace's ArcFace; Intel's OpenVINO re-identification
models).  All return L2-normalised embeddings whose size is read from the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from server.errors import ModelError
from server.models.manifest import RECOGNIZER_LAYOUTS
from server.pipeline.geometry import umeyama, warp_bilinear
from server.pipeline.runtime import fixed_batch, run_batched
from server.pipeline.types import ARCFACE5, BOTH, DLIB5, MIRRORED, DetectedFace

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

# The 96x112 SphereFace template (the ArcFace one is it shifted 8 px right on 112x112).
SPHEREFACE_TEMPLATE = ARCFACE_TEMPLATE - np.array([8.0, 0.0])


@dataclass(frozen=True)
class ChipSpec:
    """What a template recognizer is fed: the aligned chip and the tensor made from it.

    Attributes:
        width, height: the chip (the model's input) in pixels.
        template: (5, 2) where the arcface5 landmarks go in the chip, in its pixels.
        colour: ``rgb`` or ``bgr``, the channel order of the input.
        mean, std: per channel (in ``colour`` order), input = (pixel - mean) / std.
        layout: the preset it came from, for logs (``custom`` where none).
    """

    width: int
    height: int
    template: np.ndarray
    colour: str = "rgb"
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    layout: str = "custom"

    def to_manifest(self) -> dict[str, Any]:
        return {"layout": self.layout, "chip": [self.width, self.height],
                "template": np.round(self.template, 4).tolist(), "colour": self.colour,
                "mean": list(self.mean), "std": list(self.std)}

    @staticmethod
    def from_manifest(entry: dict[str, Any]) -> ChipSpec:
        """The spec a manifest's recognizer entry records (an older ``arcface``
        entry, which records none, is the ArcFace preset).

        Raises:
            ModelError: a field is missing or malformed.
        """
        if "chip" not in entry:
            return layout_spec("arcface", 112, 112)
        try:
            width, height = (int(v) for v in entry["chip"])
            template = np.asarray(entry["template"], dtype=np.float64).reshape(5, 2)
            colour = str(entry["colour"])
            mean = tuple(float(v) for v in entry["mean"])
            std = tuple(float(v) for v in entry["std"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"the manifest's recognizer entry is malformed: {exc}") from exc
        if colour not in ("rgb", "bgr") or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ModelError("the manifest's recognizer entry needs colour rgb or bgr and "
                             "three means and three positive standard deviations")
        return ChipSpec(width, height, template, colour, mean, std,
                        str(entry.get("layout", "custom")))


def layout_spec(layout: str, width: int, height: int) -> ChipSpec:
    """A preset's spec for a model whose input is ``width`` x ``height``.

    ``arcface``: InsightFace recognizers (RGB, (x - 127.5) / 128, the ArcFace
    template scaled to the input).  ``sface``: OpenCV Zoo's SFace (the ArcFace
    template and RGB, raw 0-255: the graph normalises its input itself).
    ``openvino-reid``: Intel's Open Model Zoo face re-identification models
    (BGR, raw 0-255, normalised inside the graph; the 96x112 SphereFace template
    stretched to the input, as Intel's demo does).

    Raises:
        ModelError: an unknown preset.
    """
    if layout == "arcface":
        return ChipSpec(width, height, ARCFACE_TEMPLATE * np.array([width / 112, height / 112]),
                        layout=layout)
    if layout == "sface":
        return ChipSpec(width, height, ARCFACE_TEMPLATE * np.array([width / 112, height / 112]),
                        "rgb", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), layout)
    if layout == "openvino-reid":
        return ChipSpec(width, height,
                        SPHEREFACE_TEMPLATE * np.array([width / 96, height / 112]), "bgr",
                        (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), layout)
    raise ModelError(f"unknown recognizer layout {layout!r}; choose one of "
                     f"{', '.join(RECOGNIZER_LAYOUTS)}")

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


def template_chip(image: np.ndarray, landmarks: np.ndarray, template: np.ndarray,
                  width: int, height: int) -> np.ndarray:
    """The (height, width, 3) chip in which 5 arcface5 landmarks best fit ``template``
    (a similarity: rotation, uniform scale, shift)."""
    # Fit chip -> image, and sample the image there for every chip pixel.
    a, t = umeyama(template, np.asarray(landmarks, dtype=np.float64))
    return warp_bilinear(image, a, t, height, width, truncate=False)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit: np.ndarray = (x / np.maximum(norms, 1e-12)).astype(np.float32)
    return unit


class _OnnxRecognizer:
    """Shared session handling: input name, chip size and embedding size from the model.

    Args:
        session: the recognizer's onnxruntime session.
        flip: also embed the mirrored chip and average (test-time augmentation:
            twice the recognizer work, a steadier embedding).
        output: the name of the output that is the embedding (default: the first).

    Raises:
        ModelError: the model's input is not [N, 3, H, W], it has no output
            ``output``, or that output is not an embedding ([N, D], or
            [N, D, 1, 1] as convolutional heads leave it).
    """

    def __init__(self, session: ort.InferenceSession, flip: bool = False,
                 output: str | None = None) -> None:
        self.session = session
        self.flip = flip
        inp = session.get_inputs()[0]
        outputs = {o.name: o for o in session.get_outputs()}
        if output is not None and output not in outputs:
            raise ModelError(f"the recognizer has no output {output!r}; its outputs are "
                             f"{', '.join(outputs)}")
        out = outputs[output] if output is not None else session.get_outputs()[0]
        self.output_name = out.name
        self.input_name = inp.name
        shape = inp.shape
        if len(shape) != 4 or shape[1] != 3 or not all(isinstance(d, int) for d in shape[2:]):
            raise ModelError(f"recognizer input must be [N, 3, H, W], got {shape}")
        self.chip_shape = (int(shape[2]), int(shape[3]))  # (height, width)
        dims = out.shape[1:]
        if not dims or not isinstance(dims[0], int) or any(d != 1 for d in dims[1:]):
            raise ModelError(f"recognizer output must be [N, D] (or [N, D, 1, 1]), got "
                             f"{out.shape}")
        self.dim = int(dims[0])
        self.batch = fixed_batch(session)

    def preprocess(self, chips: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 chips -> the model's input tensor."""
        raise NotImplementedError

    def _run(self, x: np.ndarray) -> np.ndarray:
        out = run_batched(self.session, self.input_name, x, self.batch, [self.output_name])[0]
        return l2_normalise(out.reshape(len(out), -1))

    def embed(self, chips: np.ndarray, halves: Sequence[str] | None = None) -> np.ndarray:
        """Each chip's embedding (see :class:`~server.pipeline.types.Recognizer`): both
        passes averaged where the recognizer flips, or the ``halves`` asked for."""
        x = self.preprocess(chips)
        rows: list[np.ndarray] = []
        plan: list[list[int]] = []
        for i, half in enumerate(halves or [BOTH] * len(x)):
            passes = [x[i], x[i][..., ::-1]] if half == BOTH and self.flip else \
                [x[i][..., ::-1]] if half == MIRRORED else [x[i]]
            plan.append(list(range(len(rows), len(rows) + len(passes))))
            rows += passes
        out = self._run(np.stack(rows))
        return l2_normalise(np.stack([out[p].sum(axis=0) for p in plan]))


class DlibResnet(_OnnxRecognizer):
    """dlib's ResNet face descriptor (converted); input normalisation is in the graph."""

    landmark_scheme = DLIB5
    name = "dlib-resnet"

    def align(self, image: np.ndarray, face: DetectedFace) -> np.ndarray:
        return dlib_chip(image, face.landmarks, size=self.chip_shape[0])

    def preprocess(self, chips: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(chips.transpose(0, 3, 1, 2), dtype=np.float32)


class TemplateRecognizer(_OnnxRecognizer):
    """A recognizer aligned on arcface5 landmarks to the template of its :class:`ChipSpec`.

    Raises:
        ModelError: the spec's chip is not the model's input size.
    """

    landmark_scheme = ARCFACE5

    def __init__(self, session: ort.InferenceSession, spec: ChipSpec, flip: bool = False,
                 output: str | None = None) -> None:
        super().__init__(session, flip, output)
        if self.chip_shape != (spec.height, spec.width):
            raise ModelError(f"the recognizer's input is {self.chip_shape[1]}x"
                             f"{self.chip_shape[0]} but its manifest entry says "
                             f"{spec.width}x{spec.height}")
        self.spec = spec
        self.name = spec.layout
        order = [2, 1, 0] if spec.colour == "bgr" else [0, 1, 2]
        self._order = np.array(order)
        self._mean = np.array(spec.mean, dtype=np.float32)[:, None, None]
        self._scale = (1.0 / np.array(spec.std, dtype=np.float32))[:, None, None]

    def align(self, image: np.ndarray, face: DetectedFace) -> np.ndarray:
        return template_chip(image, face.landmarks, self.spec.template, self.spec.width,
                             self.spec.height)

    def preprocess(self, chips: np.ndarray) -> np.ndarray:
        x = chips[..., self._order].transpose(0, 3, 1, 2).astype(np.float32)
        return np.ascontiguousarray((x - self._mean) * self._scale)


def fuse(embeddings: np.ndarray) -> np.ndarray:
    """One template from several embeddings of a face: their normalised mean."""
    mean = embeddings.mean(axis=0)
    unit: np.ndarray = (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
    return unit
