"""Real TLS sockets on 127.0.0.1 with generated certificates."""

from __future__ import annotations

import ssl

import pytest
import trio
import trio.testing

import trioq
from trioq.broker.config import BrokerConfig
from trioq.broker.server import Broker
from trioq.errors import ConnectError
from trioq.job import JobState
from trioq.tls import CertPaths, client_context, create_ca, server_context


async def start_broker(nursery: trio.Nursery, certs: CertPaths, **cfg) -> trioq.BrokerHandle:
    config = BrokerConfig(port=0, http=False, db=":memory:", **cfg)
    broker = Broker(config, ssl_context=server_context(certs))
    return await nursery.start(broker.serve)


async def test_submit_dispatch_execute_result_over_tls(nursery, certs):
    h = await start_broker(nursery, certs)
    worker = trioq.Worker("127.0.0.1", h.port, ssl_context=client_context(certs.ca_cert), concurrency=2)
    await nursery.start(worker.run)
    async with trioq.Client("127.0.0.1", h.port, ca=certs.ca_cert) as c:
        ids = [
            await c.submit("reverse_string", {"data": "hello"}, priority=1),
            await c.submit("to_uppercase", {"data": "hello"}),
            await c.submit("fibonacci", {"n": 30}),
            await c.submit("is_prime", {"n": 7919}),
        ]
        results = [(await c.result(i, timeout=30)) for i in ids]
        assert [j.state for j in results] == [JobState.COMPLETED] * 4
        assert [j.result for j in results] == ["olleh", "HELLO", 832040, True]
        assert all(j.attempts == 1 and j.worker == worker.name for j in results)
        status = await c.status()
        assert status["jobs"]["completed"] == 4 and status["workers"]["total"] == 1
        in_one_trip = await c.run("reverse_string", {"data": "abc"}, result_timeout=30)  # SUBMIT with wait
        assert (in_one_trip.state, in_one_trip.result) == (JobState.COMPLETED, "cba")
    worker.request_stop()


async def test_task_failure_reports_type_message_and_traceback(nursery, certs):
    h = await start_broker(nursery, certs)
    worker = trioq.Worker("127.0.0.1", h.port, ssl_context=client_context(certs.ca_cert))
    await nursery.start(worker.run)
    async with trioq.Client("127.0.0.1", h.port, ca=certs.ca_cert) as c:
        bad = await c.submit("fibonacci", {"n": -1}, max_attempts=1)
        job = await c.result(bad, timeout=30)
        assert job.state is JobState.DEAD
        assert job.error.type == "ValueError" and "n must be" in job.error.message
        assert "Traceback" in job.error.traceback and "fibonacci" in job.error.traceback
        # the worker keeps going
        ok = await c.submit("reverse_string", {"data": "ab"})
        assert (await c.result(ok, timeout=30)).result == "ba"


async def test_plain_tcp_client_is_rejected_and_broker_keeps_serving(nursery, certs, caplog):
    h = await start_broker(nursery, certs)
    plain = await trio.open_tcp_stream("127.0.0.1", h.port)
    await plain.send_all(b"\x00\x00\x00\x10" + b'{"t":"hello"}   ')
    with trio.fail_after(10):
        data = await plain.receive_some(1024)
        while data:  # the broker answers with a TLS alert at most, then closes
            data = await plain.receive_some(1024)
    await plain.aclose()
    refused = [r for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert len(refused) == 1 and "127.0.0.1" in refused[0].getMessage()
    worker = trioq.Worker("127.0.0.1", h.port, ssl_context=client_context(certs.ca_cert))
    await nursery.start(worker.run)
    async with trioq.Client("127.0.0.1", h.port, ca=certs.ca_cert) as c:
        jid = await c.submit("to_uppercase", {"data": "still here"})
        assert (await c.result(jid, timeout=30)).result == "STILL HERE"


async def test_client_that_does_not_trust_the_ca_fails(nursery, certs, tmp_path):
    h = await start_broker(nursery, certs)
    other = CertPaths.in_dir(tmp_path / "other")
    create_ca(other)
    with pytest.raises(ConnectError, match="certificate"):
        async with trioq.Client("127.0.0.1", h.port, ca=other.ca_cert):
            pass
    # hostname checking: the certificate is not valid for this name
    ctx = client_context(certs.ca_cert)
    with pytest.raises(ConnectError, match="certificate"):
        async with trioq.Client("127.0.0.1", h.port, ssl_context=ctx, server_hostname="evil.example"):
            pass


async def test_tls_1_3_is_the_default_minimum(nursery, certs):
    h = await start_broker(nursery, certs)
    ctx = client_context(certs.ca_cert)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ConnectError):
        async with trioq.Client("127.0.0.1", h.port, ssl_context=ctx):
            pass


async def test_unreachable_broker_is_a_clear_error(certs):
    with trio.fail_after(10), pytest.raises(ConnectError, match="cannot reach broker"):
        async with trioq.Client("127.0.0.1", 1, ca=certs.ca_cert):
            pass


async def test_a_peer_gone_without_a_tls_goodbye_is_a_clear_connection_lost(certs):
    """A broker that stops or is killed leaves no TLS close_notify: a waiting client is told
    so in words, not with the SSL library's UNEXPECTED_EOF_WHILE_READING."""
    from trioq.errors import ConnectionLost
    from trioq.protocol.framing import FramedConnection

    client_raw, server_raw = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_raw, server_context(certs), server_side=True)
    client = trio.SSLStream(client_raw, client_context(certs.ca_cert), server_hostname="localhost")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    await server_raw.aclose()  # the process is gone: its socket closes, with no TLS goodbye
    with trio.fail_after(5), pytest.raises(ConnectionLost, match="closed the connection abruptly"):
        await FramedConnection(client).receive()
