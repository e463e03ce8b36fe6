"""Build the face pipeline named by a verified model directory."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from server.errors import ConfigurationError, ModelError
from server.models.manifest import read_manifest
from server.pipeline.batching import buckets
from server.pipeline.blazeface import BlazeFaceDetector, BlazeFaceModel
from server.pipeline.faces import FacePipeline, FacePolicy
from server.pipeline.image import ImageLimits
from server.pipeline.landmarks import ShapePredictor
from server.pipeline.mmod import MmodDetector
from server.pipeline.pad import CropClassifier, CropSpec, PresentationStage
from server.pipeline.recognizers import ChipSpec, DlibResnet, TemplateRecognizer
from server.pipeline.runtime import make_session, resolve_provider
from server.pipeline.scrfd import ScrfdDetector
from server.pipeline.types import (
    UNSET,
    Call,
    CpuStep,
    DetectedFace,
    Detector,
    FaceStage,
    Recognizer,
    detection_steps,
    run_steps,
)
from server.pipeline.yunet import YunetDetector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModels:
    """A ready pipeline and what it is made of."""

    pipeline: FacePipeline
    manifest: dict[str, Any]
    provider: str  # onnxruntime provider name actually in use
    flip: bool

    @property
    def model_version(self) -> str:
        """The manifest's version, plus how embeddings are computed from it.

        Calibrations and stored embeddings are tied to this string.
        """
        return str(self.manifest["model_version"]) + ("+flip" if self.flip else "")


@dataclass(frozen=True)
class Build:
    """What a model kind's constructor may use: the set's directory, sessions on the
    chosen provider, and the serving options that shape a model."""

    model_dir: Path
    session: Callable[[str], ort.InferenceSession]
    detector_max_side: int
    flip: bool
    file_sha256: dict[str, str]  # every file of the set, as the manifest verified it


# The one table of model kinds (the manifest's ``kind``) and how each is built.
DETECTORS: dict[str, Callable[[dict[str, Any], Build], Detector]] = {
    "dlib-mmod": lambda cfg, b: MmodDetector(
        b.session(cfg["file"]), ShapePredictor(b.model_dir / cfg["landmarks"]),
        max_side=b.detector_max_side),
    "blazeface": lambda cfg, b: BlazeFaceDetector(
        [BlazeFaceModel(b.session(scan["file"]), float(scan["threshold"]))
         for scan in cfg["scans"]], ShapePredictor(b.model_dir / cfg["landmarks"])),
    "scrfd": lambda cfg, b: ScrfdDetector(b.session(cfg["file"])),
    "yunet": lambda cfg, b: YunetDetector(b.session(cfg["file"]),
                                          input_size=int(cfg.get("input_size", 640))),
}
RECOGNIZERS: dict[str, Callable[[dict[str, Any], Build], Recognizer]] = {
    "dlib-resnet": lambda cfg, b: DlibResnet(b.session(cfg["file"]), flip=b.flip),
    "template": lambda cfg, b: TemplateRecognizer(
        b.session(cfg["file"]), ChipSpec.from_manifest(cfg), flip=b.flip,
        output=cfg.get("output")),
}
RECOGNIZERS["arcface"] = RECOGNIZERS["template"]  # "arcface": manifests before specs


def _presentation(cfg: dict[str, Any], b: Build) -> FaceStage:
    specs = [CropSpec.from_manifest(m) for m in cfg["models"]]
    return PresentationStage([CropClassifier(b.session(s.file), s) for s in specs],
                             b.file_sha256)


# The face stages, in the order they run on a selfie's face: the manifest section
# that declares each, and how each kind of it is built.  A new stage is a module
# (a FaceStage) and a line here.
FACE_STAGES: dict[str, dict[str, Callable[[dict[str, Any], Build], FaceStage]]] = {
    "presentation": {"crop-classifier": _presentation},
}


def load_models(model_dir: Path, provider: str, intra_op_threads: int, limits: ImageLimits,
                policy: FacePolicy, detector_max_side: int = 800, flip: bool = True,
                cudnn_conv_algo_search: str = "HEURISTIC") -> LoadedModels:
    """Verify the manifest, open sessions on ``provider`` and assemble the pipeline.

    Raises:
        ModelError: missing or corrupt files, or an unknown model kind.
        ConfigurationError: the provider is unavailable, or detector and
            recognizer use different landmark schemes.
    """
    manifest = read_manifest(model_dir)
    resolved = resolve_provider(provider)
    det_cfg, rec_cfg = manifest["detector"], manifest["recognizer"]

    @functools.cache  # one session a file, shared by every model object that runs it
    def session(file: str) -> ort.InferenceSession:
        return make_session(model_dir / file, resolved, intra_op_threads,
                            cudnn_conv_algo_search)

    build = Build(model_dir, session, detector_max_side, flip,
                  {name: entry["sha256"] for name, entry in manifest["files"].items()})
    make_detector = DETECTORS.get(det_cfg["kind"])
    if make_detector is None:
        raise ModelError(f"unknown detector kind {det_cfg['kind']!r} in {model_dir} (this "
                         f"server knows {', '.join(sorted(DETECTORS))})")
    make_recognizer = RECOGNIZERS.get(rec_cfg["kind"])
    if make_recognizer is None:
        raise ModelError(f"unknown recognizer kind {rec_cfg['kind']!r} in {model_dir} (this "
                         f"server knows {', '.join(sorted(RECOGNIZERS))})")
    detector = make_detector(det_cfg, build)
    recognizer = make_recognizer(rec_cfg, build)
    stages = []
    for section, kinds in FACE_STAGES.items():
        if (cfg := manifest.get(section)) is None:
            continue
        make_stage = kinds.get(cfg.get("kind"))
        if make_stage is None:
            raise ModelError(f"unknown {section} kind {cfg.get('kind')!r} in {model_dir} (this "
                             f"server knows {', '.join(sorted(kinds))})")
        stages.append(make_stage(cfg, build))
    # The same model scanning liveness frames at another size, where the set says so.
    frame_detector = (make_detector({**det_cfg, "input_size": det_cfg["frame_input_size"]},
                                    build) if "frame_input_size" in det_cfg else detector)
    pipeline = FacePipeline(detector, recognizer, limits, policy, stages, frame_detector)
    used = recognizer.session.get_providers()[0]
    log.info("models %s loaded from %s on %s (embedding size %d%s)", manifest["model_version"],
             model_dir, used, recognizer.dim,
             "".join(f"; {s.name} stage {s.version}" for s in stages))
    return LoadedModels(pipeline, manifest, used, flip)


@dataclass(frozen=True)
class _Warming:
    """Runs each model call for its items, then, on a GPU provider, at every batch size
    of :func:`~server.pipeline.batching.buckets` up to the maxima, since those plan
    (and TensorRT builds engines) per input shape."""

    sizes: dict[str, list[int]]
    declared: frozenset[str]  # the pipeline's calls: the server has a batcher for each

    def cpu(self, step: CpuStep) -> Any:
        return step.fn(*step.args)

    def model(self, step: Call) -> Any:
        if step.call.name not in self.declared:
            raise ConfigurationError(f"model call {step.call.name!r} is made but not among the "
                                     "pipeline's declared calls (a stage's `calls`): the server "
                                     "would have no batcher for it")
        outputs = list(step.call.run(list(step.items)))
        for n in self.sizes[step.call.per][1:]:
            step.call.run(list(step.items[:1]) * n)
        return outputs


def warm_up(models: LoadedModels, detect_batch: int = 1, embed_batch: int = 1) -> None:
    """Run every model call of the pipeline once (on a GPU at every batch size the
    server may send it): no request then pays for initialisation.

    Raises:
        ConfigurationError: a stage makes a model call it does not declare.
    """
    pipe = models.pipeline
    cpu = models.provider == "CPUExecutionProvider"
    runner = _Warming({"image": [1] if cpu else buckets(detect_batch),
                       "face": [1] if cpu else buckets(embed_batch), "cpu": [1]},
                      frozenset(c.name for c in pipe.calls))
    image = np.full((256, 256, 3), 128, dtype=np.uint8)
    # Finds nothing, so runs every scan.
    run_steps(detection_steps(pipe.detector, pipe.detector_calls, image), runner)
    chip = np.zeros((*pipe.recognizer.chip_shape, 3), dtype=np.uint8)
    run_steps(pipe.embed_steps(chip), runner)
    face = DetectedFace(np.array([64.0, 64.0, 192.0, 192.0]), 1.0, UNSET)
    for stage in pipe.stages:
        run_steps(stage.steps(image, face), runner)
