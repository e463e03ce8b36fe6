"""The face pipeline run for concurrent requests: thread pools and batched model calls.

Per-image work (decoding, building the detector input, choosing the subject,
alignment) runs in the ``cpu`` pool; the detector and the recognizer each sit
behind a :class:`~server.pipeline.batching.Batcher` whose batches run in the ``model``
pool, and dlib's landmark model (numpy) behind one whose batches of faces run
in the ``cpu`` pool.  The event loop only awaits.  Per-image errors are
raised by the per-image steps, before an image joins a batch.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.core.metrics import Metrics
from server.pipeline.batching import Batcher, BatchLimits, padded
from server.pipeline.faces import AnalysedFace, FacePipeline, Timings
from server.pipeline.types import (
    CpuStep,
    DetectCall,
    DetectorInput,
    EmbedCall,
    LandmarkCall,
    dispatch,
)


@dataclass(frozen=True)
class EngineLimits:
    """Batching of each model (see :class:`BatchLimits`)."""

    detect: BatchLimits
    embed: BatchLimits
    landmarks: BatchLimits
    pad_to_buckets: bool = False  # see Settings.batch_buckets


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
        self.limits = limits
        self.detect_batcher: Batcher[DetectorInput, Any] = Batcher(
            "detect", self._infer_detector, model_pool, limits.detect,
            key=lambda p: p.tensor.shape, observer=metrics)
        self.embed_batcher: Batcher[np.ndarray, np.ndarray] = Batcher(
            "embed", self._embed, model_pool, limits.embed, observer=metrics)
        # Landmarks run on the CPU whatever the provider (numpy): in the image pool.
        self.landmark_batcher: Batcher[tuple[np.ndarray, np.ndarray], np.ndarray] = Batcher(
            "landmarks", self._landmarks, cpu_pool, limits.landmarks, observer=metrics)
        for name, batch in (("detect", limits.detect), ("embed", limits.embed),
                            ("landmarks", limits.landmarks)):
            metrics.queue_capacity.labels(name).set(batch.max_queue)

    def _infer_detector(self, prepared: list[DetectorInput]) -> list[Any]:
        tensors = [p.tensor for p in prepared]
        if self.limits.pad_to_buckets:
            tensors = padded(tensors, self.limits.detect.max_batch)
        return self.pipeline.detector.infer(tensors)[:len(prepared)]

    def _embed(self, chips: list[np.ndarray]) -> list[np.ndarray]:
        batch = padded(chips, self.limits.embed.max_batch) if self.limits.pad_to_buckets \
            else chips
        return list(self.pipeline.recognizer.embed(np.stack(batch))[:len(chips)])

    def _landmarks(self, faces: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        landmarker = self.pipeline.detector.landmarker
        assert landmarker is not None  # only such detectors ask for landmarks
        return list(landmarker.predict_batch([image for image, _ in faces],
                                             np.stack([box for _, box in faces])))

    async def analyse(self, data: bytes, field_name: str, refuse_ambiguous: bool
                      ) -> AnalysedFace:
        """The subject face of one encoded image: :meth:`FacePipeline.steps`, with
        per-image steps in the CPU pool and model calls batched across requests.
        Stage times go to the metrics (``detect`` and ``embed`` include the wait
        for a batch).

        Raises:
            RequestError: the image's own problem (see :mod:`server.pipeline.faces`),
                or Overloaded / QueueTimeout from a batcher.
        """
        timings = Timings()
        steps = self.pipeline.steps(data, field_name, refuse_ambiguous, timings)
        runner = _BatchedRunner(self, asyncio.get_running_loop())
        value: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    step = steps.throw(error) if error is not None else steps.send(value)
                except StopIteration as done:
                    face: AnalysedFace = done.value
                    return face
                value, error = None, None
                try:
                    value = await dispatch(step, runner)
                except Exception as exc:  # thrown into the steps, which re-raise it
                    error = exc
        finally:
            self.metrics.observe_stages(timings.seconds)

    async def close(self) -> None:
        """Fail whatever is still queued and wait for running batches."""
        await self.detect_batcher.close()
        await self.landmark_batcher.close()
        await self.embed_batcher.close()


@dataclass(frozen=True)
class _BatchedRunner:
    """Per-image steps in the CPU pool, model calls through the engine's batchers."""

    engine: InferenceEngine
    loop: asyncio.AbstractEventLoop

    async def cpu(self, step: CpuStep) -> Any:
        return await self.loop.run_in_executor(self.engine.cpu_pool, step.fn, *step.args)

    async def detect(self, step: DetectCall) -> Any:
        return await self.engine.detect_batcher.submit(step.prepared)

    async def landmarks(self, step: LandmarkCall) -> Any:
        return np.stack(await asyncio.gather(*(
            self.engine.landmark_batcher.submit((step.image, box)) for box in step.boxes)))

    async def embed(self, step: EmbedCall) -> Any:
        return await self.engine.embed_batcher.submit(step.chip)
