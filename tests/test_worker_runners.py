"""A worker runs its jobs in a few long-lived runner tasks instead of a task per job.

What must hold: jobs that block still all start at once, up to the concurrency; jobs
that never block run back to back in one task; a job aborted or handed back while it
waited in line never starts.
"""

from __future__ import annotations

import contextvars
import threading
import time

import pytest
import trio
import trio.testing

import trioq
from trioq.job import JobState
from trioq.protocol.framing import FramedConnection
from trioq.protocol.messages import PROTOCOL_VERSION, Delivery, Result, Welcome
from trioq.worker.builtin import register_builtins
from trioq.worker.registry import Registry

from .conftest import memory_broker, memory_connect


async def run_all(nursery, reg: Registry, specs, concurrency: int, **broker_config) -> list[trioq.Job]:
    broker = memory_broker(**broker_config)
    await broker.start_core(nursery)
    worker = trioq.Worker(connect=memory_connect(broker, nursery), registry=reg, name="w", concurrency=concurrency)
    await nursery.start(worker.run)
    async with trioq.Client(connect=memory_connect(broker, nursery)) as c:
        ids = await c.submit_many(specs)
        with trio.fail_after(600):
            return [await c.result(i, timeout=600) for i in ids]


async def test_blocking_jobs_start_together_up_to_the_concurrency(nursery, autojump_clock):
    starts: list[float] = []
    running = 0
    most = 0

    async def hold() -> None:
        nonlocal running, most
        starts.append(trio.current_time())
        running += 1
        most = max(most, running)
        await trio.sleep(10)
        running -= 1

    reg = Registry()
    reg.register_task("hold", hold)
    jobs = await run_all(nursery, reg, [trioq.JobSpec("hold") for _ in range(12)], concurrency=5)
    assert [j.state for j in jobs] == [JobState.COMPLETED] * 12
    assert most == 5
    # Waves of five, each started in the same instant: no job waited for the clock to start.
    t0 = starts[0]
    assert [round(t - t0) for t in starts] == [0] * 5 + [10] * 5 + [20] * 2


async def test_jobs_that_never_block_share_a_few_tasks(nursery):
    tasks: list[object] = []

    async def quick(i: int) -> int:
        tasks.append(trio.lowlevel.current_task())
        return i

    reg = Registry()
    reg.register_task("quick", quick)
    jobs = await run_all(nursery, reg, [trioq.JobSpec("quick", {"i": i}) for i in range(300)], concurrency=64)
    assert [j.result for j in jobs] == list(range(300))
    assert len(tasks) == 300
    assert len(set(map(id, tasks))) <= 8  # a task per job would be 300


