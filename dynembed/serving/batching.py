"""Dynamic batching: requests of one model version are grouped and run on worker threads.

Requests wait in one queue. A free worker takes a batch (whole requests, up to
``batch_size`` examples) as soon as one of these holds:

- the queue holds ``batch_size`` examples;
- the oldest request has waited ``max_batch_delay`` ms (TorchServe's rule);
- the queue holds as many examples as this worker's previous batch. Under steady load each
  batch's answers bring back about as many requests as it had, so waiting for more only
  adds the delay to every answer: at concurrency 1 a lone request runs at once, at
  concurrency 8 a batch of 8 does not wait for 64. When load rises the next batch is
  larger anyway (what arrived while the previous batch ran), so batches grow back.

It runs the handler on one thread of the model's pool (torch and dynembed's kernels release
the GIL, so workers overlap) and gives each request its slice of the results. Workers sleep
on a future of their own and are woken only when a batch is due, not for every request.
Scaling adds or stops workers; stopping drains what was accepted. A request whose caller
gave up (timeout) before its batch started is not run.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

MAX_WORKERS = 1024
"""Most workers one model version may have (each is a task on the event loop, and a thread
while it runs a batch)."""
STOP_WAIT_S = 30.0
"""Longest a scale-down waits for the workers it stops to finish their batch."""


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())


def _log_failure(task: asyncio.Task) -> None:
    """A worker that died of an error (a bug: handler errors go to the requests) says so."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("a batching worker stopped on an error", exc_info=task.exception())


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class NoWorkers(RuntimeError):
    """The batcher is scaled to 0 workers: nothing would take a request (TorchServe lets a
    model be registered or scaled to 0 and answers 503 until it is scaled up)."""


class BatcherStopped(RuntimeError):
    """The batcher takes no more requests: its model version is being unregistered."""


