"""One session per connection, after HELLO: a producer's or a worker's.

A worker session is the cancel scope its jobs live in: every dispatched job is
a lease held by the session (jobs with a timeout get a child cancel scope whose
deadline is the lease's end). When the worker is lost, by EOF, reset or silence
past ``heartbeat_timeout``, the session's scope ends and every lease goes back
to the dispatcher, which puts the jobs back in line under their original keys.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson
import trio

from ..errors import ConnectionLost, ErrorCode, ProtocolError, StoreError
from ..job import (
    EMPTY_PAYLOAD,
    MAX_PRIORITY,
    MIN_PRIORITY,
    NAME_RE,
    ErrorInfo,
    Job,
    JobSpec,
    JobState,
    shared_name,
)
from ..protocol.framing import FramedConnection
from ..protocol.messages import (
    Abort,
    Ack,
    CancelJob,
    Delivery,
    DiscardJob,
    Dispatch,
    Drain,
    Error,
    GetJob,
    Heartbeat,
    Hello,
    JobReply,
    JobsReply,
    ListJobs,
    Message,
    Outcome,
    PauseQueue,
    ProgressReport,
    QueueReply,
    Release,
    Result,
    RetryJob,
    StatusReply,
    StatusRequest,
    Submit,
    WaitJob,
    Welcome,
    fits_in_frames,
)
from .dispatcher import CALL, EXPIRE, LEAVE, OUTCOME, RELEASE, WorkerSlot

if TYPE_CHECKING:
    from .budget import BudgetShare
    from .server import Broker

log = logging.getLogger("trioq.broker")

_NO_DEFAULTS: dict[str, Any] = {}
_GOOD_NAMES: set[str] = set()  # names that matched NAME_RE once (bounded below)


def good_name(name: str) -> bool:
    if name in _GOOD_NAMES:
        return True
    if type(name) is str and NAME_RE.match(name):
        if len(_GOOD_NAMES) < 100_000:
            _GOOD_NAMES.add(name)
        return True
    return False


class RequestError(Exception):
    """A request the broker refuses without closing the connection."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


BENIGN_CODES = frozenset({
    ErrorCode.UNKNOWN_JOB, ErrorCode.INVALID_STATE, ErrorCode.BUSY, ErrorCode.STALE, ErrorCode.TIMEOUT,
    ErrorCode.SHUTTING_DOWN,
})

#: A shutdown gives a producer's requests under way this long to be answered as usual.
WIND_DOWN = 3.0


class Session:
    """What every session shares: the connection, error accounting, the role."""

    def __init__(self, broker: Broker, conn: FramedConnection, hello: Hello, peer: str, session_id: str, owner: str | None, role: str) -> None:
        self.broker = broker
        self.conn = conn
        self.hello = hello
        self.peer = peer
        self.id = session_id
        self.owner = owner
        self.role = role
        self.errors = 0

    def refuse(self, code: ErrorCode, message: str, req: int | None = None) -> None:
        """A non-fatal ERROR; too many broken rules and the connection is closed.

        Answers about the world (an unknown or finished job, a busy broker, a stale report)
        are not misbehaviour: a client may ask for a thousand ids that do not exist.
        """
        if code not in BENIGN_CODES:
            self.errors += 1
            if self.errors > self.broker.config.max_errors:
                raise ProtocolError(
                    ErrorCode.TOO_MANY_ERRORS, f"more than {self.broker.config.max_errors} rejected messages on this connection"
                )
        self.conn.send_nowait(Error(code.value, message, req=req))


# --- producers -------------------------------------------------------------------------------


#: Jobs in one LIST page (the HTTP API's limit too).
MAX_LIST_LIMIT = 1000