class Outbox:
    """Stands in for the connection: what the worker would send."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def send_nowait(self, msg: object) -> None:
        self.sent.append(msg)


async def test_a_job_aborted_or_handed_back_while_in_line_never_starts():
    ran: list[str] = []
    reg = Registry()
    reg.register_task("mark", lambda name: ran.append(name))
    worker = trioq.Worker(connect=lambda: None, registry=reg, builtins=False, name="w")
    conn = Outbox()

    aborted = trio.CancelScope()
    worker._running["a"] = (1, aborted)
    aborted.cancel()  # ABORT arrived while the job waited for a runner
    await worker._run_job(conn, Delivery("a", 1, "mark", {"name": "a"}, "default", 5), aborted)
    (result,) = conn.sent
    assert isinstance(result, Result)
    assert [(o.id, o.ok, o.error.type) for o in result.outcomes] == [("a", False, "Cancelled")]

    # handed back (RELEASE sent, no longer held) before a runner took it: nothing runs or is sent
    await worker._run_job(conn, Delivery("b", 1, "mark", {"name": "b"}, "default", 5), trio.CancelScope())
    assert len(conn.sent) == 1
    assert ran == []
    assert worker._running == {}


async def test_a_job_that_outlives_its_lease_does_not_hold_up_the_jobs_sent_in_its_place(nursery, autojump_clock):
    """The broker counts a job past its lease as gone and sends more: they must start, not
    wait in line behind it until their own leases run out and they die of worker losses."""

    async def stubborn() -> None:
        with trio.CancelScope(shield=True):  # a cleanup that must not be interrupted
            await trio.sleep(30)

    async def quick(i: int) -> int:
        return i

    reg = Registry()
    reg.register_task("stubborn", stubborn)
    reg.register_task("quick", quick)
    specs = [trioq.JobSpec("stubborn", timeout=1)] + [trioq.JobSpec("quick", {"i": i}, timeout=1) for i in range(3)]
    stuck, *quick_jobs = await run_all(nursery, reg, specs, concurrency=1)
    assert [(j.state, j.result, j.worker_losses) for j in quick_jobs] == [(JobState.COMPLETED, i, 0) for i in range(3)]
    assert all(j.finished_at < 30 for j in quick_jobs)
    assert stuck.state is JobState.DEAD and stuck.dead_reason == "worker_lost"


async def test_an_attempt_that_ends_after_its_successor_arrived_leaves_the_successor_alone(nursery, autojump_clock):
    runs: list[tuple[str, int]] = []

    async def slow_first(ctx) -> int:
        runs.append(("start", ctx.attempt))
        if ctx.attempt == 1:
            with trio.CancelScope(shield=True):  # outlives its lease: attempt 2 arrives meanwhile
                await trio.sleep(2.5)
        runs.append(("end", ctx.attempt))
        return ctx.attempt

    reg = Registry()
    reg.register_task("slow_first", slow_first)
    (job,) = await run_all(nursery, reg, [trioq.JobSpec("slow_first", timeout=1)], concurrency=1)
    assert (job.state, job.result, job.attempts, job.worker_losses) == (JobState.COMPLETED, 2, 2, 1)
    assert ("start", 2) in runs and ("start", 3) not in runs


request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


async def test_context_variables_set_by_one_job_are_not_seen_by_the_next(nursery):
    seen: list[tuple[int, str | None]] = []

    async def tagged(i: int) -> int:
        seen.append((i, request_id.get()))
        request_id.set(f"job-{i}")  # a job binds a logging context and never resets it
        return i

    reg = Registry()
    reg.register_task("tagged", tagged)
    jobs = await run_all(nursery, reg, [trioq.JobSpec("tagged", {"i": i}) for i in range(6)], concurrency=4)
    assert [j.result for j in jobs] == list(range(6))
    assert sorted(seen) == [(i, None) for i in range(6)]


async def test_after_a_reconnect_a_stop_does_not_wait_for_jobs_the_old_session_held(nursery, autojump_clock):
    started = trio.Event()
    reconnecting = trio.Event()

    async def forever() -> None:
        started.set()
        await trio.sleep(1000)

    reg = Registry()
    reg.register_task("forever", forever)
    broker = memory_broker(max_worker_losses=1)
    await broker.start_core(nursery)
    dropped: list[trio.abc.Stream] = []

    async def connect() -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(broker.serve_connection, server, "memory")
        dropped.append(server)
        if len(dropped) == 2:
            reconnecting.set()  # the first session is over by now
        return client

    worker = trioq.Worker(connect=connect, registry=reg, name="w", concurrency=2, grace=30)
    ended = trio.Event()

    async def run_worker() -> None:
        await worker.run()
        ended.set()

    nursery.start_soon(run_worker)
    async with trioq.Client(connect=memory_connect(broker, nursery)) as c:
        (jid,) = await c.submit_many([trioq.JobSpec("forever")])
        await started.wait()
        assert worker.statistics().running == 1
        await dropped[0].aclose()  # the broker's side of the worker's first session goes away
        await reconnecting.wait()
        assert worker.statistics().running == 0
        assert (await c.result(jid, timeout=10)).state is JobState.DEAD  # lost with the session
        t0 = trio.current_time()
        worker.request_stop()
        with trio.fail_after(60):
            await ended.wait()
        assert trio.current_time() - t0 < 5  # not the 30 s grace


async def test_an_inline_sync_task_runs_on_the_event_loop_and_a_plain_one_in_a_thread(nursery):
    reg = Registry()
    reg.register_task("here", lambda: threading.get_ident(), inline=True)
    reg.register_task("there", lambda: threading.get_ident())
    here, there = await run_all(nursery, reg, [trioq.JobSpec("here"), trioq.JobSpec("there")], concurrency=2)
    loop_thread = threading.get_ident()
    assert (here.state, there.state) == (JobState.COMPLETED, JobState.COMPLETED)
    assert here.result == loop_thread and there.result != loop_thread

    async def coro() -> None:
        pass

    with pytest.raises(ValueError, match="inline is for sync functions"):
        reg.register_task("bad", coro, inline=True)
    builtins = Registry()
    register_builtins(builtins)
    assert {n for n in builtins.list_tasks() if builtins.get(n).inline} == {"reverse_string", "to_uppercase", "fibonacci"}


async def test_an_inline_task_with_a_timeout_takes_a_thread_so_the_timeout_holds(nursery, autojump_clock):
    reg = Registry()
    reg.register_task("sleepy", lambda: time.sleep(0.3), inline=True)
    (job,) = await run_all(nursery, reg, [trioq.JobSpec("sleepy", timeout=0.1, max_attempts=1)], concurrency=1)
    assert (job.state, job.error.type, job.worker_losses) == (JobState.DEAD, "TimeoutError", 0)


async def test_a_tooslowerror_of_the_tasks_own_is_its_failure_not_the_workers(nursery, autojump_clock):
    async def own_deadline() -> None:
        with trio.fail_after(1):
            await trio.sleep(5)

    reg = Registry()
    reg.register_task("own_deadline", own_deadline)
    reg.register_task("quick", lambda: 7, inline=True)
    failed, ok = await run_all(
        nursery, reg, [trioq.JobSpec("own_deadline", max_attempts=1), trioq.JobSpec("quick")], concurrency=2,
    )
    assert (failed.state, failed.error.type, failed.worker_losses) == (JobState.DEAD, "TooSlowError", 0)
    assert (ok.state, ok.result) == (JobState.COMPLETED, 7)


async def test_a_sync_job_past_its_timeout_holds_up_no_other(nursery):
    """Its thread runs on (Python cannot stop it) but holds no place: with concurrency 1 the
    jobs sent after it start and finish, instead of waiting for that thread inside their own
    timeouts and dying of them without having started. Real clock: with real threads the mock
    clock would jump past the quick jobs' timeouts while their threads run."""
    release = threading.Event()
    started: list[int] = []

    def stuck() -> None:
        release.wait(15)  # a C call that ignores everything

    def quick(i: int) -> int:
        started.append(i)
        return i

    reg = Registry()
    reg.register_task("stuck", stuck)
    reg.register_task("quick", quick)
    specs = [trioq.JobSpec("stuck", timeout=0.2, max_attempts=1)] + [
        trioq.JobSpec("quick", {"i": i}, timeout=5, max_attempts=2) for i in range(3)
    ]
    try:
        stuck_job, *quick_jobs = await run_all(nursery, reg, specs, concurrency=1)
    finally:
        release.set()
    assert stuck_job.state is JobState.DEAD and "timeout" in stuck_job.error.message
    assert [(j.state, j.result, j.attempts) for j in quick_jobs] == [(JobState.COMPLETED, i, 1) for i in range(3)]
    assert started == [0, 1, 2]


