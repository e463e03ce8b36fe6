"""Passive presentation-attack detection: classifiers of a crop around the selfie's face.

The face stage of :data:`server.pipeline.loader.FACE_STAGES` ``presentation``.
Each model (an operator brings it: `faceverify models presentation`) sees the
face box scaled ``crop_scale`` times about its centre (shrunk to fit the image
and moved inside it where it would leave it, as Silent-Face-Anti-Spoofing's
``CropImage`` does), resized bilinearly to its input, in its channel order and
normalisation; its output becomes class probabilities (``softmax`` over the
classes, or ``sigmoid`` of a single logit) of which ``live_class`` is the bona
fide one.  The live probabilities of all models are averaged: the stage's
result is that one score, 0 (an attack) to 1 (a live face).  The threshold
below which a selfie is suspected is calibrated for a bona fide rejection rate
(BPCER) and recorded with the models in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from server.errors import ModelError
from server.pipeline.geometry import warp_bilinear
from server.pipeline.runtime import fixed_batch, run_batched
from server.pipeline.types import CpuStep, DetectedFace, ModelCall, Steps, call_one

ACTIVATIONS = ("softmax", "sigmoid")
COLOURS = ("rgb", "bgr")
# Silent-Face-Anti-Spoofing's MiniFASNet models (the test models of
# ../shared/models): BGR, raw 0-255, softmax over (spoof, live, spoof), live = 1.
PRESETS: dict[str, dict[str, Any]] = {
    "minifasnet": {"colour": "bgr", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                   "live_class": 1, "activation": "softmax"},
}


@dataclass(frozen=True)
class CropSpec:
    """What one presentation-attack model is fed and what its output means.

    Attributes:
        file: the model file in the model directory.
        crop_scale: the crop is the face box scaled this many times about its centre.
        width, height: the model's input, in pixels (read from the model).
        colour: ``rgb`` or ``bgr``; mean, std per channel in that order:
            input = (pixel - mean) / std.
        live_class: the index of the bona fide class in the output.
        activation: ``softmax`` (the output holds each class's logit) or
            ``sigmoid`` (a single logit, of ``live_class`` 0).
    """

    file: str
    crop_scale: float
    width: int
    height: int
    colour: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    live_class: int
    activation: str

    def to_manifest(self) -> dict[str, Any]:
        entry = asdict(self)
        entry["mean"], entry["std"] = list(self.mean), list(self.std)
        return entry

    @staticmethod
    def from_manifest(entry: dict[str, Any]) -> CropSpec:
        """Raises ModelError naming the field that is missing or malformed."""
        try:
            spec = CropSpec(str(entry["file"]), float(entry["crop_scale"]), int(entry["width"]),
                            int(entry["height"]), str(entry["colour"]),
                            _triple(entry["mean"]), _triple(entry["std"]),
                            int(entry["live_class"]), str(entry["activation"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"presentation-attack model entry {entry!r} is malformed: "
                             f"{type(exc).__name__} {exc}") from exc
        problems = [p for p, bad in (
            (f"crop_scale {spec.crop_scale} is not in (0, 10]", not 0 < spec.crop_scale <= 10),
            (f"colour {spec.colour!r} is not one of {', '.join(COLOURS)}",
             spec.colour not in COLOURS),
            (f"activation {spec.activation!r} is not one of {', '.join(ACTIVATIONS)}",
             spec.activation not in ACTIVATIONS),
            ("a std is 0", 0.0 in spec.std),
            (f"size {spec.width}x{spec.height} is not positive", min(spec.width, spec.height) < 1),
        ) if bad]
        if problems:
            raise ModelError(f"presentation-attack model {spec.file}: {'; '.join(problems)}")
        return spec


def _triple(value: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in value)
    return a, b, c


def crop_box(box: np.ndarray, scale: float, width: int, height: int) -> np.ndarray:
    """The box (x0, y0, x1, y1) scaled ``scale`` times about its centre, shrunk to fit
    a ``width`` x ``height`` image and moved inside it (Silent-Face's ``CropImage``)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    scale = min((height - 1) / h, (width - 1) / w, scale)
    cw, ch = w * scale, h * scale
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top, right, bottom = cx - cw / 2, cy - ch / 2, cx + cw / 2, cy + ch / 2
    if left < 0:
        right, left = right - left, 0.0
    if top < 0:
        bottom, top = bottom - top, 0.0
    if right > width - 1:
        left, right = left - (right - width + 1), width - 1.0
    if bottom > height - 1:
        top, bottom = top - (bottom - height + 1), height - 1.0
    return np.clip([left, top, right, bottom], 0.0, [width - 1, height - 1] * 2)


class CropClassifier:
    """One presentation-attack model: a crop of the face in, the live probability out.

    Raises:
        ModelError: the model's input is not [N, 3, H, W] of the spec's size, or its
            output has too few classes for ``live_class``.
    """

    def __init__(self, session: ort.InferenceSession, spec: CropSpec) -> None:
        self.session = session
        self.spec = spec
        inp = session.get_inputs()[0]
        shape = inp.shape
        if len(shape) != 4 or shape[1] != 3 or (shape[2], shape[3]) != (spec.height, spec.width):
            raise ModelError(f"{spec.file}: input {shape} is not [N, 3, {spec.height}, "
                             f"{spec.width}] as its entry says")
        self.input_name = inp.name
        self.batch = fixed_batch(session)
        classes = session.get_outputs()[0].shape[-1]
        sigmoid = spec.activation == "sigmoid"
        needed = "exactly 1" if sigmoid else f"at least {max(2, spec.live_class + 1)}"
        if isinstance(classes, int) and (classes != 1 if sigmoid
                                         else classes < max(2, spec.live_class + 1)):
            raise ModelError(f"{spec.file}: its output has {classes} classes; {spec.activation} "
                             f"with live class {spec.live_class} needs {needed}")
        order = [2, 1, 0] if spec.colour == "bgr" else [0, 1, 2]
        self._order = np.array(order)
        self._mean = np.array(spec.mean, dtype=np.float32)[:, None, None]
        self._scale = (1.0 / np.array(spec.std, dtype=np.float32))[:, None, None]

    def crop(self, pixels: np.ndarray, box: np.ndarray) -> np.ndarray:
        """The model's view of the face: (H, W, 3) uint8 RGB."""
        height, width = pixels.shape[:2]
        left, top, right, bottom = crop_box(box, self.spec.crop_scale, width, height)
        sx = (right - left + 1) / self.spec.width
        sy = (bottom - top + 1) / self.spec.height
        # Pixel centres as cv2.resize places them: output u samples (u + 0.5) * s - 0.5.
        a = np.array([[sx, 0.0], [0.0, sy]])
        t = np.array([left + 0.5 * sx - 0.5, top + 0.5 * sy - 0.5])
        return warp_bilinear(pixels, a, t, self.spec.height, self.spec.width, truncate=False)

    def live(self, crops: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 crops -> (N,) live probabilities."""
        x = crops[..., self._order].transpose(0, 3, 1, 2).astype(np.float32)
        x = np.ascontiguousarray((x - self._mean) * self._scale)
        out = run_batched(self.session, self.input_name, x, self.batch)[0]
        logits = out.reshape(len(out), -1).astype(np.float64)
        if self.spec.activation == "sigmoid":
            probability: np.ndarray = 1.0 / (1.0 + np.exp(-logits[:, 0]))
            return probability
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        live: np.ndarray = e[:, self.spec.live_class] / e.sum(axis=1)
        return live


@dataclass(frozen=True)
class Threshold:
    """Where the live score is cut, and what was measured there.

    Attributes:
        value: a selfie scoring below this is suspected.
        bpcer_target: the bona fide rejection rate it was set for.
        bpcer: the rate measured on ``bona_fide`` photos of ``dataset`` (the highest
            of its conditions, each folder of photos given).
        confidence: how sure the measurement makes it that the rate is at most
            ``bpcer_target`` on the population sampled, in every condition (0 for a
            threshold set at the plain quantile).
    """

    value: float
    bpcer_target: float
    bpcer: float
    bona_fide: int
    dataset: str
    confidence: float = 0.0

    @staticmethod
    def from_manifest(entry: dict[str, Any]) -> Threshold:
        try:
            return Threshold(float(entry["value"]), float(entry["bpcer_target"]),
                             float(entry["bpcer"]), int(entry["bona_fide"]),
                             str(entry["dataset"]), float(entry.get("confidence", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"the presentation-attack threshold {entry!r} is malformed: "
                             f"{type(exc).__name__} {exc}") from exc


# The default confidence that a threshold's bona fide rejection rate holds: one
# at the plain quantile of one sample rejects more than the target about half the
# time on the next (benchmarks.presentation: 7.0 % on held-out photos for 5 %).
CONFIDENCE = 0.95


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P[X <= k] for X ~ Binomial(n, p), summed in log space."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
            + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def rejections_allowed(n: int, bpcer: float, confidence: float) -> int | None:
    """The most of ``n`` bona fide photos a threshold may reject for the rate to be
    at most ``bpcer`` with ``confidence``: the largest k whose one-sided
    Clopper-Pearson upper bound is at most ``bpcer`` (P[X <= k] <= 1 - confidence,
    X ~ Binomial(n, bpcer)); with confidence 0, floor(bpcer * n).  None when even
    rejecting none is not enough (too few photos)."""
    if confidence <= 0:
        return int(math.floor(bpcer * n + 1e-9))
    if bpcer <= 0:
        return None
    k = int(math.floor(bpcer * n + 1e-9))
    while k >= 0 and binomial_cdf(k, n, bpcer) > 1 - confidence:
        k -= 1
    return k if k >= 0 else None


def threshold_for(scores: np.ndarray, bpcer: float, confidence: float = 0.0) -> float:
    """The highest threshold that rejects no more of the bona fide ``scores`` than
    :func:`rejections_allowed` allows: the (k+1)-th lowest score, floored to 6
    decimals (so that what is recorded rejects no more than was measured).

    Raises:
        ValueError: a rate outside [0, 1), no scores, or too few of them for the
            confidence asked.
    """
    if not 0 <= bpcer < 1 or not 0 <= confidence < 1 or len(scores) == 0:
        raise ValueError("bpcer and confidence must be in [0, 1) and scores not empty")
    k = rejections_allowed(len(scores), bpcer, confidence)
    if k is None:
        raise ValueError(f"{len(scores)} photos are too few for a BPCER of {bpcer:g} "
                         f"at {confidence:.0%} confidence")
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    return float(np.floor(ordered[k] * 1e6) / 1e6)


class PresentationStage:
    """The ``presentation`` face stage: the averaged live score of its models (the
    decision on it is the service's: :mod:`server.core.presentation`)."""

    name = "presentation"

    def __init__(self, models: list[CropClassifier], file_sha256: dict[str, str]) -> None:
        if not models:
            raise ModelError("a presentation-attack stage needs at least one model")
        self.models = models
        self.call = ModelCall("liveness", self._run, "face",
                              paddable=all(m.batch is None for m in models))
        self.calls: tuple[ModelCall, ...] = (self.call,)
        # The models (their files' digests) and how they are fed: what a score means.
        what = json.dumps([{**m.spec.to_manifest(), "sha256": file_sha256[m.spec.file]}
                           for m in models], sort_keys=True)
        self.version = "pad-" + hashlib.sha256(what.encode()).hexdigest()[:12]

    def crops(self, pixels: np.ndarray, face: DetectedFace) -> tuple[np.ndarray, ...]:
        return tuple(m.crop(pixels, face.box) for m in self.models)

    def _run(self, items: list[tuple[np.ndarray, ...]]) -> list[float]:
        live = [m.live(np.stack([crops[i] for crops in items]))
                for i, m in enumerate(self.models)]
        return [float(v) for v in np.mean(live, axis=0)]

    def steps(self, pixels: np.ndarray, face: DetectedFace) -> Steps[float]:
        crops = yield CpuStep(self.crops, (pixels, face))
        score: float = yield from call_one(self.call, crops)
        return score
