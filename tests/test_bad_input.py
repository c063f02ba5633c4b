"""Bad input over real TLS: a clear ERROR, the connection closed when it must be, others served."""

from __future__ import annotations

import struct

import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

import trioq
from trioq.errors import ConnectionLost, ErrorCode, RemoteError
from trioq.job import JobSpec
from trioq.protocol.framing import FramedConnection
from trioq.protocol.messages import PROTOCOL_VERSION, Ack, Error, Hello, Submit, Welcome
from trioq.tls import client_context

from .test_tls_e2e import start_broker


async def raw_session(nursery, port, certs, *, hello: bool = True, role: str = "producer") -> FramedConnection:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, client_context(certs.ca_cert), server_hostname="127.0.0.1")
    await tls.do_handshake()
    conn = FramedConnection(tls)
    nursery.start_soon(_writer, conn)
    if hello:
        conn.send_nowait(Hello(PROTOCOL_VERSION, role, "raw"))
        assert isinstance(await conn.receive(), Welcome)
    return conn


async def _writer(conn: FramedConnection) -> None:
    try:
        await conn.run_writer()
    except ConnectionLost:
        pass


async def expect_fatal(conn: FramedConnection, code: ErrorCode) -> Error:
    with trio.fail_after(10):
        msg = await conn.receive()
        assert isinstance(msg, Error), msg
        assert msg.code == code.value and msg.fatal and msg.message
        with pytest.raises(ConnectionLost):
            await conn.receive()  # then the broker closes the connection
    return msg


async def still_serving(port, certs) -> None:
    async with trioq.Client("127.0.0.1", port, ca=certs.ca_cert) as c:
        await c.submit("noop", {})
        s = await c.status()
        assert s["submitted_total"] >= 1


@pytest.fixture
async def handle(nursery, certs):
    return await start_broker(nursery, certs, hello_timeout=1.0, max_frame=64 * 1024)


async def test_garbage_bytes_after_handshake(nursery, certs, handle):
    conn = await raw_session(nursery, handle.port, certs)
    await conn.stream.send_all(b"\x00\x00\x00\x08garbage!")
    err = await expect_fatal(conn, ErrorCode.BAD_FRAME)
    assert "JSON" in err.message
    conn2 = await raw_session(nursery, handle.port, certs)
    await conn2.stream.send_all(bytes(range(256)) * 4)  # random-looking bytes: a huge length first
    await expect_fatal(conn2, ErrorCode.TOO_LARGE)
    await still_serving(handle.port, certs)


async def test_frame_over_the_size_limit(nursery, certs, handle):
    conn = await raw_session(nursery, handle.port, certs)
    await conn.stream.send_all(struct.pack(">I", 64 * 1024 + 1))
    err = await expect_fatal(conn, ErrorCode.TOO_LARGE)
    assert str(64 * 1024) in err.message
    conn = await raw_session(nursery, handle.port, certs)
    await conn.stream.send_all(struct.pack(">I", 0xFFFFFFFF))  # 4 GiB announced
    await expect_fatal(conn, ErrorCode.TOO_LARGE)
    await still_serving(handle.port, certs)


async def test_valid_frame_with_a_wrong_field_type(nursery, certs, handle):
    conn = await raw_session(nursery, handle.port, certs)
    body = b'{"t":"submit","req":1,"jobs":[{"task":"noop","priority":"high"}]}'
    await conn.stream.send_all(struct.pack(">I", len(body)) + body)
    err = await expect_fatal(conn, ErrorCode.INVALID_FIELD)
    assert "priority" in err.message
    await still_serving(handle.port, certs)


async def test_unknown_message_type(nursery, certs, handle):
    conn = await raw_session(nursery, handle.port, certs)
    body = b'{"t":"launch_missiles"}'
    await conn.stream.send_all(struct.pack(">I", len(body)) + body)
    await expect_fatal(conn, ErrorCode.UNKNOWN_MESSAGE)


async def test_unknown_task_is_refused_and_the_connection_goes_on(nursery, certs, handle):
    conn = await raw_session(nursery, handle.port, certs)
    conn.send_nowait(Submit(1, [JobSpec("no_such_task", {})]))
    with trio.fail_after(10):
        err = await conn.receive()
    assert isinstance(err, Error) and err.code == "unknown_task" and err.req == 1 and not err.fatal
    assert "no_such_task" in err.message
    conn.send_nowait(Submit(2, [JobSpec("noop", {})]))
    with trio.fail_after(10):
        ack = await conn.receive()
    assert isinstance(ack, Ack) and ack.req == 2 and len(ack.ids) == 1
    async with trioq.Client("127.0.0.1", handle.port, ca=certs.ca_cert) as c:
        with pytest.raises(RemoteError) as info:
            await c.submit("no_such_task", {})
        assert info.value.code == "unknown_task"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (JobSpec("noop", {}, priority=0), "priority"),
        (JobSpec("noop", {}, priority=11), "priority"),
        (JobSpec("bad name!", {}), "task"),
        (JobSpec("noop", {}, queue=""), "queue"),
        (JobSpec("noop", {}, timeout=0), "timeout"),
        (JobSpec("noop", {}, delay=-1), "delay"),
        (JobSpec("noop", {}, max_attempts=0), "max_attempts"),
        (JobSpec("noop", {"x": "y" * 70_000}), "payload"),
    ],
)
async def test_invalid_job_fields_are_named(nursery, certs, spec, field):
    h = await start_broker(nursery, certs, max_payload=64 * 1024)
    async with trioq.Client("127.0.0.1", h.port, ca=certs.ca_cert) as c:
        with pytest.raises(RemoteError) as info:
            await c.submit_many([spec])
        assert info.value.code in ("invalid_field", "too_large")
        assert field in info.value.message
        assert await c.submit("noop", {})  # same connection, still fine