def _nested(depth: int) -> list:
    x: list = []
    for _ in range(depth - 1):
        x = [x]
    return x


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise ValueError("str fails")


def _exits() -> None:
    raise SystemExit(3)


async def _exits_async() -> None:
    raise SystemExit(4)


def _interrupts() -> None:
    raise KeyboardInterrupt


def _unprintable() -> None:
    raise _Unprintable


@pytest.mark.parametrize("depth", [251, 254, 300])
async def test_a_result_nested_too_deeply_for_the_frame_fails_its_job_not_the_worker(nursery, autojump_clock, depth):
    """orjson writes 254 levels; a RESULT frame adds 3 around the value. A value that fit alone
    but not in the frame ended the worker process (and, under a supervisor, every job it held)."""
    reg = Registry()
    reg.register_task("deep", lambda: _nested(depth), inline=True)
    reg.register_task("quick", lambda: "fine", inline=True)
    deep, quick = await run_all(nursery, reg, [trioq.JobSpec("deep"), trioq.JobSpec("quick")], concurrency=2)
    assert deep.state is JobState.DEAD and deep.attempts == 1 and deep.dead_reason == "not_retryable"
    assert "cannot be sent as JSON" in deep.error.message and deep.worker_losses == 0
    assert quick.state is JobState.COMPLETED and quick.result == "fine"


