"""Build the face pipeline named by a verified model directory."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.errors import ModelError
from server.models.manifest import read_manifest
from server.pipeline.faces import FacePipeline, FacePolicy
from server.pipeline.image import ImageLimits
from server.pipeline.mmod import load_mmod
from server.pipeline.recognizers import ArcFace, DlibResnet
from server.pipeline.runtime import make_session, resolve_provider
from server.pipeline.scrfd import ScrfdDetector
from server.pipeline.types import Detector, Recognizer, detect

log = logging.getLogger(__name__)

RECOGNIZERS: dict[str, Callable[..., Recognizer]] = {"dlib-resnet": DlibResnet,
                                                     "arcface": ArcFace}


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
                policy: FacePolicy, detector_max_side: int = 800, flip: bool = True
                ) -> LoadedModels:
    """Verify the manifest, open sessions on ``provider`` and assemble the pipeline.

    Raises:
        ModelError: missing or corrupt files, or an unknown model kind.
        ConfigurationError: the provider is unavailable, or detector and
            recognizer use different landmark schemes.
    """
    manifest = read_manifest(model_dir)
    resolved = resolve_provider(provider)
    det_cfg, rec_cfg = manifest["detector"], manifest["recognizer"]
    det_session = make_session(model_dir / det_cfg["file"], resolved, intra_op_threads)
    detector: Detector
    if det_cfg["kind"] == "dlib-mmod":
        detector = load_mmod(model_dir, det_session, max_side=detector_max_side)
    elif det_cfg["kind"] == "scrfd":
        detector = ScrfdDetector(det_session)
    else:
        raise ModelError(f"unknown detector kind {det_cfg['kind']!r} in {model_dir}")
    if rec_cfg["kind"] not in RECOGNIZERS:
        raise ModelError(f"unknown recognizer kind {rec_cfg['kind']!r} in {model_dir}")
    recognizer: Recognizer = RECOGNIZERS[rec_cfg["kind"]](
        make_session(model_dir / rec_cfg["file"], resolved, intra_op_threads), flip=flip)
    pipeline = FacePipeline(detector, recognizer, limits, policy)
    used = det_session.get_providers()[0]
    log.info("models %s loaded from %s on %s (embedding size %d)", manifest["model_version"],
             model_dir, used, recognizer.dim)
    return LoadedModels(pipeline, manifest, used, flip)


def warm_up(models: LoadedModels, detect_batch: int = 1, embed_batch: int = 1) -> None:
    """Run every model once; on a GPU provider, at every power-of-two batch size up to
    the maxima too, since those plan (and TensorRT builds engines) per input shape.
    No request then pays for initialisation."""
    pipe = models.pipeline
    image = np.full((256, 256, 3), 128, dtype=np.uint8)
    detect(pipe.detector, image)
    size = getattr(pipe.recognizer, "chip_size", 112)
    pipe.recognizer.embed(np.zeros((1, size, size, 3), dtype=np.uint8))
    if models.provider == "CPUExecutionProvider":
        return
    prepared = pipe.detector.prepare(image, 0)
    assert prepared is not None  # every detector has a first scan
    n = 2
    while n <= max(detect_batch, embed_batch):
        if n <= detect_batch:
            pipe.detector.infer([prepared.tensor] * n)
        if n <= embed_batch:
            pipe.recognizer.embed(np.zeros((n, size, size, 3), dtype=np.uint8))
        n *= 2
