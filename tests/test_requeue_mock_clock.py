"""Worker loss, leases, delays and backoff on Trio's mock clock: exact virtual times."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from trioq.broker.dispatcher import LEAVE, RetryPolicy
from trioq.broker.sessions import RequestError
from trioq.errors import ErrorCode
from trioq.job import ErrorInfo, JobSpec, JobState
from trioq.protocol.messages import Abort, Release

from .conftest import FakeWorker, memory_broker

PRIORITIES = [5, 3, 1, 3, 5]


async def lost_worker_scenario() -> tuple[float, list[tuple[int, int, int, str]]]:
    """A holds five jobs and goes silent; B must get them back in (priority, seq) order."""
    async with trio.open_nursery() as nursery:
        broker = memory_broker(heartbeat_timeout=10.0)
        await broker.start_core(nursery)
        ids, _ = await broker.submit(
            [JobSpec("slow_task", {"seconds": 1, "n": i}, priority=p) for i, p in enumerate(PRIORITIES)]
        )
        a = await FakeWorker.connect(broker, nursery, name="a", concurrency=5, heartbeat=None)
        t0 = trio.current_time()  # A's last frame (HELLO): from here, silence
        first = await a.deliveries_n(5)
        assert sorted(d.payload["n"] for d in first) == [0, 1, 2, 3, 4]
        assert all(d.attempt == 1 for d in first)
        b = await FakeWorker.connect(broker, nursery, name="b", concurrency=1, heartbeat=1.0)
        order = []
        d = await b.next_delivery()
        lost_after = trio.current_time() - t0
        for _ in range(5):
            job = broker.dispatcher.live[d.id]
            order.append((d.priority, job.seq, d.attempt, d.payload["n"]))
            assert job.worker_losses == 1
            b.complete(d, "ok")
            if len(order) < 5:
                d = await b.next_delivery()
        done = await broker.wait_job(ids[-1])
        assert done is not None and done.state is JobState.COMPLETED
        nursery.cancel_scope.cancel()
    return lost_after, order


async def test_silent_worker_loses_jobs_after_exactly_heartbeat_timeout(autojump_clock):
    lost_after, order = await lost_worker_scenario()
    assert lost_after == pytest.approx(10.0, abs=1e-9)
    # original priority and sequence: 1, then 3 (seq 2 before seq 4), then 5 (seq 1 before seq 5)
    assert [(p, n) for p, _, _, n in order] == [(1, 2), (3, 1), (3, 3), (5, 0), (5, 4)]
    assert all(attempt == 2 for _, _, attempt, _ in order)
    seqs_by_priority = {}
    for p, s, _, _ in order:
        seqs_by_priority.setdefault(p, []).append(s)
    assert all(v == sorted(v) for v in seqs_by_priority.values())


async def test_same_events_give_the_same_order(autojump_clock):
    first = await lost_worker_scenario()
    second = await lost_worker_scenario()
    assert first == second


async def test_priority_order_with_one_worker(autojump_clock, nursery):
    broker = memory_broker()
    await broker.start_core(nursery)
    for i, p in enumerate(PRIORITIES):  # one submit each, no worker connected
        await broker.submit([JobSpec("noop", {"n": i}, priority=p)])
    await trio.testing.wait_all_tasks_blocked()
    assert broker.stats()["queue_size"] == 5
    w = await FakeWorker.connect(broker, nursery, name="w", concurrency=1, heartbeat=1.0)
    ran = []
    for _ in range(5):
        d = await w.next_delivery()
        ran.append((d.priority, d.payload["n"]))
        w.complete(d)
    assert ran == [(1, 2), (3, 1), (3, 3), (5, 0), (5, 4)]


async def _a_leased_job(nursery):
    """A job with a 5 s timeout (lease: 5 s + 1.5 s grace) held by a worker that stays alive."""
    broker = memory_broker(lease_grace=1.5)
    await broker.start_core(nursery)
    w = await FakeWorker.connect(broker, nursery, name="w", concurrency=1, heartbeat=1.0)
    (job_id,), _ = await broker.submit([JobSpec("slow_task", {"seconds": 100}, timeout=5.0)])
    return broker, w, job_id, await w.next_delivery()


async def test_lease_expires_exactly_at_timeout_plus_grace(autojump_clock, nursery):
    broker, w, job_id, d = await _a_leased_job(nursery)
    t0 = trio.current_time()
    abort = await w.next_other(Abort)
    assert trio.current_time() - t0 == pytest.approx(6.5, abs=1e-9)
    assert (abort.id, abort.attempt, abort.reason) == (job_id, 1, "timeout")
    again = await w.next_delivery()  # requeued as a lost attempt, first in line
    assert (again.id, again.attempt) == (job_id, 2)
    assert trio.current_time() - t0 == pytest.approx(6.5, abs=1e-9)
    job = broker.dispatcher.live[job_id]
    assert job.worker_losses == 1
    # a late RESULT for the expired attempt is refused: it cannot overwrite anything
    w.complete(d, "late")
    w.complete(again, "on time")
    done = await broker.wait_job(job_id)
    assert done.state is JobState.COMPLETED and done.result == "on time"


async def test_a_release_of_an_older_attempt_leaves_the_current_lease_alone(autojump_clock, nursery):
    """RELEASE is fenced like RESULT: one naming another attempt ended the current attempt's
    lease, and the job could then run past its timeout forever."""
    broker, w, job_id, d = await _a_leased_job(nursery)
    t0 = trio.current_time()
    w.conn.send_nowait(Release([job_id], [d.attempt + 7]))  # not the attempt it holds
    with trio.fail_after(60):  # virtual seconds: without its lease the job never expires
        abort = await w.next_other(Abort)
    assert trio.current_time() - t0 == pytest.approx(6.5, abs=1e-9)  # the lease expired on time
    assert (abort.id, abort.attempt, abort.reason) == (job_id, 1, "timeout")
    assert broker.dispatcher.live[job_id].worker_losses == 1


async def test_delayed_job_runs_at_its_time_not_before(autojump_clock, nursery):
    broker = memory_broker()
    await broker.start_core(nursery)
    w = await FakeWorker.connect(broker, nursery, name="w", concurrency=2, heartbeat=1.0)
    t0 = trio.current_time()
    (delayed,), _ = await broker.submit([JobSpec("noop", {"k": "late"}, delay=30.0)])
    await trio.testing.wait_all_tasks_blocked()
    assert broker.dispatcher.live[delayed].state is JobState.SCHEDULED
    await trio.sleep(29.999)
    assert broker.dispatcher.live[delayed].state is JobState.SCHEDULED
    assert not w.deliveries
    d = await w.next_delivery()
    assert d.id == delayed
    assert trio.current_time() - t0 == pytest.approx(30.0, abs=1e-9)


async def test_backoff_follows_the_documented_formula(autojump_clock, nursery):
    broker = memory_broker(retry_base=2.0, retry_max=60.0, retry_jitter=0.25, seed=7)
    await broker.start_core(nursery)
    w = await FakeWorker.connect(broker, nursery, name="w", concurrency=1, heartbeat=1.0)
    (job_id,), _ = await broker.submit([JobSpec("noop", {}, max_attempts=4)])
    policy = RetryPolicy(base=2.0, factor=2.0, max_delay=60.0, jitter=0.25)
    rng = random.Random(7)
    expected = [policy.delay(n, rng) for n in (1, 2, 3)]
    # the formula itself: min(max, base * 2**(n-1)) * (1 + jitter * u), u in [0, 1)
    for n, delay in zip((1, 2, 3), expected, strict=True):
        raw = min(60.0, 2.0 * 2 ** (n - 1))
        assert raw <= delay < raw * 1.25
    gaps = []
    d = await w.next_delivery()
    for _ in range(3):
        t_fail = trio.current_time()
        w.fail(d, ErrorInfo("ValueError", "boom", "", True))
        d = await w.next_delivery()
        gaps.append(trio.current_time() - t_fail)
    assert gaps == pytest.approx(expected, abs=1e-9)
    w.fail(d, ErrorInfo("ValueError", "boom", "", True))
    dead = await broker.wait_job(job_id)
    assert dead.state is JobState.DEAD and dead.failures == 4 and dead.dead_reason == "failed"


async def test_not_retryable_error_goes_dead_at_once(autojump_clock, nursery):
    broker = memory_broker()
    await broker.start_core(nursery)
    w = await FakeWorker.connect(broker, nursery, name="w", concurrency=1, heartbeat=1.0)
    (job_id,), _ = await broker.submit([JobSpec("noop", {}, max_attempts=5)])
    d = await w.next_delivery()
    w.fail(d, ErrorInfo("Fatal", "bad input", "tb", False))
    dead = await broker.wait_job(job_id)
    assert dead.state is JobState.DEAD and dead.dead_reason == "not_retryable" and dead.failures == 1


async def test_crash_loop_ends_dead_with_worker_lost(autojump_clock, nursery):
    broker = memory_broker(max_worker_losses=3, heartbeat_timeout=5.0)
    await broker.start_core(nursery)
    (job_id,), _ = await broker.submit([JobSpec("noop", {})])
    for i in range(3):
        w = await FakeWorker.connect(broker, nursery, name=f"w{i}", concurrency=1, heartbeat=None)
        d = await w.next_delivery()
        assert d.attempt == i + 1
        with pytest.raises(trio.EndOfChannel):  # the broker drops the silent session
            await w.inbox.receive()
    dead = await broker.wait_job(job_id)
    assert dead.state is JobState.DEAD and dead.dead_reason == "worker_lost" and dead.worker_losses == 3


async def test_worker_only_gets_tasks_it_has(autojump_clock, nursery):
    broker = memory_broker()
    await broker.start_core(nursery)
    (rev,), _ = await broker.submit([JobSpec("reverse_string", {"data": "x"}, priority=1)])
    (noop,), _ = await broker.submit([JobSpec("noop", {}, priority=9)])
    only_noop = await FakeWorker.connect(broker, nursery, name="n", concurrency=4, tasks=("noop",), heartbeat=1.0)
    d = await only_noop.next_delivery()
    assert d.id == noop
    await trio.sleep(5)
    assert broker.dispatcher.live[rev].state is JobState.QUEUED  # waits for a worker that has it
    full = await FakeWorker.connect(broker, nursery, name="f", concurrency=1, tasks=("reverse_string",), heartbeat=1.0)
    assert (await full.next_delivery()).id == rev


async def test_paused_queue_dispatches_nothing_until_resumed(autojump_clock, nursery):
    broker = memory_broker()
    await broker.start_core(nursery)
    await broker.set_paused("default", True)
    w = await FakeWorker.connect(broker, nursery, name="w", concurrency=1, heartbeat=1.0)
    (job_id,), _ = await broker.submit([JobSpec("noop", {})])
    await trio.sleep(10)
    assert not w.deliveries
    await broker.set_paused("default", False)
    assert (await w.next_delivery()).id == job_id


async def test_credits_bound_what_a_worker_holds(autojump_clock, nursery):
    broker = memory_broker()
    await broker.start_core(nursery)
    await broker.submit([JobSpec("noop", {"n": i}) for i in range(10)])
    w = await FakeWorker.connect(broker, nursery, name="w", concurrency=3, heartbeat=1.0)
    first = await w.deliveries_n(3)
    await trio.sleep(5)
    assert len(w.deliveries) == 3  # no more than its concurrency without results
    w.complete(first[0])
    nxt = await w.next_delivery()
    assert nxt.payload["n"] == 3


async def test_a_worker_session_that_has_ended_is_sent_nothing_while_its_leave_waits(autojump_clock):
    """On a busy broker a session's LEAVE can wait in the dispatcher's inbox behind other
    events (it applies 10,000 of them per pump). Meanwhile the session must be sent nothing:
    its lease nursery is closed, and a job with a timeout made start_soon fail there, which
    took the whole broker down. Here the LEAVE is held back to make that window certain."""
    broker = memory_broker()
    d = broker.dispatcher
    held: list[tuple] = []
    post = d.post

    def post_holding_leaves(*event: object) -> None:
        if event[0] == LEAVE:
            held.append(event)
        else:
            post(*event)

    async with trio.open_nursery() as nursery:
        await broker.start_core(nursery)
        await broker.submit([JobSpec("noop", timeout=30)])
        w = await FakeWorker.connect(broker, nursery, name="w", concurrency=2, heartbeat=None)
        first = await w.next_delivery()
        await broker.set_paused("default", True)
        ids, _ = await broker.submit([JobSpec("noop", timeout=30)])  # waits in a paused queue
        d.post = post_holding_leaves  # type: ignore[method-assign]
        await w.conn.aclose()  # the worker goes; its session ends, its LEAVE is held back
        await trio.testing.wait_all_tasks_blocked()
        assert len(held) == 1 and not held[0][1].alive
        await broker.set_paused("default", False)  # the job is free to go, the slot has credit
        await trio.testing.wait_all_tasks_blocked()
        job = d.live[ids[0]]
        assert job.state is JobState.QUEUED and job.attempts == 0  # not sent to the ended session
        post(*held[0])  # the LEAVE arrives at last
        await trio.testing.wait_all_tasks_blocked()
        assert d.live[first.id].worker_losses == 1 and d.live[first.id].state is JobState.QUEUED
        assert job.worker_losses == 0 and not d.workers
        nursery.cancel_scope.cancel()


async def test_a_job_cancelled_while_running_is_retried_only_once_its_attempt_has_stopped(autojump_clock, nursery):
    """A sync task's thread cannot be interrupted: a retry while the cancelled attempt still
    runs could run the job twice at once. It is refused until the worker reports the stop."""
    broker = memory_broker()
    await broker.start_core(nursery)
    w = await FakeWorker.connect(broker, nursery, name="w", concurrency=2, heartbeat=1.0)
    (job_id,), _ = await broker.submit([JobSpec("slow_task", {"seconds": 100})])
    d = await w.next_delivery()
    await broker.cancel_job(job_id)
    await w.next_other(Abort)
    with pytest.raises(RequestError) as info:
        await broker.retry_job(job_id)
    assert info.value.code is ErrorCode.INVALID_STATE and "still running on worker w" in info.value.message
    w.fail(d, ErrorInfo("Cancelled", "the job was cancelled", "", False))  # the attempt has stopped
    await trio.testing.wait_all_tasks_blocked()
    assert (await broker.retry_job(job_id)).state in (JobState.QUEUED, JobState.RUNNING)
    again = await w.next_delivery()
    assert (again.id, again.attempt) == (job_id, 2)
    assert [x.id for _, x in w.deliveries].count(job_id) == 2
