"""Who may connect and what they may do: tokens and roles, mutual TLS, open mode, TLS versions.

Every test runs a real broker on 127.0.0.1 over real TLS; tokens and client certificates are
made by the real ``trioq token create`` and ``trioq certs client`` commands.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import trio
from click.testing import CliRunner

import trioq
from trioq.broker.auth import Authenticator
from trioq.broker.config import BrokerConfig
from trioq.broker.server import Broker, BrokerHandle
from trioq.cli import main as cli
from trioq.errors import ConnectError, ConnectionLost, JobNotFound, RemoteError
from trioq.job import JobSpec, JobState, Progress
from trioq.protocol.framing import FramedConnection
from trioq.protocol.messages import (
    PROTOCOL_VERSION,
    CancelJob,
    Drain,
    Error,
    GetJob,
    Hello,
    Message,
    Outcome,
    ProgressReport,
    Release,
    Result,
    StatusRequest,
    Submit,
    WaitJob,
    Welcome,
)
from trioq.tls import (
    CertPaths,
    client_context,
    create_ca,
    ensure_certs,
    issue_certificate,
    issue_client_cert,
    server_context,
)

OPENSSL = "/usr/bin/openssl"


# --- helpers shared with test_abuse ---------------------------------------------------------------


async def start_broker(
    nursery: trio.Nursery,
    certs: CertPaths,
    *,
    require_client_cert: bool = False,
    min_version: str = "1.3",
    **cfg,
) -> BrokerHandle:
    cfg.setdefault("db", ":memory:")
    config = BrokerConfig(
        port=0,
        http=False,
        tls_min_version=min_version,
        require_client_cert=require_client_cert,
        **cfg,
    )
    ctx = server_context(certs, min_version=min_version, require_client_cert=require_client_cert)
    return await nursery.start(Broker(config, ssl_context=ctx).serve)


async def _writer(conn: FramedConnection) -> None:
    try:
        await conn.run_writer()
    except ConnectionLost:
        pass


async def open_raw(
    nursery: trio.Nursery,
    port: int,
    ca: Path,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    writer: bool = True,
) -> FramedConnection:
    """A TLS connection that speaks frames by hand: the test decides every byte.

    With ``writer=False`` nothing but ``conn.stream.send_all`` writes to it.
    """
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, client_context(ca, cert=cert, key=key), server_hostname="127.0.0.1")
    await tls.do_handshake()
    conn = FramedConnection(tls)
    if writer:
        nursery.start_soon(_writer, conn)
    return conn


async def say_hello(
    conn: FramedConnection, role: str, token: str | None = None, **worker
) -> Message:
    if role == "worker":
        worker = {"concurrency": 1, "tasks": ["sec_only"], "queues": ["sec"], **worker}
    conn.send_nowait(Hello(PROTOCOL_VERSION, role, "raw", token, **worker))
    with trio.fail_after(10):
        return await conn.receive()


async def expect_fatal(conn: FramedConnection, code: str) -> Error:
    """The broker's last frame is a fatal ERROR with ``code``; then it closes the connection."""
    with trio.fail_after(10):
        msg = await conn.receive()
        assert isinstance(msg, Error), msg
        assert msg.code == code and msg.fatal and msg.message, msg
        with pytest.raises(ConnectionLost):
            while True:  # nothing but EOF may follow
                extra = await conn.receive()
                raise AssertionError(f"a frame after a fatal error: {extra!r}")
    return msg


@attrs.define
class Steady:
    """A well-behaved producer that keeps submitting and reading results while others misbehave."""

    port: int
    ca: Path
    token: str | None = None
    cert: Path | None = None
    key: Path | None = None
    done: int = 0
    _changed: trio.Event = attrs.Factory(trio.Event)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trioq.Client(
            "127.0.0.1",
            self.port,
            ca=self.ca,
            token=self.token,
            cert=self.cert,
            key=self.key,
            name="steady",
        ) as c:
            task_status.started()
            while True:
                text = f"steady-{self.done}"
                jid = await c.submit("reverse_string", {"data": text}, max_attempts=3, timeout=30)
                job = await c.result(jid, timeout=30)
                assert job.state is JobState.COMPLETED and job.result == text[::-1], job
                self.done += 1
                self._changed.set()
                self._changed = trio.Event()

    async def advance(self, rounds: int = 2) -> None:
        """Returns once ``rounds`` more jobs went through from now."""
        target = self.done + rounds
        with trio.fail_after(20):
            while self.done < target:
                await self._changed.wait()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- tokens and roles -------------------------------------------------------------------------------


