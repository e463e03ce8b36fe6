"""The face pipeline run for concurrent requests: thread pools and batched model calls.

Per-image work (decoding, building the detector input, choosing the subject,
alignment) runs in the ``cpu`` pool; every model call the pipeline declares
(:attr:`FacePipeline.calls`: the detector, the recognizer, a face stage's models)
sits behind a :class:`~server.pipeline.batching.Batcher` of its own, built from
that declaration: onnxruntime calls in threads of their own, numpy ones (dlib's
landmarks) in the ``cpu`` pool.  The event loop only awaits.  Per-image errors
are raised by the per-image steps, before an image joins a batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.core.metrics import Metrics
from server.pipeline.batching import Batcher, BatchLimits, padded
from server.pipeline.faces import AnalysedFace, FacePipeline, Timings
from server.pipeline.types import BOTH, Call, CpuStep, ModelCall, Steps, dispatch


@dataclass(frozen=True)
class EngineLimits:
    """Batching of the model calls, by what they are called per
    (:attr:`ModelCall.per`; see :class:`BatchLimits`)."""

    image: BatchLimits  # detector scans
    face: BatchLimits  # recognizer, face-stage models
    cpu: BatchLimits  # numpy models (landmarks), in the image pool
    pad_to_buckets: bool = False  # see Settings.batch_buckets

    def of(self, call: ModelCall) -> BatchLimits:
        return {"image": self.image, "face": self.face, "cpu": self.cpu}[call.per]


class InferenceEngine:
    """Analyses images for many requests at once.

    Args:
        pipeline: the models and policies.
        cpu_pool: threads for per-image work (and numpy model calls).
        limits: batch sizes, waits and queue bounds.
        metrics: receives stage times and batch and queue events.
    """

    def __init__(self, pipeline: FacePipeline, cpu_pool: ThreadPoolExecutor,
                 limits: EngineLimits, metrics: Metrics) -> None:
        self.pipeline = pipeline
        self.cpu_pool = cpu_pool
        self.metrics = metrics
        self.limits = limits
        self._threads: list[ThreadPoolExecutor] = []
        self.batchers: dict[str, Batcher[Any, Any]] = {}
        for call in pipeline.calls:
            batch = limits.of(call)
            pool: Executor = cpu_pool
            if call.per != "cpu":  # onnxruntime releases the GIL: threads of its own
                pool = ThreadPoolExecutor(batch.concurrency, thread_name_prefix=call.name)
                self._threads.append(pool)
            self.batchers[call.name] = Batcher(call.name, self._run(call), pool, batch,
                                               key=call.key, observer=metrics)
            metrics.queue_capacity.labels(call.name).set(batch.max_queue)

    def _run(self, call: ModelCall) -> Callable[[list[Any]], Sequence[Any]]:
        if not self.limits.pad_to_buckets or call.per == "cpu" or not call.paddable:
            return call.run
        max_batch = self.limits.of(call).max_batch

        def run(items: list[Any]) -> Sequence[Any]:
            return list(call.run(padded(items, max_batch)))[:len(items)]
        return run

    async def analyse(self, data: bytes, field_name: str, refuse_ambiguous: bool,
                      selfie: bool = False, view: bool = False, embed: bool = True,
                      turns: int | None = None, half: str = BOTH, frame: bool = False
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
        try:
            face: AnalysedFace = await self._drive(self.pipeline.steps(
                data, field_name, refuse_ambiguous, timings, selfie, view, embed, turns, half,
                frame))
        finally:
            self.metrics.observe_stages(timings.seconds)
        return face

    async def embed(self, chip: np.ndarray, half: str = BOTH) -> np.ndarray:
        """The embedding of an aligned face (:attr:`AnalysedFace.chip`), batched with
        the others: the recognizer's passes ``half`` names."""
        timings = Timings()
        try:
            with timings.stage("embed"):
                embedding: np.ndarray = await self._drive(self.pipeline.embed_steps(chip, half))
        finally:
            self.metrics.observe_stages(timings.seconds)
        return embedding

    async def _drive(self, steps: Steps[Any]) -> Any:
        """Run ``steps``: per-image steps in the CPU pool, model calls batched."""
        runner = _BatchedRunner(self, asyncio.get_running_loop())
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = steps.throw(error) if error is not None else steps.send(value)
            except StopIteration as done:
                return done.value
            finally:
                # An error raised on from here would otherwise stay in this frame's
                # locals, a cycle with its own traceback that holds the request's
                # images until the garbage collector's next full pass.
                value, error = None, None
            try:
                value = await dispatch(step, runner)
            except Exception as exc:  # thrown into the steps, which re-raise it
                error = exc

    async def close(self) -> None:
        """Fail whatever is still queued, wait for running batches, stop the threads."""
        for batcher in self.batchers.values():
            await batcher.close()
        for pool in self._threads:
            pool.shutdown(wait=True)


@dataclass(frozen=True)
class _BatchedRunner:
    """Per-image steps in the CPU pool, model calls through the engine's batchers."""

    engine: InferenceEngine
    loop: asyncio.AbstractEventLoop

    async def cpu(self, step: CpuStep) -> Any:
        return await self.loop.run_in_executor(self.engine.cpu_pool, self._timed, step)

    def _timed(self, step: CpuStep) -> Any:
        """The step, its CPU time counted under its function's name (``step:decode``)."""
        start = time.thread_time()
        try:
            return step.fn(*step.args)
        finally:
            name = getattr(step.fn, "__name__", type(step.fn).__name__)
            self.engine.metrics.cpu(f"step:{name}", time.thread_time() - start)

    async def model(self, step: Call) -> Any:
        batcher = self.engine.batchers.get(step.call.name)
        if batcher is None:
            raise TypeError(f"model call {step.call.name!r} is not among the pipeline's "
                            "declared calls (FacePipeline.calls)")
        return list(await asyncio.gather(*(batcher.submit(item) for item in step.items)))
