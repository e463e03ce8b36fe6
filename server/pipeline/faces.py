"""The face pipeline: decode, detect, choose the subject, align, measure, embed.

Per-image errors (undecodable image, no face, ambiguous faces, face too small)
are raised here, before any batching, so one bad image never fails another.
Every stage's wall time is recorded for metrics and benchmarks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from server.errors import ConfigurationError, FaceTooSmall, MultipleFaces, NoFaceDetected
from server.pipeline import replay
from server.pipeline.image import Decoded, ImageLimits, PixelBudget, decode_image
from server.pipeline.quality import Quality, measure
from server.pipeline.types import (
    BOTH,
    CpuStep,
    DetectedFace,
    Detector,
    DetectorCalls,
    FaceStage,
    ModelCall,
    Recognizer,
    Steps,
    call_one,
    detection_steps,
    run_steps,
)
from server.pipeline.upright import turn, turns_to_upright, unturn_box, unturn_points

STAGES = ("decode", "detect", "align", "embed")
NOT_EMBEDDED = np.zeros(0, np.float32)  # the embedding of a face analysed without one


@dataclass(frozen=True)
class FacePolicy:
    """How the subject face is chosen and gated.

    Attributes:
        min_face_px: a subject face narrower than this is refused (FACE_TOO_SMALL).
        ambiguity_ratio: another face whose prominence is at least this fraction
            of the subject's makes the image ambiguous (MULTIPLE_FACES) where
            ambiguity is refused.
    """

    min_face_px: float = 40.0
    ambiguity_ratio: float = 0.5


@dataclass
class Timings:
    """Seconds spent per stage for one image."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class AnalysedFace:
    """The subject face of one image, ready to compare."""

    face: DetectedFace
    quality: Quality
    embedding: np.ndarray
    faces_found: int
    ambiguous: bool  # another face is comparably prominent (refused for selfies)
    image_size: tuple[int, int]  # (width, height)
    chip: np.ndarray  # the aligned face the embedding was computed from
    # The face and its surroundings, as the replay check compares them; None where the
    # analysis was not asked for it (an image compared with no other).
    view: np.ndarray | None
    turns: int = 0  # counter-clockwise quarter turns that made the face upright
    # Each face stage's result (FacePipeline.stages), where the stages were run.
    stages: dict[str, Any] = field(default_factory=dict)
    half: str = BOTH  # the recognizer's passes the embedding is made of (types.BOTH...)

    def kept_view(self) -> np.ndarray:
        """The face's :attr:`view`, which its analysis was asked to keep."""
        if self.view is None:
            raise RuntimeError("the face was analysed without its view (view=True keeps it)")
        return self.view


def prominence(face: DetectedFace, width: int, height: int) -> float:
    """How much a face looks like the photo's subject: visible area, favouring the centre.

    A face cut by the border (a neighbour at the edge of a group photo) counts
    only its visible part, weighted by ``(1 - d)**2`` where ``d`` is its centre's
    distance from the image centre as a fraction of the half-diagonal.  (With a
    weaker, linear weight, 5 LFW images picked a bigger neighbour at the edge
    over the centred subject: -0.1 point of accuracy.)
    """
    x0, y0, x1, y1 = face.box
    visible = max(0.0, min(x1, width) - max(x0, 0.0)) * max(0.0, min(y1, height) - max(y0, 0.0))
    cx, cy = (x0 + x1) / 2 - width / 2, (y0 + y1) / 2 - height / 2
    d = min(1.0, float(np.hypot(cx, cy) / np.hypot(width / 2, height / 2)))
    return float(visible * (1.0 - d) ** 2)


def most_prominent(faces: list[DetectedFace], image: np.ndarray) -> DetectedFace:
    """The face of ``faces`` (found in ``image``) most like the photo's subject."""
    height, width = image.shape[:2]
    return max(faces, key=lambda f: prominence(f, width, height))


def choose_subject(faces: list[DetectedFace], width: int, height: int, policy: FacePolicy,
                   refuse_ambiguous: bool, field_name: str) -> tuple[DetectedFace, bool]:
    """The subject face among those detected, and whether another is comparably prominent.

    Raises:
        NoFaceDetected: ``faces`` is empty.
        MultipleFaces: ``refuse_ambiguous`` and a second face is comparably prominent.
        FaceTooSmall: the subject is narrower than ``policy.min_face_px``.
    """
    if not faces:
        raise NoFaceDetected(f"{field_name}: no face found; retake the photo facing the camera "
                             "in good light", image=field_name)
    scored = sorted(((prominence(f, width, height), i) for i, f in enumerate(faces)),
                    reverse=True)
    subject = faces[scored[0][1]]
    ambiguous = len(scored) > 1 and scored[1][0] >= policy.ambiguity_ratio * scored[0][0]
    if refuse_ambiguous and ambiguous:
        raise MultipleFaces(f"{field_name}: {len(faces)} faces of similar size found; retake "
                            "the photo with only the applicant in frame", image=field_name,
                            faces=str(len(faces)))
    if subject.width < policy.min_face_px:
        raise FaceTooSmall(f"{field_name}: the face is {subject.width:.0f} px wide, under the "
                           f"minimum of {policy.min_face_px:.0f} px; move closer to the camera",
                           image=field_name)
    return subject, ambiguous


