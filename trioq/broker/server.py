"""The broker process: listener, TLS, handshake, and the operations every face uses.

``Broker.serve`` owns one nursery holding the store writer, the dispatcher,
the purge loop, the TCP listener (each connection in its own nursery, TLS
through ``trio.SSLStream``) and, when enabled, the HTTP API.
"""

from __future__ import annotations

import gc
import logging
import math
import secrets
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import attrs
import trio

from ..errors import ConnectionLost, ErrorCode, ProtocolError, StoreError
from ..job import (
    BUILTIN_TASKS,
    DEFAULT_MAX_ATTEMPTS,
    TERMINAL_STATES,
    Job,
    JobIds,
    JobSpec,
    JobState,
    is_printable_name,
)
from ..protocol.framing import FramedConnection
from ..protocol.messages import (
    MAX_PAYLOAD_DEPTH,
    PROTOCOL_VERSION,
    ROLES,
    Error,
    Hello,
    Welcome,
    fits_in_frames,
)
from ..store.base import CORRUPT_ROW, Backlog, JobPage, Store
from ..store.memory import MemoryStore
from ..store.sqlite import SQLiteStore
from ..store.writer import StoreWriter
from .auth import MAY_ACT_AS, Authenticator
from .budget import BudgetShare, JobBudget
from .config import BrokerConfig, is_loopback
from .dispatcher import CALL, SUBMIT, Dispatcher, RetryPolicy, WorkerSlot
from .events import EventHub
from .heap import trim_after_churn
from .sessions import (
    NAME_RE,
    ProducerSession,
    RequestError,
    WorkerSession,
    check_worker_hello,
    make_jobs,
    validate_specs,
)

log = logging.getLogger("trioq.broker")

BACKPRESSURE_WAIT = 30.0
RECENT_JOBS = 50_000
#: for open requests to be answered and connections to close: a producer's WIND_DOWN, its
#: answers' flush (2 s) and the TLS close (1 s), with room to spare
SHUTDOWN_CLOSE_TIMEOUT = 8.0
MAX_NAME = 200  # characters in a HELLO name


@attrs.define(eq=False)
class _KeyedCommit:
    """The commit of one SUBMIT's jobs, for other SUBMITs that name them by key."""

    done: trio.Event = attrs.Factory(trio.Event)
    stored: bool = False


