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
    ) -> None:
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

    async def __aenter__(self) -> Client:
        self._cm = self._run()
        return await self._cm.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._cm.__aexit__(*exc_info)

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[Client]:
        conn, self.welcome = await open_session(self._connect, self._hello, handshake_timeout=self._timeout)
        self._conn = conn
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, conn)
                nursery.start_soon(self._reader, conn)
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
            self._fail_pending(ConnectionLost("client closed"))
            await conn.aclose()

    async def _writer(self, conn: FramedConnection) -> None:
        try:
            await conn.run_writer()
        except ConnectionLost as exc:
            self._fail_pending(exc)

    async def _reader(self, conn: FramedConnection) -> None:
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
            self._fail_pending(exc if isinstance(exc, ConnectionLost) else ConnectionLost(str(exc)))

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
            raise self._lost(f"connection to the broker is closed: {self._closed}")
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
            raise self._lost(f"connection to the broker ended: {self._closed}") from None
        if isinstance(reply, Error):
            if reply.code == ErrorCode.SHUTTING_DOWN:
                raise BrokerShuttingDown(f"{reply.code}: {reply.message}")
            job_id = getattr(msg, "id", None)
            if reply.code == "unknown_job" and job_id is not None:
                raise JobNotFound(job_id)
            raise RemoteError(reply.code, reply.message)
        return reply

    def _lost(self, message: str) -> ConnectionLost:
        """Why requests end unanswered: a broker that said it shuts down, or a lost connection."""
        return BrokerShuttingDown(message) if isinstance(self._closed, BrokerShuttingDown) else ConnectionLost(message)

    def _close(self, msg: Message) -> None:
        req: int = msg.req  # type: ignore[attr-defined]
        self._pending.pop(req, None)
        self._two_part.discard(req)

    async def _request(self, msg: Message) -> Message:
        try:
            return await self._reply(self._open(msg), msg)
        finally:
            self._close(msg)

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
        for this one request: a TimeoutError after the ACK names the job's id (the job goes on)."""
        spec = JobSpec(task, {} if payload is None else payload, **options)
        if self.welcome is None or not self.welcome.submit_wait:
            return await self.result((await self.submit_many([spec]))[0], timeout=result_timeout)
        told, deadline = self._wait_timeouts(result_timeout)
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
        """Submit a batch in as few frames as the broker's batch limit allows."""
        limit = self.welcome.max_batch if self.welcome else 1000
        ids: list[str] = []
        for i in range(0, len(specs), limit):
            reply = await self._request(Submit(next(self._ids), list(specs[i : i + limit])))
            assert isinstance(reply, Ack)
            ids.extend(reply.ids)
        return ids

    async def result(self, job_id: str, timeout: float | None = None) -> Job:  # noqa: ASYNC109 - the documented API
        """Wait until the job is final and return it; TimeoutError after ``timeout``."""
        told, deadline = self._wait_timeouts(timeout)
        try:
            with trio.fail_after(deadline):
                reply = await self._request(WaitJob(next(self._ids), job_id, told))
        except trio.TooSlowError:
            raise TimeoutError(f"job {job_id} did not finish within {timeout}s") from None
        except RemoteError as exc:
            if told is not None and exc.code == ErrorCode.TIMEOUT.value:
                raise TimeoutError(f"job {job_id} did not finish within {timeout}s") from None
            raise
        assert isinstance(reply, JobReply)
        return reply.job

    async def get_job(self, job_id: str) -> Job:
        reply = await self._request(GetJob(next(self._ids), job_id))
        assert isinstance(reply, JobReply)
        return reply.job

    async def list_jobs(
        self, *, state: str | None = None, queue: str | None = None, task: str | None = None,
        limit: int = 50, cursor: int | None = None,
    ) -> tuple[list[Job], int | None]:
        reply = await self._request(ListJobs(next(self._ids), state, queue, task, limit, cursor))
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
        reply = await self._request(StatusRequest(next(self._ids)))
        assert isinstance(reply, StatusReply)
        return reply.stats
