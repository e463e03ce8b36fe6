"""The dynamic batcher, tested on events rather than sleeps.

A fake model call at the boundary records each batch and can be held on a
threading.Event, so a test knows exactly what is running and what is queued.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from server.api.interceptor import code_of
from server.core.metrics import Metrics
from server.errors import Overloaded, QueueTimeout
from server.pipeline.batching import Batcher, BatchLimits, deadline_var


class Model:
    """Doubles its inputs; can be held mid-call; records every batch."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.fail = False

    def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.started.set()
        self.release.wait(timeout=10)
        if self.fail:
            raise RuntimeError("model failed")
        return [x * 2 for x in items]


# The batcher's limits in these tests, where one does not set its own.
LIMITS = {"max_batch": 8, "max_wait": 0.0, "max_queue": 256, "concurrency": 2}


@pytest.fixture
def pool() -> Any:
    with ThreadPoolExecutor(4) as p:
        yield p


def batcher(model: Model, pool: ThreadPoolExecutor, metrics: Metrics | None = None,
            **limits: Any) -> Batcher[Any, Any]:
    return Batcher("embed", model, pool, BatchLimits(**{**LIMITS, **limits}),
                   key=lambda x: isinstance(x, str), observer=metrics)


async def hold_first_batch(b: Batcher[Any, Any], model: Model) -> asyncio.Task[Any]:
    """Submit one input and return once its batch is running (and held)."""
    model.release.clear()
    model.started.clear()
    first = asyncio.ensure_future(b.submit(100))
    await asyncio.get_running_loop().run_in_executor(None, model.started.wait, 10)
    return first


async def wait_queued(b: Batcher[Any, Any], n: int) -> None:
    while b.depth < n:
        await asyncio.sleep(0)


def test_concurrent_inputs_share_one_batch_and_get_their_own_outputs(pool: Any) -> None:
    model = Model()

    async def main() -> list[Any]:
        # A long wait: the batch must go as soon as it is full, not when the wait ends.
        b = batcher(model, pool, max_batch=4, max_wait=60, concurrency=1)
        return await asyncio.gather(*(b.submit(i) for i in range(4)))

    assert asyncio.run(main()) == [0, 2, 4, 6]
    assert model.batches == [[0, 1, 2, 3]]


def test_inputs_queued_while_a_batch_runs_form_the_next_batch(pool: Any) -> None:
    model = Model()

    async def main() -> None:
        b = batcher(model, pool, max_batch=8, max_wait=0, concurrency=1)
        first = await hold_first_batch(b, model)
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(5)]
        await wait_queued(b, 5)
        model.release.set()
        assert await first == 200
        assert await asyncio.gather(*rest) == [0, 2, 4, 6, 8]

    asyncio.run(main())
    assert model.batches == [[100], [0, 1, 2, 3, 4]]


def test_a_full_queue_refuses_at_once_with_resource_exhausted(pool: Any) -> None:
    model = Model()
    metrics = Metrics()

    async def main() -> None:
        b = batcher(model, pool, metrics, max_batch=8, max_wait=0, max_queue=2, concurrency=1)
        first = await hold_first_batch(b, model)
        queued = [asyncio.ensure_future(b.submit(i)) for i in range(2)]
        await wait_queued(b, 2)
        with pytest.raises(Overloaded) as err:
            await b.submit(9)
        assert code_of(err.value).name == "RESOURCE_EXHAUSTED"
        model.release.set()
        await first
        assert await asyncio.gather(*queued) == [0, 2]

    asyncio.run(main())
    assert 9 not in [x for batch in model.batches for x in batch]
    assert metrics.dropped.labels("embed", "queue_full")._value.get() == 1


def test_cancelled_inputs_are_dropped_before_inference(pool: Any) -> None:
    model = Model()

    async def main() -> None:
        b = batcher(model, pool, max_batch=8, max_wait=0, concurrency=1)
        first = await hold_first_batch(b, model)
        gone = asyncio.ensure_future(b.submit(1))
        kept = asyncio.ensure_future(b.submit(2))
        await wait_queued(b, 2)
        gone.cancel()
        model.release.set()
        await first
        assert await kept == 4

    asyncio.run(main())
    assert model.batches == [[100], [2]]


