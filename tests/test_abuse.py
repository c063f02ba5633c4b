"""Clients that misbehave on purpose, and a store that fails: the broker sheds them and loses nothing.

Each test runs a real broker (SQLite journal) on 127.0.0.1 over real TLS with a real worker and a
well-behaved producer (the ledger). After every abuse the ledger submits more jobs, sees them
through, and checks that every job it was ever acknowledged is still there.
"""

from __future__ import annotations

import copy
import logging
import random
import resource
import struct
import time
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trioq
from trioq.broker.config import BrokerConfig
from trioq.broker.server import MAX_PAYLOAD_DEPTH, Broker
from trioq.errors import ConnectError, ConnectionLost, ErrorCode, ProtocolError, RemoteError
from trioq.job import JobSpec, JobState
from trioq.protocol import messages
from trioq.protocol.framing import FramedConnection, frame
from trioq.protocol.messages import (
    PROTOCOL_VERSION,
    Abort,
    Ack,
    Dispatch,
    Error,
    GetJob,
    Hello,
    Message,
    Outcome,
    Release,
    Result,
    StatusReply,
    StatusRequest,
    Submit,
    Welcome,
    decode,
    encode,
)
from trioq.store.sqlite import SQLiteStore
from trioq.tls import CertPaths, client_context, server_context

from .conftest import memory_broker
from .test_security import expect_fatal, open_raw, say_hello

HEADER = struct.Struct(">I")
KNOWN_CODES = {c.value for c in ErrorCode}
#: what a frame that is not a valid message may be answered with
#: the code of the ERROR that closes a connection over ``max_errors``
LIMIT_CODE = ErrorCode.TOO_MANY_ERRORS.value
BAD_INPUT_CODES = {
    "bad_frame",
    "too_large",
    "unknown_message",
    "invalid_field",
    "unexpected",
    "forbidden",
}


@attrs.define
class Ledger:
    """A producer that stays connected through the abuse and remembers every ACK it got."""

    port: int
    ca: Path
    client: trioq.Client | None = None
    acked: dict[str, str] = attrs.Factory(dict)  # job id -> the text it reverses
    delayed: list[str] = attrs.Factory(list)  # acknowledged, not due for an hour
    rounds: int = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trioq.Client("127.0.0.1", self.port, ca=self.ca, name="ledger") as c:
            self.client = c
            task_status.started()
            await trio.sleep_forever()

    async def check(self, n: int = 3) -> None:
        """Submit and finish n more jobs; every job acknowledged so far is still there."""
        c = self.client
        assert c is not None
        self.rounds += 1
        with trio.fail_after(30):
            texts = [f"ledger-{self.rounds}-{i}" for i in range(n)]
            ids = await c.submit_many(
                [
                    trioq.JobSpec("reverse_string", {"data": t}, max_attempts=5, timeout=30)
                    for t in texts
                ]
            )
            assert len(set(ids)) == n
            self.acked.update(zip(ids, texts, strict=True))
            self.delayed.append(await c.submit("reverse_string", {"data": "later"}, delay=3600))
            for jid, text in self.acked.items():
                job = await c.result(jid, timeout=30)
                assert job.state is JobState.COMPLETED and job.result == text[::-1], job
            for jid in self.delayed:
                assert (await c.get_job(jid)).state is JobState.SCHEDULED


@attrs.define
class Env:
    broker: Broker
    port: int
    ca: Path
    db: Path
    ledger: Ledger
    cancel_scope: trio.CancelScope
    stopped: trio.Event

    def config(self) -> BrokerConfig:
        return self.broker.config

    async def stop(self) -> None:
        """Stop the broker and wait until its store is flushed and closed."""
        self.cancel_scope.cancel()
        with trio.fail_after(10):
            await self.stopped.wait()


