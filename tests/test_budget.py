"""The broker-wide budget of uncommitted jobs: a weighted, first-come first-served semaphore,
and producers' connections left unread while it is spent (memory stays bounded)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import trioq
from trioq.broker.budget import JobBudget, JobBudgetStatistics
from trioq.broker.sessions import RequestError
from trioq.errors import ErrorCode
from trioq.protocol.framing import FramedConnection
from trioq.protocol.messages import PROTOCOL_VERSION, Hello, StatusRequest, Submit, Welcome

from .conftest import memory_broker, memory_connect


async def test_takes_are_served_first_come_first_served_and_large_ones_take_everything(autojump_clock):
    budget = JobBudget(10)
    assert budget.take_nowait(4) == 4
    order: list[str] = []

    async def take(name: str, jobs: int) -> None:
        got = await budget.take(jobs)
        order.append(f"{name}:{got}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "big", 25)  # more than the whole budget: waits for all of it
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "small", 1)  # fits, but waits its turn behind "big"
        await trio.testing.wait_all_tasks_blocked()
        assert order == [] and budget.statistics() == JobBudgetStatistics(10, 6, 2)
        with pytest.raises(trio.WouldBlock):
            budget.take_nowait(1)  # nobody jumps the line
        budget.give(4)
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["big:10"]  # capped at the budget, so it can be given back whole
        budget.give(10)
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["big:10", "small:1"]
    assert budget.statistics() == JobBudgetStatistics(10, 9, 0)


async def test_a_cancelled_take_leaves_the_line_and_those_behind_it_move_up(autojump_clock):
    budget = JobBudget(10)
    budget.take_nowait(8)
    got: list[int] = []

    async def take(jobs: int) -> None:
        got.append(await budget.take(jobs))

    async with trio.open_nursery() as nursery:
        first = trio.CancelScope()
        nursery.start_soon(_in_scope, first, budget, 5)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, 2)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [] and budget.statistics().waiting == 2
        first.cancel()  # the head of the line goes; the 2 behind it fit at once
        await trio.testing.wait_all_tasks_blocked()
        assert got == [2] and budget.statistics() == JobBudgetStatistics(10, 0, 0)


async def _in_scope(scope: trio.CancelScope, budget: JobBudget, jobs: int) -> None:
    with scope:
        await budget.take(jobs)
        raise AssertionError("should have been cancelled while waiting")


async def test_a_take_cancelled_before_it_starts_keeps_nothing(autojump_clock):
    budget = JobBudget(10)
    with trio.CancelScope() as scope:
        scope.cancel()
        await budget.take(3)  # the budget has room, but the cancellation comes first
    assert scope.cancelled_caught
    assert budget.statistics() == JobBudgetStatistics(10, 10, 0)


def test_a_budget_needs_a_job():
    with pytest.raises(ValueError):
        JobBudget(0)


async def test_a_producer_is_not_read_from_while_the_budget_is_spent(autojump_clock, nursery):
    """Its SUBMIT waits unserved, and so does everything it sent after it: the frames stay in
    the stream, not in the broker's memory. Once commits give jobs back, all is answered."""
    broker = memory_broker(max_uncommitted=10, allow_unknown_tasks=True)
    await broker.start_core(nursery)
    held = broker.submit_budget.take_nowait(10)  # as if another producer's batches were being committed
    answered: list[str] = []
    submitted, statused = trio.Event(), trio.Event()
    async with trioq.Client(connect=memory_connect(broker, nursery)) as c:

        async def submit() -> None:
            await c.submit_many([trioq.JobSpec("noop", {"n": i}) for i in range(3)])
            answered.append("submit")
            submitted.set()

        async def status() -> None:
            await c.status()
            answered.append("status")
            statused.set()

        nursery.start_soon(submit)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(status)
        await trio.sleep(30)  # mock clock: half a minute of nothing
        assert answered == [] and broker.dispatcher.submitted == 0
        assert broker.submit_budget.statistics() == JobBudgetStatistics(10, 0, 1)
        broker.submit_budget.give(held)
        with trio.fail_after(5):
            await submitted.wait()
            await statused.wait()
        assert sorted(answered) == ["status", "submit"] and broker.dispatcher.submitted == 3
    assert broker.submit_budget.statistics() == JobBudgetStatistics(10, 10, 0)


