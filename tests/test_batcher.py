"""The batcher on its own: batching, the window, the queue bound, cancellation, failures, stop.

The worker is held by a ``threading.Event`` (``run_batch`` runs in a thread), and tests wait
for events, never for time to pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from functools import partial

import pytest

from app.batcher import Batcher, BatcherStopped, BatchFailed, BatchStats, Done, QueueFull

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


class Worker:
    """A ``run_batch`` that doubles its items, records each batch, and can be held."""

    def __init__(self, fail_on: object = None):
        self.batches: list[list[int]] = []
        self.fail_on = fail_on
        self.entered = threading.Event()
        self.released = threading.Event()
        self.released.set()

    def hold(self) -> None:
        self.entered.clear()
        self.released.clear()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        assert self.released.wait(timeout=20)
        if self.fail_on in items:
            raise RuntimeError("boom")
        return [2 * x for x in items]

    async def wait_held(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10)


def make(
    worker: Worker, max_batch_size=4, max_wait_s=0.0, max_queue=8, stats=None, incoming=None
) -> Batcher:
    on_batch = stats.append if stats is not None else None
    batcher = Batcher(worker, max_batch_size, max_wait_s, max_queue, on_batch, incoming)
    batcher.start()
    return batcher


async def test_single_item_is_answered_with_timings():
    stats: list[BatchStats] = []
    batcher = make(Worker(), stats=stats)
    [future] = batcher.submit([21])
    done = await future
    assert isinstance(done, Done) and done.value == 42 and done.batch_size == 1
    assert done.queue_s >= 0 and done.run_s >= 0
    assert [s.size for s in stats] == [1] and not stats[0].failed
    await batcher.stop()


async def test_items_waiting_while_the_worker_is_busy_form_one_batch():
    worker, stats = Worker(), []
    batcher = make(worker, max_batch_size=4, max_queue=16, stats=stats)
    worker.hold()
    first = batcher.submit([0])
    await worker.wait_held()
    rest = batcher.submit(list(range(1, 10)))  # 9 items: batches of 4, 4, 1
    assert batcher.queue_depth == 9
    worker.released.set()
    results = await asyncio.gather(*first, *rest)
    assert [d.value for d in results] == [2 * x for x in range(10)]  # in submission order
    assert worker.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert [s.size for s in stats] == [1, 4, 4, 1]
    await batcher.stop()


async def test_a_full_batch_runs_without_waiting_for_the_window():
    worker = Worker()
    batcher = make(worker, max_batch_size=3, max_wait_s=60.0)  # the timeout mark is 30 s
    futures = batcher.submit([1, 2, 3])
    assert [d.value for d in await asyncio.gather(*futures)] == [2, 4, 6]
    assert worker.batches == [[1, 2, 3]]
    await batcher.stop()


async def test_the_window_collects_items_that_arrive_after_the_first():
    worker = Worker()
    batcher = make(worker, max_batch_size=8, max_wait_s=60.0)
    a = batcher.submit([1])
    b = batcher.submit([2, 3])
    await batcher.stop()  # stopping closes the window and runs what is queued
    assert [d.value for d in await asyncio.gather(*a, *b)] == [2, 4, 6]
    assert worker.batches == [[1, 2, 3]]


async def test_a_lone_item_runs_at_once_when_nothing_else_is_coming():
    worker = Worker()
    batcher = make(worker, max_batch_size=8, max_wait_s=60.0, incoming=lambda: 0)
    [future] = batcher.submit([5])
    assert (await future).value == 10  # long before the 60 s window (the timeout mark is 30)
    assert worker.batches == [[5]]
    await batcher.stop()


async def test_the_window_waits_for_items_said_to_be_coming():
    worker, coming = Worker(), [1]
    batcher = make(worker, max_batch_size=8, max_wait_s=60.0, incoming=lambda: coming[0])
    first = batcher.submit([1])
    for _ in range(5):
        await asyncio.sleep(0)  # the consumer gets turns: it must keep the window open
    assert worker.batches == []
    coming[0] = 0
    second = batcher.submit([2])  # the announced item arrives; nothing more is coming
    assert [d.value for d in await asyncio.gather(*first, *second)] == [2, 4]
    assert worker.batches == [[1, 2]]
    await batcher.stop()


async def test_a_full_queue_refuses_all_or_nothing():
    worker = Worker()
    batcher = make(worker, max_batch_size=2, max_queue=4)
    worker.hold()
    running = batcher.submit([0])
    await worker.wait_held()
    queued = batcher.submit([1, 2, 3])
    with pytest.raises(QueueFull):
        batcher.submit([4, 5])  # only one slot left: neither item is queued
    assert batcher.queue_depth == 3 and batcher.has_room(1) and not batcher.has_room(2)
    queued += batcher.submit([4])
    worker.released.set()
    assert [d.value for d in await asyncio.gather(*running, *queued)] == [0, 2, 4, 6, 8]
    await batcher.stop()


async def test_cancelled_items_are_dropped_before_their_batch_runs():
    worker = Worker()
    batcher = make(worker, max_batch_size=4)
    worker.hold()
    running = batcher.submit([0])
    await worker.wait_held()
    gone, kept = batcher.submit([1, 2])
    gone.cancel()
    await asyncio.sleep(0)  # one loop turn: done-callbacks run then
    assert batcher.queue_depth == 1  # the slot is free before any batch runs
    worker.released.set()
    assert (await kept).value == 4 and (await running[0]).value == 0
    assert worker.batches == [[0], [2]]
    await batcher.stop()


async def test_an_exception_fails_only_its_own_batch():
    worker, stats = Worker(fail_on=13), []
    batcher = make(worker, max_batch_size=2, stats=stats)
    worker.hold()
    first = batcher.submit([13])
    await worker.wait_held()
    second = batcher.submit([1, 2])
    worker.released.set()
    with pytest.raises(BatchFailed, match="RuntimeError"):
        await first[0]
    assert [d.value for d in await asyncio.gather(*second)] == [2, 4]
    assert [s.failed for s in stats] == [True, False]
    assert (await batcher.submit([5])[0]).value == 10  # and it keeps serving
    await batcher.stop()


async def test_a_wrong_number_of_results_fails_the_batch():
    batcher = make(Worker())
    batcher.run_batch = lambda items: []
    with pytest.raises(BatchFailed):
        await batcher.submit([1])[0]
    await batcher.stop()


async def test_stop_finishes_queued_items_then_refuses_new_ones():
    worker = Worker()
    batcher = make(worker, max_batch_size=2)
    worker.hold()
    futures = batcher.submit([1])
    await worker.wait_held()
    futures += batcher.submit([2, 3, 4])
    stopping = asyncio.create_task(batcher.stop())
    await asyncio.sleep(0)
    with pytest.raises(BatcherStopped):
        batcher.submit([5])
    worker.released.set()
    await stopping
    assert [d.value for d in await asyncio.gather(*futures)] == [2, 4, 6, 8]
    assert not batcher.running


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_every_future_is_resolved_exactly_once(seed):
    """Random submissions, cancellations and failing batches: each future ends in one state."""
    rng = random.Random(seed)
    worker = Worker(fail_on=-1)
    batcher = make(worker, max_batch_size=3, max_queue=6)
    submitted: list[tuple[asyncio.Future, int]] = []
    for _ in range(60):
        items = [rng.choice([-1, 1, 2, 3]) for _ in range(rng.randint(1, 3))]
        with contextlib.suppress(QueueFull):
            submitted += zip(batcher.submit(items), items, strict=True)
        assert batcher.queue_depth <= 6
        if submitted and rng.random() < 0.2:
            rng.choice(submitted)[0].cancel()
        await asyncio.sleep(0)
    await batcher.stop()
    for future, item in submitted:
        assert future.done()
        if future.cancelled():
            continue
        if future.exception() is None:
            assert future.result().value == 2 * item and item != -1
        else:
            assert isinstance(future.exception(), BatchFailed)
    assert batcher.queue_depth == 0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(Worker(), 0, 0.0, 4)
    with pytest.raises(ValueError, match="max_queue"):
        Batcher(Worker(), 8, 0.0, 4)


# ---- lanes: several batches at once ----------------------------------------------------------


class LaneWorker:
    """Doubles its items in ``run(kind, items)``, recording each call and how many overlap;
    every call waits inside until ``released`` is set."""

    def __init__(self):
        self.calls: list[tuple[str, list[int]]] = []
        self.inside = 0
        self.most_inside = 0
        self.released = threading.Event()
        self._changed = threading.Condition()

    def run(self, kind: str, items: list[int]) -> list[int]:
        with self._changed:
            self.calls.append((kind, list(items)))
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self._changed.notify_all()
        assert self.released.wait(timeout=20)
        with self._changed:
            self.inside -= 1
        return [2 * x for x in items]

    async def wait_inside(self, n: int) -> None:
        def wait() -> bool:
            with self._changed:
                return self._changed.wait_for(lambda: self.inside >= n, timeout=10)

        assert await asyncio.to_thread(wait)


def make_lanes(worker: LaneWorker, lanes=2, max_batch_size=2, incoming=None) -> Batcher:
    batcher = Batcher(
        partial(worker.run, "alone"), max_batch_size, 0.0, 16, incoming=incoming,
        lanes=lanes, run_lane=partial(worker.run, "lane"),
    )  # fmt: skip
    batcher.start()
    return batcher


async def test_queued_work_runs_on_as_many_lanes_as_there_are_and_no_more():
    worker = LaneWorker()
    batcher = make_lanes(worker, lanes=2, max_batch_size=2)
    futures = batcher.submit([1, 2, 3, 4, 5, 6])  # three batches' worth
    await worker.wait_inside(2)
    for _ in range(5):
        await asyncio.sleep(0)  # the consumer gets turns: the third batch must wait for a lane
    assert worker.inside == 2 and batcher.queue_depth == 2 and batcher.busy
    worker.released.set()
    assert [d.value for d in await asyncio.gather(*futures)] == [2, 4, 6, 8, 10, 12]
    assert worker.most_inside == 2
    assert worker.calls[:2] == [("lane", [1, 2]), ("lane", [3, 4])]
    assert worker.calls[2][1] == [5, 6]  # alone or in a lane, by when the others finished
    await batcher.stop()
    assert not batcher.busy


async def test_a_batch_with_nothing_else_to_do_runs_alone_and_holds_off_the_next():
    worker = LaneWorker()
    batcher = make_lanes(worker, lanes=2, incoming=lambda: 0)
    first = batcher.submit([1])
    await worker.wait_inside(1)
    second = batcher.submit([2])  # arrives while the first runs alone: it waits its turn
    for _ in range(5):
        await asyncio.sleep(0)
    assert worker.inside == 1 and batcher.queue_depth == 1
    worker.released.set()
    assert [d.value for d in await asyncio.gather(*first, *second)] == [2, 4]
    assert worker.calls == [("alone", [1]), ("alone", [2])]
    assert worker.most_inside == 1
    await batcher.stop()


async def test_items_on_their_way_send_a_batch_to_a_lane():
    worker = LaneWorker()
    coming = [1]
    batcher = make_lanes(worker, lanes=2, max_batch_size=1, incoming=lambda: coming[0])
    first = batcher.submit([1])  # a full batch (max 1) while another item is announced
    await worker.wait_inside(1)
    coming[0] = 0
    second = batcher.submit([2])
    await worker.wait_inside(2)  # the second did not wait for the first
    worker.released.set()
    assert [d.value for d in await asyncio.gather(*first, *second)] == [2, 4]
    assert worker.calls == [("lane", [1]), ("lane", [2])]
    await batcher.stop()


async def test_stop_that_gives_up_fails_every_running_lane():
    worker = LaneWorker()
    batcher = make_lanes(worker, lanes=2, max_batch_size=1)
    futures = batcher.submit([1, 2, 3])
    await worker.wait_inside(2)
    await batcher.stop(timeout_s=0.05)
    for future in futures:
        with pytest.raises(BatcherStopped):
            await future
    assert batcher.busy  # both threads still run their abandoned batches
    worker.released.set()


def test_lanes_must_be_positive():
    with pytest.raises(ValueError, match="lanes"):
        Batcher(Worker(), 4, 0.0, 8, lanes=0)