def test_inputs_whose_deadline_passed_in_the_queue_get_deadline_exceeded(pool: Any) -> None:
    model = Model()

    async def main() -> None:
        b = batcher(model, pool, max_batch=8, max_wait=0, concurrency=1)
        first = await hold_first_batch(b, model)
        deadline_var.set(time.monotonic() - 1)  # already past: expires in the queue
        expired = asyncio.ensure_future(b.submit(1))
        deadline_var.set(None)
        kept = asyncio.ensure_future(b.submit(2))
        await wait_queued(b, 2)
        model.release.set()
        await first
        with pytest.raises(QueueTimeout) as err:
            await expired
        assert code_of(err.value).name == "DEADLINE_EXCEEDED"
        assert await kept == 4

    asyncio.run(main())
    assert model.batches == [[100], [2]]


def test_every_future_of_a_failed_batch_gets_the_error(pool: Any) -> None:
    model = Model()
    model.fail = True

    async def main() -> list[Any]:
        b = batcher(model, pool, max_batch=3, max_wait=60, concurrency=1)
        return await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)

    results = asyncio.run(main())
    assert len(model.batches) == 1
    assert all(isinstance(r, RuntimeError) and str(r) == "model failed" for r in results)


def test_inputs_of_different_shapes_never_share_a_batch(pool: Any) -> None:
    model = Model()

    async def main() -> list[Any]:
        b = batcher(model, pool, max_batch=2, max_wait=60, concurrency=1)
        return await asyncio.gather(b.submit(1), b.submit("a"), b.submit(2), b.submit("b"))

    assert asyncio.run(main()) == [2, "aa", 4, "bb"]
    assert sorted(map(tuple, model.batches), key=str) == [("a", "b"), (1, 2)]


def test_batches_run_concurrently_up_to_the_limit(pool: Any) -> None:
    calls = threading.Barrier(2, timeout=10)  # passes only if two batches run at once

    def model(items: list[int]) -> list[int]:
        calls.wait()
        return items

    async def main() -> list[int]:
        b: Batcher[int, int] = Batcher("detect", model, pool,
                                       BatchLimits(**{**LIMITS, "max_batch": 1}))
        return await asyncio.gather(b.submit(1), b.submit(2))

    assert asyncio.run(main()) == [1, 2]


def test_batch_sizes_and_waits_reach_the_metrics(pool: Any) -> None:
    model = Model()
    metrics = Metrics()

    async def main() -> None:
        b = batcher(model, pool, metrics, max_batch=4, max_wait=60, concurrency=1)
        await asyncio.gather(*(b.submit(i) for i in range(4)))

    asyncio.run(main())
    text = metrics.registry.get_sample_value
    assert text("faceverify_batch_size_count", {"model": "embed"}) == 1
    assert text("faceverify_batch_size_sum", {"model": "embed"}) == 4
    assert text("faceverify_queue_wait_seconds_count", {"model": "embed"}) == 4
    assert text("faceverify_queue_depth", {"model": "embed"}) == 0


def test_close_fails_what_is_still_queued(pool: Any) -> None:
    model = Model()

    async def main() -> None:
        b = batcher(model, pool, max_batch=8, max_wait=0, concurrency=1)
        first = await hold_first_batch(b, model)
        queued = asyncio.ensure_future(b.submit(1))
        await wait_queued(b, 1)
        closing = asyncio.ensure_future(b.close())
        await asyncio.wait([queued])  # failed by close() while the first batch still runs
        with pytest.raises(Overloaded):
            await queued
        assert not closing.done()  # close() waits for the running batch
        model.release.set()
        await closing
        assert await first == 200

    asyncio.run(main())


def test_queued_inputs_are_spread_over_idle_slots(pool: Any) -> None:
    both_running = threading.Barrier(2, timeout=10)  # passes only if two batches run at once
    batches: list[list[int]] = []

    def model(items: list[int]) -> list[int]:
        batches.append(list(items))
        both_running.wait()
        return items

    async def main() -> list[int]:
        b: Batcher[int, int] = Batcher("detect", model, pool,
                                       BatchLimits(**LIMITS))
        return await asyncio.gather(*(b.submit(i) for i in range(4)))

    assert asyncio.run(main()) == [0, 1, 2, 3]
    assert sorted(batches) == [[0, 1], [2, 3]]


def test_batches_pad_to_a_few_bucket_sizes() -> None:
    from server.pipeline.batching import buckets, padded

    assert buckets(64) == [1, 2, 4, 8, 16, 32, 64] and buckets(24) == [1, 2, 4, 8, 16, 24]
    assert buckets(1) == [1]
    assert padded([1, 2, 3], 64) == [1, 2, 3, 3]
    assert padded(list(range(17)), 24) == [*range(17), *[16] * 7]
    assert padded([5], 8) == [5]
