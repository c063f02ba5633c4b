"""What reaches the journal, and when: ACK after commit, lazy RUNNING marks, coalescing."""

from __future__ import annotations

import threading
from functools import partial

import pytest
import trio
import trio.testing

from trioq.broker.config import BrokerConfig
from trioq.broker.heap import trim_after_churn
from trioq.broker.server import Broker
from trioq.job import JobSpec, JobState
from trioq.store.memory import MemoryStore

from .conftest import FakeWorker


class StateLog(MemoryStore):
    """Remembers the state each committed row carried, in commit order."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str]] = []

    def write_sync(self, rows, tasks=()) -> None:
        super().write_sync(rows, tasks)
        self.log.extend((job.id, str(job.state)) for (job,) in rows)


def make(store: MemoryStore, **cfg) -> Broker:
    return Broker(BrokerConfig(http=False, db=":memory:", **cfg), store=store, now=trio.current_time, seed=1)


async def test_running_mark_is_journaled_after_the_delay(autojump_clock, nursery):
    store = StateLog()
    broker = make(store, dispatch_mark_delay=0.05)
    await broker.start_core(nursery)
    w = await FakeWorker.connect(broker, nursery, name="w", concurrency=1, heartbeat=1.0)
    (job_id,), _ = await broker.submit([JobSpec("noop", {})])
    assert store.log == [(job_id, "queued")]  # ACK only after the commit that holds it
    d = await w.next_delivery()
    await trio.testing.wait_all_tasks_blocked()
    assert store.log == [(job_id, "queued")]  # not yet: the job may finish first
    await trio.sleep(0.2)
    assert store.log[-1] == (job_id, "running")
    assert store.get_sync(job_id).attempts == 1
    w.complete(d, "ok")
    done = await broker.wait_job(job_id)
    assert done.state is JobState.COMPLETED
    assert store.log == [(job_id, "queued"), (job_id, "running"), (job_id, "completed")]


async def test_a_job_that_ends_within_the_delay_costs_no_running_mark(autojump_clock, nursery):
    store = StateLog()
    broker = make(store, dispatch_mark_delay=0.05)
    await broker.start_core(nursery)
    w = await FakeWorker.connect(broker, nursery, name="w", concurrency=1, heartbeat=1.0)
    (job_id,), _ = await broker.submit([JobSpec("noop", {})])
    d = await w.next_delivery()
    w.complete(d, "ok")
    done = await broker.wait_job(job_id)
    await trio.sleep(1)
    assert done.attempts == 1 and store.get_sync(job_id).attempts == 1
    assert store.log == [(job_id, "queued"), (job_id, "completed")]


async def test_zero_delay_journals_running_at_dispatch(autojump_clock, nursery):
    store = StateLog()
    broker = make(store, dispatch_mark_delay=0)
    await broker.start_core(nursery)
    w = await FakeWorker.connect(broker, nursery, name="w", concurrency=1, heartbeat=1.0)
    (job_id,), _ = await broker.submit([JobSpec("noop", {})])
    await w.next_delivery()
    await trio.testing.wait_all_tasks_blocked()
    assert store.log == [(job_id, "queued"), (job_id, "running")]


async def test_heap_trims_follow_heavy_writes_and_their_end(autojump_clock, nursery):
    """The policy on the mock clock: the trim runs inline here (in a thread in the broker)."""
    rows = 0
    calls: list[float] = []

    def trim(pad: int) -> int:
        calls.append(trio.current_time())
        return 1

    async def inline(fn, *args):
        return fn(*args)

    nursery.start_soon(partial(trim_after_churn, lambda: rows, every=1.0, threshold=10, trim=trim, offload=inline))
    await trio.sleep(5.5)  # between the trimmer's ticks, at whole seconds
    assert calls == []  # nothing written: nothing to trim
    for _ in range(6):  # a burst of two rows a second: 10 rows by the tick at t=10
        rows += 2
        await trio.sleep(1)
    assert calls == [10.0]
    await trio.sleep(1)
    assert calls == [10.0, 12.0]  # at t=12 the burst had ended, with rows since the trim
    await trio.sleep(30)
    assert calls == [10.0, 12.0]  # quiet, nothing new: no more trims


async def test_the_broker_trims_its_heap_after_writes(nursery, monkeypatch):
    """Wired in (real clock, tiny interval): the first commit leads to a trim in a thread."""
    from trioq.broker import heap

    real = heap.malloc_trim
    if real is None:
        pytest.skip("not glibc: the broker has no malloc_trim to call")
    trimmed = threading.Event()
    monkeypatch.setattr(heap, "malloc_trim", lambda pad: trimmed.set() or real(pad))
    broker = make(MemoryStore(), heap_trim_rows=1, heap_trim_interval=0.01)
    await broker.start_core(nursery)
    await broker.submit([JobSpec("noop", {})])
    assert await trio.to_thread.run_sync(trimmed.wait, 30)


async def test_a_failing_trim_turns_trimming_off_and_the_broker_goes_on(autojump_clock, nursery, caplog):
    calls = 0

    def broken(pad: int) -> int:
        nonlocal calls
        calls += 1
        raise OSError("no")

    async def inline(fn, *args):
        return fn(*args)

    rows = 0
    done = trio.Event()

    async def run() -> None:
        await trim_after_churn(lambda: rows, every=1.0, threshold=1, trim=broken, offload=inline)
        done.set()

    nursery.start_soon(run)
    rows = 5
    with trio.fail_after(10):
        await done.wait()  # it returned instead of raising into the nursery
    assert calls == 1 and "heap trimming failed" in caplog.text


class _Steps(trio.abc.Instrument):
    """Counts the steps of the tasks whose name ends with ``suffix``."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.steps = 0

    def before_task_step(self, task) -> None:
        if task.name.endswith(self.suffix):
            self.steps += 1


async def test_an_idle_broker_does_not_wake_to_look_for_running_marks(autojump_clock, nursery):
    store = StateLog()
    broker = make(store, dispatch_mark_delay=0.05)
    await broker.start_core(nursery)
    w = await FakeWorker.connect(broker, nursery, name="w", concurrency=1, heartbeat=1.0)
    await trio.testing.wait_all_tasks_blocked()
    steps = _Steps("_mark_loop")
    trio.lowlevel.add_instrument(steps)
    try:
        await trio.sleep(10)
        assert steps.steps == 0  # it looked every 50 ms before: 200 steps in 10 s
        (job_id,), _ = await broker.submit([JobSpec("noop", {})])
        await w.next_delivery()
        await trio.sleep(10)
        assert store.log[-1] == (job_id, "running")  # journaled at its due time, then asleep
        assert 1 <= steps.steps <= 3
    finally:
        trio.lowlevel.remove_instrument(steps)