async def _run_broker(
    broker: Broker, stopped: trio.Event, *, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    try:
        await broker.serve(task_status=task_status)
    finally:
        stopped.set()


async def start_env(
    nursery: trio.Nursery, certs: CertPaths, tmp_path: Path, **overrides: Any
) -> Env:
    cfg: dict[str, Any] = {
        "db": str(tmp_path / "abuse.db"),
        "handshake_timeout": 0.5,
        "hello_timeout": 0.5,
        "max_frame": 64 * 1024,
        "max_payload": 32 * 1024,
        "max_connections": 64,
        "max_errors": 5,
    }
    cfg.update(overrides)
    broker = Broker(BrokerConfig(port=0, http=False, **cfg), ssl_context=server_context(certs))
    stopped = trio.Event()
    handle = await nursery.start(_run_broker, broker, stopped)
    worker = trioq.Worker(
        "127.0.0.1", handle.port, ssl_context=client_context(certs.ca_cert), concurrency=4
    )
    await nursery.start(worker.run)
    ledger = Ledger(handle.port, certs.ca_cert)
    await nursery.start(ledger.run)
    await ledger.check()
    return Env(
        broker, handle.port, certs.ca_cert, Path(cfg["db"]), ledger, handle.cancel_scope, stopped
    )


@pytest.fixture
async def env(nursery: trio.Nursery, certs: CertPaths, tmp_path: Path) -> Env:
    return await start_env(nursery, certs, tmp_path)


async def tcp(port: int) -> trio.SocketStream:
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def until_eof(stream: trio.SocketStream) -> None:
    """Read until the broker closes; a reset counts as closed too."""
    try:
        while await stream.receive_some(4096):
            pass
    except trio.BrokenResourceError:
        pass


class LogCounter(logging.Handler):
    """Counts a logger's lines containing ``text``; lets a test wait for the n-th (no polling)."""

    def __init__(self, logger: str, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(logger)
        self.text = text
        self.count = 0
        self._changed = trio.Event()

    def __enter__(self) -> LogCounter:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.logger.removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.count += 1
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, n: int) -> None:
        while self.count < n:
            await self._changed.wait()


def messages_of(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def no_internal_errors(caplog: pytest.LogCaptureFixture) -> None:
    bad = [
        r
        for r in caplog.records
        if r.exc_info or "internal error" in r.getMessage() or r.levelno >= logging.CRITICAL
    ]
    assert not bad, [r.getMessage() for r in bad]


# --- before TLS, before HELLO ---------------------------------------------------------------------------


async def test_tcp_clients_that_never_finish_tls_are_dropped(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trioq.broker")
    t0 = trio.current_time()
    silent = [await tcp(env.port) for _ in range(3)]
    stalled = await tcp(env.port)
    await stalled.send_all(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello record header, then nothing
    with trio.fail_after(env.config().handshake_timeout + 5):
        async with trio.open_nursery() as n:
            for s in [*silent, stalled]:
                n.start_soon(until_eof, s)
    assert (
        trio.current_time() - t0 >= env.config().handshake_timeout * 0.9
    )  # the timer, not a refusal
    dropped = messages_of(caplog, "refused: timeout: no TLS handshake within 0.5s")
    assert len(dropped) == 4 and all(m.startswith("connection from 127.0.0.1:") for m in dropped)
    await env.ledger.check()


async def test_tls_clients_that_stall_inside_their_hello_are_dropped(
    nursery: trio.Nursery, env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trioq.broker")
    hello = frame(Hello(PROTOCOL_VERSION, "producer", "slow"))
    # half a frame, then silence
    conn = await open_raw(nursery, env.port, env.ca, writer=False)
    await conn.stream.send_all(hello[:12])
    err = await expect_fatal(conn, "timeout")
    assert "hello" in err.message
    # the whole HELLO, one byte every 50 ms: a drip does not reset the clock
    conn = await open_raw(nursery, env.port, env.ca, writer=False)
    t0 = trio.current_time()

    async def drip() -> None:
        try:
            for i in range(len(hello)):
                await conn.stream.send_all(hello[i : i + 1])
                await trio.sleep(0.05)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    nursery.start_soon(drip)
    await expect_fatal(conn, "timeout")
    assert trio.current_time() - t0 < 0.05 * len(hello)  # long before the drip would have finished
    assert len(messages_of(caplog, "closed: timeout: no hello within 0.5s")) == 2
    await env.ledger.check()


async def test_a_thousand_connections_at_once(
    nursery: trio.Nursery, certs: CertPaths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trioq.broker")
    n_conns, limit = 1000, 50
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 3 * n_conns + 200  # both ends live in this process
    if soft < need:
        # not a skip: a machine that cannot hold these connections cannot run this test at all
        assert hard == resource.RLIM_INFINITY or hard >= need, f"RLIMIT_NOFILE hard limit {hard} is below {need}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    env = await start_env(nursery, certs, tmp_path, max_connections=limit, handshake_timeout=10.0)
    assert env.broker.connections == 2  # the worker and the ledger

    with LogCounter("trioq.broker", "refused: tls_handshake: TLS handshake failed") as ended:
        streams: list[trio.SocketStream] = []
        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                for _ in range(n_conns):
                    n.start_soon(lambda: _append(streams, env.port))
        assert len(streams) == n_conns

        closed: list[trio.SocketStream] = []
        all_refused = trio.Event()
        expected_refused = n_conns - (limit - 2)

        async def watch(s: trio.SocketStream) -> None:
            await until_eof(s)
            closed.append(s)
            if len(closed) == expected_refused:
                all_refused.set()

        async with trio.open_nursery() as watchers:
            for s in streams:
                watchers.start_soon(watch, s)
            with trio.fail_after(30):
                await all_refused.wait()
            # the broker holds exactly its limit: the rest were closed at once, none is waiting
            assert env.broker.connections == limit
            assert len(messages_of(caplog, "refused: busy")) == expected_refused
            # a newcomer is refused cleanly while the broker is full, and the ledger's session goes on
            with trio.fail_after(10), pytest.raises(ConnectError):
                async with trioq.Client("127.0.0.1", env.port, ca=env.ca):
                    pass
            await env.ledger.check()
            assert len(closed) == expected_refused  # the held ones were not closed meanwhile
            watchers.cancel_scope.cancel()
        for s in streams:
            await s.aclose()
        # the held connections end with their clients; the slots come back
        with trio.fail_after(10):
            await ended.wait_for(limit - 2)
            # each handler logs, then gives its slot back as it unwinds: let them all finish
            await trio.testing.wait_all_tasks_blocked()
        assert env.broker.connections == 2
        await env.ledger.check()
        async with trioq.Client("127.0.0.1", env.port, ca=env.ca) as c:
            assert await c.submit("noop", {})


async def _append(streams: list[trio.SocketStream], port: int) -> None:
    streams.append(await tcp(port))


# --- bad frames ---------------------------------------------------------------------------------------


async def test_a_4gib_frame_header_before_hello_and_in_a_worker_session(
    nursery: trio.Nursery, env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trioq.broker")
    conn = await open_raw(nursery, env.port, env.ca, writer=False)
    await conn.stream.send_all(HEADER.pack(0xFFFFFFFF))
    err = await expect_fatal(conn, "too_large")  # at once, not after hello_timeout
    assert str(0xFFFFFFFF) in err.message
    conn = await open_raw(nursery, env.port, env.ca)
    assert isinstance(await say_hello(conn, "worker"), Welcome)
    await conn.stream.send_all(HEADER.pack(0xFFFFFFFF) + b"{" * 1000)
    await expect_fatal(conn, "too_large")
    logged = messages_of(caplog, "closed: too_large: frame of 4294967295 bytes")
    assert len(logged) == 2 and all(m.startswith("connection from 127.0.0.1:") for m in logged)
    await env.ledger.check()


async def test_before_its_hello_is_accepted_a_peer_may_send_only_a_small_frame(nursery, autojump_clock) -> None:
    """A peer not yet authenticated could make the broker hold --max-frame (4 MiB) each by
    sending all but the end of a HELLO; before HELLO the limit is 128 KiB, after it
    --max-frame again."""
    from trioq.broker.server import MAX_HELLO_FRAME

    broker = memory_broker(max_frame=1024 * 1024)
    await broker.start_core(nursery)

    async def raw() -> FramedConnection:
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(broker.serve_connection, server, "raw")
        conn = FramedConnection(client, max_frame=8 * 1024 * 1024)
        nursery.start_soon(conn.run_writer)
        return conn

    conn = await raw()
    await conn.stream.send_all(HEADER.pack(MAX_HELLO_FRAME + 1) + b"{" * 1000)
    err = await conn.receive()  # at once, not after the hello timeout
    assert isinstance(err, Error) and err.fatal and err.code == "too_large"
    assert f"over the limit of {MAX_HELLO_FRAME}" in err.message
    conn = await raw()
    conn.send_nowait(Hello(PROTOCOL_VERSION, "producer", "p"))
    assert isinstance(await conn.receive(), Welcome)
    body = encode(StatusRequest(7))[:-1] + b', "pad": "' + b"x" * (MAX_HELLO_FRAME * 2) + b'"}'  # extra keys are ignored
    await conn.stream.send_all(HEADER.pack(len(body)) + body)
    reply = await conn.receive()
    assert isinstance(reply, StatusReply) and reply.req == 7


async def test_random_bytes_before_and_after_hello(nursery: trio.Nursery, env: Env) -> None:
    max_frame = env.config().max_frame
    rng = random.Random(5)
    outcomes: dict[str, int] = {}
    for case in range(30):
        stage = ("hello", "producer", "worker")[case % 3]
        conn = await open_raw(nursery, env.port, env.ca, writer=False)
        if stage != "hello":
            await conn.stream.send_all(
                frame(Hello(PROTOCOL_VERSION, stage, "rnd", None, 1, ["sec_only"], ["sec"]))
            )
            assert isinstance(await conn.receive(), Welcome)
        if case % 2:  # a random header: almost surely over the limit
            data = rng.randbytes(4 + rng.randrange(200))
            (length,) = HEADER.unpack_from(data)
            if length <= max_frame:  # complete the frame exactly, nothing after it
                data = (data + bytes(length))[: 4 + length]
            expected = {"too_large"} if length > max_frame else BAD_INPUT_CODES
        else:  # a correct header over random bytes
            body = rng.randbytes(rng.randrange(1, 3000))
            data = HEADER.pack(len(body)) + body
            expected = BAD_INPUT_CODES
        await conn.stream.send_all(data)
        with trio.fail_after(10):
            msg = await conn.receive()
        assert isinstance(msg, Error) and msg.fatal and msg.code in expected, (case, msg)
        outcomes[msg.code] = outcomes.get(msg.code, 0) + 1
        with trio.fail_after(10), pytest.raises(ConnectionLost):
            await conn.receive()
    assert outcomes.get("too_large", 0) >= 10 and outcomes.get("bad_frame", 0) >= 10, outcomes
    await env.ledger.check()


async def test_error_limit_closes_a_connection_that_keeps_erring(
    nursery: trio.Nursery, env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trioq.broker")
    limit = env.config().max_errors
    # a producer sending jobs it was told are wrong, over and over
    conn = await open_raw(nursery, env.port, env.ca)
    assert isinstance(await say_hello(conn, "producer"), Welcome)
    for req in range(1, 3 * limit):
        conn.send_nowait(Submit(req, [JobSpec("reverse_string", {"data": "x"}, priority=0)]))
    seen: list[Error] = []
    with trio.fail_after(10), pytest.raises(ConnectionLost):
        while True:
            msg = await conn.receive()
            assert isinstance(msg, Error), msg
            seen.append(msg)
    assert [(e.code, e.fatal) for e in seen] == [("invalid_field", False)] * limit + [
        (LIMIT_CODE, True)
    ]
    assert f"more than {limit} " in seen[-1].message
    closed = messages_of(caplog, f"closed: {LIMIT_CODE}: more than {limit} ")
    assert len(closed) == 1 and closed[0].startswith("connection from 127.0.0.1:")
    # a client that errs fewer times than the limit is not cut off, and answers about the world
    # (no such job, stale) are not errors of the client's
    async with trioq.Client("127.0.0.1", env.port, ca=env.ca) as c:
        for _ in range(limit):
            with pytest.raises(RemoteError) as info:
                await c.submit("reverse_string", {"data": "x"}, priority=11)
            assert info.value.code == "invalid_field"
        for i in range(3 * limit):
            with pytest.raises(trioq.JobNotFound):
                await c.get_job(f"{i:016x}")
        assert await c.submit("noop", {})
    conn = await open_raw(nursery, env.port, env.ca)
    assert isinstance(await say_hello(conn, "worker"), Welcome)
    for i in range(3 * limit):
        conn.send_nowait(Result([Outcome(f"{i:016x}", 1, True, "forged")]))
    with trio.fail_after(10):
        for _ in range(3 * limit):
            msg = await conn.receive()
            assert isinstance(msg, Error) and msg.code == "stale" and not msg.fatal, msg
    await env.ledger.check()


async def test_values_the_store_or_the_encoder_cannot_take_are_refused(
    nursery: trio.Nursery,
    env: Env,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each of these once stopped the whole broker: one frame from one client."""
    caplog.set_level(logging.WARNING, logger="trioq")
    conn = await open_raw(nursery, env.port, env.ca, writer=False)
    await conn.stream.send_all(frame(Hello(PROTOCOL_VERSION, "producer", "edge")))
    assert isinstance(await conn.receive(), Welcome)

    async def ask(body: bytes) -> Message:
        await conn.stream.send_all(HEADER.pack(len(body)) + body)
        with trio.fail_after(10):
            return await conn.receive()

    # a page size out of range is refused, as over HTTP, not quietly clamped
    for i, limit in enumerate((0, -5, 10**9), start=100):
        reply = await ask(b'{"t":"list","req":%d,"limit":%d}' % (i, limit))
        assert isinstance(reply, Error) and reply.code == "invalid_field" and reply.req == i and not reply.fatal
        assert "limit must be 1-1000" in reply.message
    # a page cursor SQLite cannot hold
    reply = await ask(b'{"t":"list","req":1,"cursor":18446744073709551615}')
    assert (
        isinstance(reply, Error)
        and reply.code == "invalid_field"
        and not reply.fatal
        and reply.req == 1
    )
    # a payload nested deeper than any frame can carry back out (orjson reads 1024 levels, writes 253)
    deep = b"[" * 300 + b"]" * 300
    body = b'{"t":"submit","req":2,"jobs":[{"task":"reverse_string","payload":' + deep + b"}]}"
    reply = await ask(body)
    assert isinstance(reply, Error) and reply.code == "invalid_field" and reply.req == 2, reply
    assert str(MAX_PAYLOAD_DEPTH) in reply.message
    ok = b"[" * MAX_PAYLOAD_DEPTH + b"]" * MAX_PAYLOAD_DEPTH
    body = b'{"t":"submit","req":3,"jobs":[{"task":"noop","payload":{"x":' + ok + b"}}]}"
    reply = await ask(body)
    assert isinstance(reply, Ack), reply
    # as deep as allowed: stored, dispatched, run and read back like any other job
    job = await env.ledger.client.result(reply.ids[0], timeout=30)
    assert job.state is JobState.COMPLETED and job.payload == {"x": orjson.loads(ok)}
    # worker defaults that no job row can store
    for defaults in (
        {"max_attempts": 2**64 - 1},
        {"max_attempts": 0},
        {"timeout": 0},
        {"timeout": -1.0},
    ):
        w = await open_raw(nursery, env.port, env.ca, writer=False)
        body = orjson.dumps(
            {
                "t": "hello",
                "version": 1,
                "role": "worker",
                "name": "w",
                "concurrency": 1,
                "tasks": ["reverse_string"],
                "defaults": {"reverse_string": defaults},
            }
        )
        await w.stream.send_all(HEADER.pack(len(body)) + body)
        await expect_fatal(w, "invalid_field")
    # names that would forge log lines
    w = await open_raw(nursery, env.port, env.ca)
    w.send_nowait(Hello(PROTOCOL_VERSION, "producer", "x\nWARNING trioq.broker: all good"))
    await expect_fatal(w, "invalid_field")

    # and should any handler still fail, it costs that connection, not the broker
    def broken_stats() -> dict:
        raise RuntimeError("a bug")

    monkeypatch.setattr(env.broker, "stats", broken_stats)
    reply = await ask(frame(StatusRequest(4))[4:])
    assert isinstance(reply, Error) and reply.code == "internal" and reply.fatal
    assert messages_of(caplog, "internal error") and "a bug" not in reply.message
    monkeypatch.undo()
    await env.ledger.check()


# --- fuzzing the decoder ------------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)
TAGS = sorted(messages._REGISTRY)  # every message type the wire knows


def field_names(tag: str) -> list[str]:
    cls = messages._REGISTRY.get(tag)
    return [f.name for f in attrs.fields(cls)] if cls is not None else []


#: one valid frame of every kind a peer sends, as dicts, for mutation
VALID: dict[str, dict[str, Any]] = {
    "hello": {
        "version": 1,
        "role": "worker",
        "name": "w",
        "token": None,
        "concurrency": 2,
        "tasks": ["fuzz_only"],
        "queues": ["fuzz"],
        "defaults": {"fuzz_only": {"max_attempts": 2, "timeout": 1.5}},
    },
    "submit": {
        "req": 1,
        "jobs": [
            {
                "task": "fuzz_only",
                "payload": {"a": [1, 2]},
                "priority": 3,
                "queue": "fuzz",
                "delay": 5,
                "run_at": None,
                "max_attempts": 2,
                "timeout": 2.5,
                "idempotency_key": None,
            }
        ],
    },
    "get": {"req": 2, "id": "0123456789abcdef"},
    "list": {
        "req": 3,
        "state": "queued",
        "queue": "fuzz",
        "task": "fuzz_only",
        "limit": 5,
        "cursor": 10,
    },
    "wait": {"req": 4, "id": "0123456789abcdef"},
    "cancel": {"req": 5, "id": "0123456789abcdef"},
    "retry": {"req": 6, "id": "0123456789abcdef"},
    "discard": {"req": 7, "id": "0123456789abcdef"},
    "status": {"req": 8},
    "heartbeat": {},
    "result": {
        "outcomes": [
            {
                "id": "0123456789abcdef",
                "attempt": 1,
                "ok": False,
                "result": None,
                "error": {"type": "E", "message": "m", "traceback": "", "retryable": True},
            }
        ]
    },
    "progress": {
        "id": "0123456789abcdef",
        "attempt": 1,
        "progress": {"value": 0.5, "message": "half"},
    },
    "release": {"ids": ["0123456789abcdef"], "attempts": [1]},
    "drain": {"stop": False},
}


def paths_of(d: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path inside a frame dict (into dicts and the first item of lists)."""
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            out.append((*prefix, k))
            out.extend(paths_of(v, (*prefix, k)))
    elif isinstance(d, list) and d:
        out.extend(paths_of(d[0], (*prefix, 0)))
    return out


def mutated(d: dict[str, Any], path: tuple, value: Any, drop: bool) -> dict[str, Any]:
    d = copy.deepcopy(d)
    target = d
    for key in path[:-1]:
        target = target[key]
    if drop:
        if isinstance(target, dict):
            target.pop(path[-1], None)
    else:
        target[path[-1]] = value
    return d


@st.composite
def wrong_frames(draw: st.DrawFn) -> bytes:
    """Structurally valid JSON: a known type with one to three fields wrong, missing or extra."""
    tag = draw(st.sampled_from(sorted(VALID)))
    d = {"t": tag, **VALID[tag]}
    for _ in range(draw(st.integers(1, 3))):
        paths = paths_of(d) or [("extra",)]
        path = draw(st.sampled_from(paths))
        d = mutated(d, path, draw(JSON_VALUES), drop=draw(st.booleans()))
    return orjson.dumps(d)


@st.composite
def free_frames(draw: st.DrawFn) -> bytes:
    """Any JSON object, keys drawn from the real field names of a real or made-up type."""
    tag = draw(st.sampled_from([*TAGS, "", "HELLO", "nope"]))
    names = field_names(tag) or ["x"]
    d = draw(
        st.dictionaries(st.sampled_from([*names, "extra"]), JSON_VALUES, max_size=len(names) + 1)
    )
    d["t"] = draw(st.just(tag) | JSON_VALUES)
    return orjson.dumps(d)


def check_decode(body: bytes) -> None:
    try:
        msg = decode(body)
    except ProtocolError as exc:
        assert exc.code.value in {"bad_frame", "unknown_message", "invalid_field"}, exc
        assert exc.message and len(exc.message) < 2000
        return
    assert isinstance(msg, Message) and type(msg).TYPE in messages._REGISTRY
    again = decode(encode(msg))  # whatever is accepted can be written back out and read again
    assert type(again) is type(msg)


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_decoder_fuzz_arbitrary_bytes(body: bytes) -> None:
    check_decode(body)


@FUZZ
@given(wrong_frames())
def test_decoder_fuzz_valid_frames_with_wrong_fields(body: bytes) -> None:
    check_decode(body)


@FUZZ
@given(free_frames())
def test_decoder_fuzz_any_json_object(body: bytes) -> None:
    check_decode(body)


def test_decoder_edges() -> None:
    for body in (
        b"",
        b"{",
        b"[]",
        b"null",
        b'"t"',
        b"[" * 2000 + b"]" * 2000,
        b'{"t":null}',
        b'{"t":["hello"]}',
        b'{"t":"hello","version":"1","role":"producer"}',
        b'{"t":"submit","req":1,"jobs":{}}',
        b'{"t":"result","outcomes":[{"id":"a","attempt":1,"ok":1}]}',
        '{"t":"get","req":1,"id":"\udc80"}'.encode(errors="surrogatepass"),
    ):
        check_decode(body)


_payloads = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
_maybe_float = st.none() | st.floats(0, 1e10, allow_nan=False)
_specs = st.builds(
    JobSpec, st.sampled_from(["noop", "t.2"]), _payloads, st.integers(1, 10), st.sampled_from(["default", "q2"]),
    _maybe_float, _maybe_float, st.none() | st.integers(1, 1000), _maybe_float, st.none() | st.text(max_size=5),
)


@FUZZ
@given(st.lists(_specs, min_size=1, max_size=5))
def test_a_submit_leaves_its_defaults_out_and_decodes_to_the_same_jobs(specs: list[JobSpec]) -> None:
    assert decode(encode(Submit(3, specs))) == Submit(3, specs)


def test_a_submit_of_default_jobs_carries_only_their_tasks_and_wrong_fields_name_the_job() -> None:
    assert orjson.loads(encode(Submit(1, [JobSpec("noop", {}), JobSpec("noop", None)]))) == {
        "t": "submit", "req": 1, "jobs": [{"task": "noop"}, {"task": "noop", "payload": None}],
    }
    body = orjson.dumps({"t": "submit", "req": 1, "jobs": [{"task": "noop"}, {"task": "noop", "priority": "high"}]})
    with pytest.raises(ProtocolError, match=r"expected int @ \$\.jobs\[1\]\.priority"):
        decode(body)


# --- a bounded fuzz against the live broker --------------------------------------------------------------

DEEP = "<300 levels of nesting>"  # spliced in after encoding: orjson writes only 253
STAGES = {
    "hello": "hello",
    **{
        t: "producer"
        for t in ("submit", "get", "list", "wait", "cancel", "retry", "discard", "status")
    },
    **{t: "worker" for t in ("result", "progress", "release", "drain")},
}


def wrong_type(value: Any) -> Any:
    """A JSON value of another type than ``value``."""
    if isinstance(value, bool):
        return 1
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return [value]
    if isinstance(value, str):
        return 7
    if isinstance(value, list):
        return {"0": value}
    if isinstance(value, dict):
        return [value]
    return "none"


def value_at(d: Any, path: tuple) -> Any:
    for key in path:
        d = d[key]
    return d


def live_cases(seed: int) -> list[tuple[str, bytes]]:
    """(stage, body): every field of every frame a peer sends, set to a huge integer, to JSON nested
    300 deep, to a value of the wrong type, or left out; plus a wrong tag and a cut-off body per
    frame. The frame is the first one sent ('hello') or follows a producer's or a worker's HELLO."""
    rng = random.Random(seed)
    cases = []
    for tag, stage in STAGES.items():
        base = {"t": tag, **VALID[tag]}
        for path in paths_of(base):
            if path == ("t",):
                continue
            for value in (2**64 - 1, DEEP, wrong_type(value_at(base, path))):
                cases.append((stage, mutated(base, path, value, drop=False)))
            cases.append((stage, mutated(base, path, None, drop=True)))
        cases.append((stage, {**base, "t": rng.choice([t for t in TAGS if t != tag])}))
    out = [
        (stage, orjson.dumps(d).replace(orjson.dumps(DEEP), b"[" * 300 + b"]" * 300))
        for stage, d in cases
    ]
    for tag, stage in STAGES.items():
        body = orjson.dumps({"t": tag, **VALID[tag]})
        out.append((stage, body[: rng.randrange(1, len(body))]))
    return out


SENTINEL_REQ = 7_777_777
SENTINEL_ID = "5e5e5e5e5e5e5e5e"


async def live_case(nursery: trio.Nursery, env: Env, stage: str, body: bytes) -> str:
    """Send one fuzzed frame; return how the broker answered: 'alive', 'welcome' or 'fatal:<code>'."""
    conn = await open_raw(nursery, env.port, env.ca, writer=False)
    try:
        if stage != "hello":
            hello = Hello(PROTOCOL_VERSION, stage, "fuzz", None, 1, ["fuzz_only"], ["fuzz"])
            await conn.stream.send_all(frame(hello))
            assert isinstance(await conn.receive(), Welcome)
        sentinel: Message | None = None
        if stage == "producer":
            sentinel = StatusRequest(SENTINEL_REQ)
        elif stage == "worker":
            sentinel = Result([Outcome(SENTINEL_ID, 1, True)])
        data = HEADER.pack(len(body)) + body + (frame(sentinel) if sentinel else b"")
        try:
            await conn.stream.send_all(data)
        except trio.BrokenResourceError:
            pass
        while True:
            try:
                msg = await conn.receive()
            except ConnectionLost:
                return "closed"
            if isinstance(msg, Error):
                assert msg.code in KNOWN_CODES and msg.code != "internal", (body, msg)
                if msg.fatal:
                    with pytest.raises(ConnectionLost):
                        await conn.receive()
                    return f"fatal:{msg.code}"
                if SENTINEL_ID in msg.message:
                    return "alive"
            elif isinstance(msg, Welcome) and stage == "hello":
                return "welcome"
            elif isinstance(msg, StatusReply) and msg.req == SENTINEL_REQ:
                return "alive"
            else:  # an answer to a fuzzed frame that happened to be valid, or a job for a fuzz worker
                assert isinstance(
                    msg, (Ack, StatusReply, Dispatch, Abort, messages.JobReply, messages.JobsReply)
                ), msg
    finally:
        await conn.aclose()


async def test_live_fuzz_of_malformed_frames(
    nursery: trio.Nursery, env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trioq")
    outcomes: dict[str, int] = {}
    cases = live_cases(seed=20240601)
    assert 200 <= len(cases) <= 300
    with trio.fail_after(60):
        for stage, body in cases:
            with trio.fail_after(10):
                outcome = await live_case(nursery, env, stage, body)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # the fuzz reached past the decoder: some frames were refused whole, some answered one by one
    assert outcomes.get("fatal:invalid_field", 0) >= 30, outcomes
    assert outcomes.get("alive", 0) >= 30, outcomes
    no_internal_errors(caplog)
    await env.ledger.check()


# --- faults: a full disk, forged and repeated results ---------------------------------------------------


def set_disk_full(store: SQLiteStore, full: bool) -> None:
    """SQLite's own 'database or disk is full' (SQLITE_FULL): no new page may be allocated."""
    assert store._w is not None
    with store._wlock:
        if full:
            (pages,) = store._w.execute("PRAGMA page_count").fetchone()
            store._w.execute(f"PRAGMA max_page_count={pages}")
        else:
            store._w.execute("PRAGMA max_page_count=4294967294")


async def test_a_full_disk_stops_acknowledgements_and_nothing_is_lost(
    nursery: trio.Nursery, certs: CertPaths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trioq")
    # a producer that retries on `busy` must not meet the error limit meanwhile
    env = await start_env(nursery, certs, tmp_path, max_errors=1000)
    store = env.broker.store
    assert isinstance(store, SQLiteStore)
    text = "full-" + "x" * 20_000  # needs new pages: cannot fit in the file as it is
    big = {"data": text}
    set_disk_full(store, True)
    async with trioq.Client("127.0.0.1", env.port, ca=env.ca) as c:
        for i in range(5):
            with trio.fail_after(10), pytest.raises(RemoteError) as info:
                await c.submit("reverse_string", {"data": f"{text}-{i}"})
            assert info.value.code == "busy" and "store" in info.value.message
        assert not env.broker.writer.healthy
        assert env.broker.stats()["submitted_total"] == len(env.ledger.acked) + len(
            env.ledger.delayed
        )
        assert messages_of(caplog, "database or disk is full")
        # the disk gets room again: after the writer's own retry, submits are acknowledged again
        set_disk_full(store, False)
        with trio.fail_after(15):
            while True:
                try:
                    jid = await c.submit("reverse_string", big)
                    break
                except RemoteError as exc:
                    assert exc.code == "busy"
                    await trio.sleep(0.05)
        job = await c.result(jid, timeout=30)
        assert job.result == text[::-1]
    acked = {**env.ledger.acked, jid: text}
    await env.ledger.check()
    acked.update(env.ledger.acked)
    # Stop the broker; what the file holds is exactly what was acknowledged.
    await env.stop()
    reopened = SQLiteStore(env.db)
    reopened.open_sync()
    try:
        for jid, text in acked.items():
            job = reopened.get_sync(jid)
            assert (
                job is not None and job.state is JobState.COMPLETED and job.result == text[::-1]
            ), (jid, job)
        for jid in env.ledger.delayed:  # still waiting for their hour (the row may say queued)
            job = reopened.get_sync(jid)
            assert not job.state.terminal and job.run_at > time.time() + 3000, job
        counts = reopened.counts_sync()
        assert sum(sum(per.values()) for per in counts.values()) == len(acked) + len(
            env.ledger.delayed
        )
    finally:
        reopened.close_sync()


async def start_hand_broker(nursery: trio.Nursery, certs: CertPaths, tmp_path: Path) -> tuple[Broker, Any]:
    """A SQLite broker that accepts the task ``hand``, which only a test's raw worker runs."""
    broker = Broker(
        BrokerConfig(port=0, http=False, db=str(tmp_path / "hand.db"), tasks=("hand",)),
        ssl_context=server_context(certs),
    )
    return broker, await nursery.start(broker.serve)


async def test_forged_stale_and_repeated_results(
    nursery: trio.Nursery, certs: CertPaths, tmp_path: Path
) -> None:
    # No real worker here: two hand-driven ones decide every frame.
    broker, h = await start_hand_broker(nursery, certs, tmp_path)
    a = await open_raw(nursery, h.port, certs.ca_cert)
    assert isinstance(await say_hello(a, "worker", tasks=["hand"], queues=["default"]), Welcome)

    async def delivery(conn: FramedConnection):
        with trio.fail_after(10):
            while True:
                msg = await conn.receive()
                if isinstance(msg, Dispatch) and msg.jobs:
                    return msg.jobs[0]

    async def next_error(conn: FramedConnection) -> Error:
        with trio.fail_after(10):
            msg = await conn.receive()
        assert isinstance(msg, Error) and not msg.fatal, msg
        return msg

    async with trioq.Client("127.0.0.1", h.port, ca=certs.ca_cert) as c:
        first = await c.submit("hand", {})
        d = await delivery(a)
        assert d.id == first and d.attempt == 1
        # the same result twice in one frame, then again in another with a different value
        a.send_nowait(Result([Outcome(d.id, 1, True, "one"), Outcome(d.id, 1, True, "one")]))
        a.send_nowait(Result([Outcome(d.id, 1, True, "two")]))
        # a second worker that never held the job reports on it
        b = await open_raw(nursery, h.port, certs.ca_cert)
        assert isinstance(await say_hello(b, "worker", tasks=["other"], queues=["other"]), Welcome)
        b.send_nowait(Result([Outcome(d.id, 1, True, "forged")]))
        assert (await next_error(b)).code == "stale"
        # duplicates were ignored without a word: the next thing A hears is about this bogus id
        a.send_nowait(Result([Outcome(SENTINEL_ID, 1, True)]))
        err = await next_error(a)
        assert err.code == "stale" and SENTINEL_ID in err.message and d.id not in err.message
        job = await c.result(first, timeout=10)
        assert job.state is JobState.COMPLETED and job.result == "one" and job.attempts == 1
        assert broker.stats()["completed_total"] == 1

        # fencing: once a job is handed back and sent again, the old attempt's result is refused
        second = await c.submit("hand", {})
        d1 = await delivery(a)
        a.send_nowait(Release([d1.id], [1]))
        d2 = await delivery(a)
        assert (d2.id, d2.attempt) == (second, 2)
        a.send_nowait(Result([Outcome(second, 1, True, "old")]))
        assert (await next_error(a)).code == "stale"
        a.send_nowait(Result([Outcome(second, 2, True, "new")]))
        assert (await c.result(second, timeout=10)).result == "new"
        assert broker.stats()["completed_total"] == 2


async def test_a_result_nested_too_deeply_fails_its_job_not_the_writer(
    nursery: trio.Nursery, certs: CertPaths, tmp_path: Path
) -> None:
    """A worker's RESULT nested 300 deep once killed the SQLite writer (orjson writes 253)."""
    broker, h = await start_hand_broker(nursery, certs, tmp_path)
    w = await open_raw(nursery, h.port, certs.ca_cert, writer=False)
    await w.stream.send_all(frame(Hello(PROTOCOL_VERSION, "worker", "deep", concurrency=1, tasks=["hand"])))
    assert isinstance(await w.receive(), Welcome)
    async with trioq.Client("127.0.0.1", h.port, ca=certs.ca_cert) as c:
        first = await c.submit("hand", {})
        with trio.fail_after(10):
            while not isinstance(msg := await w.receive(), Dispatch) or not msg.jobs:
                pass
        d = msg.jobs[0]
        deep = b"[" * 300 + b"]" * 300
        body = b'{"t":"result","outcomes":[{"id":"' + d.id.encode() + b'","attempt":1,"ok":true,"result":' + deep + b"}]}"
        await w.stream.send_all(HEADER.pack(len(body)) + body)
        job = await c.result(first, timeout=10)
        assert job.state is JobState.DEAD and job.error.type == "InvalidResult" and job.result is None
        # the writer lives: new jobs are acknowledged and the dead one is on disk as dead
        second = await c.submit("hand", {})
        assert (await c.get_job(second)).state in (JobState.QUEUED, JobState.RUNNING)
        assert broker.writer.healthy
    got = await trio.to_thread.run_sync(broker.store.get_sync, first)
    assert got is not None and got.state is JobState.DEAD


async def test_a_producer_that_does_not_read_its_answers_is_not_read_from(nursery, autojump_clock):
    """Its requests wait in the stream once the answers not yet written pass --max-frame: the
    broker does not hold every answer (3,000 GETs of a 20 KB job were 60 MB). When it reads
    again, every answer comes. Real back-pressure: lockstep streams buffer nothing."""
    broker = memory_broker(max_frame=64 * 1024)
    await broker.start_core(nursery)
    (job_id,), _ = await broker.submit([JobSpec("noop", {"blob": "x" * 20_000}, queue="held")])
    made: list[FramedConnection] = []

    def keep(stream, **kw) -> FramedConnection:
        conn = FramedConnection(stream, **kw)
        made.append(conn)
        return conn

    client, server = trio.testing.lockstep_stream_pair()  # a socket's back-pressure, no buffer
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("trioq.broker.server.FramedConnection", keep)
        nursery.start_soon(broker.serve_connection, server, "slow-reader")
        conn = FramedConnection(client)
        nursery.start_soon(conn.run_writer)
        conn.send_nowait(Hello(PROTOCOL_VERSION, "producer", "p"))
        await conn.receive()  # WELCOME; from here on nothing is read for a while
    nursery.start_soon(client.send_all, b"".join(frame(GetJob(i, job_id)) for i in range(1, 3001)))
    await trio.sleep(5)
    (broker_side,) = made
    # --max-frame of answers, and those of the requests already being served (at most 256)
    # when it was passed: under 300 answers of about 20 KB, not 3,000.
    assert 64 * 1024 < broker_side.queued_bytes < 300 * 20_500
    answers = [await conn.receive() for _ in range(3000)]
    assert sorted(a.req for a in answers) == list(range(1, 3001))
    await trio.testing.wait_all_tasks_blocked()
    assert broker_side.queued_bytes == 0