async def test_tasks_that_exit_or_fail_to_describe_themselves_fail_their_jobs_not_the_worker(nursery):
    """sys.exit() in a task, KeyboardInterrupt raised by a sync task's own code, an exception
    whose __str__ raises: each ended the worker process. Real clock: real threads."""
    reg = Registry()
    reg.register_task("exits", _exits)
    reg.register_task("exits_async", _exits_async)
    reg.register_task("interrupts", _interrupts)
    reg.register_task("unprintable", _unprintable)
    reg.register_task("quick", lambda: "fine")
    specs = [trioq.JobSpec(t, max_attempts=1) for t in ("exits", "exits_async", "interrupts", "unprintable", "quick")]
    exits, exits_async, interrupts, unprintable, quick = await run_all(nursery, reg, specs, concurrency=1)
    assert (exits.state, exits.error.type, exits.error.message) == (JobState.DEAD, "TaskExit", "the task raised SystemExit(3)")
    assert (exits_async.state, exits_async.error.type) == (JobState.DEAD, "SystemExit")
    assert (interrupts.state, interrupts.error.type) == (JobState.DEAD, "TaskExit")
    assert unprintable.state is JobState.DEAD and unprintable.error.type == "_Unprintable"
    assert unprintable.error.message == "<str() of the _Unprintable failed: ValueError>"
    assert quick.state is JobState.COMPLETED and all(
        j.worker_losses == 0 for j in (exits, exits_async, interrupts, unprintable, quick)
    )


async def test_a_worker_whose_own_configuration_is_refused_stops_instead_of_reconnecting(nursery, autojump_clock):
    """The broker refuses a bad queue name before WELCOME, and the worker takes that as final:
    it reconnected in a loop before (some 150 connections a second)."""
    broker = memory_broker()
    await broker.start_core(nursery)
    connects = 0
    connect = memory_connect(broker, nursery)

    async def counting_connect() -> trio.abc.Stream:
        nonlocal connects
        connects += 1
        return await connect()

    worker = trioq.Worker(connect=counting_connect, registry=Registry(), name="w", queues=("a b",))
    with pytest.raises(trioq.RemoteError) as info:
        await worker.run()
    assert info.value.code == "invalid_field" and "bad task or queue name 'a b'" in info.value.message
    assert connects == 1 and not broker.dispatcher.workers
    with pytest.raises(ValueError, match="1-200 letters"):
        Registry().register_task("my task", lambda: None)


async def test_sessions_that_end_soon_after_they_begin_are_retried_with_backoff(nursery, autojump_clock):
    """A broker that closes each session right after WELCOME: the worker waits longer and
    longer between them (0.1 s, doubling, up to 5 s) instead of reconnecting at once."""
    sessions: list[float] = []

    async def connect() -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()

        async def serve() -> None:
            conn = FramedConnection(server)
            nursery.start_soon(conn.run_writer)
            await conn.receive()  # HELLO
            sessions.append(trio.current_time())
            conn.send_nowait(Welcome(PROTOCOL_VERSION, "s", "worker", 1.0, 10.0, 1 << 20, 100))
            conn.close_after_flush()
            await conn.wait_flushed()
            await server.aclose()

        nursery.start_soon(serve)
        return client

    worker = trioq.Worker(connect=connect, registry=Registry(), name="w")
    with trio.move_on_after(30):
        await worker.run()
    gaps = [round(b - a, 1) for a, b in zip(sessions, sessions[1:], strict=False)]
    assert gaps[:7] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0] and len(sessions) < 15


async def test_results_and_errors_fit_a_broker_with_a_small_max_frame(nursery, autojump_clock):
    """The worker sizes RESULT frames for the broker's --max-frame (WELCOME says it), not a
    fixed 900 KiB: a 2 KB result under --max-frame 1024 ended the session, and the job and
    its neighbours died of worker losses."""
    reg = Registry()
    reg.register_task("big", lambda: "x" * 2000, inline=True)
    reg.register_task("small", lambda: "ok", inline=True)

    def fails() -> None:
        raise ValueError("y" * 5000)

    reg.register_task("fails", fails, inline=True)
    specs = [trioq.JobSpec("big"), trioq.JobSpec("small"), trioq.JobSpec("fails", max_attempts=1)]
    big, small, failed = await run_all(nursery, reg, specs, concurrency=3, max_frame=1024)
    assert big.state is JobState.DEAD and big.error.type == "ResultTooLarge" and big.worker_losses == 0
    assert "returned 2002 bytes of JSON" in big.error.message
    assert small.state is JobState.COMPLETED and small.result == "ok" and small.worker_losses == 0
    assert failed.state is JobState.DEAD and failed.error.type == "ValueError" and failed.worker_losses == 0
    assert failed.error.message.startswith("yyy") and len(failed.error.message) < 512
