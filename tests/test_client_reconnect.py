"""The client across lost connections, on the mock clock: waits and reads go on after a
reconnect, keyed submits are sent again and stored once, unkeyed ones are not sent twice."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import trioq
from trioq.job import JobSpec, JobState

from .conftest import memory_broker


class CutOnce(trio.abc.Stream):
    """The broker's side of one connection, which breaks instead of sending the first frame
    containing ``marker`` (the broker has done the work; its answer is lost)."""

    def __init__(self, inner: trio.abc.Stream, marker: bytes | None) -> None:
        self.inner = inner
        self.marker = marker

    async def send_all(self, data) -> None:
        if self.marker is not None and self.marker in bytes(data):
            self.marker = None
            await self.inner.aclose()
            raise trio.BrokenResourceError("cut by the test")
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Links:
    """A connect factory to the broker that keeps each connection's broker side."""

    def __init__(self, broker, nursery, *, cut_first_on: bytes | None = None) -> None:
        self.broker = broker
        self.nursery = nursery
        self.servers: list[trio.abc.Stream] = []
        self.cut_first_on = cut_first_on
        self.refuse = False
        self.attempts = 0

    async def connect(self) -> trio.abc.Stream:
        self.attempts += 1
        if self.refuse:
            raise trioq.ConnectError("connection refused (the test's broker is down)")
        client, server = trio.testing.memory_stream_pair()
        if not self.servers:
            server = CutOnce(server, self.cut_first_on)
        self.servers.append(server)
        self.nursery.start_soon(self.broker.serve_connection, server, "memory")
        return client


async def started(nursery, **cfg):
    broker = memory_broker(**cfg)
    await broker.start_core(nursery)
    return broker


async def test_a_wait_cut_by_a_lost_connection_waits_again_and_returns_the_result(autojump_clock, nursery):
    broker = await started(nursery)
    links = Links(broker, nursery)
    async with trioq.Client(connect=links.connect) as c:
        job_id = await c.submit("noop")
        got: list[trioq.Job] = []
        answered = trio.Event()

        async def wait() -> None:
            got.append(await c.result(job_id, timeout=60))
            answered.set()

        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        await links.servers[0].aclose()  # the broker's end goes away mid-wait
        await trio.testing.wait_all_tasks_blocked()
        assert c.reconnects == 1 and len(links.servers) == 2
        worker = trioq.Worker(connect=Links(broker, nursery).connect, name="w")
        await nursery.start(worker.run)
        with trio.fail_after(10):
            await answered.wait()
        assert got[0].id == job_id and got[0].state is JobState.COMPLETED
        assert (await c.get_job(job_id)).state is JobState.COMPLETED  # the new session serves on
        worker.request_stop()


async def test_a_keyed_submit_whose_ack_was_lost_is_sent_again_and_stored_once(autojump_clock, nursery):
    broker = await started(nursery)
    links = Links(broker, nursery, cut_first_on=b'"t":"ack"')
    async with trioq.Client(connect=links.connect) as c:
        ids = await c.submit_many([JobSpec("noop", {}, idempotency_key=f"k{i}") for i in range(3)])
        assert c.reconnects == 1
    stored = [j for j in broker.dispatcher.live.values() if j.idempotency_key]
    assert sorted(j.id for j in stored) == sorted(ids) and len(stored) == 3


async def test_an_unkeyed_submit_whose_ack_was_lost_is_not_sent_twice(autojump_clock, nursery):
    broker = await started(nursery)
    links = Links(broker, nursery, cut_first_on=b'"t":"ack"')
    async with trioq.Client(connect=links.connect) as c:
        with pytest.raises(trioq.ConnectionLost, match="0 of the 2 jobs are stored; the next 2 may be"):
            await c.submit_many([JobSpec("noop", {}), JobSpec("noop", {})])
        assert len(broker.dispatcher.live) == 2  # stored once, and the client did not send them again
        assert (await c.status())["jobs"]["queued"] == 2  # the next request connects again
        assert c.reconnects == 1


async def test_run_without_a_key_says_the_job_may_be_stored(autojump_clock, nursery):
    broker = await started(nursery)
    links = Links(broker, nursery, cut_first_on=b'"t":"ack"')
    async with trioq.Client(connect=links.connect) as c:
        with pytest.raises(trioq.ConnectionLost, match="may have been stored"):
            await c.run("noop")
    assert len(broker.dispatcher.live) == 1


async def test_no_broker_within_the_reconnect_timeout_is_a_connect_error(autojump_clock, nursery):
    broker = await started(nursery)
    links = Links(broker, nursery)
    async with trioq.Client(connect=links.connect, reconnect_timeout=5) as c:
        await c.status()
        links.refuse = True
        await links.servers[0].aclose()
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        with pytest.raises(trioq.ConnectError, match="could not be made again within 5s: connection refused"):
            await c.status()
        assert 3 < trio.current_time() - t0 <= 5  # backing off, not spinning: a handful of tries
        assert 3 < links.attempts < 12


async def test_reconnect_timeout_zero_keeps_the_old_behaviour(autojump_clock, nursery):
    broker = await started(nursery)
    links = Links(broker, nursery)
    async with trioq.Client(connect=links.connect, reconnect_timeout=0) as c:
        await c.status()
        await links.servers[0].aclose()
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trioq.ConnectionLost):
            await c.status()
        assert links.attempts == 1