class ProducerSession(Session):
    """Submits, reads and waits; requests are served concurrently, up to a bound."""

    async def run(self) -> None:
        limiter = trio.CapacityLimiter(256)
        self.waits = 0
        self._fatal: ProtocolError | None = None
        self._closing = False
        self._reading = trio.CancelScope()
        self._wait_scopes: set[trio.CancelScope] = set()
        conn = self.conn
        # Answers not yet written, past which no further request is read: a producer that
        # does not read its answers must not make the broker hold them without bound.
        unsent = self.broker.config.max_frame
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.broker._closers[conn] = self.close_for_shutdown
            if self.broker.closing:
                self.close_for_shutdown()
            ended = True
            try:
                with self._reading:
                    while True:
                        msg = await conn.receive()
                        while msg is not None:
                            if conn.queued_bytes > unsent:
                                await conn.wait_queued_below(unsent)
                            await self._dispatch(nursery, limiter, msg)
                            msg = conn.receive_nowait()
                ended = False  # a shutdown stopped the reading
            except ConnectionLost:
                pass
            except ProtocolError as exc:
                self._fatal = exc
            finally:
                if ended:
                    nursery.cancel_scope.cancel()
                else:
                    nursery.cancel_scope.deadline = trio.current_time() + WIND_DOWN
        if self._fatal is not None:
            raise self._fatal

    def close_for_shutdown(self) -> None:
        """Read no further request; answer the waits at once (shutting_down), the rest as usual."""
        self._closing = True
        self._reading.cancel()
        for scope in self._wait_scopes:
            scope.cancel()

    async def _dispatch(self, nursery: trio.Nursery, limiter: trio.CapacityLimiter, msg: Message) -> None:
        if isinstance(msg, Heartbeat):
            return
        req = getattr(msg, "req", None)
        handler = self._handlers.get(type(msg))
        if handler is None:
            code = ErrorCode.UNEXPECTED if isinstance(msg, (Hello, Welcome)) else ErrorCode.FORBIDDEN
            raise ProtocolError(code, f"a {self.role} session cannot send {msg.TYPE!r}")
        if type(msg) in (RetryJob, DiscardJob, PauseQueue) and self.role != "admin" and not self.broker.auth.open:
            self.refuse(ErrorCode.FORBIDDEN, f"{msg.TYPE} needs the admin role", req)
            return
        size = self.conn.last_size
        if type(msg) is WaitJob:
            # A wait may last hours and holds no request slot: 256 of them must not stall the
            # session's other requests (max_waits bounds how many there are).
            nursery.start_soon(self._serve, handler, msg, None, req, None, size)
            return
        borrower = object()
        try:  # no trip through the scheduler while the limiter has room
            limiter.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            await limiter.acquire_on_behalf_of(borrower)
        share = None
        try:
            if type(msg) is Submit and self._takes_budget(msg):
                # Not another frame is read while the broker holds its fill of uncommitted
                # jobs (the last await before the request is handed over to _serve).
                share = await self.broker.submit_share(len(msg.jobs))
                handler = partial(handler, share=share)  # _submit gives it back, however it ends
            nursery.start_soon(self._serve, handler, msg, limiter, req, borrower, size)
        except BaseException:  # never handed over: _serve and _submit would have given both back
            limiter.release_on_behalf_of(borrower)
            if share is not None:
                share.give_back()
            raise

    def _takes_budget(self, msg: Submit) -> bool:
        """A SUBMIT that will be refused at once (too large, empty, malformed) holds no jobs'
        worth of the budget: it must not wait behind others' commits for its error."""
        n = len(msg.jobs)
        return 0 < n <= self.broker.config.max_batch and not (msg.wait and n != 1)

    async def _serve(
        self, handler, msg: Message, limiter: trio.CapacityLimiter | None, req: int | None, borrower: object, size: int,
    ) -> None:
        try:
            try:
                await handler(self, msg, size)
            except trio.Cancelled:
                if self._closing:  # WIND_DOWN is over: still an answer, before the connection ends
                    what = f"this {msg.TYPE}"
                    if type(msg) is Submit:
                        what += " (its jobs may be stored: sent again with the same idempotency keys, they are found while unfinished)"
                    try:
                        self.conn.send_nowait(Error(ErrorCode.SHUTTING_DOWN.value, f"the broker is shutting down before answering {what}", req=req))
                    except ConnectionLost:
                        pass
                raise
            except RequestError as exc:
                self.refuse(exc.code, exc.message, req)
            except StoreError as exc:
                if type(msg) is Submit:
                    self.refuse(ErrorCode.BUSY, f"not accepted, the store is failing: {exc}", req)
                else:  # a change to a stored job: made, and committed again until it is stored
                    self.refuse(ErrorCode.BUSY, f"the store is failing ({exc}); the change is made and is stored when it recovers", req)
        except ConnectionLost:
            pass
        except ProtocolError as exc:  # too many errors: close the connection
            self._fatal = exc
            self._nursery.cancel_scope.cancel()
        finally:
            if limiter is not None:
                limiter.release_on_behalf_of(borrower)

    async def _submit(self, msg: Submit, size: int = 0, share: BudgetShare | None = None) -> None:
        # Its share of the submit budget goes back once it is answered, or sooner if it has
        # to wait for room under --max-queued.
        give_back = share.give_back if share is not None else None
        try:
            if msg.wait:
                await self._submit_and_wait(msg, size, give_back)
                return
            ids, existing = await self.broker.submit(msg.jobs, owner=self.owner, frame_size=size, before_waiting=give_back)
            self.conn.send_nowait(Ack(msg.req, ids, existing))
        finally:
            if give_back is not None:
                give_back()

    async def _submit_and_wait(self, msg: Submit, size: int, before_waiting: Callable[[], None] | None) -> None:
        """One job: an ACK once it is stored, then its final state; a WAIT fewer than SUBMIT, WAIT."""
        if len(msg.jobs) != 1:
            raise RequestError(ErrorCode.INVALID_FIELD, "a SUBMIT with wait takes exactly one job @ $.jobs")
        self._take_wait(msg.wait_timeout, "wait_timeout")  # refused before anything is stored
        try:
            ids, existing = await self.broker.submit(
                msg.jobs, owner=self.owner, frame_size=size, before_waiting=before_waiting,
            )
        except BaseException:
            self.waits -= 1
            raise
        self.conn.send_nowait(Ack(msg.req, ids, existing))  # the id, in case the caller gives up first
        job_id = ids[0]
        # The wait goes on in a task of its own, without this request's slot (see _dispatch).
        wait = WaitJob(msg.req, job_id, msg.wait_timeout)
        self._nursery.start_soon(self._serve, ProducerSession._wait_taken, wait, None, msg.req, None, 0)

    def _take_wait(self, timeout: float | None, field: str) -> None:
        if timeout is not None and not timeout >= 0:  # a value out of range: not fatal
            raise RequestError(ErrorCode.INVALID_FIELD, f"{field} must be a number of seconds, 0 or more @ $.{field}")
        if self.waits >= self.broker.config.max_waits:
            raise RequestError(ErrorCode.BUSY, "too many outstanding waits on this connection")
        self.waits += 1

    @property
    def reads_only_own(self) -> str | None:
        """The owner whose jobs alone this session may read: producers with a credential see
        their own jobs (and admins everything; without credentials everyone is admin)."""
        return None if self.role == "admin" else self.owner

    async def _get(self, msg: GetJob, _size: int = 0) -> None:
        job = await self.broker.get_job(msg.id, owner=self.reads_only_own)
        if job is None:  # someone else's job is as unknown as one that does not exist
            raise RequestError(ErrorCode.UNKNOWN_JOB, f"no job with id {msg.id!r}")
        self.conn.send_nowait(JobReply(msg.req, job))

    async def _list(self, msg: ListJobs, _size: int = 0) -> None:
        state = None
        if msg.state is not None:
            try:
                state = JobState(msg.state)
            except ValueError:
                raise RequestError(ErrorCode.INVALID_FIELD, f"unknown state {msg.state!r}") from None
        if not 1 <= msg.limit <= MAX_LIST_LIMIT:  # as the HTTP API: refused, not quietly clamped
            raise RequestError(ErrorCode.INVALID_FIELD, f"limit must be 1-{MAX_LIST_LIMIT} @ $.limit")
        limit = msg.limit
        page = await self.broker.list_jobs(
            state=state, queue=msg.queue, task=msg.task, limit=limit, cursor=msg.cursor, owner=self.reads_only_own
        )
        self.conn.send_nowait(JobsReply(msg.req, page.jobs, page.next_cursor))

    async def _wait(self, msg: WaitJob, _size: int = 0) -> None:
        self._take_wait(msg.timeout, "timeout")
        await self._wait_taken(msg)

    async def _wait_taken(self, msg: WaitJob, _size: int = 0) -> None:
        """Answer once the job is final; the wait was counted (and its timeout checked) by
        whoever called."""
        timeout = msg.timeout
        # Its scope ends at the timeout, or when a shutdown answers every wait.
        scope = trio.CancelScope(deadline=math.inf if timeout is None else trio.current_time() + timeout)
        self._wait_scopes.add(scope)
        try:
            if self._closing:
                scope.cancel()
            with scope:
                job = await self.broker.wait_job(msg.id, owner=self.reads_only_own)
        finally:
            self._wait_scopes.discard(scope)
            self.waits -= 1
        if scope.cancelled_caught:
            if self._closing:
                raise RequestError(
                    ErrorCode.SHUTTING_DOWN,
                    f"the broker is shutting down before job {msg.id} finished; the job stays stored, "
                    "and is finished after the restart",
                )
            raise RequestError(ErrorCode.TIMEOUT, f"job {msg.id} did not finish within {timeout:g}s")
        if job is None:  # no such job, or (an idempotency key matched) one this session may not read
            raise RequestError(ErrorCode.UNKNOWN_JOB, f"no job with id {msg.id!r}")
        self.conn.send_nowait(JobReply(msg.req, job))

    async def _cancel(self, msg: CancelJob, _size: int = 0) -> None:
        job = await self.broker.cancel_job(msg.id, owner=None if self.role == "admin" else self.owner)
        self.conn.send_nowait(JobReply(msg.req, job))

    async def _retry(self, msg: RetryJob, _size: int = 0) -> None:
        self.conn.send_nowait(JobReply(msg.req, await self.broker.retry_job(msg.id)))

    async def _discard(self, msg: DiscardJob, _size: int = 0) -> None:
        self.conn.send_nowait(JobReply(msg.req, await self.broker.discard_job(msg.id)))

    async def _pause(self, msg: PauseQueue, _size: int = 0) -> None:
        await self.broker.set_paused(msg.queue, msg.paused)
        self.conn.send_nowait(QueueReply(msg.req, msg.queue, msg.queue in self.broker.dispatcher.paused))

    async def _status(self, msg: StatusRequest, _size: int = 0) -> None:
        self.conn.send_nowait(StatusReply(msg.req, self.broker.stats()))

    _handlers: dict[type, Any] = {
        Submit: _submit,
        GetJob: _get,
        ListJobs: _list,
        WaitJob: _wait,
        CancelJob: _cancel,
        RetryJob: _retry,
        DiscardJob: _discard,
        PauseQueue: _pause,
        StatusRequest: _status,
    }