@attrs.frozen
class Tokens:
    path: Path
    alice: str  # producer
    bob: str  # producer
    worker: str
    admin: str


def create_token(auth_file: Path, role: str, name: str) -> str:
    result = CliRunner().invoke(
        cli, ["token", "create", "--role", role, "--name", name, "--auth-file", str(auth_file)]
    )
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert "\n" not in token and name in result.stderr and token not in result.stderr
    return token


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    path = tmp_path / "auth" / "tokens.jsonl"
    return Tokens(
        path,
        alice=create_token(path, "producer", "alice"),
        bob=create_token(path, "producer", "bob"),
        worker=create_token(path, "worker", "w"),
        admin=create_token(path, "admin", "root"),
    )


def test_tokens_are_printed_once_and_only_their_hash_is_kept(tokens: Tokens) -> None:
    text = tokens.path.read_text()
    secrets_ = [tokens.alice, tokens.bob, tokens.worker, tokens.admin]
    assert len(set(secrets_)) == 4 and all(len(t) >= 40 for t in secrets_)  # >= 256 bits, urlsafe
    for token in secrets_:
        assert token not in text and token[3:20] not in text
        assert "sha256:" + hashlib.sha256(token.encode()).hexdigest() in text
    assert mode(tokens.path) == 0o600
    # a file someone loosened is tightened again by the next token
    os.chmod(tokens.path, 0o644)
    create_token(tokens.path, "producer", "carol")
    assert mode(tokens.path) == 0o600
    creds = Authenticator.load(tokens.path, env={}).credentials
    assert [(c.name, c.role) for c in creds] == [
        ("alice", "producer"),
        ("bob", "producer"),
        ("w", "worker"),
        ("root", "admin"),
        ("carol", "producer"),
    ]
    auth = Authenticator.load(tokens.path, env={})
    assert auth.check(tokens.admin).role == "admin"
    assert auth.check(tokens.admin + " ") is None and auth.check(tokens.admin[:-1]) is None
    assert auth.check(None) is None and auth.check("x" * 10_000) is None