class QueueFull(RuntimeError):
    """The batcher's queue holds its limit of requests (TorchServe's ``job_queue_size``):
    the request is refused at once instead of waiting behind a backlog it would time out
    in."""


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
        batch_size: most examples per batch (>= 1); a request with more runs alone.
        max_batch_delay_ms: most time a request waits for its batch to fill.
        workers: worker count (>= 0; with 0, :meth:`submit` raises :class:`NoWorkers`).
        on_batch: called with :class:`BatchStats` after every batch.
        max_queued: most requests waiting for a worker (None: no limit); past it
            :meth:`submit` raises :class:`QueueFull`.
    """

    def __init__(self, predict, *, batch_size: int = 1, max_batch_delay_ms: float = 0.0,
                 workers: int = 1, on_batch=None, max_queued: int | None = None) -> None:
        self.predict = predict
        self.batch_size, self.max_batch_delay_ms = batch_size, max_batch_delay_ms
        self.max_queued = max_queued
        self.on_batch = on_batch
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_examples = 0
        # sleeping workers: (their wake-up, the queued examples that make a batch due)
        self._sleeping: list[tuple[asyncio.Future, int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []
        self._pool: ThreadPoolExecutor | None = None
        self._target = workers
        self._draining = False
        self._stopped = False
        self._abandoned = False  # a stop left a stuck batch's thread running

    @property
    def workers(self) -> int:
        return len([t for t in self._tasks if not t.done()])

    @property
    def pending(self) -> int:
        """Requests waiting for a worker."""
        return len(self._queue)

    @property
    def remaining_capacity(self) -> int | None:
        """Requests the queue takes before it is full (None: no limit)."""
        return None if self.max_queued is None else max(0, self.max_queued - len(self._queue))

    async def start(self) -> None:
        """Starts the workers (in the running event loop)."""
        self._loop = asyncio.get_running_loop()
        # threads start as batches need them: one per busy worker (64 once capped them, so
        # workers past 64 only queued while described as ready)
        self._pool = ThreadPoolExecutor(max_workers=MAX_WORKERS,
                                        thread_name_prefix="dynembed-model")
        await self.scale(self._target)

    async def scale(self, workers: int) -> None:
        """Sets the worker count and returns once it holds: workers stopped finish their
        current batch first, and this waits for them, up to :data:`STOP_WAIT_S` (so a
        synchronous scale-down reports the count it made, not workers still finishing)."""
        self._tasks = [t for t in self._tasks if not t.done()]
        self._target = workers
        while len(self._tasks) < workers:
            task = self._loop.create_task(self._work())
            task.add_done_callback(_log_failure)
            self._tasks.append(task)
        if len(self._tasks) > workers:
            self._wake_all()  # the ones to stop notice at the top of their loop
        if workers == 0:  # nothing will take what waits: answer it now, as new requests
            self._fail_queued(NoWorkers("the batcher was scaled to 0 workers"))
        # a later scale may have changed the target meanwhile: then this one is done too;
        # and a batch that never ends (a hung model) must not hold the caller for good
        deadline = time.monotonic() + STOP_WAIT_S
        while (self.workers > self._target and self._target == workers
               and time.monotonic() < deadline):
            await asyncio.sleep(0.005)

    def _fail_queued(self, error: Exception) -> None:
        """Answers every request still waiting for a worker with ``error``."""
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():
                request.future.set_exception(error)
        self._queued_examples = 0

    async def submit(self, examples: list, timeout: float | None = None) -> list:
        """Queues a request's examples and waits for their results.

        Raises:
            BatcherStopped: :meth:`stop` has begun (its workers would never take it).
            NoWorkers: the batcher is scaled to 0 workers.
            QueueFull: ``max_queued`` requests already wait.
            asyncio.TimeoutError: no result within ``timeout`` seconds.
            Exception: whatever the handler raised for the batch.
        """
        if self._draining:
            raise BatcherStopped("the batcher is stopping")
        if self._target == 0:
            raise NoWorkers("the batcher has 0 workers")
        if self.max_queued is not None and len(self._queue) >= self.max_queued:
            raise QueueFull(f"{len(self._queue)} requests are queued")
        future = self._loop.create_future()
        self._queue.append(_Request(examples, future))
        self._queued_examples += len(examples)
        if self._sleeping:
            self._wake_one()
        if timeout is None:
            return await future
        # one timer per request (asyncio.wait_for would start a task per request)
        timer = self._loop.call_later(timeout, _expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    async def stop(self, timeout: float | None = None) -> None:
        """Finishes every accepted request, then stops the workers and their threads.

        Args:
            timeout: seconds to wait for the accepted requests (None: as long as they
                take). Past it, a batch still in the handler is abandoned: its requests get
                :class:`BatcherStopped`, and its thread is left to finish on its own, so a
                stuck handler cannot hold up an unregister or a shutdown.

        Stopping again does nothing (a server gives up on stuck batches at its graceful
        timeout, then stops every batcher at its lifespan shutdown).
        """
        if self._loop is None or self._stopped:
            return
        self._draining = True
        self._wake_all()
        pending = set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            logger.warning("%d batch(es) still in the handler after %.1f s; their requests "
                           "were answered as stopped and their threads left to finish",
                           len(pending), timeout)
        self._tasks = []
        self._fail_queued(BatcherStopped("the batcher stopped"))  # behind an abandoned batch
        # no stop (this one, or one running beside it) may wait here for the thread of an
        # abandoned batch: it may never end
        self._abandoned = self._abandoned or bool(pending)
        self._stopped = True
        self._pool.shutdown(wait=not self._abandoned, cancel_futures=True)

    # ------------------------------------------------------------------ workers
    def _wake_one(self) -> None:
        """Wakes a sleeping worker for which the queue now holds a batch."""
        for i, (future, enough) in enumerate(self._sleeping):
            if self._queued_examples >= enough:
                del self._sleeping[i]
                _wake(future)
                return

    def _wake_all(self) -> None:
        sleeping, self._sleeping = self._sleeping, []
        for future, _ in sleeping:
            _wake(future)

    async def _sleep(self, enough: int, deadline: float | None = None) -> None:
        """Waits until the queue holds ``enough`` examples, a stop or a scale, or until
        ``deadline`` (``time.perf_counter`` seconds)."""
        future = self._loop.create_future()
        entry = (future, enough)
        self._sleeping.append(entry)
        timer = None
        if deadline is not None:
            timer = self._loop.call_later(max(0.0, deadline - time.perf_counter()), _wake,
                                          future)
        try:
            await future
        finally:
            if timer is not None:
                timer.cancel()
            if entry in self._sleeping:
                self._sleeping.remove(entry)

    def _due(self, enough: int) -> float | None:
        """None if a batch should run now, else the time (perf_counter) it will be due."""
        if self._draining or self._queued_examples >= enough:
            return None
        deadline = self._queue[0].enqueued + self.max_batch_delay_ms / 1000
        return None if deadline <= time.perf_counter() else deadline

    def _take(self) -> list[_Request]:
        batch, size = [], 0
        while self._queue and (not batch or size + len(self._queue[0].examples)
                               <= self.batch_size):
            request = self._queue.popleft()
            self._queued_examples -= len(request.examples)
            if request.future.done():  # timed out while queued: nobody waits for it
                continue
            batch.append(request)
            size += len(request.examples)
        return batch

    async def _work(self) -> None:
        previous = 0  # examples in this worker's previous batch
        while True:
            if self.workers > self._target and not self._draining:
                self._tasks.remove(asyncio.current_task())
                return
            if not self._queue:
                if self._draining:
                    return
                await self._sleep(1)
                continue
            enough = min(self.batch_size, max(previous, 1))
            due = self._due(enough)
            if due is not None:
                await self._sleep(enough, due)
                continue
            batch = self._take()
            if batch:
                previous = sum(len(r.examples) for r in batch)
                await self._run(batch)

    async def _run(self, batch: list[_Request]) -> None:
        started = time.perf_counter()
        examples = [e for request in batch for e in request.examples]
        try:
            results = await self._loop.run_in_executor(self._pool, self.predict, examples)
        except asyncio.CancelledError:  # abandoned by stop(timeout): nobody will answer
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(BatcherStopped("the batcher stopped"))
            raise
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
