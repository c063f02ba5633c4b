"""SUBMIT with ``wait``: one job submitted and its final state returned in one round trip
(``Client.run``), instead of SUBMIT, ACK, WAIT and JOB."""

from __future__ import annotations

from functools import partial

import attrs
import pytest
import trio

import trioq
from trioq.errors import ErrorCode, ProtocolError, RemoteError
from trioq.job import JobSpec, JobState
from trioq.protocol.messages import Submit, decode, encode

from .conftest import memory_broker, memory_connect


async def start(nursery, **config):
    broker = memory_broker(**config)
    await broker.start_core(nursery)
    worker = trioq.Worker(connect=memory_connect(broker, nursery), name="w", concurrency=4)
    await nursery.start(worker.run)
    return broker


class Counting:
    """Counts the requests a client sends (frames written on its stream)."""

    def __init__(self, connect) -> None:
        self._connect = connect
        self.frames: list[bytes] = []

    async def __call__(self) -> trio.abc.Stream:
        stream = await self._connect()
        send_all = stream.send_all
        frames = self.frames

        async def counting_send_all(data) -> None:
            frames.append(bytes(data))
            await send_all(data)

        stream.send_all = counting_send_all
        return stream


async def test_run_returns_the_final_job_after_one_request(nursery):
    broker = await start(nursery)
    counting = Counting(memory_connect(broker, nursery))
    async with trioq.Client(connect=counting) as c:
        assert c.welcome.submit_wait
        before = len(counting.frames)
        job = await c.run("reverse_string", {"data": "hello"}, priority=2, result_timeout=30)
        assert len(counting.frames) - before == 1  # SUBMIT alone: no WAIT was needed
        assert (job.state, job.result, job.priority, job.attempts) == (JobState.COMPLETED, "olleh", 2, 1)
        assert (await c.get_job(job.id)).state is JobState.COMPLETED
        failed = await c.run("fibonacci", {"n": -1}, max_attempts=1)
        assert failed.state is JobState.DEAD and failed.error.type == "ValueError"


async def test_run_falls_back_to_submit_and_wait_with_a_broker_that_does_not_offer_it(nursery):
    broker = await start(nursery)
    async with trioq.Client(connect=memory_connect(broker, nursery)) as c:
        c.welcome = attrs.evolve(c.welcome, submit_wait=False)  # as an older broker's WELCOME reads
        job = await c.run("to_uppercase", {"data": "abc"}, result_timeout=30)
        assert (job.state, job.result) == (JobState.COMPLETED, "ABC")


async def test_a_waiting_submit_takes_one_job_and_counts_against_the_waits(nursery):
    broker = await start(nursery, max_waits=0)
    async with trioq.Client(connect=memory_connect(broker, nursery)) as c:
        with pytest.raises(RemoteError) as busy:
            await c.run("noop")
        assert busy.value.code == ErrorCode.BUSY
        assert broker.dispatcher.submitted == 0  # refused before anything was stored
        with pytest.raises(RemoteError) as two:
            await c._request(Submit(999, [JobSpec("noop"), JobSpec("noop")], wait=True))
        assert two.value.code == ErrorCode.INVALID_FIELD and "exactly one job" in two.value.message
        assert broker.dispatcher.submitted == 0
        assert len(await c.submit_many([JobSpec("noop")])) == 1  # the session goes on


def test_wait_is_left_out_unless_asked_for_and_must_be_a_boolean():
    assert b'"wait"' not in encode(Submit(1, [JobSpec("noop")]))
    asked = decode(encode(Submit(1, [JobSpec("noop")], wait=True)))
    assert isinstance(asked, Submit) and asked.wait is True
    with pytest.raises(ProtocolError) as bad:
        decode(b'{"t":"submit","req":1,"jobs":[{"task":"noop"}],"wait":1}')
    assert bad.value.code == ErrorCode.INVALID_FIELD and "$.wait" in str(bad.value)


async def test_every_way_out_of_a_waiting_submit_gives_its_wait_back(nursery):
    broker = await start(nursery, max_waits=1)
    async with trioq.Client(connect=memory_connect(broker, nursery)) as c:
        assert (await c.run("noop")).state is JobState.COMPLETED
        assert (await c.run("noop")).state is JobState.COMPLETED  # the first one's wait was given back
        with pytest.raises(RemoteError):  # refused by broker.submit after taking its wait (priority 99)
            await c._request(Submit(998, [JobSpec("noop", priority=99)], wait=True))
        assert (await c.run("to_uppercase", {"data": "x"})).result == "X"


async def test_waits_hold_no_request_slot_so_hundreds_of_them_never_stall_the_session(nursery, autojump_clock):
    broker = memory_broker()  # no worker: every job stays queued, every wait stays open
    await broker.start_core(nursery)
    async with trioq.Client(connect=memory_connect(broker, nursery)) as c:
        ids = await c.submit_many([JobSpec("noop") for _ in range(150)])
        async with trio.open_nursery() as waiting:
            for job_id in ids:
                waiting.start_soon(c.result, job_id)  # WAIT
            for _ in range(150):
                waiting.start_soon(partial(c.run, "noop"))  # SUBMIT with wait
            with trio.fail_after(5):  # the session serves 256 requests at once: these are 300 waits
                while broker.dispatcher.submitted < 300:  # noqa: ASYNC110 - the runs reach the broker one by one
                    await trio.sleep(0.01)
                status = await c.status()
            assert status["jobs"]["queued"] == 300
            waiting.cancel_scope.cancel()


async def test_a_run_that_times_out_names_its_job_which_goes_on(nursery, autojump_clock):
    broker = await start(nursery)
    async with trioq.Client(connect=memory_connect(broker, nursery)) as c:
        with pytest.raises(TimeoutError) as late:
            await c.run("noop", queue="nobody-serves-this", result_timeout=5)
        (job_id,) = [w for w in str(late.value).split() if len(w) == 16]
        job = await c.get_job(job_id)
        assert (job.state, job.queue) == (JobState.QUEUED, "nobody-serves-this")
        assert broker.dispatcher.submitted == 1