async def test_roles_are_enforced_and_good_clients_are_served_throughout(
    nursery: trio.Nursery, certs: CertPaths, tokens: Tokens, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # everything trioq says, to look for tokens in it
    h = await start_broker(nursery, certs, auth_file=str(tokens.path))
    port, ca = h.port, certs.ca_cert
    worker = trioq.Worker(
        "127.0.0.1", port, ssl_context=client_context(ca), token=tokens.worker, concurrency=4
    )
    await nursery.start(worker.run)
    steady = Steady(port, ca, token=tokens.alice)
    await nursery.start(steady.run)
    await steady.advance()

    # No token, a wrong one, a near miss, an absurd one: unauthenticated, and the connection ends.
    for token in (None, "tq_" + "A" * 43, tokens.alice[:-1], tokens.alice + "x", "x" * 100_000):
        conn = await open_raw(nursery, port, ca)
        conn.send_nowait(Hello(PROTOCOL_VERSION, "producer", "intruder", token))
        await expect_fatal(conn, "unauthenticated")
    for role in ("producer", "worker", "admin"):
        with pytest.raises(RemoteError) as info:
            async with trioq.Client("127.0.0.1", port, ca=ca, role=role, token="tq_guess"):
                pass
        assert info.value.code == "unauthenticated"
    await steady.advance()

    # A producer token opens no worker or admin session, and a producer session sends no worker frames.
    for role in ("worker", "admin"):
        conn = await open_raw(nursery, port, ca)
        conn.send_nowait(
            Hello(PROTOCOL_VERSION, role, "p", tokens.alice, 1, ["reverse_string"], ["default"])
        )
        err = await expect_fatal(conn, "forbidden")
        assert f"producer token cannot open a {role} session" in err.message
    for frame in (
        Result([Outcome("0123456789abcdef", 1, True, "forged")]),
        ProgressReport("0123456789abcdef", 1, Progress(0.5)),
        Release(["0123456789abcdef"], [1]),
        Drain(),
    ):
        conn = await open_raw(nursery, port, ca)
        assert isinstance(await say_hello(conn, "producer", tokens.alice), Welcome)
        conn.send_nowait(frame)
        await expect_fatal(conn, "forbidden")

    # A worker token opens no producer session, and a worker session submits and reads nothing.
    for role in ("producer", "admin"):
        conn = await open_raw(nursery, port, ca)
        conn.send_nowait(Hello(PROTOCOL_VERSION, role, "w", tokens.worker))
        await expect_fatal(conn, "forbidden")
    for frame in (
        Submit(1, [JobSpec("reverse_string", {"data": "x"})]),
        GetJob(2, "0123456789abcdef"),
        WaitJob(3, "0123456789abcdef"),
        CancelJob(4, "0123456789abcdef"),
        StatusRequest(5),
    ):
        conn = await open_raw(nursery, port, ca)
        welcome = await say_hello(conn, "worker", tokens.worker)
        assert isinstance(welcome, Welcome) and welcome.role == "worker"
        conn.send_nowait(frame)
        await expect_fatal(conn, "forbidden")
    await steady.advance()

    async with (
        trioq.Client("127.0.0.1", port, ca=ca, token=tokens.alice, name="alice") as alice,
        trioq.Client("127.0.0.1", port, ca=ca, token=tokens.bob, name="bob") as bob,
        trioq.Client(
            "127.0.0.1", port, ca=ca, token=tokens.admin, role="admin", name="root"
        ) as admin,
        trioq.Client(
            "127.0.0.1", port, ca=ca, token=tokens.admin, name="root-as-producer"
        ) as admin_p,
    ):
        assert admin.welcome.role == "admin" and admin_p.welcome.role == "producer"
        dead = await alice.submit("fibonacci", {"n": -1}, max_attempts=1)
        assert (await alice.result(dead, timeout=30)).state is JobState.DEAD
        # retry and discard are admin-only: refused, but the producer's connection goes on
        for client in (alice, bob, admin_p):
            for op in (client.retry, client.discard):
                with pytest.raises(RemoteError) as info:
                    await op(dead)
                assert info.value.code == "forbidden" and "admin" in info.value.message
        assert (await alice.get_job(dead)).state is JobState.DEAD
        retried = await admin.retry(dead)
        assert retried.state in (JobState.QUEUED, JobState.RUNNING, JobState.DEAD)
        again = await alice.result(dead, timeout=30)
        assert again.state is JobState.DEAD and again.attempts == 2
        assert (await admin.discard(dead)).id == dead
        with pytest.raises(JobNotFound):
            await alice.get_job(dead)

        # a producer cancels its own jobs, not someone else's (to it they do not exist, as for
        # get_job: a different answer would tell that they do); an admin cancels anyone's
        mine = await alice.submit("reverse_string", {"data": "later"}, delay=3600)
        theirs = await bob.submit("reverse_string", {"data": "later"}, delay=3600)
        with pytest.raises(JobNotFound):
            await bob.cancel(mine)
        ownerless, _ = await h.broker.submit([JobSpec("noop", delay=3600)])  # as over HTTP: no owner
        with pytest.raises(JobNotFound):
            await bob.cancel(ownerless[0])
        assert (await admin.get_job(ownerless[0])).state is JobState.SCHEDULED
        assert (await alice.get_job(mine)).state is JobState.SCHEDULED
        assert (await alice.cancel(mine)).state is JobState.CANCELLED
        assert (await admin.cancel(theirs)).state is JobState.CANCELLED
        assert (await alice.get_job(mine)).owner == "alice"
    await steady.advance()

    # Tokens never reach the log, not even a wrong one; every refusal is one line with peer and code.
    logged = caplog.text
    for token in (
        tokens.alice,
        tokens.bob,
        tokens.worker,
        tokens.admin,
        "tq_guess",
        "tq_" + "A" * 43,
    ):
        assert token not in logged and token[:12] not in logged
    refused = [
        r.getMessage() for r in caplog.records if " closed: unauthenticated" in r.getMessage()
    ]
    assert len(refused) == 5 + 3, refused
    assert all(m.startswith("connection from 127.0.0.1:") for m in refused)
    assert (
        len([r for r in caplog.records if " closed: forbidden" in r.getMessage()]) == 2 + 4 + 2 + 5
    )


async def test_producers_read_only_their_own_jobs_and_admins_read_all(
    nursery: trio.Nursery, certs: CertPaths, tokens: Tokens, tmp_path: Path
) -> None:
    h = await start_broker(nursery, certs, auth_file=str(tokens.path), db=str(tmp_path / "own.db"))
    port, ca = h.port, certs.ca_cert
    worker = trioq.Worker("127.0.0.1", port, ssl_context=client_context(ca), token=tokens.worker, concurrency=2)
    await nursery.start(worker.run)
    async with (
        trioq.Client("127.0.0.1", port, ca=ca, token=tokens.alice) as alice,
        trioq.Client("127.0.0.1", port, ca=ca, token=tokens.bob) as bob,
        trioq.Client("127.0.0.1", port, ca=ca, token=tokens.admin, role="admin") as admin,
    ):
        mine = await alice.submit("reverse_string", {"data": "alice's secret"})
        theirs = await bob.submit("reverse_string", {"data": "bob"})
        assert (await alice.result(mine, timeout=10)).result == "terces s'ecila"
        # to bob, alice's job does not exist: not its payload, not its result, not its listing
        for read in (bob.get_job, lambda i: bob.result(i, timeout=5)):
            with pytest.raises(JobNotFound):
                await read(mine)
        assert [j.id for j in (await bob.list_jobs())[0]] == [theirs]
        assert [j.id for j in (await alice.list_jobs())[0]] == [mine]
        # the admin sees both, and bob still reads his own
        assert {j.id for j in (await admin.list_jobs())[0]} == {mine, theirs}
        assert (await admin.get_job(mine)).payload == {"data": "alice's secret"}
        assert (await bob.result(theirs, timeout=10)).result == "bob"


async def test_idempotency_keys_belong_to_the_credential_that_used_them(
    nursery: trio.Nursery, certs: CertPaths, tokens: Tokens, tmp_path: Path
) -> None:
    """One producer's key neither finds nor blocks another's job: bob using alice's key gets a
    job of his own and never learns hers (it waits in a queue no worker serves)."""
    h = await start_broker(nursery, certs, auth_file=str(tokens.path), db=str(tmp_path / "keys.db"))
    port, ca = h.port, certs.ca_cert
    async with (
        trioq.Client("127.0.0.1", port, ca=ca, token=tokens.alice) as alice,
        trioq.Client("127.0.0.1", port, ca=ca, token=tokens.bob) as bob,
    ):
        mine = await alice.submit("noop", {"who": "alice"}, queue="held", idempotency_key="order-1")
        theirs = await bob.submit("noop", {"who": "bob"}, queue="held", idempotency_key="order-1")
        assert theirs != mine
        assert await alice.submit("noop", {"who": "alice again"}, queue="held", idempotency_key="order-1") == mine
        assert await bob.submit("noop", {"who": "bob again"}, queue="held", idempotency_key="order-1") == theirs
        assert (await bob.get_job(theirs)).payload == {"who": "bob"}
        assert (await alice.get_job(mine)).payload == {"who": "alice"}
        with pytest.raises(JobNotFound):
            await bob.get_job(mine)
    assert {(j.owner, j.idempotency_key) for j in h.broker.dispatcher.idempotency.values()} == {
        ("alice", "order-1"), ("bob", "order-1"),
    }


async def test_only_an_admin_pauses_a_queue_and_its_jobs_wait_until_resumed(
    nursery: trio.Nursery, certs: CertPaths, tokens: Tokens
) -> None:
    h = await start_broker(nursery, certs, auth_file=str(tokens.path))
    port, ca = h.port, certs.ca_cert
    worker = trioq.Worker(
        "127.0.0.1", port, ssl_context=client_context(ca), token=tokens.worker, concurrency=1,
        queues=("default", "other"),
    )
    await nursery.start(worker.run)
    async with (
        trioq.Client("127.0.0.1", port, ca=ca, token=tokens.alice) as alice,
        trioq.Client("127.0.0.1", port, ca=ca, token=tokens.admin, role="admin") as admin,
    ):
        with pytest.raises(RemoteError) as info:
            await alice.pause("default")
        assert info.value.code == "forbidden"
        for bad in ("no spaces", "default\n", ""):
            with pytest.raises(RemoteError) as info:
                await admin.pause(bad)
            assert info.value.code == "invalid_field"
        assert await admin.pause("default") is True
        held = await alice.submit("reverse_string", {"data": "held"})
        # the one worker slot is free: a job on another queue, submitted after, runs first
        later = await alice.submit("reverse_string", {"data": "other"}, queue="other")
        assert (await alice.result(later, timeout=10)).result == "rehto"
        assert (await alice.get_job(held)).state is JobState.QUEUED
        assert (await alice.status())["queue_size"] == 1
        assert await admin.resume("default") is False
        assert (await alice.result(held, timeout=10)).result == "dleh"


async def test_a_real_broker_process_with_tokens_and_limits_from_flags(
    nursery: trio.Nursery, tmp_path: Path, tokens: Tokens
) -> None:
    from .procs import TrioqProcess, free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOQ_")}
    broker = await TrioqProcess.start(
        nursery,
        "broker",
        "broker",
        "--port",
        str(port),
        "--no-http",
        "--db",
        ":memory:",
        "--certs-dir",
        str(tmp_path / "certs"),
        "--auth-file",
        str(tokens.path),
        "--hello-timeout",
        "0.5",
        "--max-errors",
        "3",
        "--log-level",
        "debug",
        cwd=tmp_path,
        env=env,
    )
    try:
        await broker.wait_for(r"broker listening on 127\.0\.0\.1:\d+ \(TLS on, auth 4 token\(s\)")
        ca = tmp_path / "certs" / "ca.pem"
        worker = trioq.Worker(
            "127.0.0.1", port, ssl_context=client_context(ca), token=tokens.worker
        )
        await nursery.start(worker.run)
        async with trioq.Client("127.0.0.1", port, ca=ca, token=tokens.alice) as c:
            jid = await c.submit("reverse_string", {"data": "flags"})
            assert (await c.result(jid, timeout=30)).result == "sgalf"
            for _ in range(3):  # --max-errors 3: three refusals are answered...
                with pytest.raises(RemoteError) as info:
                    await c.submit("reverse_string", {"data": "x"}, priority=0)
                assert info.value.code == "invalid_field"
            with pytest.raises((RemoteError, ConnectionLost)):  # ...the fourth ends the session
                await c.submit("reverse_string", {"data": "x"}, priority=0)
        silent = await open_raw(nursery, port, ca)
        err = await expect_fatal(silent, "timeout")  # --hello-timeout 0.5
        assert "0.5s" in err.message
        with pytest.raises(RemoteError) as info:
            async with trioq.Client("127.0.0.1", port, ca=ca, token="tq_nope"):
                pass
        assert info.value.code == "unauthenticated"
        await broker.wait_for(r"connection from 127\.0\.0\.1:\d+ closed: unauthenticated")
        worker.request_stop()
    finally:
        await broker.stop()
    logged = "\n".join(broker.lines)
    assert re.search(r"connection from 127\.0\.0\.1:\d+ closed: \w+: more than 3 ", logged), logged
    for token in (tokens.alice, tokens.worker, "tq_nope"):
        assert token not in logged


async def run_broker_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``trioq broker ARGS`` as a real process that is expected to refuse to start, bounded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOQ_")}
    cmd = [sys.executable, "-m", "trioq", "broker", "--port", "0", "--no-http",
           "--certs-dir", str(tmp_path / "certs"), "--db", ":memory:", *args]
    with trio.fail_after(60):
        return await trio.run_process(
            cmd, cwd=tmp_path, env=env, stdin=b"", capture_stdout=True, capture_stderr=True, check=False
        )


async def test_local_workers_cannot_be_combined_with_client_certificates(tmp_path: Path) -> None:
    proc = await run_broker_cli(tmp_path, "--workers", "1", "--require-client-cert")
    assert proc.returncode == 1 and "--workers cannot be combined" in proc.stderr.decode()


# --- open mode --------------------------------------------------------------------------------------


async def test_without_tokens_the_broker_is_loopback_only_and_says_so(
    nursery: trio.Nursery, certs: CertPaths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = server_context(certs)
    for host in ("0.0.0.0", "::", "192.0.2.10", "broker.example"):
        with pytest.raises(
            ValueError, match=f"refusing to listen on {host} without authentication"
        ):
            Broker(
                BrokerConfig(host=host, http=False, db=":memory:"),
                ssl_context=ctx,
                authenticator=Authenticator(),
            )
    # tokens (from the environment, here) or client certificates make another address acceptable
    Broker(
        BrokerConfig(host="0.0.0.0", http=False, db=":memory:"),
        ssl_context=ctx,
        authenticator=Authenticator.load(None, env={"TRIOQ_PRODUCER_TOKEN": "tq_x"}),
    )
    Broker(
        BrokerConfig(host="0.0.0.0", http=False, db=":memory:", require_client_cert=True),
        ssl_context=server_context(certs, require_client_cert=True),
        authenticator=Authenticator(),
    )
    # but never without TLS, and never a certificate demand the TLS context does not make
    with pytest.raises(ValueError, match="without TLS"):
        Broker(
            BrokerConfig(host="0.0.0.0", http=False, db=":memory:"),
            ssl_context=None,
            authenticator=Authenticator.load(None, env={"TRIOQ_ADMIN_TOKEN": "tq_x"}),
        )
    with pytest.raises(ValueError, match="client certificates"):
        Broker(BrokerConfig(http=False, db=":memory:", require_client_cert=True), ssl_context=ctx)

    # The real command refuses before it binds anything, with the reason on stderr.
    proc = await run_broker_cli(tmp_path, "--host", "0.0.0.0")
    assert proc.returncode == 1, proc.stderr.decode()
    assert "refusing to listen on 0.0.0.0 without authentication" in proc.stderr.decode()

    # On loopback it runs, and warns loudly that it is open.
    caplog.set_level(logging.INFO, logger="trioq")
    h = await start_broker(nursery, certs)
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "OPEN MODE" in r.getMessage()
    ]
    assert len(warnings) == 1 and "no tokens configured" in warnings[0].getMessage()
    assert any("auth OPEN (loopback only)" in r.getMessage() for r in caplog.records)
    async with trioq.Client("127.0.0.1", h.port, ca=certs.ca_cert) as c:
        assert await c.submit("noop", {})


# --- mutual TLS -------------------------------------------------------------------------------------


async def test_mutual_tls_takes_the_role_from_the_certificate(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioq")
    d = tmp_path / "certs"
    runner = CliRunner()
    assert runner.invoke(cli, ["certs", "--dir", str(d)]).exit_code == 0
    for name, role in (("w1", "worker"), ("p1", "producer"), ("p2", "producer"), ("ops", "admin")):
        result = runner.invoke(cli, ["certs", "--dir", str(d), "client", name, "--role", role])
        assert result.exit_code == 0, result.output
        assert f"role {role}" in result.output
        assert mode(d / f"client-{name}.key") == 0o600 and mode(d / f"client-{name}.pem") == 0o644
    paths = CertPaths.in_dir(d)
    assert mode(paths.ca_key) == 0o600 and mode(paths.server_key) == 0o600

    def pair(name: str) -> dict[str, Path]:
        return {"cert": d / f"client-{name}.pem", "key": d / f"client-{name}.key"}

    h = await start_broker(nursery, paths, require_client_cert=True)
    port, ca = h.port, paths.ca_cert
    assert any("auth client certificates" in r.getMessage() for r in caplog.records)
    assert not any("OPEN MODE" in r.getMessage() for r in caplog.records)

    # No certificate: trioq's ConnectError, whichever TLS step notices, saying what is missing.
    with trio.fail_after(10), pytest.raises(ConnectError) as info:
        async with trioq.Client("127.0.0.1", port, ca=ca):
            pass
    assert "client certificate" in str(info.value), info.value
    # A certificate from another CA, even one claiming admin.
    other = CertPaths.in_dir(tmp_path / "other")
    create_ca(other)
    forged_cert, forged_key = issue_client_cert(other.dir, "mallory", "admin")
    with trio.fail_after(10), pytest.raises(ConnectError):
        async with trioq.Client(
            "127.0.0.1", port, ca=ca, cert=forged_cert, key=forged_key, role="admin"
        ):
            pass
    with trio.fail_after(10), pytest.raises(ConnectError):
        w = trioq.Worker(
            "127.0.0.1",
            port,
            reconnect=False,
            ssl_context=client_context(ca, cert=forged_cert, key=forged_key),
        )
        await w.run()
    # The project CA, but no role in the certificate.
    issue_certificate(paths, "nobody", d / "nobody.pem", d / "nobody.key", server=False)
    with pytest.raises(RemoteError) as info:
        async with trioq.Client(
            "127.0.0.1", port, ca=ca, cert=d / "nobody.pem", key=d / "nobody.key"
        ):
            pass
    assert info.value.code == "unauthenticated"
    refusals = [
        r.getMessage() for r in caplog.records if "refused: tls_handshake: TLS handshake failed" in r.getMessage()
    ]
    assert len(refusals) == 3 and all("127.0.0.1:" in m for m in refusals)

    # The worker certificate: a worker session, jobs run; never a producer session, never a SUBMIT.
    worker = trioq.Worker(
        "127.0.0.1", port, ssl_context=client_context(ca, **pair("w1")), concurrency=2
    )
    welcome = await nursery.start(worker.run)
    assert welcome.role == "worker"
    with pytest.raises(RemoteError) as info:
        async with trioq.Client("127.0.0.1", port, ca=ca, **pair("w1")):
            pass
    assert info.value.code == "forbidden" and "worker certificate" in info.value.message
    conn = await open_raw(nursery, port, ca, **pair("w1"))
    welcome = await say_hello(conn, "worker")
    assert isinstance(welcome, Welcome) and welcome.role == "worker"
    conn.send_nowait(Submit(1, [JobSpec("reverse_string", {"data": "x"})]))
    await expect_fatal(conn, "forbidden")
    # the producer certificate cannot be a worker
    conn = await open_raw(nursery, port, ca, **pair("p1"))
    conn.send_nowait(
        Hello(PROTOCOL_VERSION, "worker", "p1", None, 1, ["reverse_string"], ["default"])
    )
    await expect_fatal(conn, "forbidden")

    steady = Steady(port, ca, **pair("p2"))
    await nursery.start(steady.run)
    async with (
        trioq.Client("127.0.0.1", port, ca=ca, **pair("p1")) as p1,
        trioq.Client("127.0.0.1", port, ca=ca, **pair("p2")) as p2,
        trioq.Client("127.0.0.1", port, ca=ca, role="admin", **pair("ops")) as ops,
    ):
        jid = await p1.submit("reverse_string", {"data": "mutual"})
        job = await p1.result(jid, timeout=30)
        assert job.result == "lautum" and job.worker == worker.name and job.owner == "cert:p1"
        # each certificate owns its jobs; admin-only requests stay admin-only
        later = await p1.submit("noop", {}, delay=3600)
        with pytest.raises(JobNotFound):
            await p2.cancel(later)
        dead = await p1.submit("fibonacci", {"n": -1}, max_attempts=1)
        assert (await p1.result(dead, timeout=30)).state is JobState.DEAD
        with pytest.raises(RemoteError) as info:
            await p1.retry(dead)
        assert info.value.code == "forbidden"
        assert (await ops.retry(dead)).id == dead
        assert (await ops.cancel(later)).state is JobState.CANCELLED
    await steady.advance()


# --- TLS versions, seen by a client no one here wrote ----------------------------------------------------


async def s_client(port: int, ca: Path, *flags: str) -> tuple[int, str]:
    with trio.fail_after(20):
        proc = await trio.run_process(
            [
                OPENSSL,
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                "-CAfile",
                str(ca),
                "-verify_return_error",
                "-verify_ip",
                "127.0.0.1",
                *flags,
            ],
            stdin=b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return proc.returncode, proc.stdout.decode(errors="replace") + proc.stderr.decode(
        errors="replace"
    )


async def test_openssl_s_client_sees_tls_1_3_and_old_versions_are_refused(
    nursery: trio.Nursery, certs: CertPaths, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trioq.broker")
    h13 = await start_broker(nursery, certs)
    rc, out = await s_client(h13.port, certs.ca_cert, "-tls1_3")
    assert rc == 0, out
    assert "New, TLSv1.3, Cipher is TLS_" in out
    assert "subject=CN = trioq broker" in out and "issuer=CN = trioq local CA" in out
    assert "Verify return code: 0 (ok)" in out
    rc, out = await s_client(h13.port, certs.ca_cert, "-tls1_2")
    assert rc != 0 and "Cipher is (NONE)" in out, out

    h12 = await start_broker(nursery, certs, min_version="1.2")
    rc, out = await s_client(h12.port, certs.ca_cert, "-tls1_2")
    assert rc == 0 and "New, TLSv1.2, Cipher is" in out, out
    # SECLEVEL=0 lets this openssl really offer TLS 1.1: the refusal is the broker's, not the client's
    rc, out = await s_client(h12.port, certs.ca_cert, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert rc != 0 and "Cipher is (NONE)" in out, out
    refused = [
        r.getMessage() for r in caplog.records if "refused: tls_handshake: TLS handshake failed" in r.getMessage()
    ]
    assert len(refused) == 2 and all("unsupported protocol" in m.lower() for m in refused), refused
    # and the broker serves on after every refusal
    for h in (h13, h12):
        async with trioq.Client("127.0.0.1", h.port, ca=certs.ca_cert) as c:
            assert await c.submit("noop", {})


def test_cli_certificates_are_for_clients_only(tmp_path: Path) -> None:
    """A client certificate cannot serve as a broker certificate, and asks for a role."""
    d = tmp_path / "certs"
    runner = CliRunner()
    result = runner.invoke(cli, ["certs", "--dir", str(d), "client", "w1", "--role", "worker"])
    assert result.exit_code == 1 and "trioq certs" in result.output  # no CA yet
    assert runner.invoke(cli, ["certs", "--dir", str(d)]).exit_code == 0
    result = runner.invoke(cli, ["certs", "--dir", str(d), "client", "w1"])
    assert result.exit_code == 2 and "--role" in result.output
    result = runner.invoke(cli, ["certs", "--dir", str(d), "client", "../evil", "--role", "worker"])
    assert result.exit_code == 2 and not (tmp_path / "client-..").exists()
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    assert (
        runner.invoke(cli, ["certs", "--dir", str(d), "client", "w1", "--role", "worker"]).exit_code
        == 0
    )
    cert = x509.load_pem_x509_certificate((d / "client-w1.pem").read_bytes())
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (
        cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "worker"
    )
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "w1"


def test_the_ca_key_may_live_elsewhere_and_a_ca_is_never_replaced(tmp_path: Path) -> None:
    paths, created = ensure_certs(tmp_path / "certs")
    assert created
    ca_pem = paths.ca_cert.read_bytes()
    offline = tmp_path / "offline-ca.key"
    paths.ca_key.rename(offline)
    # serving needs the CA certificate and the server's pair, not the CA key
    again, created = ensure_certs(paths.dir)
    assert not created and again.ca_cert.read_bytes() == ca_pem
    server_context(again, require_client_cert=True)
    # without the key, a missing server certificate is an error, not a new CA behind the clients' backs
    paths.server_cert.unlink()
    with pytest.raises(FileNotFoundError, match="CA certificate but not its key"):
        ensure_certs(paths.dir)
    assert paths.ca_cert.read_bytes() == ca_pem and not paths.ca_key.exists()


def test_private_keys_other_users_can_read_are_reported_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="trioq.tls")
    paths, _ = ensure_certs(tmp_path / "certs")
    ensure_certs(paths.dir)
    assert "readable by other users" not in caplog.text  # made 0600
    paths.server_key.chmod(0o644)
    paths.ca_key.chmod(0o640)
    ensure_certs(paths.dir)
    assert f"{paths.server_key} is readable by other users (mode 644)" in caplog.text
    assert f"{paths.ca_key} is readable by other users (mode 640)" in caplog.text


def test_an_auth_file_others_may_write_is_reported(
    tokens: Tokens, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trioq.broker")
    Authenticator.load(tokens.path, env={})
    assert not caplog.records
    os.chmod(tokens.path, 0o666)
    assert len(Authenticator.load(tokens.path, env={}).credentials) == 4
    assert any("writable by other users" in r.getMessage() for r in caplog.records)


def test_every_error_code_is_in_the_protocol_document() -> None:
    from trioq.errors import ErrorCode

    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    table = doc[doc.index("| code | fatal | when |") :]
    listed = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
    assert listed == {c.value for c in ErrorCode}
