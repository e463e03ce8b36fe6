"""Dynamic micro-batching of model calls across concurrent requests.

A :class:`Batcher` owns one model call (detector or recognizer).  Requests
``submit`` one input each and await its output.  A collector task waits for the
first queued input, then for more until ``max_batch`` inputs of the same shape
are queued or that input has waited ``max_wait``, and hands the batch to a
thread pool.
Up to ``concurrency`` batches run at once; what is queued is spread over the
idle ones, and while all run, new inputs queue, so batches grow with the load.

Bounded, not elastic: a submit that finds ``max_queue`` inputs waiting is
refused at once with :class:`~server.errors.Overloaded` (RESOURCE_EXHAUSTED),
so overload shows as fast refusals rather than unbounded latency.  Inputs
whose caller has gone (cancelled) are dropped before inference, and those
whose deadline passed while queued get :class:`~server.errors.QueueTimeout`.
If a batch fails, every one of its futures gets the error.  Per-image errors
(an undecodable image, no face) are raised by the pipeline before an input is
ever submitted, so one bad image never fails its neighbours.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from server.errors import Overloaded, QueueTimeout

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# The monotonic time by which the current request must be answered (None: no
# deadline).  Set per request by the RPC layer; read when an input is queued.
deadline_var: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline",
                                                                            default=None)


class BatchObserver(Protocol):
    """Receives what the batcher does (metrics); every method must be cheap."""

    def queued(self, name: str, depth: int) -> None: ...

    def batch(self, name: str, size: int, waits: Sequence[float]) -> None: ...

    def dropped_input(self, name: str, why: str) -> None: ...

    def cpu(self, part: str, seconds: float) -> None:
        """CPU time one batch took on the thread that ran it (called on that thread)."""
        ...


class _NoObserver:
    def queued(self, name: str, depth: int) -> None:
        pass

    def batch(self, name: str, size: int, waits: Sequence[float]) -> None:
        pass

    def dropped_input(self, name: str, why: str) -> None:
        pass

    def cpu(self, part: str, seconds: float) -> None:
        pass


def buckets(max_batch: int) -> list[int]:
    """The batch sizes a padded model call uses: powers of two below ``max_batch``,
    then ``max_batch`` itself."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def padded(items: list[T], max_batch: int) -> list[T]:
    """``items`` padded (with copies of the last) to the next size of :func:`buckets`."""
    size = next(b for b in buckets(max_batch) if b >= len(items)) \
        if len(items) <= max_batch else len(items)
    return items + [items[-1]] * (size - len(items))


@dataclass(frozen=True)
class BatchLimits:
    """How a batcher groups inputs.

    Attributes:
        max_batch: most inputs in one model call.
        max_wait: seconds to wait, after the first input, for more to arrive.
        max_queue: inputs allowed to wait; one more is refused (OVERLOADED).
        concurrency: batches running at once (threads given to this model).

    The server's come from its settings (:attr:`server.config.Settings.engine_limits`).
    """

    max_batch: int
    max_wait: float
    max_queue: int
    concurrency: int


@dataclass
class _Entry(Generic[T, R]):
    item: T
    key: Hashable
    future: asyncio.Future[R]
    deadline: float | None
    queued_at: float = field(default_factory=time.monotonic)


