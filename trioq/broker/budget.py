"""How many submitted jobs may be between a producer's frame and their commit, broker-wide.

A decoded job costs about 2 KiB until its commit (its spec, its row, its share of the batch's
JSON) against some 400 bytes once queued; a producer pipelining batches of 10,000 four deep
held 40,000 of them at once, and put a broker with a million jobs queued 90 MiB over its
resting size. Sessions take their SUBMIT's jobs from this budget before serving it and give
them back when it is answered; while it is spent they stop reading, so the next frames wait
in the sockets (TCP's own back-pressure), not in the broker's memory.

The HTTP API's submits (one job each) take from the same budget.

A SUBMIT that will be refused at once, or that must wait for room under --max-queued, holds
none of it (sessions._takes_budget, Broker.submit's before_waiting): waits on the budget last
as long as commits take, not 30 s. While a session waits it does not see its peer leave; a
SUBMIT whose producer is gone by then is still stored, as one whose ACK was lost would be.
"""

from __future__ import annotations

from collections import deque

import attrs
import trio


@attrs.frozen
class JobBudgetStatistics:
    total: int
    free: int
    waiting: int


@attrs.define(eq=False)
class _Waiter:
    jobs: int
    granted: trio.Event = attrs.field(factory=trio.Event)


class JobBudget:
    """A weighted, first-come first-served semaphore counted in jobs.

    A request for more jobs than the whole budget takes the whole budget (it waits until
    everything else is given back), so no SUBMIT within the batch limit waits forever.
    """

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("a job budget needs at least one job")
        self.total = total
        self.free = total
        self._waiting: deque[_Waiter] = deque()

    def take_nowait(self, jobs: int) -> int:
        """Take ``jobs`` (at most the whole budget) and return how many to give back later."""
        jobs = min(jobs, self.total)
        if self._waiting or self.free < jobs:  # first come, first served
            raise trio.WouldBlock
        self.free -= jobs
        return jobs

    async def take(self, jobs: int) -> int:
        # Trio's own pattern (trio.Semaphore): a cancellation comes before anything is taken,
        # never after, so a cancelled take can not keep jobs that nobody gives back.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            taken = self.take_nowait(jobs)
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return taken
        waiter = _Waiter(min(jobs, self.total))
        self._waiting.append(waiter)
        try:
            await waiter.granted.wait()
        except BaseException:
            if waiter.granted.is_set():  # granted in the same moment as cancelled
                self.give(waiter.jobs)
            else:
                self._waiting.remove(waiter)
                self._grant()  # those behind it may fit now
            raise
        return waiter.jobs

    def give(self, jobs: int) -> None:
        self.free += jobs
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._waiting[0].jobs <= self.free:
            waiter = self._waiting.popleft()
            self.free -= waiter.jobs
            waiter.granted.set()

    def statistics(self) -> JobBudgetStatistics:
        return JobBudgetStatistics(self.total, self.free, len(self._waiting))


class BudgetShare:
    """One request's jobs from a budget, given back exactly once (the request may end, or
    start waiting for room under --max-queued, first)."""

    __slots__ = ("budget", "jobs")

    def __init__(self, budget: JobBudget) -> None:
        self.budget = budget
        self.jobs = 0

    async def take(self, jobs: int) -> None:
        try:  # no trip through the scheduler while the budget has room
            self.jobs = self.budget.take_nowait(jobs)
        except trio.WouldBlock:
            self.jobs = await self.budget.take(jobs)

    def give_back(self) -> None:
        jobs, self.jobs = self.jobs, 0
        if jobs:
            self.budget.give(jobs)
