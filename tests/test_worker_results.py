"""What a task returns always reaches the broker: values JSON cannot hold are coerced, results too
large for a frame fail their job, and the worker's session survives both.

Found by the stress benchmark: ``fibonacci(200)`` returned an int beyond 64 bits, the encoder
raised inside the worker's flusher, and the worker crashed on every retry of the job.
"""

from __future__ import annotations

import trio

import trioq
from trioq.job import JobState
from trioq.worker.registry import Registry
from trioq.worker.runner import MAX_RESULT_BYTES

from .conftest import memory_broker, memory_connect


async def medium(i: int) -> str:
    return f"{i}:" + "y" * 300_000  # async, no checkpoint: a whole delivery finishes in one tick


def registry() -> Registry:
    reg = Registry()
    reg.register_task("big_int", lambda: 2**200)
    reg.register_task("nested", lambda: {"n": -(2**70), "items": {1, 2}, 3: (4, 2**64)})
    reg.register_task("huge", lambda: "x" * (MAX_RESULT_BYTES + 1))
    reg.register_task("wide", lambda: "€" * (MAX_RESULT_BYTES // 2))  # half the characters, 1.5x the bytes
    reg.register_task("medium", medium)
    reg.register_task("object", lambda: object())
    return reg


async def run(nursery, specs, concurrency=8):
    broker = memory_broker()
    await broker.start_core(nursery)
    worker = trioq.Worker(connect=memory_connect(broker, nursery), registry=registry(), name="w", concurrency=concurrency)
    await nursery.start(worker.run)
    async with trioq.Client(connect=memory_connect(broker, nursery)) as c:
        ids = await c.submit_many(specs)
        with trio.fail_after(30):
            jobs = [await c.result(i) for i in ids]
    return broker, worker, jobs


async def test_unencodable_values_are_coerced_and_the_worker_lives(nursery):
    broker, worker, jobs = await run(nursery, [trioq.JobSpec(t) for t in ("big_int", "nested", "object")])
    big, nested, obj = jobs
    assert big.state is JobState.COMPLETED and big.result == str(2**200) and big.attempts == 1
    assert nested.state is JobState.COMPLETED
    assert nested.result["3"] == [4, str(2**64)]  # keys become strings, as JSON has them
    assert nested.result["n"] == str(-(2**70)) and sorted(nested.result["items"]) == [1, 2]
    assert obj.state is JobState.COMPLETED and obj.result.startswith("<object object at")
    # one session all along: no job was lost to a crashed worker
    assert all(j.worker_losses == 0 for j in jobs) and worker.completed == 3


async def test_a_result_over_the_limit_fails_its_job_not_the_worker(nursery):
    broker, worker, jobs = await run(nursery, [trioq.JobSpec("huge"), trioq.JobSpec("big_int"), trioq.JobSpec("wide")])
    huge, ok, wide = jobs
    assert huge.state is JobState.DEAD and huge.error.type == "ResultTooLarge"
    assert wide.state is JobState.DEAD and wide.error.type == "ResultTooLarge"  # bytes count, not characters
    assert str(MAX_RESULT_BYTES) in huge.error.message and huge.attempts == 1  # not retried
    assert ok.state is JobState.COMPLETED and ok.worker_losses == 0


async def test_many_large_results_are_split_across_frames(nursery):
    # 20 x 300 kB finishing together is 6 MB: over the broker's 4 MiB frame limit in one RESULT
    broker, worker, jobs = await run(nursery, [trioq.JobSpec("medium", {"i": i}) for i in range(20)], concurrency=20)
    assert [j.state for j in jobs] == [JobState.COMPLETED] * 20
    assert [j.result.split(":")[0] for j in jobs] == [str(i) for i in range(20)]
    assert all(j.worker_losses == 0 and j.attempts == 1 for j in jobs)
