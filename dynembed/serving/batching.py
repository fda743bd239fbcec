"""Dynamic batching: requests of one model version are grouped and run on worker threads.

Each worker is a coroutine that takes the first waiting request, then keeps taking more
until the batch holds ``batch_size`` examples or ``max_batch_delay`` ms have passed, and
runs the handler on one thread of the model's pool (torch and dynembed's kernels release
the GIL, so workers overlap). Under low load it does not wait: a request that finds the
queue empty right after a batch of one request runs at once (at concurrency 1 waiting
only adds the delay to every answer); as soon as requests meet in the queue, batches
fill again. Results go back to each request's future. Scaling adds or
stops workers; stopping drains what was accepted.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

_STOP = object()


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())


@dataclass
class _Request:
    examples: list
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """What a batch did, for metrics."""

    size: int
    requests: int
    queue_s: list[float]
    run_s: float


class Batcher:
    """Runs a handler's ``predict`` on batches of requests.

    Args:
        predict: examples -> one result per example (called on a worker thread).
        batch_size: most examples per batch (>= 1).
        max_batch_delay_ms: most time the first request of a batch waits for more.
        workers: worker count (>= 1).
        on_batch: called with :class:`BatchStats` after every batch.
    """

    def __init__(self, predict, *, batch_size: int = 1, max_batch_delay_ms: float = 0.0,
                 workers: int = 1, on_batch=None) -> None:
        self.predict = predict
        self.batch_size, self.max_batch_delay_ms = batch_size, max_batch_delay_ms
        self.on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []
        self._pool: ThreadPoolExecutor | None = None
        self._target = workers

    @property
    def workers(self) -> int:
        return len([t for t in self._tasks if not t.done()])

    @property
    def pending(self) -> int:
        """Requests waiting for a worker."""
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        """Starts the workers (in the running event loop)."""
        self._queue = asyncio.Queue()
        self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="dynembed-model")
        await self.scale(self._target)

    async def scale(self, workers: int) -> None:
        """Sets the worker count; workers stopped finish their current batch first."""
        self._tasks = [t for t in self._tasks if not t.done()]
        self._target = workers
        while len(self._tasks) < workers:
            self._tasks.append(asyncio.create_task(self._work()))
        for _ in range(len(self._tasks) - workers):
            await self._queue.put(_STOP)

    async def submit(self, examples: list, timeout: float | None = None) -> list:
        """Queues a request's examples and waits for their results.

        Raises:
            asyncio.TimeoutError: no result within ``timeout`` seconds.
            Exception: whatever the handler raised for the batch.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put_nowait(_Request(examples, future))  # unbounded: never blocks
        if timeout is None:
            return await future
        # one timer per request (asyncio.wait_for would start a task per request)
        timer = loop.call_later(timeout, _expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    async def stop(self) -> None:
        """Finishes every accepted request, then stops the workers and their threads."""
        if self._queue is None:
            return
        for _ in self._tasks:
            await self._queue.put(_STOP)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._pool.shutdown(wait=True)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        last = 0  # requests in this worker's previous batch
        while True:
            first = await self._queue.get()
            if first is _STOP:
                return
            batch, size, stop = [first], len(first.examples), False
            deadline = loop.time() + self.max_batch_delay_ms / 1000
            while size < self.batch_size:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    wait = deadline - loop.time()
                    if wait <= 0 or (len(batch) == 1 and last == 1):
                        break  # a lone request after a lone request: low load, run it now
                    try:
                        item = await asyncio.wait_for(self._queue.get(), wait)
                    except asyncio.TimeoutError:
                        break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
                size += len(item.examples)
            last = len(batch)
            await self._run(batch, loop)
            if stop:
                return

    async def _run(self, batch: list[_Request], loop) -> None:
        started = time.perf_counter()
        examples = [e for request in batch for e in request.examples]
        try:
            results = await loop.run_in_executor(self._pool, self.predict, examples)
        except Exception as e:  # noqa: BLE001 - the batch's requests get the error
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(e)
            return
        start = 0
        for request in batch:
            n = len(request.examples)
            if not request.future.done():
                request.future.set_result(results[start:start + n])
            start += n
        if self.on_batch is not None:
            self.on_batch(BatchStats(len(examples), len(batch),
                                     [started - r.enqueued for r in batch],
                                     time.perf_counter() - started))