def validate_specs(specs: list[JobSpec], broker: Broker) -> None:
    """Refuse a whole batch if any job in it is wrong; name the job and the field."""
    cfg = broker.config
    if not specs:
        raise RequestError(ErrorCode.INVALID_FIELD, "submit carries no jobs")
    if len(specs) > cfg.max_batch:
        raise RequestError(ErrorCode.TOO_LARGE, f"{len(specs)} jobs in one submit; the limit is {cfg.max_batch}")
    known = broker.dispatcher.known_tasks
    many = len(specs) > 1
    for i, s in enumerate(specs):
        if not good_name(s.task):
            raise RequestError(ErrorCode.INVALID_FIELD, f"{_where(i, many)}: task must be 1-200 letters, digits or _.:-")
        if not good_name(s.queue):
            raise RequestError(ErrorCode.INVALID_FIELD, f"{_where(i, many)}: queue must be 1-200 letters, digits or _.:-")
        if not MIN_PRIORITY <= s.priority <= MAX_PRIORITY:
            raise RequestError(ErrorCode.INVALID_FIELD, f"{_where(i, many)}: priority must be {MIN_PRIORITY}-{MAX_PRIORITY}, not {s.priority}")
        if s.delay is not None or s.run_at is not None or s.timeout is not None:
            for name in ("delay", "run_at", "timeout"):
                v = getattr(s, name)
                if v is not None and (not math.isfinite(v) or v < 0 or (name == "timeout" and v == 0)):
                    raise RequestError(ErrorCode.INVALID_FIELD, f"{_where(i, many)}: {name} must be a positive finite number")
        if s.max_attempts is not None and not 1 <= s.max_attempts <= 1000:
            raise RequestError(ErrorCode.INVALID_FIELD, f"{_where(i, many)}: max_attempts must be 1-1000")
        if s.idempotency_key is not None and not 0 < len(s.idempotency_key) <= 200:
            raise RequestError(ErrorCode.INVALID_FIELD, f"{_where(i, many)}: idempotency_key must be 1-200 characters")
        if not cfg.allow_unknown_tasks and s.task not in known:
            raise RequestError(
                ErrorCode.UNKNOWN_TASK,
                f"{_where(i, many)}: no worker has ever registered task {s.task!r} (known: {', '.join(sorted(known)) or 'none'})",
            )


