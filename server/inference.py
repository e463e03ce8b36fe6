"""The face pipeline run for concurrent requests: thread pools and batched model calls.

Per-image work (decoding, building the detector input, landmarks, choosing
the subject, alignment) runs in the ``cpu`` pool; the detector and the
recognizer each sit behind a :class:`~server.batching.Batcher` whose batches
run in the ``model`` pool.  The event loop only awaits.  Per-image errors are
raised by the per-image steps, before an image joins a batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from server.batching import Batcher, BatchLimits
from server.metrics import Metrics
from server.pipeline.faces import AnalysedFace, FacePipeline, Timings
from server.pipeline.types import DetectedFace, DetectorInput

T = TypeVar("T")


@dataclass(frozen=True)
class EngineLimits:
    """Batching of each model (see :class:`BatchLimits`)."""

    detect: BatchLimits = BatchLimits()
    embed: BatchLimits = BatchLimits()


class InferenceEngine:
    """Analyses images for many requests at once.

    Args:
        pipeline: the models and policies.
        cpu_pool: threads for per-image work.
        model_pool: threads for model calls; should have at least
            ``limits.detect.concurrency + limits.embed.concurrency`` threads.
        limits: batch sizes, waits and queue bounds.
        metrics: receives stage times and batch and queue events.
    """

    def __init__(self, pipeline: FacePipeline, cpu_pool: ThreadPoolExecutor,
                 model_pool: ThreadPoolExecutor, limits: EngineLimits, metrics: Metrics) -> None:
        self.pipeline = pipeline
        self.cpu_pool = cpu_pool
        self.metrics = metrics
        self.detect_batcher: Batcher[DetectorInput, Any] = Batcher(
            "detect", self._infer_detector, model_pool, limits.detect,
            key=lambda p: p.tensor.shape, observer=metrics)
        self.embed_batcher: Batcher[np.ndarray, np.ndarray] = Batcher(
            "embed", self._embed, model_pool, limits.embed, observer=metrics)
        metrics.queue_capacity.labels("detect").set(limits.detect.max_queue)
        metrics.queue_capacity.labels("embed").set(limits.embed.max_queue)

    def _infer_detector(self, prepared: list[DetectorInput]) -> list[Any]:
        return self.pipeline.detector.infer([p.tensor for p in prepared])

    def _embed(self, chips: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.pipeline.recognizer.embed(np.stack(chips)))

    async def _cpu(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, fn, *args)

    async def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """Every scan the detector wants, each batched with other requests' scans."""
        detector = self.pipeline.detector
        attempt = 0
        while (prepared := await self._cpu(detector.prepare, image, attempt)) is not None:
            output = await self.detect_batcher.submit(prepared)
            faces = await self._cpu(detector.finish, image, prepared, output)
            if faces:
                return faces
            attempt += 1
        return []

    async def analyse(self, data: bytes, field_name: str, refuse_ambiguous: bool
                      ) -> AnalysedFace:
        """The subject face of one encoded image; stage times go to the metrics
        (``detect`` and ``embed`` include the wait for a batch).

        Raises:
            RequestError: the image's own problem (see :mod:`server.pipeline.faces`),
                or Overloaded / QueueTimeout from a batcher.
        """
        timings = Timings()
        try:
            with timings.stage("decode"):
                image = await self._cpu(self.pipeline.decode, data, field_name)
            with timings.stage("detect"):
                faces = await self.detect(image)
            with timings.stage("align"):
                subject, ambiguous, chip, quality = await self._cpu(
                    self.pipeline.subject_chip, image, faces, field_name, refuse_ambiguous)
            with timings.stage("embed"):
                embedding = await self.embed_batcher.submit(chip)
        finally:
            self.metrics.observe_stages(timings.seconds)
        h, w = image.shape[:2]
        return AnalysedFace(subject, quality, embedding, len(faces), ambiguous, (w, h))

    async def close(self) -> None:
        """Fail whatever is still queued and wait for running batches."""
        await self.detect_batcher.close()
        await self.embed_batcher.close()
