"""The client across lost connections, on the mock clock: waits and reads go on after a
reconnect; a SUBMIT whose answer was lost is not sent again (its jobs may be stored, or done)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import trioq
from trioq.client import Client
from trioq.job import JobSpec, JobState

from .conftest import memory_broker, memory_connect


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


async def test_a_submit_whose_ack_was_lost_is_not_sent_twice(autojump_clock, nursery):
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


# --- edges found by review --------------------------------------------------------------


async def test_a_wait_in_progress_when_the_client_exits_ends_with_connection_lost(autojump_clock, nursery):
    broker = await started(nursery)
    outcome: list[BaseException] = []

    async def wait(c: trioq.Client, job_id: str) -> None:
        try:
            await c.result(job_id)  # no timeout: waits for the job (there is no worker)
        except trioq.TrioqError as exc:
            outcome.append(exc)

    with trio.move_on_after(120):  # mock time
        async with trio.open_nursery() as outer, trioq.Client(connect=memory_connect(broker, nursery)) as c:
            job_id = await c.submit("noop")
            outer.start_soon(wait, c, job_id)
            await trio.testing.wait_all_tasks_blocked()
        # the client is closed first: its pending wait must end, not wait again
    assert outcome and isinstance(outcome[0], trioq.ConnectionLost), outcome


class Spinning(Exception):
    pass


async def test_a_keyed_run_on_a_closed_client_raises_instead_of_spinning(autojump_clock, nursery, monkeypatch):
    broker = await started(nursery)
    async with trioq.Client(connect=memory_connect(broker, nursery)) as c:
        await c.status()
    calls = 0
    real_open = Client._open

    def counting_open(self, msg, replies=1):
        nonlocal calls
        calls += 1
        if calls > 1000:  # without this guard the loop never yields: the whole Trio run freezes
            raise Spinning(f"_open called {calls} times without a checkpoint")
        return real_open(self, msg, replies)

    monkeypatch.setattr(Client, "_open", counting_open)
    with pytest.raises(trioq.ConnectionLost):
        await c.run("noop", idempotency_key="k1")


async def test_a_reconnect_racing_the_client_exit_raises_connection_lost_and_leaks_nothing(autojump_clock, nursery):
    broker = await started(nursery)
    servers: list[trio.abc.Stream] = []

    async def connect() -> trio.abc.Stream:
        if servers:
            await trio.sleep(1)  # a reconnect's TCP+TLS takes a while
        client_side, server_side = trio.testing.memory_stream_pair()
        servers.append(server_side)
        nursery.start_soon(broker.serve_connection, server_side, "memory")
        return client_side

    outcome: list[BaseException] = []

    async def status(c: trioq.Client) -> None:
        try:
            await c.status()
        except BaseException as exc:
            outcome.append(exc)

    async with trio.open_nursery() as outer, trioq.Client(connect=connect) as c:
        await c.status()
        await servers[0].aclose()  # the broker's end goes away
        await trio.testing.wait_all_tasks_blocked()
        outer.start_soon(status, c)  # it reconnects: 1 s of connecting
        await trio.testing.wait_all_tasks_blocked()
        # the client exits while that reconnect is under way

    await trio.sleep(5)
    assert len(outcome) == 1
    assert isinstance(outcome[0], trioq.ConnectionLost), repr(outcome[0])
    assert broker._closers == {}, f"{len(broker._closers)} broker-side connection(s) left open"


async def test_a_keyed_submit_whose_ack_was_lost_is_not_sent_again_by_the_client(autojump_clock, nursery):
    broker = await started(nursery)
    worker = trioq.Worker(connect=memory_connect(broker, nursery), name="w")
    await nursery.start(worker.run)
    links = 0

    async def connect() -> trio.abc.Stream:
        nonlocal links
        links += 1
        if links > 1:
            await trio.sleep(1)  # connecting again takes a moment (a broker restart: seconds)
        client_side, server_side = trio.testing.memory_stream_pair()
        if links == 1:
            server_side = CutOnce(server_side, b'"t":"ack"')
        nursery.start_soon(broker.serve_connection, server_side, "memory")
        return client_side

    async with trioq.Client(connect=connect) as c:
        with pytest.raises(trioq.ConnectionLost, match="0 of the 1 jobs are stored; the next 1 may be"):
            await c.submit("noop", idempotency_key="pay-invoice-42")
        await trio.testing.wait_all_tasks_blocked()
        # a key matches unfinished jobs only: sending it again after the job ran would run it
        # again, so the client leaves that choice to its caller
        assert (await c.status())["jobs"]["completed"] == 1 and c.reconnects == 1
    assert broker.dispatcher.completed == 1, f"the keyed job ran {broker.dispatcher.completed} times"


async def test_no_broker_within_the_reconnect_timeout_is_one_connect_error_for_every_caller(autojump_clock, nursery):
    broker = await started(nursery)
    links = Links(broker, nursery)

    async with trioq.Client(connect=links.connect, reconnect_timeout=5) as c:
        await c.status()
        links.refuse = True
        await links.servers[0].aclose()
        await trio.testing.wait_all_tasks_blocked()
        took: list[float] = []

        async def one() -> None:
            t0 = trio.current_time()
            with pytest.raises(trioq.ConnectError, match="could not be made again within 5s: connection refused"):
                await c.status()
            took.append(round(trio.current_time() - t0, 1))

        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(one)
    # one reconnect for the three, backing off (not spinning): a handful of tries in 5 s
    # the last try at the deadline, not a backoff's length before it
    assert all(4.9 <= t <= 5.5 for t in took), f"seconds each caller waited with reconnect_timeout=5: {sorted(took)}"
    assert 3 < links.attempts < 12


async def test_run_gives_up_at_its_result_timeout_while_the_broker_is_unreachable(autojump_clock, nursery):
    broker = await started(nursery)
    links = Links(broker, nursery)

    async with trioq.Client(connect=links.connect) as c:  # reconnect_timeout: the default 30 s
        await c.status()
        links.refuse = True
        await links.servers[0].aclose()
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        with pytest.raises((TimeoutError, trioq.ConnectError)) as got:
            await c.run("noop", result_timeout=2)
        took = trio.current_time() - t0
    assert took < 4, f"run(result_timeout=2) returned after {took:.1f}s with {got.value!r}"


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_a_reconnect_timeout_that_is_not_a_finite_number_of_seconds_is_refused(value):
    # nan made the reconnect loop's deadline never pass: it tried for ever
    with pytest.raises(ValueError, match="reconnect_timeout must be a finite number of seconds"):
        trioq.Client(connect=Links(None, None).connect, reconnect_timeout=value)