def _where(i: int, many: bool) -> str:
    """How an error names the job: made only for an error (a batch holds up to 10,000 jobs)."""
    return f"job {i}" if many else "job"


def payload_size(payload: Any) -> int:
    try:
        return len(orjson.dumps(payload))
    except TypeError as exc:  # pragma: no cover - JSON from the wire always re-encodes
        raise RequestError(ErrorCode.INVALID_FIELD, f"payload is not JSON: {exc}") from None


def make_jobs(specs: list[JobSpec], broker: Broker, owner: str | None, frame_size: int | None = None) -> list[Job]:
    now = broker.now()
    cfg = broker.config
    # A frame no larger than the payload limit cannot hold a payload over it.
    if frame_size is None or frame_size > cfg.max_payload:
        for i, s in enumerate(specs):
            if payload_size(s.payload) > cfg.max_payload:
                raise RequestError(ErrorCode.TOO_LARGE, f"job {i}: payload over {cfg.max_payload} bytes")
    first = broker.dispatcher.reserve_seqs(len(specs))
    ids = broker.job_ids.make(first, len(specs))
    task_defaults = broker.task_defaults
    default_max_attempts = broker.default_max_attempts
    jobs = []
    for i, s in enumerate(specs):
        defaults = task_defaults.get(s.task, _NO_DEFAULTS)
        run_at = s.run_at if s.run_at is not None else (now + s.delay if s.delay else None)
        state = JobState.SCHEDULED if run_at is not None and run_at > now else JobState.QUEUED
        payload = s.payload
        jobs.append(Job(  # by position (see trioq.job.FIELD_ORDER): a batch of 10,000 is a hot path
            ids[i], first + i, shared_name(s.task), EMPTY_PAYLOAD if type(payload) is dict and not payload else payload,
            s.priority, shared_name(s.queue), state, 0, 0, 0,
            s.max_attempts or defaults.get("max_attempts") or default_max_attempts,
            s.timeout if s.timeout is not None else defaults.get("timeout"),
            run_at, now, None, None, None, None, None, None, s.idempotency_key, None, owner,
        ))
    return jobs


