"""The real HTTP server started by ``Broker.serve``: sockets, HTTPS, the token file, shutdown."""

from __future__ import annotations

import logging
import os
import ssl
import stat
from pathlib import Path

import httpx
import pytest
import trio

from trioq.broker.auth import fingerprint
from trioq.broker.config import BrokerConfig
from trioq.broker.server import Broker
from trioq.http.server import check_http_config, load_or_create_token
from trioq.tls import CertPaths, client_context, server_context


def http_broker(certs_dir: Path, ssl_context: ssl.SSLContext | None = None, **overrides) -> Broker:
    cfg = dict(port=0, http=True, http_port=0, db=":memory:", certs_dir=str(certs_dir))
    cfg.update(overrides)
    return Broker(BrokerConfig(**cfg), ssl_context=ssl_context)


async def test_stats_over_a_real_socket_and_the_token_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trioq.http")
    broker = http_broker(tmp_path)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(broker.serve)
            assert handle.http_port and handle.http_port == broker.http_port
            token_file = tmp_path / "http-token"
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
            token = token_file.read_text().strip()
            assert len(token) >= 32
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}") as c:
                r = await c.get("/api/stats")
                assert r.status_code == 200
                assert r.json()["workers"]["total"] == 0 and r.json()["submitted_total"] == 0
                r = await c.get("/api/security")
                assert r.json()["port"] == handle.port and r.json()["http_tls"] is False
                r = await c.post("/api/queues/default/pause")
                assert r.status_code == 401
                r = await c.post("/api/queues/default/pause", headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 200 and r.json()["paused"] is True
            handle.cancel_scope.cancel()
    logged = caplog.text
    assert token[:6] not in logged, "a part of the token was logged"
    assert fingerprint(token) in logged and str(token_file) in logged

    # a second start reuses the token
    broker2 = http_broker(tmp_path)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(broker2.serve)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}") as c:
                r = await c.post("/api/queues/q2/pause", headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 200
            handle.cancel_scope.cancel()
    assert token_file.read_text().strip() == token


def test_token_file_helper(tmp_path: Path) -> None:
    token, path, created = load_or_create_token(tmp_path / "new-dir")
    assert created and path.read_text().strip() == token
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again, _, created = load_or_create_token(tmp_path / "new-dir")
    assert again == token and not created


async def test_explicit_token(tmp_path: Path) -> None:
    broker = http_broker(tmp_path, http_token="chosen-token")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(broker.serve)
            assert not (tmp_path / "http-token").exists()
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}") as c:
                r = await c.post("/api/queues/default/pause", headers={"Authorization": "Bearer chosen-token"})
                assert r.status_code == 200
            handle.cancel_scope.cancel()


async def test_https_with_the_broker_certificate(certs: CertPaths) -> None:
    broker = http_broker(certs.dir, server_context(certs), http_tls=True, http_token="t0ken")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(broker.serve)
            verify = client_context(certs.ca_cert)
            async with httpx.AsyncClient(base_url=f"https://localhost:{handle.http_port}", verify=verify) as c:
                r = await c.get("/api/security")
                assert r.status_code == 200
                sec = r.json()
                assert sec["http_tls"] is True and sec["tls"] is True
                assert sec["tls_version"] == "TLSv1.3 (minimum TLSv1.3)"
                assert sec["certificate"]["subject"] == "CN=trioq broker"
                assert "127.0.0.1" in sec["certificate"]["sans"]
            # an unverified client is refused: the certificate is the broker's, not a public one
            async with httpx.AsyncClient(base_url=f"https://localhost:{handle.http_port}") as c:
                with pytest.raises(httpx.ConnectError):
                    await c.get("/api/stats")
            # plain HTTP on the HTTPS port gets no API answer
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}") as c:
                try:
                    r = await c.get("/api/stats")
                except httpx.HTTPError:
                    pass
                else:
                    assert r.status_code >= 400
            handle.cancel_scope.cancel()


async def test_non_loopback_without_token_is_refused(tmp_path: Path) -> None:
    broker = http_broker(tmp_path, http_host="0.0.0.0")
    with trio.fail_after(20):
        with pytest.RaisesGroup(
            pytest.RaisesExc(ValueError, match="without an explicit token"), flatten_subgroups=True,
        ):
            async with trio.open_nursery() as nursery:
                await nursery.start(broker.serve)
    assert broker.http_port is None
    assert not (tmp_path / "http-token").exists(), "no token is made for a refused start"

    with pytest.raises(ValueError, match="loopback"):
        check_http_config(BrokerConfig(http_host="192.0.2.10"))
    with pytest.raises(ValueError, match="explicit token"):
        check_http_config(BrokerConfig(http_host="::"))
    check_http_config(BrokerConfig(http_host="::1"))
    check_http_config(BrokerConfig(http_host="localhost"))
    check_http_config(BrokerConfig(http_host="0.0.0.0", http_token="chosen"))


async def test_cancelling_the_broker_ends_open_event_streams(tmp_path: Path) -> None:
    broker = http_broker(tmp_path, http_token="t")
    serve_returned = trio.Event()

    async def run_broker(task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await broker.serve(task_status=task_status)
        finally:
            serve_returned.set()

    ended: list[str] = []

    async def listen(url: str, listening: trio.Event) -> None:
        async with httpx.AsyncClient() as c, c.stream("GET", url) as r:
            assert r.status_code == 200
            lines = r.aiter_lines()
            assert (await lines.__anext__()).startswith(":")
            listening.set()
            try:
                async for _ in lines:
                    pass
                ended.append("eof")
            except httpx.HTTPError as exc:  # cut off mid-stream: also an end
                ended.append(type(exc).__name__)

    # A correctness bound, not a timing assertion: without it a hang would hang the suite.
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(run_broker)
            url = f"http://127.0.0.1:{handle.http_port}/api/events"
            for _ in range(3):
                listening = trio.Event()
                nursery.start_soon(listen, url, listening)
                await listening.wait()
            handle.cancel_scope.cancel()
            await serve_returned.wait()  # serve() ends although three clients are listening
        # and every client saw its stream end instead of waiting forever
    assert len(ended) == 3, ended


async def test_a_request_naming_another_host_is_refused_dns_rebinding(tmp_path: Path) -> None:
    """A web page that rebinds its own name to 127.0.0.1 reaches the loopback API with its own
    name in the Host header: 421, so it reads no payloads; the loopback names, the bound
    address and --http-allowed-host names are answered."""
    broker = http_broker(tmp_path, http_allowed_hosts=("queue.internal",))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(broker.serve)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}") as c:
                for host in ("attacker.example", f"attacker.example:{handle.http_port}", "127.0.0.1.nip.io"):
                    r = await c.get("/api/jobs", headers={"Host": host})
                    assert r.status_code == 421 and r.json()["error"]["code"] == "bad_host", host
                for host in (f"127.0.0.1:{handle.http_port}", "localhost", f"LOCALHOST:{handle.http_port}",
                             f"[::1]:{handle.http_port}", "queue.internal"):
                    r = await c.get("/api/jobs", headers={"Host": host})
                    assert r.status_code == 200, host
            handle.cancel_scope.cancel()
