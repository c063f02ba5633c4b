"""The producer's side: one TLS session, many requests in flight on it.

    async with trioq.Client(ca="certs/ca.pem") as client:
        job_id = await client.submit("reverse_string", {"data": "hello"}, priority=1)
        job = await client.result(job_id, timeout=10)
"""

from __future__ import annotations

import itertools
import math
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from .errors import (
    BrokerShuttingDown,
    ConnectError,
    ConnectionLost,
    ErrorCode,
    JobNotFound,
    ProtocolError,
    RemoteError,
    TrioqError,
)
from .job import DEFAULT_PRIORITY, DEFAULT_QUEUE, Job, JobSpec
from .protocol.connect import StreamFactory, open_session, tcp_tls_factory
from .protocol.framing import FramedConnection
from .protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    CancelJob,
    DiscardJob,
    Error,
    GetJob,
    Hello,
    JobReply,
    JobsReply,
    ListJobs,
    Message,
    PauseQueue,
    QueueReply,
    RetryJob,
    StatusReply,
    StatusRequest,
    Submit,
    WaitJob,
    Welcome,
)
from .tls import client_context


class Client:
    """An async context manager; every method may be called from many tasks at once."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 65432,
        *,
        ca: str | Path | None = "certs/ca.pem",
        ssl_context: ssl.SSLContext | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_hostname: str | None = None,
        token: str | None = None,
        role: str = "producer",
        name: str = "client",
        connect: StreamFactory | None = None,
        timeout: float = 10.0,
        reconnect_timeout: float = 30.0,
    ) -> None:
        if not (math.isfinite(reconnect_timeout) and reconnect_timeout >= 0):
            raise ValueError(f"reconnect_timeout must be a finite number of seconds, 0 or more, not {reconnect_timeout!r}")
        if connect is None:
            if ssl_context is None:
                if ca is not None and not Path(ca).exists():
                    raise TrioqError(f"CA certificate {ca} not found: run 'trioq certs' or pass ca=")
                ssl_context = client_context(ca, cert=cert, key=key)
            connect = tcp_tls_factory(host, port, ssl_context, server_hostname)
        self._connect = connect
        self._hello = Hello(version=PROTOCOL_VERSION, role=role, name=name, token=token)
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, trio.MemorySendChannel[Message]] = {}
        self._two_part: set[int] = set()  # requests answered by an ACK and then a JOB
        self._conn: FramedConnection | None = None
        self._closed: BaseException | None = None
        self._cm: Any = None
        self.welcome: Welcome | None = None
        #: how long a request after a lost connection tries to connect again (0: never)
        self.reconnect_timeout = reconnect_timeout
        self.reconnects = 0
        self._reconnecting = trio.Lock()
        self._reconnect_tries = 0  # reconnect attempts made, finished or failed
        self._reconnect_error: ConnectError | None = None  # how the last one failed
        self._nursery: trio.Nursery | None = None

    async def __aenter__(self) -> Client:
        self._cm = self._run()
        return await self._cm.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._cm.__aexit__(*exc_info)

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[Client]:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._open_session()
                try:
                    yield self
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # One error from the caller's block, re-raised as itself: no groups for users.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            self._nursery = None
            self._closed = None
            self._fail_pending(ConnectionLost("client closed"))
            if self._conn is not None:
                await self._conn.aclose()

    async def _open_session(self) -> None:
        conn, welcome = await open_session(self._connect, self._hello, handshake_timeout=self._timeout)
        if self._nursery is None:  # the client was closed while this reconnect connected
            await conn.aclose()
            raise ConnectionLost("client closed")
        old, self._conn, self.welcome, self._closed = self._conn, conn, welcome, None
        self._nursery.start_soon(self._session, conn)
        if old is not None:
            await old.aclose()

    async def _session(self, conn: FramedConnection) -> None:
        """One connection's writer and reader; a loss ends both, and fails what it carried."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer, conn, nursery.cancel_scope)
            nursery.start_soon(self._reader, conn, nursery.cancel_scope)

    async def _reconnect(self) -> None:
        """After a lost connection: connect again, backing off, within ``reconnect_timeout``
        (a broker restarting, or one that said it shuts down). ConnectError if it cannot.

        One task reconnects; those that queued behind it take its outcome (its error too:
        each caller waits one ``reconnect_timeout`` at most, not one per caller ahead of it)."""
        tries = self._reconnect_tries
        async with self._reconnecting:
            if self._nursery is None:
                raise ConnectionLost("client closed")
            if self._closed is None:
                return
            if self._reconnect_tries != tries and self._reconnect_error is not None:
                raise self._reconnect_error
            try:
                await self._reconnect_now(self._closed)
                self._reconnect_error = None
            except ConnectError as exc:
                self._reconnect_error = exc
                raise
            finally:
                self._reconnect_tries += 1

    async def _reconnect_now(self, lost: BaseException) -> None:
        deadline = trio.current_time() + self.reconnect_timeout
        delay = 0.05
        while True:
            try:
                await self._open_session()
                self.reconnects += 1
                return
            except RemoteError as exc:
                if exc.code != ErrorCode.SHUTTING_DOWN:
                    raise  # the broker refused this client's HELLO: it would again
                last: TrioqError = exc
            except ConnectError as exc:
                last = exc
            left = deadline - trio.current_time()
            if left <= 0:
                raise ConnectError(
                    f"the connection to the broker was lost ({lost}) and could not be made again "
                    f"within {self.reconnect_timeout:g}s: {last}"
                )
            await trio.sleep(min(delay, left))  # the last try is at the deadline, not before it
            delay = min(delay * 2, 2.0)

    async def _ready(self) -> None:
        if self._closed is not None and self.reconnect_timeout > 0:
            await self._reconnect()

    def _may_retry(self) -> bool:
        """After a ConnectionLost: whether a wait or a read may be sent again."""
        return self.reconnect_timeout > 0 and self._nursery is not None

    async def _writer(self, conn: FramedConnection, scope: trio.CancelScope) -> None:
        try:
            await conn.run_writer()
        except ConnectionLost as exc:
            self._lost(conn, exc)
        scope.cancel()

    async def _reader(self, conn: FramedConnection, scope: trio.CancelScope) -> None:
        try:
            while True:
                msg = await conn.receive()
                while msg is not None:
                    req = getattr(msg, "req", None)
                    if req is None:
                        chan = None
                    elif type(msg) is Ack and req in self._two_part:
                        chan = self._pending.get(req)  # the JOB follows: the request stays open
                    else:
                        chan = self._pending.pop(req, None)
                    if chan is not None:
                        chan.send_nowait(msg)
                    elif isinstance(msg, Error) and msg.fatal:
                        lost = BrokerShuttingDown if msg.code == ErrorCode.SHUTTING_DOWN else ConnectionLost
                        raise lost(f"broker closed the session: {msg.code}: {msg.message}")
                    msg = conn.receive_nowait()
        except (ConnectionLost, ProtocolError) as exc:
            self._lost(conn, exc if isinstance(exc, ConnectionLost) else ConnectionLost(str(exc)))
        scope.cancel()

    def _lost(self, conn: FramedConnection, exc: ConnectionLost) -> None:
        if conn is self._conn:  # not a connection already replaced by a reconnect
            self._fail_pending(exc)

    def _fail_pending(self, exc: BaseException) -> None:
        self._closed = self._closed or exc
        pending, self._pending = self._pending, {}
        for chan in pending.values():
            chan.close()

    def _open(self, msg: Message, replies: int = 1) -> trio.MemoryReceiveChannel[Message]:
        """Send a request; its replies (one, or an ACK and then a JOB) arrive on the channel."""
        if self._conn is None:
            raise TrioqError("use 'async with Client(...)' before sending requests")
        if self._closed is not None:
            raise self._lost_error(f"connection to the broker is closed: {self._closed}")
        send, recv = trio.open_memory_channel[Message](replies)
        req: int = msg.req  # type: ignore[attr-defined]
        self._pending[req] = send
        if replies > 1:
            self._two_part.add(req)
        self._conn.send_nowait(msg)
        return recv

    async def _reply(self, recv: trio.MemoryReceiveChannel[Message], msg: Message) -> Message:
        try:
            reply = await recv.receive()
        except trio.EndOfChannel:
            raise self._lost_error(f"connection to the broker ended: {self._closed}") from None
        if isinstance(reply, Error):
            if reply.code == ErrorCode.SHUTTING_DOWN:
                raise BrokerShuttingDown(f"{reply.code}: {reply.message}")
            job_id = getattr(msg, "id", None)
            if reply.code == "unknown_job" and job_id is not None:
                raise JobNotFound(job_id)
            raise RemoteError(reply.code, reply.message)
        return reply

    def _lost_error(self, message: str) -> ConnectionLost:
        """Why requests end unanswered: a broker that said it shuts down, or a lost connection."""
        return BrokerShuttingDown(message) if isinstance(self._closed, BrokerShuttingDown) else ConnectionLost(message)

    def _close(self, msg: Message) -> None:
        req: int = msg.req  # type: ignore[attr-defined]
        self._pending.pop(req, None)
        self._two_part.discard(req)

    async def _request(self, msg: Message) -> Message:
        await self._ready()
        try:
            return await self._reply(self._open(msg), msg)
        finally:
            self._close(msg)

    async def _read(self, msg: Message) -> Message:
        """A request that changes nothing: sent again once if the connection was lost."""
        try:
            return await self._request(msg)
        except ConnectionLost:
            if not self._may_retry():
                raise
        return await self._request(msg)

    # --- the API -------------------------------------------------------------------------------

    async def submit(
        self,
        task: str,
        payload: Any = None,
        *,
        priority: int = DEFAULT_PRIORITY,
        queue: str = DEFAULT_QUEUE,
        delay: float | None = None,
        run_at: float | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the job's run limit, not this call's
        idempotency_key: str | None = None,
    ) -> str:
        """Submit one job; returns its id once the broker has committed it."""
        spec = JobSpec(task, {} if payload is None else payload, priority, queue, delay, run_at, max_attempts, timeout, idempotency_key)
        return (await self.submit_many([spec]))[0]

    async def run(self, task: str, payload: Any = None, *, result_timeout: float | None = None, **options: Any) -> Job:
        """Submit one job and wait until it is final: ``result(submit(...))`` in one round trip
        (a SUBMIT with ``wait``) where the broker offers it. ``options`` are ``submit``'s
        (priority, queue, delay, run_at, max_attempts, timeout, idempotency_key).

        The broker answers with an ACK once the job is stored and a JOB once it is final, both
        for this one request: a TimeoutError after the ACK names the job's id (the job goes on).
        A connection lost after the ACK is waited out as ``result`` does; one lost before it
        raises ConnectionLost (the job may be stored: see ``submit_many``)."""
        spec = JobSpec(task, {} if payload is None else payload, **options)
        end = _end(result_timeout)
        with trio.move_on_after(math.inf if result_timeout is None else result_timeout) as connecting:
            await self._ready()
        if connecting.cancelled_caught:
            raise TimeoutError(f"no connection to the broker within {result_timeout}s: the {task!r} job was not sent")
        if self.welcome is None or not self.welcome.submit_wait:
            return await self.result((await self.submit_many([spec]))[0], timeout=_left(end))
        told, deadline = self._wait_timeouts(_left(end))
        msg = Submit(next(self._ids), [spec], wait=True, wait_timeout=told)
        job_id = None
        try:
            with trio.fail_after(deadline):
                recv = self._open(msg, replies=2)
                ack = await self._reply(recv, msg)
                assert isinstance(ack, Ack)
                job_id = ack.ids[0]
                reply = await self._reply(recv, msg)
        except trio.TooSlowError:
            if job_id is None:
                raise TimeoutError(f"a {task!r} job was not accepted within {result_timeout}s") from None
            raise TimeoutError(f"job {job_id} did not finish within {result_timeout}s") from None
        except RemoteError as exc:
            if told is not None and job_id is not None and exc.code == ErrorCode.TIMEOUT.value:
                raise TimeoutError(f"job {job_id} did not finish within {result_timeout}s") from None
            raise
        except ConnectionLost as exc:
            if job_id is not None and self._may_retry():
                return await self.result(job_id, timeout=_left(end))
            if job_id is None:
                raise type(exc)(f"{exc} (the job may have been stored: {_RESEND})") from None
            raise
        finally:
            self._close(msg)
        assert isinstance(reply, JobReply)
        return reply.job

    def _wait_timeouts(self, timeout: float | None) -> tuple[float | None, float]:
        """The timeout to tell the broker (where it takes one, so that a wait given up on here
        does not go on there until the job ends) and the deadline here: a moment past the
        broker's own end of the wait, which answers first."""
        if timeout is None:
            return None, math.inf
        if self.welcome is not None and self.welcome.wait_timeout:
            return timeout, timeout + 1.0
        return None, timeout

    async def submit_many(self, specs: Sequence[JobSpec]) -> list[str]:
        """Submit a batch in as few frames as the broker's batch limit allows.

        A SUBMIT whose answer a lost connection took is not sent again by the client: its jobs
        may be stored, and may even have run. ConnectionLost says how many are surely stored."""
        await self._ready()
        limit = self.welcome.max_batch if self.welcome else 1000
        ids: list[str] = []
        for i in range(0, len(specs), limit):
            chunk = list(specs[i : i + limit])
            try:
                reply = await self._request(Submit(next(self._ids), chunk))
            except ConnectionLost as exc:
                raise type(exc)(
                    f"{exc} ({len(ids)} of the {len(specs)} jobs are stored; the next {len(chunk)} may be: {_RESEND})"
                ) from None
            assert isinstance(reply, Ack)
            ids.extend(reply.ids)
        return ids

    async def result(self, job_id: str, timeout: float | None = None) -> Job:  # noqa: ASYNC109 - the documented API
        """Wait until the job is final and return it; TimeoutError after ``timeout``. A wait
        cut by a lost connection (a broker restarting) waits again once connected."""
        end = _end(timeout)
        retries = 0
        while True:
            told, deadline = self._wait_timeouts(_left(end))
            try:
                with trio.fail_after(deadline):
                    reply = await self._request(WaitJob(next(self._ids), job_id, told))
            except trio.TooSlowError:
                raise TimeoutError(f"job {job_id} did not finish within {timeout}s") from None
            except RemoteError as exc:
                if told is not None and exc.code == ErrorCode.TIMEOUT.value:
                    raise TimeoutError(f"job {job_id} did not finish within {timeout}s") from None
                raise
            except ConnectionLost:
                if not self._may_retry():
                    raise
                if retries:  # a broker that keeps closing new connections is not hammered
                    await trio.sleep(min(0.05 * 2**retries, 2.0))
                retries += 1
                continue
            assert isinstance(reply, JobReply)
            return reply.job

    async def get_job(self, job_id: str) -> Job:
        reply = await self._read(GetJob(next(self._ids), job_id))
        assert isinstance(reply, JobReply)
        return reply.job

    async def list_jobs(
        self, *, state: str | None = None, queue: str | None = None, task: str | None = None,
        limit: int = 50, cursor: int | None = None,
    ) -> tuple[list[Job], int | None]:
        reply = await self._read(ListJobs(next(self._ids), state, queue, task, limit, cursor))
        assert isinstance(reply, JobsReply)
        return reply.jobs, reply.next_cursor

    async def cancel(self, job_id: str) -> Job:
        reply = await self._request(CancelJob(next(self._ids), job_id))
        assert isinstance(reply, JobReply)
        return reply.job

    async def retry(self, job_id: str) -> Job:
        reply = await self._request(RetryJob(next(self._ids), job_id))
        assert isinstance(reply, JobReply)
        return reply.job

    async def discard(self, job_id: str) -> Job:
        reply = await self._request(DiscardJob(next(self._ids), job_id))
        assert isinstance(reply, JobReply)
        return reply.job

    async def pause(self, queue: str = DEFAULT_QUEUE, *, paused: bool = True) -> bool:
        """Stop dispatching ``queue`` (admin); its jobs stay queued. Returns whether it is paused."""
        reply = await self._request(PauseQueue(next(self._ids), queue, paused))
        assert isinstance(reply, QueueReply)
        return reply.paused

    async def resume(self, queue: str = DEFAULT_QUEUE) -> bool:
        return await self.pause(queue, paused=False)

    async def status(self) -> dict[str, Any]:
        reply = await self._read(StatusRequest(next(self._ids)))
        assert isinstance(reply, StatusReply)
        return reply.stats


_RESEND = (
    "sent again with the same idempotency keys, they are found while unfinished, "
    "but a job that finished meanwhile runs again"
)


def _end(timeout: float | None) -> float:
    return math.inf if timeout is None else trio.current_time() + timeout


def _left(end: float) -> float | None:
    return None if end == math.inf else max(0.0, end - trio.current_time())
