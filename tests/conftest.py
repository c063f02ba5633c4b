"""Shared fixtures: certificates, in-memory brokers, and a scriptable fake worker."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from trioq.broker.config import BrokerConfig
from trioq.broker.server import Broker
from trioq.protocol.framing import FramedConnection
from trioq.protocol.messages import (
    PROTOCOL_VERSION,
    Delivery,
    Dispatch,
    Heartbeat,
    Hello,
    Message,
    Outcome,
    Result,
    Welcome,
)
from trioq.tls import CertPaths, ensure_certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    paths, _ = ensure_certs(tmp_path_factory.mktemp("certs"))
    return paths


def memory_broker(**overrides) -> Broker:
    """A broker on the memory store, its clock the Trio clock (mock-clock friendly)."""
    cfg = dict(http=False, db=":memory:", heartbeat_interval=1.0, heartbeat_timeout=10.0, lease_grace=1.0)
    cfg.update(overrides)
    seed = cfg.pop("seed", 1)
    return Broker(BrokerConfig(**cfg), now=trio.current_time, seed=seed)


@pytest.fixture
async def broker(nursery: trio.Nursery) -> AsyncIterator[Broker]:
    b = memory_broker()
    await b.start_core(nursery)
    yield b


def memory_connect(broker: Broker, nursery: trio.Nursery):
    """A connect factory for Worker/Client that talks to ``broker`` over memory streams."""

    async def connect() -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(broker.serve_connection, server, "memory")
        return client

    return connect


class FakeWorker:
    """Speaks the worker protocol by hand, so a test decides every frame it sends."""

    def __init__(self, conn: FramedConnection, welcome: Welcome, scope: trio.CancelScope) -> None:
        self.conn = conn
        self.welcome = welcome
        self.scope = scope
        self.inbox: trio.MemoryReceiveChannel[Message]
        self.deliveries: list[tuple[float, Delivery]] = []
        self.other: list[tuple[float, Message]] = []

    @classmethod
    async def connect(
        cls,
        broker: Broker,
        nursery: trio.Nursery,
        *,
        name: str,
        concurrency: int = 1,
        tasks: tuple[str, ...] = ("slow_task", "noop", "reverse_string"),
        queues: tuple[str, ...] = ("default",),
        heartbeat: float | None = None,
    ) -> FakeWorker:
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(broker.serve_connection, server, name)
        conn = FramedConnection(client)
        scope = trio.CancelScope()
        send, recv = trio.open_memory_channel[Message](math.inf)

        async def run() -> None:
            with scope:
                async with trio.open_nursery() as n:
                    n.start_soon(conn.run_writer)
                    if heartbeat:
                        n.start_soon(_beat, conn, heartbeat)
                    try:
                        while True:
                            send.send_nowait(await conn.receive())
                    except Exception:
                        send.close()
                        n.cancel_scope.cancel()

        conn.send_nowait(Hello(PROTOCOL_VERSION, "worker", name, None, concurrency, list(tasks), list(queues)))
        nursery.start_soon(run)
        welcome = await recv.receive()
        assert isinstance(welcome, Welcome), welcome
        fw = cls(conn, welcome, scope)
        fw.inbox = recv
        return fw

    async def next_delivery(self) -> Delivery:
        """The next job pushed to this worker (other frames are kept in ``other``)."""
        while True:
            msg = await self.inbox.receive()
            if isinstance(msg, Dispatch):
                for d in msg.jobs:
                    self.deliveries.append((trio.current_time(), d))
                if msg.jobs:
                    first = msg.jobs[0]
                    self._extra = list(msg.jobs[1:])
                    return first
            self.other.append((trio.current_time(), msg))

    async def deliveries_n(self, n: int) -> list[Delivery]:
        out: list[Delivery] = []
        out.extend(getattr(self, "_extra", []))
        self._extra = []
        while len(out) < n:
            out.append(await self.next_delivery())
            out.extend(self._extra)
            self._extra = []
        return out

    async def next_other(self, kind: type[Message]) -> Message:
        while True:
            msg = await self.inbox.receive()
            if isinstance(msg, kind):
                return msg
            if isinstance(msg, Dispatch):
                for d in msg.jobs:
                    self.deliveries.append((trio.current_time(), d))
                self._extra = [*getattr(self, "_extra", []), *msg.jobs]

    def complete(self, d: Delivery, result=None) -> None:
        self.conn.send_nowait(Result([Outcome(d.id, d.attempt, True, result)]))

    def fail(self, d: Delivery, error) -> None:
        self.conn.send_nowait(Result([Outcome(d.id, d.attempt, False, error=error)]))

    def vanish(self) -> None:
        """Stop sending anything at all (a hung machine): no EOF, no heartbeats."""
        self.scope.cancel()


async def _beat(conn: FramedConnection, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        conn.send_nowait(Heartbeat())


ROOT = Path(__file__).resolve().parent.parent