class FacePipeline:
    """Detector + recognizer + policies: bytes in, subject embedding out; then, for
    a selfie, each of ``stages`` on its face (a presentation-attack check).

    Raises:
        ConfigurationError: the detector's landmarks are not what the
            recognizer's alignment needs, or two model calls or stages share a name.
    """

    def __init__(self, detector: Detector, recognizer: Recognizer, limits: ImageLimits,
                 policy: FacePolicy, stages: Sequence[FaceStage] = (),
                 frame_detector: Detector | None = None) -> None:
        if detector.landmark_scheme != recognizer.landmark_scheme:
            raise ConfigurationError(
                f"detector {detector.name} gives {detector.landmark_scheme} landmarks but "
                f"recognizer {recognizer.name} aligns with {recognizer.landmark_scheme}")
        self.detector = detector
        # A liveness burst's frames are located by this one (the same model scanning
        # at another size where the set says so: the parallax is read from their
        # landmarks to a fraction of a pixel).
        self.frame_detector = frame_detector or detector
        self.recognizer = recognizer
        self.stages = tuple(stages)
        self.limits = limits
        self.policy = policy
        self.budget = PixelBudget(limits.decode_budget_bytes)
        self.detector_calls = DetectorCalls.of(detector)
        # Items: (chip, half): the passes to make of it (types.BOTH, PLAIN, MIRRORED).
        self.embed_call = ModelCall("embed", lambda items: list(recognizer.embed(
            np.stack([chip for chip, _ in items]), [half for _, half in items])), "face")
        # Every model call the steps make: the server batches each (InferenceEngine).
        self.calls = (*self.detector_calls.all, self.embed_call,
                      *(call for stage in self.stages for call in stage.calls))
        # Each call names its batcher and each stage its timing: no two alike.
        calls, named = [c.name for c in self.calls], [*STAGES, *(s.name for s in self.stages)]
        if len(set(calls)) != len(calls) or len(set(named)) != len(named):
            raise ConfigurationError(f"model calls ({', '.join(calls)}) and stages "
                                     f"({', '.join(named)}) need names of their own")

    @property
    def dim(self) -> int:
        return self.recognizer.dim

    def decode(self, data: bytes, field_name: str) -> Decoded:
        """The image as (H, W, 3) uint8 RGB, maybe reduced (see :func:`decode_image`)."""
        return decode_image(data, self.limits, field_name, self.budget)

    def subject_chip(self, decoded: Decoded, faces: list[DetectedFace], field_name: str,
                     refuse_ambiguous: bool, turns: int = 0, view: bool = False
                     ) -> tuple[DetectedFace, bool, np.ndarray, np.ndarray | None, Quality,
                                DetectedFace]:
        """Choose the subject (raising its per-image errors), align it, measure it.

        The subject is chosen, gated and reported in the uploaded image's pixels,
        whatever size it was decoded at, and whichever way it was turned to be
        upright (``decoded`` is then the turned image: ``turns`` quarter turns).

        Returns:
            The subject, whether it is ambiguous, its aligned chip, its view for the
            replay check (:func:`server.pipeline.replay.view`; None unless ``view``),
            its quality, and the subject as found in ``decoded`` (its pixels, for the
            face stages).
        """
        width, height = decoded.size
        if turns % 2:
            width, height = height, width
        uploaded = [f.scaled(decoded.scale) for f in faces]
        subject, ambiguous = choose_subject(uploaded, width, height, self.policy,
                                            refuse_ambiguous, field_name)
        local = faces[uploaded.index(subject)]
        chip = self.recognizer.align(decoded.pixels, local)
        surroundings = replay.view(decoded.pixels, local, self.recognizer.align) if view else None
        quality = measure(subject, chip, self.detector.landmark_scheme)
        if turns:
            subject = DetectedFace(unturn_box(subject.box, turns, width, height), subject.score,
                                   unturn_points(subject.landmarks, turns, width, height))
        return subject, ambiguous, chip, surroundings, quality, local

    def upright_steps(self, pixels: np.ndarray, faces: list[DetectedFace],
                      detector: Detector | None = None
                      ) -> Steps[tuple[np.ndarray, list[DetectedFace], int]]:
        """Where no face was found, or the most prominent one is sideways or upside
        down by its own keypoints, or scores low enough to be a turned face the
        detector took for an upright one (:attr:`Detector.upright_score`), detect
        again in the image turned by quarter turns (see
        :mod:`server.pipeline.upright`).  A face whose keypoints show its
        orientation (:attr:`DetectedFace.down`) is taken at the first turn where it
        is upright and confidently found; one without (YuNet's keypoints are
        always in the upright pattern) is detected at every turn and the
        best-scoring turn kept.

        Returns:
            The image to go on with, its faces, and the quarter turns it was turned.
        """
        detector = detector or self.detector
        confident = detector.upright_score
        best: tuple[float, np.ndarray, list[DetectedFace], int] | None = None
        if faces:
            main = most_prominent(faces, pixels)
            k = 0 if main.down is None else turns_to_upright(main.down)
            if k:  # sideways by its keypoints: the turn they ask for, or the opposite one
                tries = [k, (k + 2) % 4]
            elif confident is not None and main.score < confident:
                tries = [2] if main.down is not None else [1, 3, 2]
                best = (main.score, pixels, faces, 0)
            else:
                return pixels, faces, 0
        else:
            tries = [1, 3, 2]  # a quarter turn either way is likelier than upside down
        for k in tries:
            turned = yield CpuStep(turn, (pixels, k))
            found = yield from detection_steps(detector, self.detector_calls, turned)
            if not found:
                continue
            main = most_prominent(found, turned)
            if main.down is not None and turns_to_upright(main.down) != 0:
                continue
            if confident is None or (main.down is not None and main.score >= confident):
                return turned, found, k
            if best is None or main.score > best[0]:
                best = (main.score, turned, found, k)
        return (pixels, faces, 0) if best is None else best[1:]

    def steps(self, data: bytes | np.ndarray, field_name: str, refuse_ambiguous: bool,
              timings: Timings, selfie: bool = False, view: bool = False, embed: bool = True,
              turns: int | None = None, half: str = BOTH, frame: bool = False
              ) -> Steps[AnalysedFace]:
        """The analysis of one image as a sequence of steps, for a driver to run.

        The one definition of what analysing an image means, whoever runs it:
        :meth:`analyse` runs each step in turn (calibration, quantization,
        benchmarks, tests), the server's :class:`~server.core.inference.InferenceEngine`
        runs per-image steps in a thread pool and batches model calls across
        requests.  Yields :class:`CpuStep` (call it, send back its result) and
        :class:`Call` (send back the outputs of one of :attr:`calls`); returns the face.

        Args:
            data: encoded image bytes, or already decoded (H, W, 3) uint8 RGB pixels.
            selfie: run the face stages too (a selfie: its presentation-attack check).
            view: keep the face's view for the replay check (an image compared with
                another: a selfie and its reference).
            embed: compute the embedding (else it is empty: a liveness frame, whose
                chip is embedded later if at all, :meth:`embed_steps`).
            turns: the quarter turns that make the image upright, where they are
                known (a burst's frames, from one camera): detected once, so turned;
                None: found by :meth:`upright_steps`.
            half: the recognizer's passes to embed with (:data:`~server.pipeline.types.BOTH`;
                PLAIN leaves the mirror pass to :meth:`embed_steps`, where it is needed).
            frame: a liveness burst's frame, located by :attr:`frame_detector`.
        """
        with timings.stage("decode"):
            if isinstance(data, np.ndarray):
                decoded = Decoded(data, 1.0, (data.shape[1], data.shape[0]))
            else:
                decoded = yield CpuStep(self.decode, (data, field_name))
        detector = self.frame_detector if frame else self.detector
        with timings.stage("detect"):
            if turns is None:
                faces = yield from detection_steps(detector, self.detector_calls,
                                                    decoded.pixels)
                pixels, faces, turns = yield from self.upright_steps(decoded.pixels, faces,
                                                                     detector)
            else:
                pixels = decoded.pixels if not turns else (
                    yield CpuStep(turn, (decoded.pixels, turns)))
                faces = yield from detection_steps(detector, self.detector_calls, pixels)
        with timings.stage("align"):
            subject, ambiguous, chip, surroundings, quality, local = yield CpuStep(
                self.subject_chip, (replace(decoded, pixels=pixels), faces, field_name,
                                    refuse_ambiguous, turns, view))
        embedding = NOT_EMBEDDED
        if embed:
            with timings.stage("embed"):
                embedding = yield from call_one(self.embed_call, (chip, half))
        results: dict[str, Any] = {}
        for stage in self.stages if selfie else ():
            with timings.stage(stage.name):
                results[stage.name] = yield from stage.steps(pixels, local)
        return AnalysedFace(subject, quality, embedding, len(faces), ambiguous, decoded.size,
                            chip, surroundings, turns, results, half)

    def embed_steps(self, chip: np.ndarray, half: str = BOTH) -> Steps[np.ndarray]:
        """The embedding of an aligned face (:attr:`AnalysedFace.chip`): the passes
        ``half`` names."""
        embedding: np.ndarray = yield from call_one(self.embed_call, (chip, half))
        return embedding

    def analyse(self, data: bytes | np.ndarray, field_name: str, refuse_ambiguous: bool,
                timings: Timings | None = None, selfie: bool = False, view: bool = False,
                embed: bool = True, turns: int | None = None, half: str = BOTH,
                frame: bool = False) -> AnalysedFace:
        """Run :meth:`steps` here, one model call at a time (see :func:`choose_subject`
        for the per-image errors)."""
        return run_steps(self.steps(data, field_name, refuse_ambiguous, timings or Timings(),
                                    selfie, view, embed, turns, half, frame))
