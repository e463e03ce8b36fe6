"""The face pipeline's data types and the interfaces its models implement."""

from __future__ import annotations

from collections.abc import Callable, Generator, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, assert_never

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


# Which passes an embedding is made of, where the recognizer averages each face
# with its mirror image (``flip``): both (the embedding the calibration and the
# gallery use), or one of the two halves alone; their sum, L2-normalised, is the
# whole.  A recognizer that does not flip makes one pass for BOTH and PLAIN.
BOTH, PLAIN, MIRRORED = "both", "plain", "mirrored"


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

    def embed(self, chips: np.ndarray, halves: Sequence[str] | None = None) -> np.ndarray:
        """(N, H, W, 3) uint8 chips -> (N, dim) float32 L2-normalised embeddings: of
        the passes each of ``halves`` names (:data:`BOTH`, :data:`PLAIN`,
        :data:`MIRRORED`; default all :data:`BOTH`)."""
        ...


@dataclass(frozen=True)
class CpuStep:
    """A per-image step: the driver sends back ``fn(*args)``."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


def _unkeyed(_: Any) -> None:
    return None


@dataclass(frozen=True, eq=False)
class ModelCall:
    """A model the pipeline calls, declared once: how one batch of its items runs.

    The server builds one batcher per declared call (``FacePipeline.calls``,
    :class:`~server.core.inference.InferenceEngine`); ``per`` says which limits and
    threads it gets: ``image`` (one item per scan: a detector) and ``face`` (one per
    face: the recognizer, a presentation-attack model) run onnxruntime in threads of
    their own, batches padded to fixed sizes where the settings ask; ``cpu`` (numpy
    work, dlib's landmarks) runs in the image pool, unpadded.  Items of different
    ``key`` never share a batch (a detector's tensors of different shapes).
    """

    name: str  # in logs and metrics: detect, landmarks, embed, liveness
    run: Callable[[list[Any]], Sequence[Any]]  # blocking; one output per item, in order
    per: Literal["image", "face", "cpu"]
    key: Callable[[Any], Hashable] = _unkeyed
    # Whether padding a batch to a fixed size helps (a GPU plans per shape); False
    # for models run in slices of a batch fixed at export, where it only adds slices.
    paddable: bool = True


@dataclass(frozen=True)
class Call:
    """A model call step: the driver sends back the outputs of ``call.run`` for
    ``items``, in order, as a list (each item may be batched with other images')."""

    call: ModelCall
    items: tuple[Any, ...]


Step = CpuStep | Call
Steps = Generator[Step, Any, T]


def call_one(call: ModelCall, item: Any) -> Steps[Any]:
    """The output of ``call`` for one item."""
    outputs = yield Call(call, (item,))
    return outputs[0]


@dataclass(frozen=True)
class DetectorCalls:
    """A detector's model calls: its scans, and its landmark model where it has one."""

    scan: ModelCall
    landmarks: ModelCall | None

    @classmethod
    def of(cls, detector: Detector) -> DetectorCalls:
        landmarker = detector.landmarker

        def scan(prepared: list[DetectorInput]) -> list[Any]:
            return detector.infer([p.tensor for p in prepared])

        def landmarks(faces: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
            assert landmarker is not None
            return list(landmarker.predict_batch([image for image, _ in faces],
                                                 np.stack([box for _, box in faces])))

        return cls(ModelCall("detect", scan, "image", key=lambda p: p.tensor.shape),
                   None if landmarker is None else ModelCall("landmarks", landmarks, "cpu"))

    @property
    def all(self) -> tuple[ModelCall, ...]:
        return (self.scan,) if self.landmarks is None else (self.scan, self.landmarks)


def detection_steps(detector: Detector, calls: DetectorCalls, image: np.ndarray
                    ) -> Steps[list[DetectedFace]]:
    """Every scan the detector wants, in turn, until one finds a face (see :class:`Detector`)."""
    attempt = 0
    while (prepared := (yield CpuStep(detector.prepare, (image, attempt)))) is not None:
        output = yield from call_one(calls.scan, prepared)
        faces: list[DetectedFace] = yield CpuStep(detector.finish, (image, prepared, output))
        if faces:
            boxes = [f.landmark_box for f in faces if f.landmark_box is not None]
            if boxes:
                if calls.landmarks is None:
                    raise TypeError(f"detector {detector.name} placed landmark boxes but has "
                                    "no landmark model")
                points = iter((yield Call(calls.landmarks, tuple((image, b) for b in boxes))))
                faces = [f if f.landmark_box is None else f.with_landmarks(next(points))
                         for f in faces]
            return faces
        attempt += 1
    return []


class FaceStage(Protocol):
    """A stage run on a selfie's subject face once it is found (a presentation-attack
    check): one module implements it, and one line of the loader's table
    (:data:`server.pipeline.loader.FACE_STAGES`) puts it in the pipeline.

    Its result lands in :attr:`AnalysedFace.stages` under ``name``, which also names
    its timing stage; ``calls`` are the model calls its steps make (each gets a
    batcher in the server).
    """

    name: str
    version: str  # what its result was computed with (models and their layout)
    calls: tuple[ModelCall, ...]

    def steps(self, pixels: np.ndarray, face: DetectedFace) -> Steps[Any]:
        """The stage's result for ``face``, found in ``pixels`` (the image as
        analysed: decoded, maybe reduced and turned upright)."""
        ...


class StepRunner(Protocol[R_co]):
    """What a driver does with each kind of step (:func:`dispatch`)."""

    def cpu(self, step: CpuStep) -> R_co: ...

    def model(self, step: Call) -> R_co: ...


def dispatch(step: Step, runner: StepRunner[R_co]) -> R_co:
    """The one place a step meets its handler: every kind of :data:`Step` has one
    (``assert_never``: a new kind without a handler fails the type check)."""
    match step:
        case CpuStep():
            return runner.cpu(step)
        case Call():
            return runner.model(step)
        case _:
            assert_never(step)


class InlineRunner:
    """Runs each step here and now, one model call at a time (tools, tests)."""

    def cpu(self, step: CpuStep) -> Any:
        return step.fn(*step.args)

    def model(self, step: Call) -> Any:
        return list(step.call.run(list(step.items)))


def run_steps(steps: Steps[T], runner: StepRunner[Any] | None = None) -> T:
    """Drive ``steps`` here (with ``runner``: by default each model call on its own); a
    step's error is thrown back into the sequence (so its stage timers close) and
    propagates."""
    runner = runner or InlineRunner()
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
    return run_steps(detection_steps(detector, DetectorCalls.of(detector), image))