class Batcher(Generic[T, R]):
    """Batches ``submit``-ted inputs into calls of ``run`` on ``executor``.

    Args:
        name: the model's name in logs and metrics (``detect``, ``embed``).
        run: blocking ``inputs -> outputs``, one output per input, same order.
        executor: where ``run`` executes (it must release the GIL to overlap).
        limits: batch size, wait, queue bound and concurrency.
        key: inputs with different keys never share a batch (e.g. tensor shape).
        observer: told of queue depth, batch sizes, queue waits and drops.
    """

    def __init__(self, name: str, run: Callable[[list[T]], Sequence[R]], executor: Executor,
                 limits: BatchLimits, key: Callable[[T], Hashable] = lambda _: None,
                 observer: BatchObserver | None = None) -> None:
        self.name = name
        self.run = run
        self.executor = executor
        self.limits = limits
        self.key = key
        self.observer: BatchObserver = observer or _NoObserver()
        self._pending: deque[_Entry[T, R]] = deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(limits.concurrency)
        self._busy = 0  # batches running
        self._running: set[asyncio.Task[None]] = set()
        self._collector: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Inputs waiting for a batch."""
        return len(self._pending)

    async def submit(self, item: T) -> R:
        """Queue one input and wait for its output.

        Raises:
            Overloaded: the queue is full.
            QueueTimeout: the request's deadline passed before its batch ran.
            Exception: whatever ``run`` raised for the batch.
        """
        if len(self._pending) >= self.limits.max_queue:
            self.observer.dropped_input(self.name, "queue_full")
            raise Overloaded(f"the {self.name} queue is full ({self.limits.max_queue} "
                             "waiting); retry with backoff")
        if self._collector is None or self._collector.done():
            self._collector = asyncio.get_running_loop().create_task(self._collect_forever())
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append(_Entry(item, self.key(item), future, deadline_var.get()))
        self.observer.queued(self.name, len(self._pending))
        self._arrived.set()
        return await future

    async def close(self) -> None:
        """Stop collecting; fail what is still queued; wait for running batches."""
        if self._collector is not None:
            self._collector.cancel()
            await asyncio.gather(self._collector, return_exceptions=True)
            self._collector = None
        while self._pending:
            e = self._pending.popleft()
            if not e.future.done():
                e.future.set_exception(Overloaded("the server is shutting down"))
        await asyncio.gather(*self._running, return_exceptions=True)

    def _drop_dead(self) -> None:
        """Remove cancelled inputs and fail expired ones, keeping the order of the rest."""
        now = time.monotonic()
        live: deque[_Entry[T, R]] = deque()
        for e in self._pending:
            if e.future.done():  # the caller went away (cancelled)
                self.observer.dropped_input(self.name, "cancelled")
            elif e.deadline is not None and e.deadline <= now:
                e.future.set_exception(QueueTimeout(
                    f"the deadline passed after {now - e.queued_at:.3f} s waiting for "
                    f"{self.name}"))
                self.observer.dropped_input(self.name, "expired")
            else:
                live.append(e)
        self._pending = live

    def _same_key(self, key: Hashable) -> int:
        return sum(1 for e in self._pending if e.key == key)

    async def _next_batch(self) -> list[_Entry[T, R]]:
        while True:
            self._drop_dead()
            if self._pending:
                break
            self._arrived.clear()
            await self._arrived.wait()
        key = self._pending[0].key
        # The wait counts from the oldest input's arrival: inputs left queued when
        # the previous batch was split over idle slots have waited already.
        give_up = self._pending[0].queued_at + self.limits.max_wait
        while self._same_key(key) < self.limits.max_batch:
            left = give_up - time.monotonic()
            if left <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break
        self._drop_dead()
        # Spread what is queued over the idle slots (this one included) rather than
        # piling it into one call while other slots idle: on a CPU, two calls of
        # one image each use two cores, one call of two images only one.
        idle = self.limits.concurrency - self._busy
        size = min(self.limits.max_batch, -(-self._same_key(key) // max(idle, 1)))
        batch: list[_Entry[T, R]] = []
        rest: deque[_Entry[T, R]] = deque()
        for e in self._pending:
            if e.key == key and len(batch) < size:
                batch.append(e)
            else:
                rest.append(e)
        self._pending = rest
        self.observer.queued(self.name, len(rest))
        return batch

    async def _collect_forever(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            if not batch:  # everything that was queued expired or was cancelled
                self._slots.release()
                continue
            self._busy += 1
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _timed_run(self, items: list[T]) -> Sequence[R]:
        """``run``, its CPU time told to the observer (onnxruntime runs a model call on
        the calling thread when it has one intra-op thread, the server's default)."""
        start = time.thread_time()
        try:
            return self.run(items)
        finally:
            self.observer.cpu(f"model:{self.name}", time.thread_time() - start)

    async def _run_batch(self, batch: list[_Entry[T, R]]) -> None:
        try:
            now = time.monotonic()
            self.observer.batch(self.name, len(batch), [now - e.queued_at for e in batch])
            loop = asyncio.get_running_loop()
            try:
                outputs = await loop.run_in_executor(self.executor, self._timed_run,
                                                     [e.item for e in batch])
                if len(outputs) != len(batch):
                    raise RuntimeError(f"{self.name}: {len(outputs)} outputs for "
                                       f"{len(batch)} inputs")
            except Exception as exc:
                log.exception("%s batch of %d failed", self.name, len(batch))
                for e in batch:
                    if not e.future.done():
                        e.future.set_exception(exc)
                return
            for e, out in zip(batch, outputs, strict=True):
                if not e.future.done():
                    e.future.set_result(out)
        finally:
            self._busy -= 1
            self._slots.release()
