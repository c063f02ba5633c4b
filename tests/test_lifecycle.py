"""A job's whole life with the real Worker and Client, over memory streams, on the mock clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import trioq
from trioq.job import JobState
from trioq.protocol.messages import Submit, WaitJob
from trioq.worker.registry import Fatal, Registry

from .conftest import memory_broker, memory_connect


async def flaky(ctx) -> str:
    """Fails for good on its first attempt, succeeds on any later one."""
    if ctx.attempt == 1:
        raise Fatal("first attempt always fails")
    return f"ok on attempt {ctx.attempt}"


def registry() -> Registry:
    reg = Registry()
    reg.register_task("flaky", flaky)
    return reg


async def start_worker(broker, nursery, name: str, **kw) -> trioq.Worker:
    w = trioq.Worker(connect=memory_connect(broker, nursery), registry=registry(), name=name, **kw)
    await nursery.start(w.run)
    await trio.testing.wait_all_tasks_blocked()  # the dispatcher has handled the join
    assert name in {s.name for s in broker.dispatcher.workers.values()}
    return w


async def started_broker(nursery, **cfg):
    broker = memory_broker(**cfg)
    await broker.start_core(nursery)
    return broker


def client(broker, nursery) -> trioq.Client:
    return trioq.Client(connect=memory_connect(broker, nursery))


async def test_cancel_a_queued_job_it_never_runs(autojump_clock, nursery):
    broker = await started_broker(nursery)
    async with client(broker, nursery) as c:
        doomed = await c.submit("slow_task", {"seconds": 1})
        assert (await c.get_job(doomed)).state is JobState.QUEUED
        cancelled = await c.cancel(doomed)
        assert cancelled.state is JobState.CANCELLED
        with pytest.raises(trioq.RemoteError) as info:
            await c.cancel(doomed)  # once is enough
        assert info.value.code == "invalid_state"
        w = await start_worker(broker, nursery, "w")
        other = await c.submit("noop")
        assert (await c.result(other, timeout=10)).state is JobState.COMPLETED
        job = await c.get_job(doomed)
        assert job.state is JobState.CANCELLED and job.attempts == 0 and job.worker is None
        assert w.statistics().completed == 1 and w.statistics().failed == 0
        assert broker.stats()["jobs"]["cancelled"] == 1


async def test_cancel_a_running_job_stops_it_on_the_worker(autojump_clock, nursery):
    broker = await started_broker(nursery)
    w = await start_worker(broker, nursery, "w", concurrency=1)
    async with client(broker, nursery) as c:
        slow = await c.submit("slow_task", {"seconds": 30})
        await trio.testing.wait_all_tasks_blocked()
        assert (await c.get_job(slow)).state is JobState.RUNNING
        assert w.statistics().running == 1
        t0 = trio.current_time()
        assert (await c.cancel(slow)).state is JobState.CANCELLED
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() - t0 < 1  # nobody waited for the 30 s task
        assert w.statistics().running == 0  # its cancel scope was cancelled
        slot = next(iter(broker.dispatcher.workers.values()))
        assert slot.held == {}  # and the worker's report released the lease
        nxt = await c.submit("noop", {"n": 1})
        done = await c.result(nxt, timeout=10)
        assert done.state is JobState.COMPLETED and done.worker == "w"
        final = await c.get_job(slow)
        assert final.state is JobState.CANCELLED and final.result is None  # the "Cancelled" report overwrote nothing
        assert trio.current_time() - t0 < 1


async def test_worker_side_timeout_fails_the_attempt_and_retries(autojump_clock, nursery):
    broker = await started_broker(nursery, retry_base=1.0, retry_jitter=0.1)
    await start_worker(broker, nursery, "w")
    async with client(broker, nursery) as c:
        t0 = trio.current_time()
        jid = await c.submit("slow_task", {"seconds": 30}, timeout=0.5, max_attempts=2)
        await trio.sleep(0.75)  # first attempt timed out at 0.5; the retry waits out its backoff
        between = await c.get_job(jid)
        assert between.state is JobState.SCHEDULED and between.failures == 1 and between.attempts == 1
        assert between.error.type == "TimeoutError"
        job = await c.result(jid, timeout=60)
        elapsed = trio.current_time() - t0
    assert job.state is JobState.DEAD and job.dead_reason == "failed"
    assert job.attempts == 2 and job.failures == 2 and job.worker_losses == 0
    assert job.error.type == "TimeoutError" and "0.5s" in job.error.message
    # 0.5 s, a backoff of 1 s * (1 + 0.1 u), 0.5 s: far from the task's 30 s
    assert 2.0 <= elapsed < 2.1 + 1e-9


async def test_idempotency_key(autojump_clock, nursery):
    broker = await started_broker(nursery)
    async with client(broker, nursery) as c:
        first = await c.submit("noop", {"n": 1}, idempotency_key="order-7")
        again = await c.submit("noop", {"n": 2}, idempotency_key="order-7")
        assert again == first
        assert broker.stats()["jobs"]["queued"] == 1
        other = await c.submit("noop", {"n": 3}, idempotency_key="order-8")
        assert other != first
        await start_worker(broker, nursery, "w")
        done = await c.result(first, timeout=10)
        assert done.state is JobState.COMPLETED and done.payload == {"n": 1}
        fresh = await c.submit("noop", {"n": 4}, idempotency_key="order-7")
        assert fresh not in (first, other)  # the key is free once its job finished
        assert (await c.result(fresh, timeout=10)).payload == {"n": 4}


async def test_named_queues(autojump_clock, nursery):
    broker = await started_broker(nursery)
    high = await start_worker(broker, nursery, "high-only", queues=("high",))
    async with client(broker, nursery) as c:
        plain = await c.submit("noop", {"q": "default"}, priority=1)
        urgent = await c.submit("noop", {"q": "high"}, queue="high", priority=9)
        done = await c.result(urgent, timeout=10)
        assert done.worker == "high-only" and done.queue == "high"
        await trio.sleep(5)
        assert (await c.get_job(plain)).state is JobState.QUEUED  # nobody serves "default" yet
        assert high.statistics().completed == 1
        await start_worker(broker, nursery, "default")
        assert (await c.result(plain, timeout=10)).worker == "default"


async def test_retry_and_discard_dead_jobs(autojump_clock, nursery):
    broker = await started_broker(nursery)
    await start_worker(broker, nursery, "w")
    async with client(broker, nursery) as c:
        jid = await c.submit("flaky", max_attempts=3)
        dead = await c.result(jid, timeout=10)
        assert dead.state is JobState.DEAD and dead.dead_reason == "not_retryable" and dead.attempts == 1
        with pytest.raises(trioq.RemoteError) as info:
            await c.discard(await c.submit("slow_task", {"seconds": 100}))
        assert info.value.code == "invalid_state"
        back = await c.retry(jid)
        assert back.state in (JobState.QUEUED, JobState.RUNNING)  # the worker may have it already
        assert back.failures == 0 and back.dead_reason is None
        done = await c.result(jid, timeout=10)
        assert done.state is JobState.COMPLETED and done.result == "ok on attempt 2"
        assert done.attempts == 2 and done.failures == 0 and done.error is None
        with pytest.raises(trioq.RemoteError) as info:
            await c.retry(jid)  # completed jobs are not retried
        assert info.value.code == "invalid_state"

        bad = await c.submit("flaky")
        assert (await c.result(bad, timeout=10)).state is JobState.DEAD
        dead_before = broker.stats()["jobs"]["dead"]
        assert (await c.discard(bad)).id == bad
        with pytest.raises(trioq.JobNotFound):
            await c.get_job(bad)
        with pytest.raises(trioq.JobNotFound):
            await c.retry(bad)
        assert broker.stats()["jobs"]["dead"] == dead_before - 1


async def test_concurrent_retries_of_one_dead_job_run_it_once(nursery, tmp_path):
    """Two admins retry the same dead job at once: it is put back in line once, and runs once."""
    db = str(tmp_path / "q.db")
    async with trio.open_nursery() as first_life:
        broker = await started_broker(first_life, db=db)
        await start_worker(broker, first_life, "w0")
        async with client(broker, first_life) as c:
            jid = await c.submit("flaky")
            assert (await c.result(jid, timeout=10)).state is JobState.DEAD
        first_life.cancel_scope.cancel()
    # a restarted broker reads the dead job from the SQLite file, in a thread: both
    # requests see it dead before either of them acts
    broker = await started_broker(nursery, db=db)
    w = await start_worker(broker, nursery, "w")
    async with client(broker, nursery) as c:
        outcomes = []

        async def retry() -> None:
            try:
                outcomes.append((await c.retry(jid)).state.value)
            except trioq.RemoteError as exc:
                outcomes.append(exc.code)

        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(retry)
                n.start_soon(retry)
        assert len(outcomes) == 2 and "invalid_state" in outcomes, outcomes
        # the retry was answered once committed: the file no longer says dead
        assert broker.store.get_sync(jid).state is not JobState.DEAD
        done = await c.result(jid, timeout=10)
        assert done.state is JobState.COMPLETED and done.attempts == 2
        other = await c.submit("noop")  # the worker is free again, and ran the job only once
        assert (await c.result(other, timeout=10)).state is JobState.COMPLETED
        assert w.statistics().completed == 2
        jobs = broker.stats()["jobs"]
        assert (jobs["queued"], jobs["running"], jobs["dead"], jobs["completed"]) == (0, 0, 0, 2)


async def test_progress_is_visible_while_running(autojump_clock, nursery):
    broker = await started_broker(nursery)
    await start_worker(broker, nursery, "w")
    async with client(broker, nursery) as c:
        jid = await c.submit("slow_task", {"seconds": 10})
        t0 = trio.current_time()
        await trio.sleep(3.5)  # slow_task reports every tenth of its run: 1 s, 2 s, 3 s
        job = await c.get_job(jid)
        assert job.state is JobState.RUNNING
        assert job.progress is not None
        assert job.progress.value == pytest.approx(0.3) and job.progress.message == "slept 3.0s"
        done = await c.result(jid, timeout=60)
        assert done.result == "slept 10s" and done.progress.value == pytest.approx(1.0)
        assert trio.current_time() - t0 == pytest.approx(10.0)


async def test_backpressure_holds_the_fourth_submit(autojump_clock, nursery):
    broker = await started_broker(nursery, max_queued=3)
    await start_worker(broker, nursery, "w", concurrency=1)
    async with client(broker, nursery) as c:
        t0 = trio.current_time()
        first = [await c.submit("slow_task", {"seconds": 5}) for _ in range(3)]
        assert trio.current_time() == t0  # room for three: acknowledged at once
        acked = []

        async def fourth() -> None:
            acked.append((await c.submit("noop"), trio.current_time() - t0))

        async with trio.open_nursery() as n:
            n.start_soon(fourth)
            await trio.sleep(4.9)
            assert acked == []  # still held back
            assert broker.stats()["jobs"]["queued"] + broker.stats()["jobs"]["running"] == 3
        (jid, at), = acked
        assert at == pytest.approx(5.0)  # the moment the first job finished
        assert (await c.get_job(first[0])).state is JobState.COMPLETED
        assert (await c.result(jid, timeout=60)).state is JobState.COMPLETED
        # a producer is not held forever: with no room for 30 s the answer is "busy"
        [await c.submit("slow_task", {"seconds": 100}) for _ in range(3)]
        t1 = trio.current_time()
        with pytest.raises(trioq.RemoteError) as info:
            await c.submit("noop")
        assert info.value.code == "busy" and trio.current_time() - t1 == pytest.approx(30.0)


async def test_room_wakes_every_submit_waiting_for_it(autojump_clock, nursery):
    """Room for all of them: every waiting SUBMIT goes on at once, not one of them and the
    others after their 30 s."""
    broker = await started_broker(nursery, max_queued=10)
    async with client(broker, nursery) as c:
        first = await c.submit_many([trioq.JobSpec("noop", queue="held") for _ in range(10)])  # full
        took: list[float] = []

        async def producer() -> None:
            t0 = trio.current_time()
            await c.submit("noop", queue="held")
            took.append(trio.current_time() - t0)

        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(producer)
            await trio.sleep(1)
            assert took == []  # all three wait for room
            for job_id in first[:5]:  # room for five
                await c.cancel(job_id)
        assert took == [pytest.approx(1.0)] * 3


async def test_submits_read_together_stay_within_max_queued(autojump_clock, nursery):
    """Jobs being committed count against the limit: 30 SUBMITs of 10 sent at once under a
    limit of 25 store 30 jobs (the limit passed by at most one batch), the rest answered busy."""
    broker = await started_broker(nursery, max_queued=25)
    accepted: list[int] = []
    busy: list[str] = []
    async with client(broker, nursery) as c:

        async def batch() -> None:
            try:
                accepted.append(len(await c.submit_many([trioq.JobSpec("noop", queue="held") for _ in range(10)])))
            except trioq.RemoteError as exc:
                busy.append(exc.code)

        async with trio.open_nursery() as n:
            for _ in range(30):
                n.start_soon(batch)
    assert accepted == [10, 10, 10] and busy == ["busy"] * 27
    assert len(broker.dispatcher.live) == 30 and broker.dispatcher.reserved == 0


async def test_result_timeout_raises_timeout_error(autojump_clock, nursery):
    broker = await started_broker(nursery)
    await start_worker(broker, nursery, "w")
    async with client(broker, nursery) as c:
        jid = await c.submit("noop", queue="nobody-serves-this")
        t0 = trio.current_time()
        with pytest.raises(TimeoutError, match=jid):
            await c.result(jid, timeout=5)
        assert trio.current_time() - t0 == pytest.approx(5.0)
        assert (await c.get_job(jid)).state is JobState.QUEUED
        ok = await c.submit("noop")  # the connection is still usable
        assert (await c.result(ok, timeout=5)).state is JobState.COMPLETED


async def test_graceful_stop_finishes_what_fits_and_hands_back_the_rest(autojump_clock, nursery):
    broker = await started_broker(nursery)
    a = trioq.Worker(connect=memory_connect(broker, nursery), registry=registry(), name="a", concurrency=2, grace=5)
    a_done = trio.Event()

    async def run_a(task_status=trio.TASK_STATUS_IGNORED) -> None:
        await a.run(task_status=task_status)
        a_done.set()

    await nursery.start(run_a)
    async with client(broker, nursery) as c:
        short = await c.submit("slow_task", {"seconds": 2})
        long = await c.submit("slow_task", {"seconds": 30})
        await trio.testing.wait_all_tasks_blocked()
        assert a.statistics().running == 2
        t0 = trio.current_time()
        a.request_stop()
        await start_worker(broker, nursery, "b")
        s = await c.result(short, timeout=60)
        assert s.state is JobState.COMPLETED and s.worker == "a"
        assert trio.current_time() - t0 == pytest.approx(2.0)
        with trio.fail_after(10):
            await a_done.wait()  # a exits once the grace is over
        assert trio.current_time() - t0 == pytest.approx(5.0)
        assert a.statistics().released == 1
        job = await c.get_job(long)
        assert job.state is JobState.RUNNING and job.worker == "b" and job.attempts == 2
        done = await c.result(long, timeout=60)
        assert done.state is JobState.COMPLETED and done.worker == "b"
        assert trio.current_time() - t0 == pytest.approx(35.0)
        assert done.failures == 0 and done.worker_losses == 0 and done.error is None
        assert broker.dispatcher.requeued == 1 and broker.dispatcher.failed == 0


async def test_a_retried_job_is_named_by_its_idempotency_key_again(autojump_clock, nursery):
    broker = memory_broker()
    await broker.start_core(nursery)
    (first,), _ = await broker.submit([trioq.JobSpec("noop", queue="held", idempotency_key="order-7")])
    await broker.cancel_job(first)
    await broker.retry_job(first)
    assert await broker.submit([trioq.JobSpec("noop", idempotency_key="order-7")]) == ([first], [True])
    # A newer job that took the key while the first was finished keeps it through a retry.
    await broker.cancel_job(first)
    (newer,), _ = await broker.submit([trioq.JobSpec("noop", queue="held", idempotency_key="order-7")])
    await broker.retry_job(first)
    assert newer != first
    assert await broker.submit([trioq.JobSpec("noop", idempotency_key="order-7")]) == ([newer], [True])


async def test_the_purge_removes_everything_past_the_ttl_in_one_run(autojump_clock, nursery):
    """In chunks of 10,000 (one transaction each), not one chunk per interval: that fell
    behind any broker finishing more than 10,000 jobs a minute."""
    broker = memory_broker(result_ttl=100.0, purge_interval=60.0)
    await broker.start_core(nursery)
    n = 20_050  # two chunks and a bit
    ids: list[str] = []
    for i in range(0, n, 10_000):
        ids += (await broker.submit([trioq.JobSpec("noop", queue="held") for _ in range(min(10_000, n - i))]))[0]
    await broker._call(lambda: [broker.dispatcher.cancel_nowait(job_id) for job_id in ids])
    await trio.sleep(100)  # past the TTL by the purge after this one
    assert len(broker.store.list_sync(state=JobState.CANCELLED, limit=n + 1).jobs) == n
    (fresh,), _ = await broker.submit([trioq.JobSpec("noop", queue="held")])
    await broker.cancel_job(fresh)  # finished at 100 s: kept by the purge at 120 s
    await trio.sleep(30)  # the purge at 120 s
    assert [j.id for j in broker.store.list_sync(limit=10).jobs] == [fresh]
    # the counts follow what the purge removed, exactly
    assert broker.stats()["jobs"]["cancelled"] == 1
    assert broker.dispatcher.finished[("noop", "cancelled")] == 1


async def test_a_result_that_times_out_ends_its_wait_on_the_broker_too(autojump_clock, nursery):
    """Polling a long job with short timeouts: each wait ends on the broker at its timeout,
    so the polls never use up the connection's waits (they were refused busy after max_waits)."""
    broker = memory_broker(max_waits=5)
    await broker.start_core(nursery)
    async with client(broker, nursery) as c:
        job_id = await c.submit("noop", queue="held")  # nobody serves it
        for _ in range(10):
            t0 = trio.current_time()
            with pytest.raises(TimeoutError, match="did not finish within 1"):
                await c.result(job_id, timeout=1)
            assert trio.current_time() - t0 == pytest.approx(1.0)  # the broker's answer, at once
        await trio.testing.wait_all_tasks_blocked()
        assert not broker._waiters.get(job_id)
        with pytest.raises(trioq.RemoteError) as info:  # a timeout must be a number of seconds
            await c._request(WaitJob(99, job_id, -1.0))
        assert info.value.code == "invalid_field"
        # the same for a SUBMIT with wait: refused before anything is stored, the session goes on
        with pytest.raises(trioq.RemoteError) as info:
            await c._request(Submit(98, [trioq.JobSpec("noop", queue="held")], wait=True, wait_timeout=-1.0))
        assert info.value.code == "invalid_field" and "wait_timeout must be" in info.value.message
        assert len(broker.dispatcher.live) == 1 and (await c.get_job(job_id)).id == job_id


async def test_a_run_that_times_out_ends_its_wait_on_the_broker_too(autojump_clock, nursery):
    """Client.run(result_timeout=) tells the broker the timeout with its SUBMIT: each timed-out
    run's wait ends there at once, so runs never use up the connection's waits."""
    broker = memory_broker(max_waits=3)
    await broker.start_core(nursery)
    async with client(broker, nursery) as c:
        for _ in range(6):
            t0 = trio.current_time()
            with pytest.raises(TimeoutError, match="did not finish within 1"):
                await c.run("noop", queue="held", result_timeout=1)
            assert trio.current_time() - t0 == pytest.approx(1.0)
        await trio.testing.wait_all_tasks_blocked()
        assert not any(broker._waiters.values())
        assert len(broker.dispatcher.live) == 6  # the jobs go on; only the waits ended
