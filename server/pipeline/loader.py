"""Build the face pipeline named by a verified model directory."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from server.errors import ModelError
from server.models.manifest import read_manifest
from server.pipeline.batching import buckets
from server.pipeline.blazeface import BlazeFaceDetector, BlazeFaceModel
from server.pipeline.faces import FacePipeline, FacePolicy
from server.pipeline.image import ImageLimits
from server.pipeline.landmarks import ShapePredictor
from server.pipeline.mmod import MmodDetector
from server.pipeline.recognizers import ChipSpec, DlibResnet, TemplateRecognizer
from server.pipeline.runtime import make_session, resolve_provider
from server.pipeline.scrfd import ScrfdDetector
from server.pipeline.types import Detector, Recognizer, detect
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

    def session(file: str) -> ort.InferenceSession:
        return make_session(model_dir / file, resolved, intra_op_threads,
                            cudnn_conv_algo_search)

    detector: Detector
    if det_cfg["kind"] == "dlib-mmod":
        detector = MmodDetector(session(det_cfg["file"]),
                                ShapePredictor(model_dir / det_cfg["landmarks"]),
                                max_side=detector_max_side)
    elif det_cfg["kind"] == "blazeface":
        scans = [BlazeFaceModel(session(scan["file"]), float(scan["threshold"]))
                 for scan in det_cfg["scans"]]
        detector = BlazeFaceDetector(scans, ShapePredictor(model_dir / det_cfg["landmarks"]))
    elif det_cfg["kind"] == "scrfd":
        detector = ScrfdDetector(session(det_cfg["file"]))
    elif det_cfg["kind"] == "yunet":
        detector = YunetDetector(session(det_cfg["file"]),
                                 input_size=int(det_cfg.get("input_size", 640)))
    else:
        raise ModelError(f"unknown detector kind {det_cfg['kind']!r} in {model_dir}")
    recognizer_session = session(rec_cfg["file"])
    recognizer: Recognizer
    if rec_cfg["kind"] == "dlib-resnet":
        recognizer = DlibResnet(recognizer_session, flip=flip)
    elif rec_cfg["kind"] in ("template", "arcface"):  # "arcface": manifests before specs
        recognizer = TemplateRecognizer(recognizer_session, ChipSpec.from_manifest(rec_cfg),
                                        flip=flip, output=rec_cfg.get("output"))
    else:
        raise ModelError(f"unknown recognizer kind {rec_cfg['kind']!r} in {model_dir}")
    pipeline = FacePipeline(detector, recognizer, limits, policy)
    used = recognizer_session.get_providers()[0]
    log.info("models %s loaded from %s on %s (embedding size %d)", manifest["model_version"],
             model_dir, used, recognizer.dim)
    return LoadedModels(pipeline, manifest, used, flip)


def warm_up(models: LoadedModels, detect_batch: int = 1, embed_batch: int = 1) -> None:
    """Run every model once; on a GPU provider, at every batch size of
    :func:`~server.pipeline.batching.buckets` up to the maxima too, since those plan (and
    TensorRT builds engines) per input shape.  No request then pays for
    initialisation."""
    pipe = models.pipeline
    image = np.full((256, 256, 3), 128, dtype=np.uint8)
    detect(pipe.detector, image)  # finds nothing, so runs every scan
    chip = (*pipe.recognizer.chip_shape, 3)
    pipe.recognizer.embed(np.zeros((1, *chip), dtype=np.uint8))
    if models.provider == "CPUExecutionProvider":
        return
    attempt = 0
    while (prepared := pipe.detector.prepare(image, attempt)) is not None:
        for n in buckets(detect_batch)[1:]:
            pipe.detector.infer([prepared.tensor] * n)
        attempt += 1
    for n in buckets(embed_batch)[1:]:
        pipe.recognizer.embed(np.zeros((n, *chip), dtype=np.uint8))
