"""Dynamic batching: one consumer task groups queued items and runs them in worker threads.

Modelled on Ray Serve's batcher: one future per item, the batch window timed from the first
arrival, cancelled items dropped before their batch runs, every future resolved exactly once
(also when the batch raises).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """The queue has no room for the items; the caller should retry later."""


class BatcherStopped(Exception):
    """The batcher is stopping or stopped and takes no more items."""


class BatchFailed(Exception):
    """The batch holding this item raised; the message names the original exception."""


@dataclass(frozen=True)
class Done(Generic[R]):
    """One item's result and where its time went."""

    value: R
    queue_s: float  # from submit to the start of its batch
    run_s: float  # the batch's run time
    batch_size: int


@dataclass(frozen=True)
class BatchStats:
    """What the batcher reports after each batch (for metrics)."""

    size: int
    queue_s: tuple[float, ...]  # per item
    run_s: float
    failed: bool


@dataclass(eq=False)
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[Done[R]]
    enqueued: float = field(default_factory=time.monotonic)


class Batcher(Generic[T, R]):
    """Queue items, run them ``max_batch_size`` at a time in worker threads.

    ``run_batch(items) -> results`` (same length, same order) runs in a worker thread, so the
    event loop stays free. When no batch runs the batch window stays open ``max_wait_s`` after
    the first arrival, but only while ``incoming()`` says more items are on their way (the
    caller's count of items about to be submitted, such as uploads still being decoded): a
    lone item runs at once. When the worker was busy, whatever queued meanwhile runs at once.

    With ``lanes`` > 1, up to that many batches run at once, each with ``run_lane`` (the
    backend's share of the CPU for one lane), as long as there is more work than one batch: a
    batch that would run alone (nothing else running, queued or on its way) still gets
    ``run_batch`` and the machine to itself, and no other batch starts until it ends. A
    lone request keeps the latency of one batch on every core; under load the lanes overlap
    one batch's inference with the next one's, instead of one batch's threads waiting on
    each other. ``run_batch`` and ``run_lane`` are plain attributes, so tests can wrap them.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        incoming: Callable[[], int] | None = None,
        lanes: int = 1,
        run_lane: Callable[[list[T]], Sequence[R]] | None = None,
    ):
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if max_queue < max_batch_size:
            raise ValueError(
                f"max_queue ({max_queue}) must be >= max_batch_size ({max_batch_size})"
            )
        self.run_batch = run_batch
        self.run_lane = run_lane if run_lane is not None else run_batch
        self.lanes = lanes
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        # None: nothing is known of arrivals, so the window always stays open its full time.
        self.incoming = incoming
        self._queue: deque[_Pending[T, R]] = deque()
        self._arrived = asyncio.Event()
        self._closed = False
        self._consumer: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="inference")
        self._running: set[Future] = set()  # batches handed to the worker threads
        self._lane_tasks: set[asyncio.Task[None]] = set()
        self._lane_freed = asyncio.Event()

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (not counting the batch that runs)."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._consumer is not None and not self._consumer.done() and not self._closed

    @property
    def busy(self) -> bool:
        """A batch runs in a worker thread (also one that ``stop`` gave up waiting for)."""
        return any(not future.done() for future in list(self._running))

    def has_room(self, n: int) -> bool:
        return len(self._queue) + n <= self.max_queue

    def start(self) -> None:
        if self._consumer is not None:
            raise RuntimeError("batcher already started")
        self._consumer = asyncio.get_running_loop().create_task(self._consume(), name="batcher")

    def submit(self, items: Sequence[T]) -> list[asyncio.Future[Done[R]]]:
        """Queue all ``items`` or none; return one future per item.

        Raises ``QueueFull`` when they do not all fit and ``BatcherStopped`` once ``stop`` ran.
        Cancelling a future (or the task awaiting it) takes its item out of the queue.
        """
        if self._closed or self._consumer is None:
            raise BatcherStopped("the batcher is not running")
        if not self.has_room(len(items)):
            raise QueueFull(
                f"queue holds {len(self._queue)} of {self.max_queue} images; "
                f"no room for {len(items)} more"
            )
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            pending: _Pending[T, R] = _Pending(item, loop.create_future())
            pending.future.add_done_callback(lambda f, p=pending: self._forget(p))
            self._queue.append(pending)
            futures.append(pending.future)
        self._arrived.set()
        return futures

    async def stop(self, timeout_s: float | None = None) -> None:
        """Take no more items, run those already queued, then end the consumer.

        After ``timeout_s`` (``None``: no limit) the items still waiting or running are failed
        with ``BatcherStopped`` instead; a batch already in a worker thread cannot be
        interrupted and is left to finish there (``busy`` says whether it still runs).
        """
        self._closed = True
        self._arrived.set()
        if self._consumer is not None and not self._consumer.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._consumer), timeout_s)
            except asyncio.TimeoutError:
                logger.warning("stop: gave up waiting for the batches after %g s", timeout_s)
                self._consumer.cancel()  # fails the running batch and the queue: see _run
                with contextlib.suppress(asyncio.CancelledError):
                    await self._consumer
        self._executor.shutdown(wait=False)

    def _forget(self, pending: _Pending[T, R]) -> None:
        # A cancelled item leaves the queue at once, so it neither runs nor holds a slot.
        if pending.future.cancelled():
            with contextlib.suppress(ValueError):  # already taken into a batch
                self._queue.remove(pending)

    async def _consume(self) -> None:
        try:
            while batch := await self._next_batch():
                if self._alone():
                    await self._run(batch, self.run_batch)
                    continue
                task = asyncio.get_running_loop().create_task(self._run(batch, self.run_lane))
                self._lane_tasks.add(task)
                task.add_done_callback(self._lane_done)
                while len(self._lane_tasks) >= self.lanes:
                    self._lane_freed.clear()
                    await self._lane_freed.wait()
            await asyncio.gather(*self._lane_tasks)
        finally:
            # Cancelled (stop gave up waiting): the lanes fail their batches, as _run does.
            for task in list(self._lane_tasks):
                task.cancel()
            await asyncio.gather(*self._lane_tasks, return_exceptions=True)
            # Items are left only if stop() gave up waiting or the loop broke: answer them.
            while self._queue:
                _fail(
                    self._queue.popleft().future,
                    BatcherStopped("the service stopped before this request ran"),
                )

    def _alone(self) -> bool:
        """Would the batch just taken run alone: no lane running, nothing queued or coming?"""
        if self.lanes == 1:
            return True
        coming = self.incoming() if self.incoming is not None else 0
        return not self._lane_tasks and not self._queue and coming <= 0

    def _lane_done(self, task: asyncio.Task[None]) -> None:
        self._lane_tasks.discard(task)
        self._lane_freed.set()

    async def _next_batch(self) -> list[_Pending[T, R]]:
        """Wait for work, keep the window open, then take up to ``max_batch_size`` live items.

        Returns an empty list only when stopped and empty.
        """
        while True:
            while not self._queue:
                if self._closed:
                    return []
                self._arrived.clear()
                await self._arrived.wait()
            # Timed from the first arrival: if the worker was busy it has already passed.
            window_end = self._queue[0].enqueued + self.max_wait_s
            while len(self._queue) < self.max_batch_size and not self._closed:
                if self.incoming is not None and self.incoming() <= 0:
                    break  # nothing more on its way: waiting would only add latency
                remaining = window_end - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = []
            while self._queue and len(batch) < self.max_batch_size:
                pending = self._queue.popleft()
                if not pending.future.done():
                    batch.append(pending)
            if batch:
                return batch

    async def _run(
        self, batch: list[_Pending[T, R]], run: Callable[[list[T]], Sequence[R]]
    ) -> None:
        started = time.monotonic()
        queue_s = tuple(started - p.enqueued for p in batch)
        failed = False
        try:
            running = self._executor.submit(run, [p.item for p in batch])
            self._running.add(running)  # until the thread is done, also after a cancel
            running.add_done_callback(self._running.discard)
            results = await asyncio.wrap_future(running)
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)}")
        except asyncio.CancelledError:
            for p in batch:
                _fail(p.future, BatcherStopped("the service stopped before this batch finished"))
            raise
        except Exception as exc:
            failed = True
            logger.exception("batch of %d failed", len(batch))
            error = BatchFailed(f"inference failed for this batch ({type(exc).__name__})")
            for p in batch:
                _fail(p.future, error)
        else:
            run_s = time.monotonic() - started
            for p, value, waited in zip(batch, results, queue_s, strict=True):
                if not p.future.done():  # its client may have left while the batch ran
                    p.future.set_result(Done(value, waited, run_s, len(batch)))
        if self.on_batch is not None:
            stats = BatchStats(len(batch), queue_s, time.monotonic() - started, failed)
            try:
                self.on_batch(stats)
            except Exception:
                logger.exception("on_batch callback failed")


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
