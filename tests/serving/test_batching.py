"""The batcher alone: batches by size and delay, scaling, draining, errors."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from dynembed.serving.batching import Batcher


def _recording(delay: float = 0.0):
    seen = []

    def predict(examples):
        seen.append(list(examples))
        time.sleep(delay)
        return [x * 10 for x in examples]

    return predict, seen


def test_requests_are_grouped_up_to_batch_size_and_answered_in_order():
    async def main():
        predict, seen = _recording(0.05)
        batcher = Batcher(predict, batch_size=4, max_batch_delay_ms=200, workers=1)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit([i]) for i in range(10)))
        await batcher.stop()
        return results, seen

    results, seen = asyncio.run(main())
    assert results == [[i * 10] for i in range(10)]
    assert all(len(batch) <= 4 for batch in seen)
    assert sum(len(b) for b in seen) == 10 and len(seen) < 10  # batched


def test_a_lone_request_waits_at_most_the_batch_delay():
    async def main():
        predict, seen = _recording()
        batcher = Batcher(predict, batch_size=64, max_batch_delay_ms=30, workers=1)
        await batcher.start()
        result = await asyncio.wait_for(batcher.submit([1, 2]), 5)
        await batcher.stop()
        return result, seen

    result, seen = asyncio.run(main())
    assert result == [10, 20] and seen == [[1, 2]]


def test_workers_run_batches_in_parallel_and_scale():
    async def main():
        running, peak, lock = [0], [0], threading.Lock()

        def predict(examples):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.05)
            with lock:
                running[0] -= 1
            return examples

        batcher = Batcher(predict, batch_size=1, workers=1)
        await batcher.start()
        await asyncio.gather(*(batcher.submit([i]) for i in range(4)))
        single = peak[0]
        await batcher.scale(4)
        assert batcher.workers == 4
        await asyncio.gather(*(batcher.submit([i]) for i in range(8)))
        await batcher.scale(2)
        await asyncio.sleep(0.05)
        workers = batcher.workers
        await batcher.stop()
        return single, peak[0], workers

    single, peak, workers = asyncio.run(main())
    assert single == 1 and peak >= 2 and workers == 2


def test_stop_finishes_every_accepted_request():
    async def main():
        predict, _ = _recording(0.02)
        batcher = Batcher(predict, batch_size=2, max_batch_delay_ms=10, workers=1)
        await batcher.start()
        pending = [asyncio.create_task(batcher.submit([i])) for i in range(9)]
        await asyncio.sleep(0)  # queued
        await batcher.stop()
        return [task.result() for task in pending]

    assert asyncio.run(main()) == [[i * 10] for i in range(9)]


def test_a_failing_batch_fails_its_requests_only():
    async def main():
        def predict(examples):
            if "bad" in examples:
                raise RuntimeError("boom")
            return examples

        batcher = Batcher(predict, batch_size=1, workers=1)
        await batcher.start()
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(["bad"])
        ok = await batcher.submit(["good"])
        await batcher.stop()
        return ok

    assert asyncio.run(main()) == ["good"]


async def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def _gated():
    gate, seen = threading.Event(), []

    def predict(examples):
        seen.append(list(examples))
        gate.wait(10)
        return examples

    return predict, gate, seen


def test_a_batch_runs_once_as_many_examples_wait_as_in_the_previous_batch():
    async def main():
        predict, gate, seen = _gated()
        batcher = Batcher(predict, batch_size=64, max_batch_delay_ms=60_000, workers=1)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit([0]))  # an idle worker: at once
        await _until(lambda: len(seen) == 1)
        queued = [asyncio.ensure_future(batcher.submit([i])) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        gate.set()
        # 3 queued >= 1 in the previous batch: no waiting for the 60 s delay or 64 examples
        await asyncio.wait_for(asyncio.gather(first, *queued), 10)
        waiting = [asyncio.ensure_future(batcher.submit([i])) for i in (4, 5)]
        await asyncio.sleep(0.2)
        assert not any(w.done() for w in waiting) and len(seen) == 2  # 2 < 3: they wait
        waiting.append(asyncio.ensure_future(batcher.submit([6])))
        await asyncio.wait_for(asyncio.gather(*waiting), 10)
        await batcher.stop()
        return seen

    assert asyncio.run(main()) == [[0], [1, 2, 3], [4, 5, 6]]


def test_a_request_that_timed_out_in_the_queue_is_not_run():
    async def main():
        predict, gate, seen = _gated()
        batcher = Batcher(predict, batch_size=1, workers=1)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit([0]))
        await _until(lambda: len(seen) == 1)
        with pytest.raises(asyncio.TimeoutError):
            await batcher.submit([1], timeout=0.05)  # queued behind the held batch
        gate.set()
        assert await first == [0] and await batcher.submit([2]) == [2]
        await batcher.stop()
        return seen

    assert asyncio.run(main()) == [[0], [2]]


def _held_handler():
    """A handler that holds each batch until ``release`` is set; ``inside`` while it holds."""
    release, inside = threading.Event(), threading.Event()

    def predict(examples):
        inside.set()
        release.wait(60)
        inside.clear()
        return list(examples)

    return predict, release, inside


def _run_releasing(main, release: threading.Event) -> None:
    """Runs the test's ``main()``; releases the held handler whatever happens, so its
    thread never outlives the test."""
    try:
        asyncio.run(main())
    finally:
        release.set()


async def _one_held_one_queued(predict, inside):
    """A one-worker batcher with request [1] in the handler and [2] queued behind it."""
    batcher = Batcher(predict, batch_size=1, workers=1)
    await batcher.start()
    held = asyncio.ensure_future(batcher.submit([1]))
    while not inside.is_set():
        await asyncio.sleep(0.01)
    queued = asyncio.ensure_future(batcher.submit([2]))
    await asyncio.sleep(0.05)
    return batcher, held, queued


def test_stop_with_a_timeout_abandons_a_stuck_batch():
    """A handler stuck in a batch once held an unregister and the server's shutdown for as
    long as it ran: past the timeout its requests are answered as stopped and stop returns
    while the handler still runs, leaving its thread to finish on its own."""
    from dynembed.serving.batching import BatcherStopped
    predict, release, inside = _held_handler()

    async def main():
        batcher, stuck, queued = await _one_held_one_queued(predict, inside)
        await batcher.stop(timeout=0.2)
        still_inside = inside.is_set()  # stop returned before the handler did
        for request in (stuck, queued):
            with pytest.raises(BatcherStopped):
                await request
        return still_inside

    try:
        assert asyncio.run(main())
    finally:
        release.set()


def test_scaling_to_zero_answers_what_waits_and_what_comes():
    """Scaled to 0 (as TorchServe allows), queued requests once waited for a worker that
    never came."""
    from dynembed.serving.batching import NoWorkers
    predict, release, inside = _held_handler()

    async def main():
        batcher, running, queued = await _one_held_one_queued(predict, inside)
        await batcher.scale(0)
        with pytest.raises(NoWorkers):
            await queued
        with pytest.raises(NoWorkers):
            await batcher.submit([3])
        release.set()
        assert await running == [1]  # the batch in the handler finishes
        await batcher.scale(1)
        assert await batcher.submit([4]) == [4]
        await batcher.stop()

    _run_releasing(main, release)


def test_a_full_queue_refuses_at_once_and_takes_again_when_it_drains():
    from dynembed.serving.batching import QueueFull
    predict, release, inside = _held_handler()

    async def main():
        batcher = Batcher(predict, batch_size=1, workers=1, max_queued=1)
        await batcher.start()
        assert batcher.remaining_capacity == 1
        held = asyncio.ensure_future(batcher.submit([1]))
        while not inside.is_set():
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(batcher.submit([2]))
        await asyncio.sleep(0.05)
        assert (batcher.pending, batcher.remaining_capacity) == (1, 0)
        with pytest.raises(QueueFull, match="1 requests are queued"):
            await batcher.submit([3])
        release.set()
        assert (await held, await queued) == ([1], [2])
        assert await batcher.submit([4]) == [4]
        await batcher.stop()

    _run_releasing(main, release)


def test_every_worker_gets_a_thread_past_64():
    """The thread pool had 64 threads whatever the workers: with more, batches queued for a
    thread while every worker was described as ready (here they would wait for good)."""
    import threading

    workers = 70
    together = threading.Barrier(workers, timeout=20)

    def predict(batch):
        together.wait()  # returns only once all 70 batches run at the same time
        return batch

    async def main():
        batcher = Batcher(predict, batch_size=1, max_batch_delay_ms=0, workers=workers)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit([i]) for i in range(workers)))
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == [[i] for i in range(workers)]
