"""The broker-wide budget of uncommitted jobs: a weighted, first-come first-served semaphore,
and producers' connections left unread while it is spent (memory stays bounded)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import trioq
from trioq.broker.budget import JobBudget, JobBudgetStatistics

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