# --- workers ---------------------------------------------------------------------------------


def check_worker_hello(hello: Hello, max_concurrency: int) -> None:
    """A worker's own configuration, refused before WELCOME: the same HELLO would be refused
    again on every reconnect, so the worker is told at once and does not retry."""
    if not 1 <= hello.concurrency <= max_concurrency:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"concurrency must be 1-{max_concurrency}")
    for name in (*hello.tasks, *hello.queues):
        if not NAME_RE.match(name):
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"bad task or queue name {name[:50]!r}")


class WorkerSession(Session):
    async def run(self, task_status: trio.TaskStatus[WorkerSlot] = trio.TASK_STATUS_IGNORED) -> None:
        broker = self.broker
        hello = self.hello
        now = broker.now()  # the HELLO was checked before WELCOME (check_worker_hello)
        self.slot = slot = WorkerSlot(
            id=self.id,
            name=hello.name or f"worker-{self.id}",
            tasks=frozenset(hello.tasks),
            queues=tuple(dict.fromkeys(hello.queues)) or ("default",),
            concurrency=hello.concurrency,
            deliver=self._deliver,
            abort=self._abort,
            address=self.peer,
            connected_at=now,
            last_heartbeat=now,
        )
        self._leases: dict[str, trio.CancelScope] = {}
        self._recent: OrderedDict[tuple[str, int], None] = OrderedDict()
        dispatcher = broker.dispatcher
        reason = "connection closed"
        fatal: ProtocolError | None = None
        try:
            # The session's scope: every lease lives in this nursery and ends with it.
            async with trio.open_nursery() as leases:
                self._nursery = leases
                dispatcher.post(CALL, broker.worker_joined, slot, self)
                task_status.started(slot)
                try:
                    reason = await self._receive_loop()
                except ConnectionLost as exc:
                    reason = str(exc)
                except ProtocolError as exc:
                    reason = f"protocol error: {exc}"
                    fatal = exc
                finally:
                    # Before the lease nursery closes: from here on the dispatcher sends
                    # this session nothing, however long its LEAVE waits in the inbox.
                    slot.alive = False
                    leases.cancel_scope.cancel()
        finally:
            slot.alive = False
            dispatcher.post(LEAVE, slot, reason)
            broker.worker_left(slot, reason)
        if fatal is not None:
            raise fatal

    async def _receive_loop(self) -> str:
        conn = self.conn
        timeout = self.broker.config.heartbeat_timeout
        slot = self.slot
        clock = self.broker.now
        while True:
            with trio.move_on_after(timeout):
                msg = await conn.receive()
                slot.last_heartbeat = clock()
                while msg is not None:
                    self._handle(msg)
                    msg = conn.receive_nowait()
                continue
            return f"no frame for {timeout:g}s (heartbeat timeout)"

    def _handle(self, msg: Message) -> None:
        t = type(msg)
        if t is Result:
            self._results(msg)  # type: ignore[arg-type]
        elif t is Heartbeat:
            pass
        elif t is ProgressReport:
            self._progress(msg)  # type: ignore[arg-type]
        elif t is Release:
            items = list(zip(msg.ids, msg.attempts, strict=False))  # type: ignore[attr-defined]
            dispatcher = self.broker.dispatcher
            for job_id, attempt in items:
                # Fenced as results are: a RELEASE of an older attempt must not end the lease of
                # the current one (the job would then never expire).
                if dispatcher.is_current(self.slot, job_id, attempt):
                    self._end_lease(job_id)
            self.broker.dispatcher.post(RELEASE, self.slot, items)
        elif t is Drain:
            log.info("worker %s is draining (takes no new jobs)", self.slot.name)
            self.broker.dispatcher.post(CALL, self.broker.dispatcher.drain_nowait, self.slot)
            self.broker.publish_worker(self.slot, "updated")
        else:
            code = ErrorCode.UNEXPECTED if isinstance(msg, (Hello, Welcome)) else ErrorCode.FORBIDDEN
            raise ProtocolError(code, f"a worker session cannot send {msg.TYPE!r}")

    def _results(self, msg: Result) -> None:
        dispatcher = self.broker.dispatcher
        slot = self.slot
        good = []
        refused = []
        recent = self._recent
        for oc in msg.outcomes:
            key = (oc.id, oc.attempt)
            if dispatcher.is_current(slot, oc.id, oc.attempt) and key not in recent:
                if not fits_in_frames(oc.result):  # it fails its attempt, not the broker
                    oc = Outcome(oc.id, oc.attempt, False, None, ErrorInfo(
                        "InvalidResult", "the worker reported a result nested too deeply to store", "", False))
                good.append(oc)
                self._end_lease(oc.id)
                recent[key] = None
                if len(recent) > 10_000:
                    recent.popitem(last=False)
            elif key in recent:
                continue  # a duplicate RESULT: already recorded, ignored
            else:
                refused.append(oc.id)
        if good:
            dispatcher.post(OUTCOME, slot, good)
        if refused:
            self.refuse(
                ErrorCode.STALE,
                f"result refused for {len(refused)} job(s) this worker does not hold at that attempt: "
                + ", ".join(refused[:5]),
            )

    def _progress(self, msg: ProgressReport) -> None:
        if not self.broker.dispatcher.is_current(self.slot, msg.id, msg.attempt):
            self.refuse(ErrorCode.STALE, f"progress for {msg.id} attempt {msg.attempt} is not current")
            return
        job = self.slot.held[msg.id]
        job.progress = msg.progress
        self.broker.journal([job])

    # Called by the dispatcher task (sync): sends and leases.
    def _deliver(self, jobs: list[Job]) -> None:
        now = trio.current_time()
        grace = self.broker.config.lease_grace
        deliveries = []
        for job in jobs:
            deliveries.append(Delivery(job.id, job.attempts, job.task, job.payload, job.queue, job.priority, job.timeout))
            if job.timeout is not None:
                self._nursery.start_soon(self._lease, job.id, job.attempts, now + job.timeout + grace)
        try:
            self.conn.send_nowait(Dispatch(deliveries))
        except ConnectionLost:
            pass  # the session is ending; LEAVE will requeue these

    def _abort(self, job: Job, reason: str) -> None:
        self._end_lease(job.id)
        try:
            self.conn.send_nowait(Abort(job.id, job.attempts, reason))
        except ConnectionLost:
            pass

    def _end_lease(self, job_id: str) -> None:
        scope = self._leases.pop(job_id, None)
        if scope is not None:
            scope.cancel()

    async def _lease(self, job_id: str, attempt: int, deadline: float) -> None:
        """The job's own cancel scope: if its deadline passes first, the lease expires."""
        with trio.CancelScope(deadline=deadline) as scope:
            self._leases[job_id] = scope
            await trio.sleep_forever()
        if self._leases.get(job_id) is scope:
            del self._leases[job_id]
            held = self.slot.held.get(job_id)
            if held is not None and held.attempts == attempt:
                log.warning("job %s attempt %d: lease expired on worker %s", job_id, attempt, self.slot.name)
                self.broker.dispatcher.post(EXPIRE, self.slot, job_id)

    def send_drain(self, stop: bool) -> None:
        try:
            self.conn.send_nowait(Drain(stop=stop))
        except ConnectionLost:
            pass

