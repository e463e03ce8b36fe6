"""The face pipeline's data types and the interfaces its models implement."""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, assert_never

import numpy as np
import onnxruntime as ort

T = TypeVar("T")
R_co = TypeVar("R_co", covariant=True)

# Landmark schemes: which five points a detector reports, in which order.
# dlib5: outer/inner corner of the image-right eye, outer/inner corner of the
#        image-left eye, the point below the nose (dlib's 5-point predictor).
# arcface5: centre of the image-left eye, of the image-right eye, nose tip,
#        left and right mouth corner (InsightFace / RetinaFace / SCRFD order).
DLIB5 = "dlib5"
ARCFACE5 = "arcface5"
UNSET = np.full((5, 2), np.nan)  # landmarks a landmarker has yet to place


@dataclass(frozen=True, eq=False)  # identity equality: fields are arrays
class DetectedFace:
    """One face found in an image, in that image's pixel coordinates."""

    box: np.ndarray  # (4,) float: x0, y0, x1, y1
    score: float
    landmarks: np.ndarray  # (5, 2) float, in the detector's landmark scheme
    # Set by a detector whose landmarks come from its landmarker: the box to run it
    # on; the landmarks are NaN until the landmark step has filled them in.
    landmark_box: np.ndarray | None = None
    # The face's own downward direction (from between the eyes to the mouth) as
    # the detector's keypoints show it, where it has such keypoints: tells a
    # sideways or upside-down face (see server.pipeline.upright).
    down: np.ndarray | None = None

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    def scaled(self, factor: float) -> DetectedFace:
        """The same face in an image ``factor`` times larger."""
        if factor == 1.0:
            return self
        return DetectedFace(self.box * factor, self.score, self.landmarks * factor,
                            None if self.landmark_box is None else self.landmark_box * factor,
                            self.down)

    def with_landmarks(self, landmarks: np.ndarray) -> DetectedFace:
        return DetectedFace(self.box, self.score, landmarks, self.landmark_box, self.down)


@dataclass(frozen=True)
class DetectorInput:
    """One scan's model input (no batch axis) and what decoding its output needs."""

    tensor: np.ndarray
    context: Any


class Landmarker(Protocol):
    """Places five landmarks inside face boxes (dlib's shape predictor)."""

    def predict_batch(self, images: list[np.ndarray], boxes: np.ndarray) -> np.ndarray:
        """(B, 5, 2) landmarks for B boxes (B, 4), each in its own image."""
        ...


class Detector(Protocol):
    """Finds faces and their five landmarks in an RGB uint8 image.

    Split so that the model calls can be batched across images: ``prepare``
    (per image) -> ``infer`` (a batch of same-shape tensors) -> ``finish`` (per
    image) -> where the detector has a ``landmarker``, that model on every face's
    ``landmark_box`` (a batch of faces).  A detector may scan an image more than
    once (``attempt`` 0, 1, ...) when a scan finds nothing; :func:`detect` runs
    the whole sequence for one image.
    """

    landmark_scheme: str
    name: str
    # A best face scoring below this may be a turned face the detector took for an
    # upright one (its keypoints then say upright, or it has none that tell): the
    # turned image is tried too (FacePipeline.upright_steps).  None: the keypoints
    # can be trusted.
    upright_score: float | None

    @property
    def landmarker(self) -> Landmarker | None:
        """The model that places the landmarks in each face's ``landmark_box``, or
        None when the detector gives them itself."""
        ...

    def prepare(self, image: np.ndarray, attempt: int) -> DetectorInput | None:
        """The model input of scan number ``attempt``, or None when there is none."""
        ...

    def infer(self, tensors: list[np.ndarray]) -> list[Any]:
        """The model's raw output for each tensor (all of one shape)."""
        ...

    def finish(self, image: np.ndarray, prepared: DetectorInput, output: Any
               ) -> list[DetectedFace]:
        """Faces above the threshold, highest score first, in image coordinates."""
        ...


