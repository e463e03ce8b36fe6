"""The server's batched path and the tools' unbatched path are one step sequence:
the embedding served for an image is the one calibration computed for it."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from server.core.inference import EngineLimits, InferenceEngine
from server.core.metrics import Metrics
from server.errors import NoFaceDetected
from server.models.calibrate import embed_labelled
from server.pipeline.batching import BatchLimits
from server.pipeline.faces import FacePolicy
from server.pipeline.image import ImageLimits
from server.pipeline.loader import load_models
from tests.conftest import lfw_image
from tests.imaging import blank

IMAGES = [("Abel_Pacheco", 1), ("Abel_Pacheco", 4), ("Tony_Blair", 5), ("Laura_Bush", 3),
          ("Colin_Powell", 7), ("Hugo_Chavez", 4)]


@pytest.mark.parametrize("buckets", [False, True])
def test_served_embeddings_equal_calibrated_ones(dlib_model_dir: Path, lfw_dir: Path,
                                                 buckets: bool) -> None:
    models = load_models(dlib_model_dir, "cpu", 1, ImageLimits(), FacePolicy())
    paths = [("x", lfw_dir / "images" / n / f"{n}_{i:04d}.jpg") for n, i in IMAGES]
    calibrated = embed_labelled(models.pipeline, paths).embeddings

    async def serve_all() -> list[np.ndarray]:
        limits = EngineLimits(BatchLimits(8, 0.005, 64, 1), BatchLimits(8, 0.005, 64, 1),
                              BatchLimits(8, 0.0, 256, 2), pad_to_buckets=buckets)
        with ThreadPoolExecutor(2) as cpu:
            engine = InferenceEngine(models.pipeline, cpu, limits, Metrics())
            faces = await asyncio.gather(*(engine.analyse(lfw_image(lfw_dir, n, i), "selfie",
                                                          False) for n, i in IMAGES))
            # A per-image error still reaches its own caller through the steps.
            with pytest.raises(NoFaceDetected):
                await engine.analyse(blank(), "selfie", False)
            await engine.close()
        return [f.embedding for f in faces]

    served = np.stack(asyncio.run(serve_all()))
    # Batched with other requests' images (and padded) or alone: the same numbers.
    assert np.allclose(served, calibrated, atol=1e-5)
