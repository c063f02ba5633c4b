"""A graceful shutdown (SIGTERM's path) on the mock clock: running jobs get their grace, what
still runs is handed back in line, and every open request gets an answer, not a cut connection."""

from __future__ import annotations

from functools import partial

import pytest
import trio
import trio.testing

import trioq
from trioq.broker.server import BrokerHandle
from trioq.job import JobState
from trioq.protocol.messages import Drain, Error

from .conftest import FakeWorker, memory_broker, memory_connect


async def failure_of(call, into: list[BaseException]) -> None:
    """Runs ``call()``, keeping the TrioqError it raises, if any."""
    try:
        await call()
    except trioq.TrioqError as exc:
        into.append(exc)


async def started(nursery):
    broker = memory_broker()
    await broker.start_core(nursery)
    return broker


def client(broker, nursery) -> trioq.Client:
    # reconnect_timeout=0: what the broker answers, not a client that connects again
    return trioq.Client(connect=memory_connect(broker, nursery), reconnect_timeout=0)


async def start_worker(broker, nursery, name: str = "w", **kw) -> trioq.Worker:
    w = trioq.Worker(connect=memory_connect(broker, nursery), name=name, **kw)
    await nursery.start(w.run)
    await trio.testing.wait_all_tasks_blocked()
    return w


async def test_running_jobs_finish_within_the_grace_and_their_waits_are_answered(autojump_clock, nursery):
    broker = memory_broker()
    await broker.start_core(nursery)
    w = await start_worker(broker, nursery, concurrency=2)
    results: list[trioq.Job] = []
    async with client(broker, nursery) as c:

        async def run_slow() -> None:
            results.append(await c.run("slow_task", {"seconds": 5}))

        nursery.start_soon(run_slow)
        await trio.testing.wait_all_tasks_blocked()
        assert broker.dispatcher.n_running == 1
        t0 = trio.current_time()
        async with trio.open_nursery() as stopping:
            stopping.start_soon(broker.shutdown, 30.0)
            await trio.testing.wait_all_tasks_blocked()
            assert broker.stats()["stopping"] is True
            # Accepted and stored while the broker winds down, but not dispatched: the
            # worker has a free slot and gets nothing more.
            later = await c.submit("noop")
            await trio.testing.wait_all_tasks_blocked()
            assert (await c.get_job(later)).state is JobState.QUEUED
        took = trio.current_time() - t0
        assert 4.9 < took < 6  # the job's 5 s, not the 30 s grace
        assert [j.state for j in results] == [JobState.COMPLETED]
        assert broker.dispatcher.n_running == 0
        assert w.statistics().completed == 1
        queued = broker.dispatcher.live[later]
        assert queued.state is JobState.QUEUED and queued.attempts == 0
        with pytest.raises(trioq.BrokerShuttingDown):  # the connection was closed, and said why
            await c.get_job(later)


async def test_jobs_still_running_after_the_grace_go_back_in_line_and_their_waiters_are_told(autojump_clock, nursery):
    broker = memory_broker()
    await broker.start_core(nursery)
    w = await start_worker(broker, nursery, concurrency=1)
    async with client(broker, nursery) as c:
        first = await c.submit("slow_task", {"seconds": 100}, priority=3)
        behind = await c.submit("slow_task", {"seconds": 1}, priority=3)  # behind it: concurrency 1
        await trio.testing.wait_all_tasks_blocked()
        assert broker.dispatcher.live[first].state is JobState.RUNNING
        errors: list[BaseException] = []
        nursery.start_soon(failure_of, partial(c.result, first), errors)
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        await broker.shutdown(grace=2.0)
        assert 1.9 < trio.current_time() - t0 < 3
        await trio.testing.wait_all_tasks_blocked()
    assert len(errors) == 1 and isinstance(errors[0], trioq.BrokerShuttingDown)
    assert first in str(errors[0]) and "shutting down" in str(errors[0])
    job = broker.dispatcher.live[first]
    # handed back as a worker's own RELEASE would be: no failure, no worker loss
    assert job.state is JobState.QUEUED and job.attempts == 1
    assert job.failures == 0 and job.worker_losses == 0 and job.worker is None
    assert broker.dispatcher.n_running == 0
    # back in line at its own place, ahead of the job that was behind it
    assert [j.id for j in broker.dispatcher.queued_jobs()] == [first, behind]
    assert w.statistics().running == 0  # the worker was told to abort it


async def test_waits_are_answered_at_once_when_no_job_runs_and_new_connections_are_refused(autojump_clock, nursery):
    broker = memory_broker()
    await broker.start_core(nursery)
    async with client(broker, nursery) as waiting, client(broker, nursery) as idle:
        queued = await waiting.submit("noop")  # no worker: it waits in line
        outcome: list[BaseException] = []
        nursery.start_soon(failure_of, partial(waiting.result, queued), outcome)
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        await broker.shutdown()
        assert trio.current_time() - t0 < 0.1  # nothing ran: no grace to wait out
        await trio.testing.wait_all_tasks_blocked()
        assert len(outcome) == 1 and isinstance(outcome[0], trioq.BrokerShuttingDown)
        assert "stays stored" in str(outcome[0])
        with pytest.raises(trioq.BrokerShuttingDown, match="shutting_down"):
            await idle.status()
        assert broker._closers == {}
    with pytest.raises(trioq.RemoteError) as refused:
        async with client(broker, nursery):
            pass
    assert refused.value.code == "shutting_down"
    assert broker.dispatcher.live[queued].state is JobState.QUEUED