async def test_a_take_cancelled_in_the_moment_it_is_granted_gives_the_jobs_back(autojump_clock):
    budget = JobBudget(10)
    budget.take_nowait(10)
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()
        nursery.start_soon(_in_scope, scope, budget, 4)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()  # the waiter is woken with Cancelled ...
        budget.give(10)  # ... and granted before it runs: it must give its 4 back
    assert budget.statistics() == JobBudgetStatistics(10, 10, 0)


async def _producer(broker, nursery, name: str, jobs: int, log: list) -> None:
    """A SUBMIT of ``jobs`` jobs and a STATUS behind it, sent at once; when each is answered."""
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(broker.serve_connection, server, "memory")
    conn = FramedConnection(client)
    nursery.start_soon(conn.run_writer)
    conn.send_nowait(Hello(PROTOCOL_VERSION, "producer", name))
    assert isinstance(await conn.receive(), Welcome)
    conn.send_nowait(Submit(1, [trioq.JobSpec("noop", {"i": i}) for i in range(jobs)]))
    conn.send_nowait(StatusRequest(2))
    for _ in range(2):
        msg = await conn.receive()
        log.append((name, type(msg).__name__, getattr(msg, "code", None), trio.current_time()))


async def test_submits_waiting_for_room_hold_no_budget_so_all_are_refused_after_30s_not_in_turn(autojump_clock, nursery):
    """With --max-queued full, a SUBMIT waits 30 s for room, then `busy`. Were its jobs held
    from the budget meanwhile, the producers behind it would not even be read until then."""
    broker = memory_broker(max_uncommitted=10, max_queued=1, allow_unknown_tasks=True)
    await broker.start_core(nursery)
    async with trioq.Client(connect=memory_connect(broker, nursery)) as c:
        await c.submit_many([trioq.JobSpec("noop", {})])  # the queue is full ...
    await trio.testing.wait_all_tasks_blocked()  # ... once the dispatcher has heard of it
    assert not broker.dispatcher.has_room(1)
    t0 = trio.current_time()
    log: list = []
    async with trio.open_nursery() as producers:
        for k in range(4):
            producers.start_soon(_producer, broker, nursery, f"p{k}", 10, log)
            await trio.testing.wait_all_tasks_blocked()
    assert sorted((name, kind, code, round(t - t0)) for name, kind, code, t in log) == sorted(
        [(f"p{k}", "StatusReply", None, 0) for k in range(4)] + [(f"p{k}", "Error", ErrorCode.BUSY.value, 30) for k in range(4)]
    )
    assert broker.submit_budget.statistics() == JobBudgetStatistics(10, 10, 0)


async def test_a_submit_that_runs_out_of_room_gives_its_budget_back_while_it_waits(autojump_clock, nursery):
    broker = memory_broker(max_queued=1, allow_unknown_tasks=True)
    await broker.start_core(nursery)
    await broker.submit([trioq.JobSpec("noop", {})])
    await trio.testing.wait_all_tasks_blocked()  # the dispatcher has heard of it: the queue is full
    assert not broker.dispatcher.has_room(1)
    given_back_at: list[float] = []
    with pytest.raises(RequestError) as refused:
        await broker.submit([trioq.JobSpec("noop", {})], before_waiting=lambda: given_back_at.append(trio.current_time()))
    assert refused.value.code is ErrorCode.BUSY
    assert given_back_at == [pytest.approx(trio.current_time() - 30)]  # at once, not after the wait


async def test_a_submit_refused_for_its_size_is_answered_while_the_budget_is_spent(autojump_clock, nursery):
    broker = memory_broker(max_uncommitted=10, max_batch=5, allow_unknown_tasks=True)
    await broker.start_core(nursery)
    held = broker.submit_budget.take_nowait(10)
    log: list = []
    with trio.fail_after(1):  # no commit is coming to give the budget back
        await _producer(broker, nursery, "p", 6, log)
    assert sorted((kind, code or "") for _, kind, code, _ in log) == [("Error", ErrorCode.TOO_LARGE.value), ("StatusReply", "")]
    broker.submit_budget.give(held)