async def test_message_before_hello_and_silence_before_hello(nursery, certs, handle):
    conn = await raw_session(nursery, handle.port, certs, hello=False)
    conn.send_nowait(Submit(1, [JobSpec("noop", {})]))
    await expect_fatal(conn, ErrorCode.UNEXPECTED)
    silent = await raw_session(nursery, handle.port, certs, hello=False)
    await expect_fatal(silent, ErrorCode.TIMEOUT)  # hello_timeout=1s
    await still_serving(handle.port, certs)


async def test_wrong_protocol_version(nursery, certs, handle):
    conn = await raw_session(nursery, handle.port, certs, hello=False)
    conn.send_nowait(Hello(PROTOCOL_VERSION + 1, "producer", "future"))
    err = await expect_fatal(conn, ErrorCode.VERSION)
    assert str(PROTOCOL_VERSION) in err.message


async def test_worker_cannot_submit_and_producer_cannot_report(nursery, certs, handle):
    from trioq.protocol.messages import Outcome, Result

    w = await raw_session(nursery, handle.port, certs, hello=False)
    w.send_nowait(Hello(PROTOCOL_VERSION, "worker", "w", None, 1, ["noop"], ["default"]))
    assert isinstance(await w.receive(), Welcome)
    w.send_nowait(Submit(1, [JobSpec("noop", {})]))
    await expect_fatal(w, ErrorCode.FORBIDDEN)
    p = await raw_session(nursery, handle.port, certs)
    p.send_nowait(Result([Outcome("x", 1, True)]))
    await expect_fatal(p, ErrorCode.FORBIDDEN)


async def test_result_for_a_job_the_worker_does_not_hold_is_refused(nursery, certs, handle):
    from trioq.protocol.messages import Outcome, Result

    w = await raw_session(nursery, handle.port, certs, hello=False)
    w.send_nowait(Hello(PROTOCOL_VERSION, "worker", "w", None, 1, ["reverse_string"], ["default"]))
    assert isinstance(await w.receive(), Welcome)
    w.send_nowait(Result([Outcome("0123456789abcdef", 1, True, "forged")]))
    with trio.fail_after(10):
        err = await w.receive()
    assert isinstance(err, Error) and err.code == "stale" and not err.fatal


_JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=8)
_NUMBERS = st.floats(0, 1e6) | st.integers(0, 1000)
# Each field present or not, mostly with a value of its own type, sometimes with any value.
_JOB_DICTS = st.fixed_dictionaries({}, optional={
    "task": st.sampled_from(["noop", "t.x", ""]) | _JSON_SCALARS,
    "payload": st.dictionaries(st.text(max_size=4), _JSON_SCALARS, max_size=2) | _JSON_SCALARS,
    "priority": st.integers(0, 12) | _JSON_SCALARS,
    "queue": st.sampled_from(["default", "q2"]) | _JSON_SCALARS,
    "delay": _NUMBERS | _JSON_SCALARS,
    "run_at": _NUMBERS | _JSON_SCALARS,
    "max_attempts": st.integers(1, 5) | _JSON_SCALARS,
    "timeout": _NUMBERS | _JSON_SCALARS,
    "idempotency_key": st.text(max_size=5) | _JSON_SCALARS,
    "other": _JSON_SCALARS,
})


# Half the examples shaped like the fast path's jobs: the task, and a payload or not.
_PLAIN_JOBS = st.fixed_dictionaries(
    {"task": st.sampled_from(["noop", "t.x"]) | _JSON_SCALARS},
    optional={"payload": st.dictionaries(st.text(max_size=4), _JSON_SCALARS, max_size=2) | _JSON_SCALARS},
)


@settings(max_examples=500, deadline=None)
@given(st.one_of(_PLAIN_JOBS, _JOB_DICTS))
@example({"task": "t"})
@example({"task": "t", "payload": {"a": 1}})
@example({"task": "t", "payload": None})
@example({"task": "t", "priority": 9})
@example({"task": 1})
@example({"payload": {}})
@example({"payload": {}, "queue": "q"})
@example({"x": 1})
@example({})
def test_the_fast_path_for_plain_jobs_decodes_as_the_field_by_field_path_does(d):
    """A job naming only its task (and perhaps a payload) skips the per-field checks: it must
    come out the same, and anything else must take the checks and get their errors."""
    from trioq.protocol.messages import FieldError, _structure_jobspec, _structure_jobspec_fields

    try:
        expected = _structure_jobspec_fields(d, "$.jobs[0]")
    except FieldError as exc:
        with pytest.raises(FieldError) as got:
            _structure_jobspec(d, "$.jobs[0]")
        assert str(got.value) == str(exc)
    else:
        assert _structure_jobspec(d, "$.jobs[0]") == expected