async def test_a_worker_is_told_to_quiet_then_that_the_broker_shuts_down(autojump_clock, nursery):
    """Raw frames: the worker sees DRAIN(quiet), its result is still taken, and then the
    connection ends with a fatal shutting_down."""
    broker = memory_broker()
    await broker.start_core(nursery)
    worker = await FakeWorker.connect(broker, nursery, name="fake")
    async with client(broker, nursery) as c:
        job_id = await c.submit("noop")
        d = await worker.next_delivery()
        assert d.id == job_id
        async with trio.open_nursery() as stopping:
            stopping.start_soon(broker.shutdown, 10.0)
            drain = await worker.next_other(Drain)
            assert drain.stop is False  # quiet: a remote worker must stay up for the restart
            worker.complete(d, "done")
            last = await worker.next_other(Error)
        assert (last.code, last.fatal) == ("shutting_down", True)
        assert (await broker.get_job(job_id)).state is JobState.COMPLETED


async def test_a_submit_and_wait_sent_during_the_grace_is_stored_then_answered_shutting_down(autojump_clock, nursery):
    broker = memory_broker()
    await broker.start_core(nursery)
    await start_worker(broker, nursery, concurrency=1)
    async with client(broker, nursery) as c:
        running = await c.submit("slow_task", {"seconds": 4})
        await trio.testing.wait_all_tasks_blocked()
        got: list[object] = []

        async def submit_and_wait() -> None:
            try:
                got.append(await c.run("noop"))
            except trioq.TrioqError as exc:
                got.append(exc)

        async with trio.open_nursery() as stopping:
            stopping.start_soon(broker.shutdown, 10.0)
            await trio.testing.wait_all_tasks_blocked()
            stopping.start_soon(submit_and_wait)
        assert len(got) == 1 and isinstance(got[0], trioq.BrokerShuttingDown)
        assert (await broker.get_job(running)).state is JobState.COMPLETED
    stored = [j for j in broker.dispatcher.live.values() if j.task == "noop"]
    assert len(stored) == 1 and stored[0].state is JobState.QUEUED


async def test_a_second_shutdown_waits_for_the_first(autojump_clock, nursery):
    broker = await started(nursery)
    w = trioq.Worker(connect=memory_connect(broker, nursery), name="w")
    await nursery.start(w.run)
    async with trioq.Client(connect=memory_connect(broker, nursery), reconnect_timeout=0) as c:
        job_id = await c.submit("slow_task", {"seconds": 5})
        await trio.testing.wait_all_tasks_blocked()
        assert broker.dispatcher.n_running == 1
        async with trio.open_nursery() as stopping:
            stopping.start_soon(broker.shutdown, 30.0)
            await trio.testing.wait_all_tasks_blocked()
            await broker.shutdown(30.0)  # e.g. BrokerHandle.shutdown from a second task
            # the promise of shutdown(): the running job has reported (or was handed back)
            assert broker.dispatcher.n_running == 0, "second shutdown() returned mid-grace"
    assert (await broker.get_job(job_id)).state is trioq.JobState.COMPLETED


async def test_a_second_handle_shutdown_does_not_cut_the_grace(autojump_clock, nursery):
    with trio.CancelScope() as everything:
        async with trio.open_nursery() as serving:
            broker = await started(serving)
            handle = BrokerHandle(broker, "127.0.0.1", 0, None, serving.cancel_scope)
            w = trioq.Worker(connect=memory_connect(broker, nursery), name="w")
            await nursery.start(w.run)
            async with trioq.Client(connect=memory_connect(broker, nursery), reconnect_timeout=0) as c:
                job_id = await c.submit("slow_task", {"seconds": 5})
                await trio.testing.wait_all_tasks_blocked()
                serving.start_soon(handle.shutdown, 30.0)
                await trio.testing.wait_all_tasks_blocked()
                serving.start_soon(handle.shutdown, 30.0)  # SIGTERM handler + an operator's call
    assert not everything.cancelled_caught
    job = broker.dispatcher.live.get(job_id) or broker._recent.get(job_id)
    # within the 30 s grace the 5 s job reports; the broker was cut before it could
    assert job is not None and job.state is trioq.JobState.COMPLETED, job and job.state


async def test_a_request_still_waiting_when_the_wind_down_ends_is_answered_shutting_down(autojump_clock, nursery):
    """A SUBMIT waiting for room under --max-queued (it may wait 30 s) when the broker stops:
    after the 3 s wind-down it is answered, not cut, and says its jobs may be stored."""
    broker = memory_broker(max_queued=1)
    await broker.start_core(nursery)
    async with client(broker, nursery) as c:
        await c.submit("noop")  # no worker: the queue is full
        errors: list[BaseException] = []
        nursery.start_soon(failure_of, partial(c.submit, "noop"), errors)
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        await broker.shutdown()
        assert 2.9 < trio.current_time() - t0 < 4  # the wind-down, not the 30 s wait for room
        await trio.testing.wait_all_tasks_blocked()
    assert len(errors) == 1 and isinstance(errors[0], trioq.BrokerShuttingDown)
    assert "before answering this submit" in str(errors[0]) and "may be stored" in str(errors[0])
