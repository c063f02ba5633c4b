"""The worker: one session to the broker, jobs pushed to it, each in its own cancel scope.

Async tasks run on the event loop in a few long-lived runner tasks (see
``_JobRunners``); sync tasks run in threads (bounded by the concurrency). Outcomes finished in the same moment go back in
one RESULT frame. On a stop request the worker takes nothing new, lets running
jobs finish for ``grace`` seconds, hands the rest back, and exits.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import socket
import ssl
import threading
import traceback
import types
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from contextvars import Context, copy_context
from functools import partial
from typing import Any, TypeVar

import attrs
import orjson
import trio
import trio.lowlevel

from ..errors import (
    BrokerShuttingDown,
    ConnectError,
    ConnectionLost,
    ErrorCode,
    ProtocolError,
    RemoteError,
)
from ..job import DEFAULT_QUEUE, ErrorInfo, Progress
from ..protocol.connect import StreamFactory, open_session, tcp_tls_factory
from ..protocol.framing import FramedConnection
from ..protocol.messages import (
    PROTOCOL_VERSION,
    Abort,
    Delivery,
    Dispatch,
    Drain,
    Error,
    Heartbeat,
    Hello,
    Outcome,
    ProgressReport,
    Release,
    Result,
    TaskDefaults,
    Welcome,
)
from .builtin import register_builtins
from .registry import Fatal, Registry, default_registry

log = logging.getLogger("trioq.worker")

T = TypeVar("T")

#: Jobs a runner runs in a row before it lets the event loop turn (and their results go).
RUNNER_BATCH = 64


@attrs.define(eq=False)
class JobContext:
    """Handed to a task that takes a ``ctx`` parameter."""

    id: str
    attempt: int
    task: str
    queue: str
    priority: int
    _report: Callable[[Progress], None]
    _loop_thread: int

    def progress(self, value: float, message: str = "") -> None:
        """Report progress (0..1 and a short message); safe from threads too."""
        p = Progress(float(value), str(message)[:200])
        if threading.get_ident() == self._loop_thread:
            self._report(p)
        else:
            trio.from_thread.run_sync(self._report, p)


@attrs.frozen
class WorkerStatistics:
    connected: bool
    running: int
    completed: int
    failed: int
    released: int
    reconnects: int


@types.coroutine
def _resume_in_context(ctx: Context, coro: Coroutine[Any, Any, T], trap: Any) -> Generator[Any, Any, T]:
    """Go on awaiting ``coro``, whose first step (inside ``ctx``) yielded ``trap``, with every
    further step of it run inside ``ctx`` too."""
    send: Any = None
    error: BaseException | None = None
    try:
        send = yield trap
    except BaseException as exc:
        error = exc
    while True:
        try:
            if error is None:
                trap = ctx.run(coro.send, send)
            else:
                trap, error = ctx.run(coro.throw, error), None
        except StopIteration as stop:
            return stop.value
        try:
            send = yield trap
        except BaseException as exc:  # thrown into this step by the scheduler: pass it on
            error = exc


class _JobRunners:
    """Long-lived tasks that run a session's jobs, instead of a new task per job.

    Spawning a task cost a quarter of a worker's time on short jobs. A runner takes
    jobs from the line one after another, so jobs that never block run back to back in
    one step of one task; before each job it makes sure one more runner is awake, so
    the next job in line starts at once if this one blocks. Runners are made on demand
    and die with the session's job nursery. Their number is not capped here: the broker
    bounds the jobs a worker holds, and a job that outlives its lease (it ignored its
    cancellation) must not hold up the jobs sent in its place. Each job runs in its own
    copy of the context, as it would in a task of its own: context variables set by one
    job are not seen by the next.
    """

    def __init__(self, worker: Worker, conn: FramedConnection, nursery: trio.Nursery) -> None:
        self._worker = worker
        self._conn = conn
        self._nursery = nursery
        self._line: deque[tuple[Delivery, trio.CancelScope]] = deque()
        self._parked = trio.lowlevel.ParkingLot()
        self._count = 0
        self._waking = 0  # runners woken or made that have not yet taken their first step

    def add(self, d: Delivery, scope: trio.CancelScope) -> None:
        self._line.append((d, scope))
        self._wake()

    def _wake(self) -> None:
        if self._waking:
            return
        if self._parked:
            self._parked.unpark()
        else:
            self._count += 1
            self._nursery.start_soon(self._run)
        self._waking += 1

    async def _run(self) -> None:
        line = self._line
        run_job = self._worker._run_job
        conn = self._conn
        while True:
            self._waking -= 1
            done = 0
            while line:
                d, scope = line.popleft()
                if line:
                    self._wake()
                # In a copy of the context, as a task of its own would be; most jobs end
                # in their first step, which is taken here without wrapping the coroutine.
                ctx = copy_context()
                coro = run_job(conn, d, scope)
                try:
                    trap = ctx.run(coro.send, None)
                except StopIteration:
                    pass
                else:
                    await _resume_in_context(ctx, coro, trap)
                done += 1
                if done % RUNNER_BATCH == 0 and line:
                    # Let what finished so far go out, and the event loop breathe.
                    self._waking += 1
                    await trio.lowlevel.checkpoint()
                    self._waking -= 1
            await self._parked.park()


class Worker:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 65432,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        token: str | None = None,
        name: str | None = None,
        concurrency: int = 4,
        queues: tuple[str, ...] | list[str] = (DEFAULT_QUEUE,),
        registry: Registry | None = None,
        builtins: bool = True,
        connect: StreamFactory | None = None,
        reconnect: bool = True,
        grace: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.registry = registry if registry is not None else default_registry
        if builtins:
            register_builtins(self.registry)
        if connect is None:
            if ssl_context is None:
                raise ValueError("a worker needs an ssl_context (TLS is mandatory) or a connect factory")
            connect = tcp_tls_factory(host, port, ssl_context, server_hostname)
        self._connect = connect
        self.token = token
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.concurrency = concurrency
        self.queues = tuple(queues)
        self.reconnect = reconnect
        self.grace = grace
        self.connect_timeout = connect_timeout
        self._stopping = trio.Event()
        self._idle: trio.Event | None = None
        self._stop_requested = False
        self._running: dict[str, tuple[int, trio.CancelScope]] = {}
        self._outbox: list[Outcome] = []
        self._outbox_sizes: list[int] = []  # an upper bound of each outcome's encoded size
        self._flush = trio.Event()
        # Sync tasks' threads. The broker's credit bounds the jobs running; the threads of
        # jobs past their timeout run on (Python cannot stop a thread) and must not hold a
        # place the next job needs, so this limiter counts nothing but keeps them off
        # trio's default one (40 threads for the whole process).
        self._threads = trio.CapacityLimiter(math.inf)
        self._frame_budget = FRAME_BUDGET
        self._outcome_room = MAX_RESULT_BYTES
        self.abandoned_threads = 0
        self._conn: FramedConnection | None = None
        self.completed = 0
        self.failed = 0
        self.released = 0
        self.reconnects = 0
        self._ended_by: BaseException | None = None  # what ended the last session
        self.session_count = 0

    def statistics(self) -> WorkerStatistics:
        return WorkerStatistics(
            connected=self._conn is not None,
            running=len(self._running),
            completed=self.completed,
            failed=self.failed,
            released=self.released,
            reconnects=self.reconnects,
        )

    def request_stop(self) -> None:
        """Stop taking jobs; finish (for ``grace`` seconds) or hand back what is held; exit."""
        if self._stop_requested:
            return
        self._stop_requested = True
        log.info("worker %s stopping: taking no new jobs, %d running", self.name, len(self._running))
        if self._conn is not None:
            try:
                self._conn.send_nowait(Drain())
            except ConnectionLost:
                pass
        self._stopping.set()

    # --- the connection loop -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Welcome] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until stopped; reconnects with backoff when the broker goes away."""
        delay = 0.1
        started = False
        while not self._stop_requested:
            try:
                conn, welcome = await open_session(self._connect, self._hello(), handshake_timeout=self.connect_timeout)
            except (ConnectError, RemoteError) as exc:
                # Refusals of this worker's own HELLO (its credential, names, version) would
                # come again on every try: they end the worker instead of a reconnect loop.
                if not self.reconnect or (isinstance(exc, RemoteError) and exc.code in _HELLO_REFUSALS):
                    raise
                log.warning("worker %s cannot connect (%s); retrying in %.1fs", self.name, exc, delay)
                with trio.move_on_after(delay):
                    await self._stopping.wait()
                delay = min(delay * 2, 5.0)
                continue
            self.session_count += 1
            if self.session_count > 1:
                self.reconnects += 1
            log.info("worker %s connected (session %s), concurrency %d", self.name, welcome.session, self.concurrency)
            if not started:
                task_status.started(welcome)
                started = True
            began = trio.current_time()
            try:
                await self._session(conn, welcome)
            finally:
                self._conn = None
                await conn.aclose()
            if not self.reconnect:
                return
            if not self._stop_requested:
                if trio.current_time() - began < SHORT_SESSION:
                    # Ended soon after it began (the broker closed it, say for a frame it
                    # refused): reconnecting at once would loop as fast as TLS allows.
                    log.log(self._loss_level(), "worker %s lost its broker connection; reconnecting in %.1fs", self.name, delay)
                    with trio.move_on_after(delay):
                        await self._stopping.wait()
                    delay = min(delay * 2, 5.0)
                else:
                    delay = 0.1
                    log.log(self._loss_level(), "worker %s lost its broker connection; reconnecting", self.name)

    def _loss_level(self) -> int:
        """A broker that said it shuts down is routine: its restart is waited for quietly."""
        return logging.INFO if isinstance(self._ended_by, BrokerShuttingDown) else logging.WARNING

    def _hello(self) -> Hello:
        defaults = {}
        for name in self.registry.list_tasks():
            info = self.registry.get(name)
            if info is not None and (info.max_attempts is not None or info.timeout is not None):
                defaults[name] = TaskDefaults(info.max_attempts, info.timeout)
        return Hello(
            version=PROTOCOL_VERSION,
            role="worker",
            name=self.name,
            token=self.token,
            concurrency=self.concurrency,
            tasks=self.registry.list_tasks(),
            queues=list(self.queues),
            defaults=defaults,
        )

    async def _session(self, conn: FramedConnection, welcome: Welcome) -> None:
        self._conn = conn
        # RESULT frames are sized for this broker's --max-frame (WELCOME says it).
        self._frame_budget = max(1024, min(FRAME_BUDGET, welcome.max_frame - 256))
        # One outcome alone in its frame, a RESULT's envelope around it.
        self._outcome_room = max(512, welcome.max_frame - OUTCOME_OVERHEAD - 256)
        self._outbox = []
        self._outbox_sizes = []
        lost: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write, conn, nursery.cancel_scope)
            nursery.start_soon(self._heartbeat, conn, welcome.heartbeat_interval)
            nursery.start_soon(self._flusher, conn)
            if self._stop_requested:
                conn.send_nowait(Drain())
            try:
                async with trio.open_nursery() as jobs:
                    nursery.start_soon(self._stop_watch, jobs, conn)
                    try:
                        await self._receive(conn, jobs)
                    except (ConnectionLost, ProtocolError) as exc:
                        lost = exc
                    finally:
                        # Anything still running can no longer report: its attempt is over.
                        jobs.cancel_scope.cancel()
            finally:
                # What the session held went with it (the broker requeues it): a stop after a
                # reconnect must not wait its grace for jobs this worker no longer has.
                self._running.clear()
                if self._idle is not None:
                    self._idle.set()
            nursery.cancel_scope.cancel()
        self._ended_by = lost
        if self._stop_requested:
            pass  # this worker is stopping too: nothing to wait for
        elif isinstance(lost, BrokerShuttingDown):
            log.info("worker %s: the broker is shutting down; connecting again once it is back", self.name)
        elif lost is not None:
            log.warning("worker %s: connection ended: %s", self.name, lost)

    async def _write(self, conn: FramedConnection, scope: trio.CancelScope) -> None:
        try:
            await conn.run_writer()
        except ConnectionLost:
            pass
        scope.cancel()

    async def _heartbeat(self, conn: FramedConnection, interval: float) -> None:
        try:
            while True:
                await trio.sleep(interval)
                conn.send_nowait(Heartbeat())
        except ConnectionLost:
            pass

    async def _flusher(self, conn: FramedConnection) -> None:
        """Outcomes that finish together leave together, in one RESULT frame."""
        try:
            while True:
                await self._flush.wait()
                self._flush = trio.Event()
                await trio.lowlevel.checkpoint()  # let jobs finishing in this same moment join the batch
                self._send_outbox(conn)
        except ConnectionLost:
            pass

    def _send_outbox(self, conn: FramedConnection) -> None:
        """The outbox in RESULT frames, split so that none comes near the broker's frame limit."""
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        sizes, self._outbox_sizes = self._outbox_sizes, []
        budget = self._frame_budget
        if sum(sizes) <= budget:
            conn.send_nowait(Result(batch))
            return
        chunk: list[Outcome] = []
        used = 0
        for outcome, size in zip(batch, sizes, strict=True):
            if chunk and used + size > budget:
                conn.send_nowait(Result(chunk))
                chunk, used = [], 0
            chunk.append(outcome)
            used += size
        conn.send_nowait(Result(chunk))

    async def _stop_watch(self, jobs: trio.Nursery, conn: FramedConnection) -> None:
        try:
            await self._stop(jobs, conn)
        except ConnectionLost:
            jobs.cancel_scope.cancel()

    async def _stop(self, jobs: trio.Nursery, conn: FramedConnection) -> None:
        await self._stopping.wait()
        with trio.move_on_after(self.grace):
            while self._running:
                self._idle = trio.Event()
                await self._idle.wait()
        if self._running:
            held = list(self._running.items())
            log.warning("worker %s: grace over, handing back %d job(s)", self.name, len(held))
            for _, (_, scope) in held:
                scope.cancel()
            conn.send_nowait(Release([jid for jid, _ in held], [a for _, (a, _) in held]))
            self.released += len(held)
            self._running.clear()
        await self._flush_now(conn)
        conn.close_after_flush()
        with trio.move_on_after(5):
            await conn.wait_flushed()
        jobs.cancel_scope.cancel()

    async def _flush_now(self, conn: FramedConnection) -> None:
        await trio.lowlevel.checkpoint()
        self._send_outbox(conn)

    async def _receive(self, conn: FramedConnection, jobs: trio.Nursery) -> None:
        runners = _JobRunners(self, conn, jobs)
        while True:
            msg = await conn.receive()
            while msg is not None:
                t = type(msg)
                if t is Dispatch:
                    for d in msg.jobs:  # type: ignore[attr-defined]
                        if self._stop_requested:
                            # Arrived after our DRAIN crossed it on the wire: hand it straight back.
                            conn.send_nowait(Release([d.id], [d.attempt]))
                            self.released += 1
                            continue
                        scope = trio.CancelScope()
                        self._running[d.id] = (d.attempt, scope)
                        runners.add(d, scope)
                elif t is Abort:
                    entry = self._running.get(msg.id)  # type: ignore[attr-defined]
                    if entry is not None and entry[0] == msg.attempt:  # type: ignore[attr-defined]
                        log.info("job %s attempt %d aborted by the broker: %s", msg.id, msg.attempt, msg.reason)  # type: ignore[attr-defined]
                        entry[1].cancel()
                elif t is Drain:
                    log.info("broker asked worker %s to %s", self.name, "stop" if msg.stop else "quiet")  # type: ignore[attr-defined]
                    if msg.stop:  # type: ignore[attr-defined]
                        self.grace = 0
                        self.request_stop()
                elif t is Error:
                    level = logging.INFO
                    if msg.fatal:  # type: ignore[attr-defined]
                        # a broker stopping is routine: the worker reconnects to its restart
                        level = logging.INFO if msg.code == ErrorCode.SHUTTING_DOWN else logging.ERROR  # type: ignore[attr-defined]
                    log.log(level, "broker says %s: %s", msg.code, msg.message)  # type: ignore[attr-defined]
                    if msg.fatal:  # type: ignore[attr-defined]
                        lost = BrokerShuttingDown if msg.code == ErrorCode.SHUTTING_DOWN else ConnectionLost  # type: ignore[attr-defined]
                        raise lost(f"broker closed the session: {msg.code}: {msg.message}")  # type: ignore[attr-defined]
                msg = conn.receive_nowait()

    # --- one job ---------------------------------------------------------------------------

    async def _run_job(self, conn: FramedConnection, d: Delivery, scope: trio.CancelScope) -> None:
        held = self._running.get(d.id)
        if held is None or held[1] is not scope:
            return  # handed back while it waited in line
        outcome: Outcome | None = None
        size = 0
        info = self.registry.get(d.task)
        with scope:
            if scope.cancel_called:  # aborted while it waited in line: it does not start
                await trio.lowlevel.checkpoint()
            try:
                if info is None:
                    raise Fatal(f"this worker has no task {d.task!r}")
                args, kwargs = _bind(info, d.payload)
                if info.wants_ctx:
                    kwargs["ctx"] = JobContext(
                        d.id, d.attempt, d.task, d.queue, d.priority,
                        lambda p, d=d: self._report_progress(conn, d, p), threading.get_ident(),
                    )
                if d.timeout is None and info.is_async:
                    value = await info.fn(*args, **kwargs)  # the common case, without extra scopes
                elif info.inline and d.timeout is None:
                    # A quick sync function: no thread hand-off. With a timeout it takes the
                    # thread below, where the timeout can end the wait for it.
                    value = info.fn(*args, **kwargs)
                else:
                    with trio.fail_after(d.timeout if d.timeout is not None else math.inf):
                        if info.is_async:
                            value = await info.fn(*args, **kwargs)
                        else:
                            value = await trio.to_thread.run_sync(
                                partial(_call_in_thread, info.fn, args, kwargs), abandon_on_cancel=True,
                                limiter=self._threads,
                            )
                result, size = _jsonable(value)
                limit = min(MAX_RESULT_BYTES, self._outcome_room)
                if size > limit:  # an upper bound for short strings: measure before refusing
                    size = len(orjson.dumps(result))
                if size > limit:
                    outcome = Outcome(d.id, d.attempt, False, error=ErrorInfo(
                        "ResultTooLarge", f"task {d.task} returned {size} bytes of JSON; the limit is "
                        f"{limit}: store large results elsewhere and return a reference", "", False))
                    size = 0  # the result is not sent
                else:
                    outcome = Outcome(d.id, d.attempt, True, result)
            except trio.TooSlowError as exc:
                if d.timeout is None:  # the task's own fail_after, not the job's timeout
                    outcome = Outcome(d.id, d.attempt, False, error=_error(exc, retryable=True))
                else:
                    if info is not None and not info.is_async:
                        self.abandoned_threads += 1
                        log.warning(
                            "job %s: task %s ran past its timeout of %gs; its thread is left running "
                            "(%d left so far by this worker)", d.id, d.task, d.timeout, self.abandoned_threads,
                        )
                    outcome = Outcome(d.id, d.attempt, False, error=ErrorInfo(
                        "TimeoutError", f"task {d.task} ran longer than its timeout of {d.timeout:g}s", "", True))
            except (Fatal, SystemExit) as exc:  # sys.exit() in a task ends the task, not the worker
                outcome = Outcome(d.id, d.attempt, False, error=_error(exc, retryable=False))
            except Exception as exc:
                outcome = Outcome(d.id, d.attempt, False, error=_error(exc, retryable=True))
        # Only this attempt's own entry is removed: a newer attempt of the job may be held now.
        mine = self._running.get(d.id) is held
        if mine:
            del self._running[d.id]
        if outcome is None:  # cancelled (aborted by the broker, or the worker is stopping)
            if not mine:
                return  # already handed back, or superseded
            outcome = Outcome(d.id, d.attempt, False, error=ErrorInfo("Cancelled", "the job was cancelled", "", False))
        if not self._running and self._idle is not None:
            self._idle.set()
        if outcome.ok:
            self.completed += 1
        else:
            self.failed += 1
        err = outcome.error
        if err is not None:
            room = self._outcome_room
            if 2 * (len(err.type) + len(err.message) + len(err.traceback)) > room:
                # Under a broker with a small --max-frame: the error is cut to fit its frame,
                # the traceback first (a frame over the limit would end the session).
                err.traceback = ""
                err.type = err.type[: room // 8]
                err.message = err.message[: max(0, room // 2 - len(err.type) - 16)]
        self._outbox.append(outcome)
        self._outbox_sizes.append(
            OUTCOME_OVERHEAD + size + (2 * (len(err.type) + len(err.message) + len(err.traceback)) if err else 0)
        )
        if self._running:
            self._flush.set()  # others may finish in this same moment: the flusher batches them
        else:
            # Nothing else is running, so nothing can join the batch: waking the flusher
            # would only cost two more trips through the scheduler (idle latency).
            try:
                self._send_outbox(conn)
            except ConnectionLost:
                pass

    def _report_progress(self, conn: FramedConnection, d: Delivery, p: Progress) -> None:
        if d.id in self._running:
            try:
                conn.send_nowait(ProgressReport(d.id, d.attempt, p))
            except ConnectionLost:
                pass


class InvalidPayload(Fatal):
    pass


# Keyed by the function: hashing a TaskInfo would hash its inspect.Signature on every job.
_SHAPES: dict[Any, tuple[frozenset[str], frozenset[str], bool]] = {}


def _shape(info: Any) -> tuple[frozenset[str], frozenset[str], bool]:
    """(parameter names, required names, takes **kwargs) of a task, computed once."""
    shape = _SHAPES.get(info.fn)
    if shape is None:
        params = info.signature.parameters
        names = frozenset(n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "ctx")
        required = frozenset(
            n for n in names if params[n].default is inspect.Parameter.empty
        )
        var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        shape = _SHAPES[info.fn] = (names, required, var_kw)
    return shape


def _bind(info: Any, payload: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Payload dict -> keyword arguments (the old {"data": ...} style), else one argument."""
    if type(payload) is dict and "ctx" not in payload:
        names, required, var_kw = _shape(info)
        keys = payload.keys()
        if (var_kw or keys <= names) and required <= keys:
            return (), dict(payload)
    if isinstance(payload, dict):
        args: tuple[Any, ...] = ()
        kwargs = dict(payload)
    elif payload is None:
        args, kwargs = (), {}
    else:
        args, kwargs = (payload,), {}
    kwargs.pop("ctx", None)
    try:
        info.signature.bind(*args, **kwargs, **({"ctx": None} if info.wants_ctx else {}))
    except TypeError as exc:
        raise InvalidPayload(f"payload does not fit task {info.name}{info.signature}: {exc}") from None
    return args, kwargs


def _error(exc: BaseException, *, retryable: bool) -> ErrorInfo:
    # A task's exception is the task's code: its __str__ or __repr__ may fail too, and that
    # must fail the job, not the worker.
    try:
        message = str(exc)[:2000]
    except Exception as inner:
        message = f"<str() of the {type(exc).__name__} failed: {type(inner).__name__}>"
    try:
        tb = "".join(traceback.format_exception(exc))
    except Exception:
        tb = ""
    return ErrorInfo(type(exc).__name__, message, tb[-8000:], retryable)


class TaskExit(Fatal):
    """A sync task raised SystemExit or KeyboardInterrupt in its thread: the task ended,
    the worker goes on."""


def _call_in_thread(fn: Any, args: Any, kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except (SystemExit, KeyboardInterrupt) as exc:
        raise TaskExit(f"the task raised {type(exc).__name__}({exc})") from exc


#: Error codes that refuse a worker's HELLO for what it is, not for the moment.
_HELLO_REFUSALS = frozenset({"unauthenticated", "forbidden", "invalid_field", "version"})
#: A session shorter than this (seconds) is followed by a backoff before the next one.
SHORT_SESSION = 10.0

#: A result larger than this fails its job instead of overflowing the RESULT frame.
MAX_RESULT_BYTES = 1024 * 1024
#: RESULT frames stay under this, or under the broker's --max-frame if that is smaller.
FRAME_BUDGET = 900 * 1024
OUTCOME_OVERHEAD = 200

_I64_MIN, _U64_MAX = -(1 << 63), (1 << 64) - 1
_EXACT_FROM = 16 * 1024  # strings this long are measured by encoding them


def _jsonable(value: Any) -> tuple[Any, int]:
    """(a JSON-encodable form of a task's return value, its encoded size)."""
    t = type(value)
    if value is None or t is bool or t is float:
        return value, 8
    if t is str:
        # at most 6 bytes a character (an escape like \u0001): exact only where it can matter
        return value, len(value) * 6 + 2 if len(value) < _EXACT_FROM else len(orjson.dumps(value))
    if t is int:
        return (value, 20) if _I64_MIN <= value <= _U64_MAX else (str(value), len(str(value)) + 2)
    # Measured inside 4 lists: the RESULT frame around it takes 3 more levels of nesting, and
    # a value orjson writes alone but not inside the frame failed the whole worker.
    try:
        return value, len(orjson.dumps([[[[value]]]])) - 8
    except TypeError:  # big ints, sets, objects: JSON of their nearest meaning
        coerced = _coerce(value)
        try:
            return coerced, len(orjson.dumps([[[[coerced]]]])) - 8
        except TypeError as exc:  # nested too deeply for any frame
            raise Fatal(f"the task's result cannot be sent as JSON: {exc}") from None


def _coerce(value: Any) -> Any:
    if value is None or type(value) in (str, bool, float):
        return value
    if type(value) is int:
        return value if _I64_MIN <= value <= _U64_MAX else str(value)
    if isinstance(value, dict):
        return {str(k): _coerce(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_coerce(v) for v in value]
    try:
        orjson.dumps(value)  # dataclasses, datetimes, numpy scalars: orjson knows them
        return value
    except TypeError:
        return repr(value)
