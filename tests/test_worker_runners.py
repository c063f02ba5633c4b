"""A worker runs its jobs in a few long-lived runner tasks instead of a task per job.

What must hold: jobs that block still all start at once, up to the concurrency; jobs
that never block run back to back in one task; a job aborted or handed back while it
waited in line never starts.
"""

from __future__ import annotations

import trio

import trioq
from trioq.job import JobState
from trioq.protocol.messages import Delivery, Result
from trioq.worker.registry import Registry

from .conftest import memory_broker, memory_connect


async def run_all(nursery, reg: Registry, specs, concurrency: int) -> list[trioq.Job]:
    broker = memory_broker()
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
