"""What reaches the journal, and when: ACK after commit, lazy RUNNING marks, coalescing."""

from __future__ import annotations

import trio
import trio.testing

from trioq.broker.config import BrokerConfig
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