@attrs.frozen
class BrokerHandle:
    """What ``nursery.start(broker.serve)`` returns once the broker accepts connections."""

    broker: Broker
    host: str
    port: int
    http_port: int | None
    cancel_scope: trio.CancelScope

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop gracefully (see ``Broker.shutdown``), then end ``serve``."""
        try:
            await self.broker.shutdown(grace)
        finally:
            self.cancel_scope.cancel()


def job_summary(job: Job) -> dict[str, Any]:
    """A job as the API and event streams show it (no payload, no traceback)."""
    err = job.error
    return {
        "id": job.id,
        "seq": job.seq,
        "task": job.task,
        "queue": job.queue,
        "priority": job.priority,
        "state": job.state.value,
        "attempts": job.attempts,
        "failures": job.failures,
        "worker": job.worker,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "result": job.result if job.state is JobState.COMPLETED else None,
        "error": None if err is None else {"type": err.type, "message": err.message},
        "progress": None if job.progress is None else {"value": job.progress.value, "message": job.progress.message},
    }


class Broker:
    def __init__(
        self,
        config: BrokerConfig | None = None,
        *,
        store: Store | None = None,
        ssl_context: ssl.SSLContext | None = None,
        authenticator: Authenticator | None = None,
        now: Callable[[], float] = time.time,
        seed: int | None = None,
    ) -> None:
        self.config = config = config or BrokerConfig()
        config.validate()
        if store is None:
            store = MemoryStore() if config.db == ":memory:" else SQLiteStore(config.db, synchronous=config.sync)
        self.store = store
        self.job_ids = JobIds(JobIds.new_key())  # the store's own replaces it at start
        self.now = now
        self.ssl_context = ssl_context
        self.auth = authenticator if authenticator is not None else Authenticator.load(config.auth_file)
        if config.require_client_cert:
            self.auth.client_certs = True
            if ssl_context is not None and ssl_context.verify_mode != ssl.CERT_REQUIRED:
                raise ValueError(
                    "require_client_cert is set but the TLS context does not ask for client certificates "
                    "(build it with server_context(..., require_client_cert=True))"
                )
        if not is_loopback(config.host):
            if ssl_context is None:
                raise ValueError(f"refusing to listen on {config.host} without TLS")
            if self.auth.open:
                raise ValueError(
                    f"refusing to listen on {config.host} without authentication: configure tokens "
                    "(--auth-file or TRIOQ_*_TOKEN), or --require-client-cert, or bind to a loopback address"
                )
        self.dispatcher = Dispatcher(
            now=now,
            retry=RetryPolicy(base=config.retry_base, max_delay=config.retry_max, jitter=config.retry_jitter),
            max_worker_losses=config.max_worker_losses,
            seed=seed,
            on_change=self.journal,
        )
        self.dispatcher.on_requeue = self._log_requeue
        self.dispatcher.on_dispatch = self._dispatched
        self._marks: deque[tuple[float, list[Job]]] = deque()
        self._marked = trio.Event()  # set when a mark arrives while there were none
        self.writer = StoreWriter(store)
        self.writer.on_commit.append(self._committed)
        #: SUBMITs' jobs between their frame and their answer (see budget.py)
        self.submit_budget = JobBudget(config.max_uncommitted)
        self.hub = EventHub()
        self.task_defaults: dict[str, dict[str, Any]] = {}
        self.default_max_attempts = DEFAULT_MAX_ATTEMPTS
        self.worker_sessions: dict[str, WorkerSession] = {}
        self._waiters: dict[str, list[Callable[[Job], None]]] = {}
        self._retrying: set[str] = set()  # job ids with a retry request in progress
        self.purge_chunk = 10_000  # finished jobs deleted per transaction of the purge
        #: held by a retry or discard from its read of the job to its write, and by each purge
        #: chunk: a purge between them left a retried job running without a row
        self._finished_rows = trio.Lock()
        #: keyed jobs whose commit is under way, by id: a SUBMIT that names one by its key is
        #: answered only once that commit is over (an ACK for a job never stored is a lie)
        self._storing: dict[str, _KeyedCommit] = {}
        #: jobs whose final state was committed lately: answers waits without a store read,
        #: and closes the race between a store read and the commit that ends the job
        self._recent: OrderedDict[str, Job] = OrderedDict()
        #: set once every unfinished job of the journal is loaded (a restart serves before)
        self.restored = trio.Event()
        #: set once the finished counts include the journal's (retries, discards and purges,
        #: which change them, wait for it)
        self.counted = trio.Event()
        self.connections = 0
        self.started_at = now()
        self.dispatch_latency: list[float] = []  # recent queue waits, for metrics
        # metrics hooks, called as (kind, data): ("job", job) per committed change,
        # ("changed", jobs) as the dispatcher changes them, ("submitted", jobs), ("requeued", jobs),
        # ("restored", jobs) as a restart that serves meanwhile loads them from the journal
        self.observers: list[Callable[[str, Any], None]] = []
        self.http_port: int | None = None
        self.port: int | None = None  # the trioq listener's bound port, once serving
        #: set by shutdown(): no new connections or dispatches, open requests answered
        self.closing = False
        self._listening = trio.CancelScope()
        #: how shutdown() ends each open connection, by connection
        self._closers: dict[FramedConnection, Callable[[], None]] = {}
        self._all_closed = trio.Event()
        self._shut = trio.Event()  # shutdown() is over

    # --- startup ------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[BrokerHandle] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await self._serve(nursery, task_status)
        finally:
            # Changes journaled but not yet committed (dispatches, results) reach the disk.
            n = self.writer.flush_sync()
            if n:
                log.info("flushed %d pending row(s) to the store at shutdown", n)
            self.store.close_sync()

    async def _serve(self, nursery: trio.Nursery, task_status: trio.TaskStatus[BrokerHandle]) -> None:
        cfg = self.config
        await self.start_core(nursery)
        listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host)
        port = listeners[0].socket.getsockname()[1]
        self.port = port
        await nursery.start(self._listen, listeners, nursery)
        if cfg.require_client_cert:
            auth = "client certificates"
        elif self.auth.open:
            auth = "OPEN (loopback only)"
        else:
            auth = f"{len(self.auth.credentials)} token(s)"
        log.info(
            "broker listening on %s:%d (TLS %s, auth %s, store %s)",
            cfg.host, port, "on" if self.ssl_context else "OFF", auth, self.store.description,
        )
        if self.auth.open:
            log.warning(
                "OPEN MODE: no tokens configured: any local process may submit, read, cancel and run jobs "
                "(loopback only; create tokens with 'trioq token create' and pass --auth-file)"
            )
        if cfg.http:
            from ..http.server import serve_http

            self.http_port = await nursery.start(serve_http, self)
        task_status.started(BrokerHandle(self, cfg.host, port, self.http_port, nursery.cancel_scope))

    async def _listen(
        self, listeners: list[trio.SocketListener], connections: trio.Nursery,
        *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The listeners in a scope of their own: a shutdown closes them, not the connections
        (which live in the broker's nursery)."""
        with self._listening:
            await trio.serve_listeners(self._handle_tcp, listeners, handler_nursery=connections, task_status=task_status)

    async def shutdown(self, grace: float | None = None) -> None:
        """What SIGTERM does, before ``serve`` is cancelled: stop without breaking a promise.

        The port closes and nothing more is dispatched. Running jobs have ``grace`` seconds
        (``shutdown_grace``) to report; what still runs then is handed back to its line, as a
        worker's own RELEASE would be (stored, not counted as a failure). Then every open
        request is answered ``shutting_down``, and every connection is told so before it
        closes. SUBMITs are served until then: they are stored, and run after the restart.
        """
        if self.closing:  # a second caller returns when the first one is done
            await self._shut.wait()
            return
        self.closing = True
        try:
            await self._shutdown(self.config.shutdown_grace if grace is None else grace)
        finally:
            self._shut.set()

    async def _shutdown(self, grace: float) -> None:
        self._listening.cancel()
        d = self.dispatcher
        await self._call(self._stop_dispatching)
        if d.n_running:
            log.info("shutting down: waiting up to %gs for %d running job(s)", grace, d.n_running)
            quiet = trio.Event()

            def watch(kind: str, _data: Any) -> None:
                if kind == "changed" and not d.n_running:
                    quiet.set()

            self.observers.append(watch)
            try:
                with trio.move_on_after(grace):
                    await quiet.wait()
            finally:
                self.observers.remove(watch)
        back = await self._call(self._hand_back_running)
        if back:
            log.warning(
                "shutting down: %d job(s) still running after %gs handed back to their queues: %s",
                len(back), grace, ", ".join(j.id for j in back[:20]),
            )
        else:
            log.info("shutting down: no job running")
        # Waits learn of a job's end from its commit: the last results (and the hand-backs)
        # are committed, and their waits answered, before open waits are told shutting_down.
        with trio.move_on_after(SHUTDOWN_CLOSE_TIMEOUT):
            try:
                await self.writer.write([])
            except StoreError:
                pass  # the store is failing: the rows are written by serve's last flush
        self._all_closed = trio.Event()  # connections that ended during the grace set it already
        for close in list(self._closers.values()):
            close()
        if self._closers:
            with trio.move_on_after(SHUTDOWN_CLOSE_TIMEOUT):
                await self._all_closed.wait()

    def _stop_dispatching(self) -> None:
        for session in self.worker_sessions.values():
            self._drain_nowait(session, stop=False)  # it finishes what it runs, and stays connected

    def _drain_nowait(self, session: WorkerSession, *, stop: bool) -> None:
        """In the dispatcher task: the worker gets no new job, and is told (DRAIN quiet or stop)."""
        self.dispatcher.drain_nowait(session.slot, stopping=stop)
        session.send_drain(stop)
        self.publish_worker(session.slot, "updated")

    def _hand_back_running(self) -> list[Job]:
        back = []
        for session in list(self.worker_sessions.values()):
            slot = session.slot
            held = list(slot.held.values())
            for job in held:
                if job.state is JobState.RUNNING:
                    slot.abort(job, "the broker is shutting down; the job is back in its queue")
            back += self.dispatcher.release_nowait(slot, [(job.id, job.attempts) for job in held])
        return back

    async def start_core(self, nursery: trio.Nursery) -> None:
        """Recover from the store and start the writer, dispatcher and purge loop.

        A store that can hands over its unfinished jobs to load while the broker serves
        (``_restore``): a restart of a long backlog takes connections at once, and dispatches
        as soon as the order of what is loaded is certain.
        """
        store = self.store
        t0 = time.perf_counter()
        # A recovery makes a million long-lived objects: the cyclic GC would scan them again and
        # again while they are made (a third of the time), and at every full collection after.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            if store.inline:
                recovered = store.open_sync()
            else:
                recovered = await trio.to_thread.run_sync(partial(store.open_sync, load=False))
            t_read = time.perf_counter() - t0
            d = self.dispatcher
            d.known_tasks.update(BUILTIN_TASKS)
            d.known_tasks.update(self.config.tasks)
            d.known_tasks.update(recovered.tasks)
            d.paused.update(recovered.paused_queues)
            self.job_ids = recovered.job_ids
            if recovered.backlog is not None:
                d.begin_restore(recovered.next_seq)
                requeued = []
            elif store.inline:
                self._merge_finished(store.counts_sync())
                requeued = d.restore(recovered.jobs, recovered.next_seq)
            else:
                # The counts scan the whole table in SQLite (the GIL released) while the heaps
                # are built here.
                async with trio.open_nursery() as counting:
                    counting.start_soon(self._count_finished)
                    await trio.lowlevel.checkpoint()  # the counting thread starts first
                    requeued = d.restore(recovered.jobs, recovered.next_seq)
        except BaseException:
            if gc_was_enabled:
                gc.enable()
            raise
        if recovered.backlog is not None:
            try:
                await nursery.start(self.writer.run)
                await nursery.start(d.run)
            except BaseException:  # stopped before the restore task could own the cleanup
                recovered.backlog.close_sync()
                if gc_was_enabled:
                    gc.enable()
                raise
            nursery.start_soon(self._restore, recovered.backlog, recovered.next_seq, gc_was_enabled)
        else:
            await nursery.start(self.writer.run)
            if gc_was_enabled:
                gc.enable()
            if len(recovered.jobs) > 10_000:
                gc.freeze()  # jobs hold no cycles: refcounting frees them when they finish
            self._requeued_at_start(requeued)
            log.info(
                "store %s: %d unfinished job(s) restored in %.2fs (read %.2fs)", store.description,
                len(recovered.jobs), time.perf_counter() - t0, t_read,
            )
            self.counted.set()
            self.restored.set()
            await nursery.start(d.run)
        nursery.start_soon(self._purge_loop)
        nursery.start_soon(self._mark_loop)
        nursery.start_soon(partial(
            trim_after_churn, lambda: self.writer.rows,
            every=self.config.heap_trim_interval, threshold=self.config.heap_trim_rows,
        ))

    async def _restore(self, backlog: Backlog, end: int, gc_was_enabled: bool) -> None:
        """Load the journal's unfinished jobs in seq order while serving (see _Backlog)."""
        t0 = time.perf_counter()
        loaded = 0
        try:
            async with trio.open_nursery() as counting:
                counting.start_soon(self._count_from, backlog)
                loaded = await self._load_from(backlog, end)
        finally:
            backlog.close_sync()
            if gc_was_enabled:
                gc.enable()
        self.restored.set()
        log.info(
            "store %s: %d unfinished job(s) restored in %.2fs while serving", self.store.description,
            loaded, time.perf_counter() - t0,
        )

    async def _count_from(self, backlog: Backlog) -> None:
        """The journal's finished counts, read beside the jobs (SQLite's scan on the other core)."""
        self._merge_finished(await trio.to_thread.run_sync(backlog.counts_sync))
        self.counted.set()

    async def _load_from(self, backlog: Backlog, end: int) -> int:
        """The summary, then the jobs in seq order, a chunk a step; how many were loaded."""
        d = self.dispatcher
        chunk = self.config.restore_chunk
        loaded = 0
        await self._call(d.restore_summary, await trio.to_thread.run_sync(backlog.summary_sync))
        after = 0
        while True:
            jobs = await trio.to_thread.run_sync(backlog.chunk_sync, after, chunk)
            loaded += len(jobs)
            last = len(jobs) < chunk or jobs[-1].seq + 1 >= end
            frontier = end if last else jobs[-1].seq + 1
            self._requeued_at_start(await self._call(self._restore_step, jobs, frontier))
            if loaded > 10_000:
                # Jobs hold no cycles: refcounting frees them when they finish, and the cyclic
                # GC (off while loading) need not scan a million of them at each full
                # collection later. Before each freeze, what the requests served meanwhile
                # left behind is collected (a scan of what came since the last freeze only).
                gc.collect(0)
                gc.freeze()
            if last:
                break
            after = jobs[-1].seq
        # Held jobs join their lines a priority at a step, the dispatcher serving in between.
        while d.releasing and await self._call(d.restore_release):
            pass
        return loaded

    def _restore_step(self, jobs: list[Job], frontier: int) -> list[Job]:
        """In the dispatcher task: a chunk in line, and observers told of it before any change."""
        requeued = self.dispatcher.restore_chunk(jobs, frontier)
        for obs in self.observers:
            obs("restored", jobs)
        return requeued

    def _requeued_at_start(self, requeued: list[Job]) -> None:
        if requeued:
            self.journal(requeued)
            log.warning(
                "recovered %d running job(s) from the last run and requeued them: %s",
                len(requeued), ", ".join(j.id for j in requeued[:20]),
            )

    async def _count_finished(self) -> None:
        self._merge_finished(await trio.to_thread.run_sync(self.store.counts_sync))

    def _merge_finished(self, counts: dict[str, dict[str, int]]) -> None:
        """The store's counts as of its open, added to those of jobs finished since (none,
        unless the broker already serves: a restore)."""
        finished = self.dispatcher.finished
        terminal = {s.value for s in TERMINAL_STATES}
        for task, per in counts.items():
            for state, n in per.items():
                if state in terminal:
                    finished[task, state] = finished.get((task, state), 0) + n

    def _dispatched(self, slot: WorkerSlot, jobs: list[Job]) -> None:
        if self.config.dispatch_mark_delay <= 0:
            self.journal(jobs)
        else:
            marks = self._marks
            if not marks:
                self._marked.set()
            marks.append((trio.current_time(), jobs))

    async def _mark_loop(self) -> None:
        """Journal RUNNING marks of jobs still running ``dispatch_mark_delay`` after dispatch."""
        delay = self.config.dispatch_mark_delay
        if delay <= 0:
            return
        marks = self._marks
        while True:
            if not marks:  # an idle broker sleeps, instead of looking every ``delay``
                self._marked = trio.Event()
                await self._marked.wait()
            await trio.sleep_until(marks[0][0] + delay)
            now = trio.current_time()
            due: list[Job] = []
            # the same sum as the deadline slept to: ``now - delay`` can round below it
            while marks and marks[0][0] + delay <= now:
                due.extend(job for job in marks.popleft()[1] if job.state is JobState.RUNNING)
            if due:
                self.journal(due)

    async def _purge_loop(self) -> None:
        store = self.store
        await self.counted.wait()  # the finished counts are whole only then
        while True:
            await trio.sleep(self.config.purge_interval)
            cutoff = self.now() - self.config.result_ttl
            try:
                # In chunks, commits going on between them, until nothing past the TTL is left:
                # one chunk per interval fell behind any broker finishing 10,000 jobs a minute.
                n = 0
                while True:
                    chunk = self.purge_chunk
                    async with self._finished_rows:
                        if store.inline:
                            gone = store.purge_counted_sync(cutoff, chunk)
                        else:
                            gone = await trio.to_thread.run_sync(store.purge_counted_sync, cutoff, chunk)
                        got = sum(gone.values())
                        # The counts follow what went, exactly: a new count of the table, read in
                        # a thread, missed the jobs that finished while it ran.
                        finished = self.dispatcher.finished
                        for key, k in gone.items():
                            finished[key] = max(0, finished.get(key, 0) - k)
                        if got:  # what a read would find in memory must be gone too
                            recent = self._recent
                            for job_id in [i for i, j in recent.items()
                                           if j.state.terminal and j.finished_at is not None and j.finished_at < cutoff]:
                                del recent[job_id]
                    n += got
                    if got < chunk:
                        break
                    await trio.lowlevel.checkpoint()
                if n:
                    log.info("purged %d finished job(s) older than the result TTL", n)
            except Exception as exc:  # a failing disk must not stop the broker
                log.error("purge failed: %s", exc)

    # --- connections ----------------------------------------------------------------

    async def _handle_tcp(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "?"
        if self.connections >= self.config.max_connections:
            log.warning("connection from %s refused: busy: %d connections open", peer, self.connections)
            await stream.aclose()
            return
        self.connections += 1
        try:
            await self._serve_tcp(stream, peer)
        except Exception:  # a bug must cost one connection, never the broker
            log.exception("connection from %s failed", peer)
            await _close_quietly(stream)
        finally:
            self.connections -= 1

    async def _serve_tcp(self, stream: trio.SocketStream, peer: str) -> None:
        """TLS within the handshake timeout, then the trioq protocol."""
        if self.ssl_context is None:
            await self.serve_connection(stream, peer)
            return
        tls = trio.SSLStream(stream, self.ssl_context, server_side=True)
        with trio.move_on_after(self.config.handshake_timeout) as cs:
            try:
                await tls.do_handshake()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                cause = exc.__cause__ or exc
                log.warning("connection from %s refused: tls_handshake: TLS handshake failed: %s", peer, _short(cause))
                await _close_quietly(stream)
                return
        if cs.cancelled_caught:
            log.warning("connection from %s refused: timeout: no TLS handshake within %gs", peer, self.config.handshake_timeout)
            await _close_quietly(stream)
            return
        cert_name = cert_role = None
        if self.config.require_client_cert:
            from ..tls import role_from_peer_cert

            cert_name, cert_role = role_from_peer_cert(tls.getpeercert(binary_form=True))
        await self.serve_connection(tls, peer, cert_role=cert_role, cert_name=cert_name)

    async def serve_connection(
        self, stream: trio.abc.Stream, peer: str = "memory", *, cert_role: str | None = None, cert_name: str | None = None
    ) -> None:
        """Speak trioq over an established stream until it ends; never raises to the caller."""
        conn = FramedConnection(stream, max_frame=self.config.max_frame)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_run_writer, conn, nursery.cancel_scope)
                try:
                    # A shutdown cancels this scope, or (a producer) lets the session wind down
                    # itself; the writer, outside it, still sends what the session answered.
                    with trio.CancelScope() as session_scope:
                        self._closers[conn] = session_scope.cancel
                        if self.closing:
                            session_scope.cancel()
                        await self._session(conn, peer, cert_role, cert_name)
                    if self.closing:
                        conn.send_nowait(Error(ErrorCode.SHUTTING_DOWN.value, "the broker is shutting down", fatal=True))
                except ProtocolError as exc:
                    log.warning("connection from %s closed: %s: %s", peer, exc.code.value, exc.message)
                    try:
                        conn.send_nowait(Error(exc.code.value, exc.message, fatal=True))
                    except ConnectionLost:
                        pass
                except ConnectionLost:
                    pass
                except Exception:  # a bug must cost one connection, never the broker
                    log.exception("connection from %s closed: internal error", peer)
                    try:
                        conn.send_nowait(Error(ErrorCode.INTERNAL.value, "internal error (see the broker log)", fatal=True))
                    except ConnectionLost:
                        pass
                finally:
                    conn.close_after_flush()
                    with trio.move_on_after(2):
                        await conn.wait_flushed()
                    nursery.cancel_scope.cancel()
            await conn.aclose()
        finally:  # a shutdown waits for the last connection's answers to be written
            self._closers.pop(conn, None)
            if self.closing and not self._closers:
                self._all_closed.set()

    async def _session(self, conn: FramedConnection, peer: str, cert_role: str | None, cert_name: str | None = None) -> None:
        cfg = self.config
        hello = None
        # Until HELLO is accepted the peer is nobody: it may make the broker hold one small
        # frame, not --max-frame (a thousand half-sent 4 MiB HELLOs were 4 GiB).
        conn.max_frame = min(cfg.max_frame, MAX_HELLO_FRAME)
        with trio.move_on_after(cfg.hello_timeout):
            hello = await conn.receive()
        if hello is None:
            raise ProtocolError(ErrorCode.TIMEOUT, f"no hello within {cfg.hello_timeout:g}s")
        if not isinstance(hello, Hello):
            raise ProtocolError(ErrorCode.UNEXPECTED, f"the first message must be 'hello', not {hello.TYPE!r}")
        if hello.version != PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.VERSION, f"protocol version {hello.version} is not supported (broker speaks {PROTOCOL_VERSION})")
        if hello.role not in ROLES:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"role must be one of {', '.join(ROLES)}")
        owner = self._authenticate(hello, cert_role, cert_name)
        check_hello(hello)
        if hello.role == "worker":
            check_worker_hello(hello, cfg.max_concurrency)
        conn.max_frame = cfg.max_frame
        session_id = secrets.token_hex(4)
        conn.send_nowait(
            Welcome(
                version=PROTOCOL_VERSION,
                session=session_id,
                role=hello.role,
                heartbeat_interval=cfg.heartbeat_interval,
                heartbeat_timeout=cfg.heartbeat_timeout,
                max_frame=cfg.max_frame,
                max_batch=cfg.max_batch,
                submit_wait=True,
                wait_timeout=True,
            )
        )
        if hello.role == "worker":
            session = WorkerSession(self, conn, hello, peer, session_id, owner, hello.role)
            await session.run()
        else:
            await ProducerSession(self, conn, hello, peer, session_id, owner, hello.role).run()

    def _authenticate(self, hello: Hello, cert_role: str | None, cert_name: str | None) -> str | None:
        """The session's owner (a credential name), or a fatal ERROR."""
        if self.config.require_client_cert:
            if cert_role not in MAY_ACT_AS:
                raise ProtocolError(ErrorCode.UNAUTHENTICATED, "client certificate carries no trioq role")
            if hello.role not in MAY_ACT_AS[cert_role]:
                raise ProtocolError(ErrorCode.FORBIDDEN, f"a {cert_role} certificate cannot open a {hello.role} session")
            return f"cert:{cert_name or cert_role}"  # each certificate owns its jobs
        if self.auth.open:
            return None
        cred = self.auth.check(hello.token)
        if cred is None:
            raise ProtocolError(ErrorCode.UNAUTHENTICATED, "missing or unknown token")
        if hello.role not in MAY_ACT_AS[cred.role]:
            raise ProtocolError(ErrorCode.FORBIDDEN, f"a {cred.role} token cannot open a {hello.role} session")
        return cred.name

    # --- journaling and notifications ---------------------------------------------------

    def journal(self, jobs: Iterable[Job]) -> None:
        batch = list(jobs)
        self.writer.write_nowait(batch)
        for obs in self.observers:
            obs("changed", batch)

    def _committed(self, committed: Iterable[tuple[Job, JobState]]) -> None:
        """After a commit: wake waiters of jobs whose committed row is final, tell listeners."""
        waiters = self._waiters
        hub = self.hub
        recent = self._recent
        for job, state in committed:
            if state in TERMINAL_STATES:
                recent[job.id] = job
                cbs = waiters.pop(job.id, None)
                if cbs:
                    for cb in cbs:
                        cb(job)
            if hub.active:
                hub.publish("job", job_summary(job))
            for obs in self.observers:
                obs("job", job)
        while len(recent) > RECENT_JOBS:
            recent.popitem(last=False)

    def publish_worker(self, slot: WorkerSlot, event: str) -> None:
        if self.hub.active:
            self.hub.publish("worker", {**worker_view(slot), "event": event})

    def worker_joined(self, slot: WorkerSlot, session: WorkerSession) -> None:
        """Runs in the dispatcher task (posted as CALL), so it is ordered with the rest."""
        if not slot.alive:
            return
        self.dispatcher.join_nowait(slot)
        self.worker_sessions[slot.id] = session
        for task, defaults in session.hello.defaults.items():
            self.task_defaults[task] = attrs.asdict(defaults)
        self.writer.write_nowait([], tasks=slot.tasks)
        log.info(
            "worker %s joined from %s: concurrency %d, queues %s, tasks %s",
            slot.name, slot.address, slot.concurrency, ",".join(slot.queues), ",".join(sorted(slot.tasks)),
        )
        self.publish_worker(slot, "joined")
        if self.closing:  # it connected as the port closed: it gets nothing more
            self._drain_nowait(session, stop=False)

    def worker_left(self, slot: WorkerSlot, reason: str) -> None:
        self.worker_sessions.pop(slot.id, None)
        if self.closing:
            log.info("worker %s left: the broker is shutting down", slot.name)
        else:
            log.warning("worker %s lost: %s", slot.name, reason)
        self.publish_worker(slot, "lost")

    def _log_requeue(self, slot: WorkerSlot | None, jobs: list[Job], reason: str) -> None:
        for job in jobs:
            if job.state is JobState.DEAD:
                log.error("job %s is dead after %d worker losses (worker_lost)", job.id, job.worker_losses)
            else:
                log.warning(
                    "job %s requeued (%s on %s): priority %d, seq %d, attempt %d next",
                    job.id, reason, slot.name if slot else "?", job.priority, job.seq, job.attempts + 1,
                )
        for obs in self.observers:
            obs("requeued", jobs)

    # --- operations (used by sessions, the HTTP API and tests) -----------------------------

    async def submit_share(self, jobs: int) -> BudgetShare:
        """A submit's jobs from the budget of uncommitted jobs, for every way in (TLS, HTTP);
        waiting for it if it is spent. A submit that will wait for room under --max-queued
        takes none: it must not keep other producers waiting for its 30 s."""
        share = BudgetShare(self.submit_budget)
        if self.dispatcher.has_room(self.config.max_queued):
            await share.take(jobs)
        return share

    async def submit(
        self, specs: list[JobSpec], *, owner: str | None = None, frame_size: int | None = None,
        before_waiting: Callable[[], None] | None = None,
    ) -> tuple[list[str], list[bool]]:
        """Validate, store and queue jobs; the ids once they are committed.

        ``before_waiting`` is called if the jobs must wait for room under ``max_queued``
        (a session gives back its share of the submit budget there).
        """
        validate_specs(specs, self)
        # A frame of n bytes nests at most n/2 deep: small frames need no depth check.
        if frame_size is None or frame_size > 2 * MAX_PAYLOAD_DEPTH:
            check_payload_depth(specs)
        d = self.dispatcher
        if not self.restored.is_set() and any(spec.idempotency_key is not None for spec in specs):
            # The job a key names may not be loaded yet. Waiting, this SUBMIT holds none of
            # the submit budget: other producers go on being served.
            if before_waiting is not None:
                before_waiting()
            await self.restored.wait()
        if not d.has_room(self.config.max_queued):
            if before_waiting is not None:
                before_waiting()
            with trio.move_on_after(BACKPRESSURE_WAIT):
                await d.wait_room(self.config.max_queued)
            if not d.has_room(self.config.max_queued):
                raise RequestError(ErrorCode.BUSY, f"the broker holds {self.config.max_queued} unfinished jobs; try again later")
        if not self.writer.healthy:
            raise RequestError(ErrorCode.BUSY, f"the store is failing ({self.writer.last_error}); not accepting jobs")
        ids: list[str | None] = [None] * len(specs)
        existing = [False] * len(specs)
        fresh_specs: list[JobSpec] = []
        fresh_pos: list[int] = []
        matched_storing: list[_KeyedCommit] = []
        for i, spec in enumerate(specs):
            key = spec.idempotency_key
            if key is not None and (owner, key) in d.idempotency:
                match = d.idempotency[owner, key]
                ids[i] = match.id
                existing[i] = True
                storing = self._storing.get(match.id)
                if storing is not None:
                    matched_storing.append(storing)
            else:
                fresh_specs.append(spec)
                fresh_pos.append(i)
        jobs = make_jobs(fresh_specs, self, owner, frame_size) if fresh_specs else []
        claimed: list[tuple[str | None, str]] = []
        for job, i in zip(jobs, fresh_pos, strict=True):
            ids[i] = job.id
            if job.idempotency_key is not None:
                key = (owner, job.idempotency_key)
                if key in d.idempotency:  # twice in one batch
                    ids[i] = d.idempotency[key].id
                    existing[i] = True
                    continue
                d.idempotency[key] = job
                claimed.append(key)
        jobs = [j for j, i in zip(jobs, fresh_pos, strict=True) if not existing[i]]
        if jobs:
            # The dispatcher hears of the jobs from the writer task, the moment they are
            # committed: a turn of the scheduler sooner than this task could tell it, and
            # even if this task is cancelled. Shielded: a failed commit must free its keys.
            d.reserved += len(jobs)  # no await since the check for room: they count from here
            keyed = [job.id for job in jobs if job.idempotency_key is not None]
            commit = _KeyedCommit() if keyed else None
            for job_id in keyed:
                self._storing[job_id] = commit  # type: ignore[assignment]
            with trio.CancelScope(shield=True):
                try:
                    await self.writer.write(jobs, new=True, committed=partial(d.post, SUBMIT, jobs, True))
                except StoreError:
                    d.unreserve(len(jobs))
                    for key in claimed:
                        d.idempotency.pop(key, None)
                    raise
                else:
                    if commit is not None:
                        commit.stored = True
                finally:
                    if commit is not None:
                        for job_id in keyed:
                            del self._storing[job_id]
                        commit.done.set()
                for obs in self.observers:
                    obs("submitted", jobs)
        for storing in matched_storing:  # another SUBMIT's job, named by its key
            await storing.done.wait()
            if not storing.stored:
                raise RequestError(
                    ErrorCode.BUSY,
                    "the job this idempotency key names was being stored when the store failed; try again",
                )
        return ids, existing  # type: ignore[return-value]

    async def get_job(self, job_id: str, *, owner: str | None = None) -> Job | None:
        """The job, or None; with ``owner``, only a job that credential submitted."""
        job = self.dispatcher.live.get(job_id) or self._recent.get(job_id)
        if job is None:
            if not isinstance(job_id, str) or len(job_id) > 64:
                return None
            store = self.store
            job = store.get_sync(job_id) if store.inline else await trio.to_thread.run_sync(store.get_sync, job_id)
            # The job may have ended while the store was read: the newer state wins.
            job = self.dispatcher.live.get(job_id) or self._recent.get(job_id) or job
            if job is not None and not job.state.terminal and job.id not in self.dispatcher.live and not self.restored.is_set():
                # Unfinished in the journal and not loaded yet (a job running at the crash is
                # about to be requeued): its answer, and any change to it, waits for the restore.
                await self.restored.wait()
                return await self.get_job(job_id, owner=owner)
        return job if job is None or owner is None or job.owner == owner else None

    async def list_jobs(self, *, state=None, queue=None, task=None, limit=50, cursor=None, owner=None) -> JobPage:
        if cursor is not None and not 0 <= cursor < 2**63:
            raise RequestError(ErrorCode.INVALID_FIELD, "cursor must be a next_cursor of an earlier page")
        store = self.store

        def page() -> JobPage:
            return store.list_sync(state=state, queue=queue, task=task, limit=limit, before_seq=cursor, owner=owner)

        return page() if store.inline else await trio.to_thread.run_sync(page)

    async def wait_job(self, job_id: str, *, owner: str | None = None) -> Job | None:
        """The job once it is final (committed); None if there is no such job (for ``owner``)."""
        live = self.dispatcher.live.get(job_id)
        if live is None:
            job = await self.get_job(job_id, owner=owner)
            if job is None:
                return None
            if job.state in TERMINAL_STATES:
                return job
        elif owner is not None and live.owner != owner:
            return None
        # From here to the registration below nothing awaits: no commit can slip in between.
        done = trio.Event()
        box: list[Job] = []

        def fire(job: Job) -> None:
            box.append(job)
            done.set()

        self._waiters.setdefault(job_id, []).append(fire)
        try:
            await done.wait()
        finally:
            if not box:
                cbs = self._waiters.get(job_id)
                if cbs and fire in cbs:
                    cbs.remove(fire)
                    if not cbs:
                        del self._waiters[job_id]
        return box[0] if box else await self.get_job(job_id)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn in the dispatcher task, in order with every other event, and wait for it."""
        done = trio.Event()
        box: list[Any] = []

        def run() -> None:
            try:
                box.append((True, fn(*args)))
            except Exception as exc:
                box.append((False, exc))
            done.set()

        self.dispatcher.post(CALL, run)
        await done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    async def cancel_job(self, job_id: str, *, owner: str | None = None) -> Job:
        # With ``owner``, another credential's job (or one submitted over HTTP, which has no
        # owner) is as unknown as to get_job: a different answer would tell that it exists.
        job = await self.get_job(job_id, owner=owner)
        if job is None:
            raise RequestError(ErrorCode.UNKNOWN_JOB, f"no job with id {job_id!r}")
        if job.state in TERMINAL_STATES:
            raise RequestError(ErrorCode.INVALID_STATE, f"job {job_id} is already {job.state.value}")
        was = job.state
        cancelled = await self._call(self.dispatcher.cancel_nowait, job_id)
        if cancelled is None:
            raise RequestError(ErrorCode.INVALID_STATE, f"job {job_id} finished before it could be cancelled")
        log.info("job %s cancelled (was %s)", job_id, was.value)
        return cancelled

    async def retry_job(self, job_id: str) -> Job:
        # Two retries of one job at once would both see it dead (a store read can be older
        # than the first retry, even than the run that followed it) and put it in line twice.
        if job_id in self._retrying:
            raise RequestError(ErrorCode.INVALID_STATE, f"job {job_id} is being retried already")
        self._retrying.add(job_id)
        try:
            await self.counted.wait()  # the finished counts are whole only then
            async with self._finished_rows:
                return await self._retry_held(job_id)
        finally:
            self._retrying.discard(job_id)

    async def _retry_held(self, job_id: str) -> Job:
        job = await self.get_job(job_id)
        if job is None:
            raise RequestError(ErrorCode.UNKNOWN_JOB, f"no job with id {job_id!r}")
        if job.state not in (JobState.DEAD, JobState.CANCELLED):
            raise RequestError(ErrorCode.INVALID_STATE, f"only dead or cancelled jobs can be retried; {job_id} is {job.state.value}")
        if job.dead_reason == CORRUPT_ROW:
            raise RequestError(
                ErrorCode.INVALID_STATE,
                f"job {job_id} cannot be run again: its journal row cannot be read ({job.error.message if job.error else CORRUPT_ROW}); "
                "repair the row, or discard the job",
            )
        holder = await self._call(self.dispatcher.held_by, job_id)
        if holder is not None:
            # Cancelled while running, and its worker has not said the attempt stopped (a sync
            # task's thread cannot be interrupted): put back in line now, it could run twice at once.
            raise RequestError(
                ErrorCode.INVALID_STATE,
                f"job {job_id} was cancelled but is still running on worker {holder.name}; retry it once that has stopped",
            )
        await self._call(self.dispatcher.retry_nowait, job)
        # Answer once the retry is committed: until then the store still says dead, and a
        # wait on the job could read that and end at once, even after the job has run.
        await self.writer.write([job])
        log.info("job %s retried by request", job_id)
        return job

    async def discard_job(self, job_id: str) -> Job:
        await self.counted.wait()  # the finished counts are whole only then
        async with self._finished_rows:
            return await self._discard_held(job_id)

    async def _discard_held(self, job_id: str) -> Job:
        job = await self.get_job(job_id)
        if job is None:
            raise RequestError(ErrorCode.UNKNOWN_JOB, f"no job with id {job_id!r}")
        if job.state not in TERMINAL_STATES:
            raise RequestError(ErrorCode.INVALID_STATE, f"only finished jobs can be discarded; {job_id} is {job.state.value}")
        store = self.store
        gone = store.delete_sync(job_id) if store.inline else await trio.to_thread.run_sync(store.delete_sync, job_id)
        self._recent.pop(job_id, None)
        if gone:
            self.dispatcher.forget_finished(job)
        log.info("job %s discarded", job_id)
        return job

    async def set_paused(self, queue: str, paused: bool) -> None:
        if not NAME_RE.match(queue):
            raise RequestError(ErrorCode.INVALID_FIELD, "queue name must be 1-200 letters, digits or _.:-")
        await self._call(self.dispatcher.set_paused, queue, paused)
        store = self.store
        if store.inline:
            store.set_paused_sync(queue, paused)
        else:
            await trio.to_thread.run_sync(store.set_paused_sync, queue, paused)
        log.info("queue %s %s", queue, "paused" if paused else "resumed")

    async def drain_worker(self, worker_id: str, *, stop: bool) -> WorkerSlot:
        session = self.worker_sessions.get(worker_id)
        if session is None:
            raise RequestError(ErrorCode.UNKNOWN_JOB, f"no worker with id {worker_id!r}")
        await self._call(partial(self._drain_nowait, session, stop=stop))
        log.info("worker %s asked to %s", session.slot.name, "stop" if stop else "quiet")
        return session.slot

    # --- views ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        d = self.dispatcher
        st = d.statistics()
        fin: dict[str, int] = {"completed": 0, "dead": 0, "cancelled": 0}
        for (_, state), n in d.finished.items():
            fin[state] = fin.get(state, 0) + n
        # Jobs of the journal not loaded yet (a restart) count as queued: they are unfinished,
        # and those that were running at the crash go back in line.
        jobs = {"queued": st.queued + st.restoring, "scheduled": st.scheduled, "running": st.running, **fin}
        return {
            "queue_size": jobs["queued"] + st.scheduled,
            # a restart serves while it loads the journal: whether it still does, and how
            # many of the journal's unfinished jobs are not loaded yet (0 until it knows)
            "restoring": not self.restored.is_set(),
            "stopping": self.closing,
            "restore_pending": st.restoring,
            "workers": {
                "total": st.workers, "idle": st.idle_workers, "busy": st.busy_workers,
                "capacity": sum(w.concurrency for w in d.workers.values()),
                "free": sum(max(0, w.credit) for w in d.workers.values() if not w.draining),
            },
            "jobs": jobs,
            "requeued": st.requeued,
            "submitted_total": st.submitted,
            "completed_total": st.completed,
            "failed_total": st.failed,
            "dead_total": st.dead,
            "cancelled_total": st.cancelled,
            "total": sum(jobs.values()),
            "uptime": self.now() - self.started_at,
            "store": {"description": self.store.description, "healthy": self.writer.healthy, "commits": self.writer.commits},
        }

    def workers(self) -> list[dict[str, Any]]:
        return [worker_view(s) for s in self.dispatcher.workers.values()]


#: The largest HELLO read from a peer not yet authenticated (a worker announcing a thousand
#: tasks with defaults sends some 60 KiB).
MAX_HELLO_FRAME = 128 * 1024


def check_hello(hello: Hello) -> None:
    """Refuse HELLO values that would end up in logs, jobs or the store unchecked."""
    if hello.name and not is_printable_name(hello.name, MAX_NAME):
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"name must be at most {MAX_NAME} printable characters")
    for task, defaults in hello.defaults.items():
        if not NAME_RE.match(task):
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"bad task name {task[:50]!r} in defaults")
        if defaults.max_attempts is not None and not 1 <= defaults.max_attempts <= 1000:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"defaults for {task}: max_attempts must be 1-1000")
        if defaults.timeout is not None and not (math.isfinite(defaults.timeout) and defaults.timeout > 0):
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"defaults for {task}: timeout must be a positive finite number")


def check_payload_depth(specs: list[JobSpec]) -> None:
    """Refuse payloads nested too deeply to be written back out (stored, dispatched, answered)."""
    for i, spec in enumerate(specs):
        if not fits_in_frames(spec.payload):
            raise RequestError(ErrorCode.INVALID_FIELD, f"job {i}: payload nests deeper than {MAX_PAYLOAD_DEPTH} levels")


def worker_view(slot: WorkerSlot) -> dict[str, Any]:
    return {
        "id": slot.id,
        "name": slot.name,
        "address": slot.address,
        "status": slot.status,
        "current_jobs": list(slot.held),
        "concurrency": slot.concurrency,
        "tasks": sorted(slot.tasks),
        "queues": list(slot.queues),
        "last_heartbeat": slot.last_heartbeat,
        "connected_at": slot.connected_at,
        "completed": slot.completed,
        "failed": slot.failed,
    }


async def _run_writer(conn: FramedConnection, scope: trio.CancelScope) -> None:
    try:
        await conn.run_writer()
    except ConnectionLost:
        scope.cancel()


async def _close_quietly(stream: trio.abc.AsyncResource) -> None:
    with trio.move_on_after(1):
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "…"