class Recognizer(Protocol):
    """Turns one detected face into an embedding."""

    landmark_scheme: str
    name: str
    dim: int
    input_name: str
    chip_shape: tuple[int, int]  # (height, width) of the aligned chip
    session: ort.InferenceSession  # where it runs (its provider is the server's)

    def align(self, image: np.ndarray, face: DetectedFace) -> np.ndarray:
        """The aligned face chip the model expects, (H, W, 3) uint8 RGB."""
        ...

    def preprocess(self, chips: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 chips -> the model's input tensor."""
        ...

    def embed(self, chips: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 chips -> (N, dim) float32 L2-normalised embeddings."""
        ...


@dataclass(frozen=True)
class CpuStep:
    """A per-image step: the driver sends back ``fn(*args)``."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass(frozen=True)
class DetectCall:
    """A detector model call: the driver sends back ``detector.infer`` of this input."""

    prepared: DetectorInput


@dataclass(frozen=True)
class LandmarkCall:
    """A landmark model call: the driver sends back (len(boxes), 5, 2) landmarks."""

    image: np.ndarray
    boxes: np.ndarray  # (K, 4)


@dataclass(frozen=True)
class EmbedCall:
    """A recognizer call: the driver sends back the chip's (dim,) embedding."""

    chip: np.ndarray


Step = CpuStep | DetectCall | LandmarkCall | EmbedCall
Steps = Generator[Step, Any, T]


def detection_steps(detector: Detector, image: np.ndarray) -> Steps[list[DetectedFace]]:
    """Every scan the detector wants, in turn, until one finds a face (see :class:`Detector`)."""
    attempt = 0
    while (prepared := (yield CpuStep(detector.prepare, (image, attempt)))) is not None:
        output = yield DetectCall(prepared)
        faces: list[DetectedFace] = yield CpuStep(detector.finish, (image, prepared, output))
        if faces:
            boxes = [f.landmark_box for f in faces if f.landmark_box is not None]
            if boxes:
                points = iter((yield LandmarkCall(image, np.stack(boxes))))
                faces = [f if f.landmark_box is None else f.with_landmarks(next(points))
                         for f in faces]
            return faces
        attempt += 1
    return []


class StepRunner(Protocol[R_co]):
    """What a driver does with each kind of step (:func:`dispatch`)."""

    def cpu(self, step: CpuStep) -> R_co: ...

    def detect(self, step: DetectCall) -> R_co: ...

    def landmarks(self, step: LandmarkCall) -> R_co: ...

    def embed(self, step: EmbedCall) -> R_co: ...


def dispatch(step: Step, runner: StepRunner[R_co]) -> R_co:
    """The one place a step meets its handler: every kind of :data:`Step` has one
    (``assert_never``: a new kind without a handler fails the type check)."""
    match step:
        case CpuStep():
            return runner.cpu(step)
        case DetectCall():
            return runner.detect(step)
        case LandmarkCall():
            return runner.landmarks(step)
        case EmbedCall():
            return runner.embed(step)
        case _:
            assert_never(step)


@dataclass(frozen=True)
class InlineRunner:
    """Runs each step here and now, one model call at a time (tools, tests)."""

    detector: Detector
    recognizer: Recognizer | None = None

    def cpu(self, step: CpuStep) -> Any:
        return step.fn(*step.args)

    def detect(self, step: DetectCall) -> Any:
        return self.detector.infer([step.prepared.tensor])[0]

    def landmarks(self, step: LandmarkCall) -> Any:
        landmarker = self.detector.landmarker
        if landmarker is None:
            raise TypeError(f"detector {self.detector.name} asked for landmarks but has no "
                            "landmark model")
        return landmarker.predict_batch([step.image] * len(step.boxes), step.boxes)

    def embed(self, step: EmbedCall) -> Any:
        if self.recognizer is None:
            raise TypeError("these steps embed: pass the recognizer")
        return self.recognizer.embed(step.chip[None])[0]


def run_steps(steps: Steps[T], detector: Detector, recognizer: Recognizer | None = None) -> T:
    """Drive ``steps`` here, one model call at a time; a step's error is thrown back
    into the sequence (so its stage timers close) and propagates."""
    runner = InlineRunner(detector, recognizer)
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = steps.throw(error) if error is not None else steps.send(value)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        value, error = None, None
        try:
            value = dispatch(step, runner)
        except Exception as exc:  # thrown into the sequence, which re-raises it
            error = exc


def detect(detector: Detector, image: np.ndarray) -> list[DetectedFace]:
    """Every scan of ``image``, unbatched, until one finds a face."""
    return run_steps(detection_steps(detector, image), detector)
