"""Pure scheduling: priority heaps, delays, leases' bookkeeping, worker credits.

Nothing here touches a socket or the disk. Sessions post events on one memory
channel; the dispatcher task drains them in batches, applies them through the
sync core (``*_nowait`` methods, usable directly in tests), then pushes jobs to
workers that have credit. Every decision depends only on the order of events,
never on timing: a job's place in line is (priority, seq), fixed at acceptance
and kept through every requeue.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Any

import attrs
import trio

from ..job import (
    DEFAULT_MAX_WORKER_LOSSES,
    TERMINAL_STATES,
    ErrorInfo,
    Job,
    JobState,
)

log = logging.getLogger("trioq.dispatcher")

_by_seq = attrgetter("seq")


@attrs.frozen
class RetryPolicy:
    """delay(n) = min(max_delay, base * factor ** (n - 1)) * (1 + jitter * u), u in [0, 1)."""

    base: float = 1.0
    factor: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.1

    def delay(self, failures: int, rng: random.Random) -> float:
        raw = min(self.max_delay, self.base * self.factor ** max(0, failures - 1))
        return raw * (1.0 + self.jitter * rng.random())


@attrs.define(eq=False)
class WorkerSlot:
    """The dispatcher's view of one worker session."""

    id: str
    name: str
    tasks: frozenset[str]
    queues: tuple[str, ...]
    concurrency: int
    deliver: Callable[[list[Job]], None]
    abort: Callable[[Job, str], None] = lambda job, reason: None
    address: str = ""
    connected_at: float = 0.0
    last_heartbeat: float = 0.0
    held: dict[str, Job] = attrs.Factory(dict)
    draining: bool = False
    stopping: bool = False
    alive: bool = True
    completed: int = 0
    failed: int = 0

    @property
    def credit(self) -> int:
        return self.concurrency - len(self.held)

    @property
    def status(self) -> str:
        if self.stopping:
            return "stopping"
        if self.draining:
            return "quiet"
        return "busy" if self.held else "idle"


_QUEUED = JobState.QUEUED
_RUNNING = JobState.RUNNING


class _Lane:
    """One priority of one line, in seq order.

    Jobs nearly always arrive in seq order, so they go to a deque: 8 bytes a job and O(1)
    at both ends, where a heap entry cost a tuple (about 80 bytes) and O(log n). The few
    that arrive late (requeued, retried, due after a delay) wait in a small heap beside it;
    the front is the smaller of the two. Entries whose job is no longer queued (cancelled,
    or a stale twin of a job pushed again) are dropped when they reach the front.
    """

    __slots__ = ("fifo", "late")

    def __init__(self) -> None:
        self.fifo: deque[Job] = deque()
        self.late: list[tuple[int, int, Job]] = []

    def push(self, job: Job) -> None:
        fifo = self.fifo
        if not fifo or fifo[-1].seq < job.seq:
            fifo.append(job)
        else:
            # id() breaks a tie between two objects of one job (a stale entry and a copy read
            # back from the store), which cannot be compared; the stale one is dropped anyway.
            heapq.heappush(self.late, (job.seq, id(job), job))

    def extend(self, jobs: list[Job]) -> None:
        """Jobs sorted by seq (a restart): taken whole when they follow the deque's tail."""
        fifo = self.fifo
        if jobs and (not fifo or fifo[-1].seq < jobs[0].seq):
            fifo.extend(jobs)
        else:
            for job in jobs:
                self.push(job)

    def front(self) -> Job | None:
        fifo = self.fifo
        late = self.late
        while fifo and fifo[0].state is not _QUEUED:
            fifo.popleft()
        while late and late[0][2].state is not _QUEUED:
            heapq.heappop(late)
        if fifo:
            if late and late[0][0] < fifo[0].seq:
                return late[0][2]
            return fifo[0]
        return late[0][2] if late else None

    def take(self, n: int, out: list[Job]) -> int:
        """Up to n jobs from the front into ``out``, each marked RUNNING as it is taken (so a
        stale twin further back is skipped); fewer than n means the lane is empty."""
        fifo = self.fifo
        taken = 0
        if not self.late:  # the common case: one seq-ordered deque, popped in a run
            popleft = fifo.popleft
            while taken < n and fifo:
                job = popleft()
                if job.state is _QUEUED:
                    job.state = _RUNNING
                    out.append(job)
                    taken += 1
            return taken
        while taken < n:
            job = self.front()
            if job is None:
                break
            self.pop_front()
            job.state = _RUNNING
            out.append(job)
            taken += 1
        return taken

    def pop_front(self) -> None:
        """Remove the job ``front()`` returned last."""
        fifo = self.fifo
        late = self.late
        if fifo and not (late and late[0][0] < fifo[0].seq):
            fifo.popleft()
        else:
            heapq.heappop(late)

    def __iter__(self):
        yield from self.fifo
        for _, _, job in self.late:
            yield job


class _Line:
    """The queued jobs of one (queue, task): by priority (1 first), then by seq."""

    __slots__ = ("lanes", "active")

    def __init__(self) -> None:
        self.lanes: dict[int, _Lane] = {}
        self.active: list[int] = []  # priorities that may hold jobs, ascending

    def _lane(self, priority: int) -> _Lane:
        lane = self.lanes.get(priority)
        if lane is None:
            lane = self.lanes[priority] = _Lane()
            bisect.insort(self.active, priority)
        return lane

    def push(self, job: Job) -> None:
        self._lane(job.priority).push(job)

    def extend(self, jobs: list[Job]) -> None:
        """Many at once (a restart): per priority, sorted once and taken as the deque whole."""
        per: dict[int, list[Job]] = {}
        for job in jobs:
            same = per.get(job.priority)
            if same is None:
                same = per[job.priority] = []
            same.append(job)
        for priority, same in per.items():
            same.sort(key=_by_seq)  # the store reads in seq order: a merge of sorted runs
            self._lane(priority).extend(same)

    def take(self, n: int, out: list[Job]) -> int:
        """Up to n jobs in dispatch order into ``out``, marked RUNNING; returns how many."""
        active = self.active
        lanes = self.lanes
        taken = 0
        while active and taken < n:
            got = lanes[active[0]].take(n - taken, out)
            taken += got
            if taken < n:  # that lane ran dry
                del lanes[active.pop(0)]
        return taken

    def front(self) -> tuple[_Lane, Job] | None:
        """The next job to dispatch and its lane, or None."""
        active = self.active
        lanes = self.lanes
        while active:
            lane = lanes[active[0]]
            job = lane.front()
            if job is not None:
                return lane, job
            del lanes[active.pop(0)]
        return None

    def __iter__(self):
        for lane in self.lanes.values():
            yield from lane


class _Backlog:
    """The journal's unfinished jobs not loaded yet, while a restart loads them in seq order.

    The broker serves while it loads, so a job may only reach its line when no job still in
    the journal could come before it in any worker's order: none at a more urgent priority,
    none at its own with a smaller seq. Until the journal's priorities are known, nothing
    reaches a line. Jobs that must wait are held here, per priority and line, in arrival
    order. Once the whole journal is read, the held jobs join their lines a priority at a
    step, most urgent first (``releasing``), so no step holds the loop for all of them.
    """

    __slots__ = ("end", "frontier", "tails", "first", "pending", "unread", "held", "releasing")

    def __init__(self, end: int) -> None:
        self.end = end  # jobs from the journal have seq < end; new ones seq >= end
        self.frontier = 0  # every unfinished journal job with seq < frontier is loaded
        #: per priority not wholly loaded: the largest seq of the journal's jobs there
        self.tails: dict[int, int] | None = None
        self.first: int | None = None  # the most urgent of them (None: none)
        self.pending = 0  # journal jobs not loaded yet (once counted)
        self.unread: dict[tuple[str, str, int], int] = {}  # the same, by queue, task and priority
        self.held: dict[int, dict[tuple[str, str], list[Job]]] = {}
        self.releasing = False  # read whole; ``first`` is the next priority to release

    def holds(self, job: Job) -> bool:
        if self.tails is None:
            return True
        first = self.first
        if first is None:
            return False
        if self.releasing:
            return job.priority >= first
        return first < job.priority or (first == job.priority and job.seq >= self.frontier)

    def hold(self, key: tuple[str, str], priority: int, jobs: list[Job]) -> None:
        """Jobs of one line and priority, after those of theirs held already."""
        lines = self.held.get(priority)
        if lines is None:
            lines = self.held[priority] = {}
        same = lines.get(key)
        if same is None:
            lines[key] = jobs
        else:
            same.extend(jobs)

    def most_pending(self) -> int:
        """Journal jobs not loaded yet, or before they are counted, as many as could be."""
        return self.pending if self.tails is not None else max(0, self.end - 1)

    def know(self, tails: dict[int, int]) -> None:
        self.tails = tails
        self.first = min(tails, default=None)

    def advance(self, frontier: int) -> bool:
        """Loaded up to ``frontier``: whether a priority became whole (held jobs may pass)."""
        self.frontier = frontier
        assert self.tails is not None
        done = [p for p, top in self.tails.items() if top < frontier]
        for p in done:
            del self.tails[p]
        self.first = min(self.tails, default=None)
        return bool(done)


@attrs.frozen
class DispatcherStatistics:
    queued: int
    scheduled: int
    running: int
    workers: int
    idle_workers: int
    busy_workers: int
    submitted: int
    dispatched: int
    completed: int
    failed: int
    dead: int
    cancelled: int
    requeued: int
    retried: int
    restoring: int = 0  # journal jobs not loaded yet (a restart in progress)


# Events posted on the inbox: a tag and its arguments.
SUBMIT = "submit"
JOIN = "join"
LEAVE = "leave"
OUTCOME = "outcome"
RELEASE = "release"
EXPIRE = "expire"
CALL = "call"


class Dispatcher:
    def __init__(
        self,
        *,
        now: Callable[[], float] = time.time,
        retry: RetryPolicy | None = None,
        max_worker_losses: int = DEFAULT_MAX_WORKER_LOSSES,
        seed: int | None = None,
        on_change: Callable[[Iterable[Job]], None] | None = None,
    ) -> None:
        self.now = now
        self.retry = retry or RetryPolicy()
        self.max_worker_losses = max_worker_losses
        self.rng = random.Random(seed)
        #: called with jobs whose state changed (the broker journals them)
        self.on_change = on_change or (lambda jobs: None)
        self._lines: dict[tuple[str, str], _Line] = {}
        self._scheduled: list[tuple[float, int, int, Job]] = []
        self.live: dict[str, Job] = {}  # every unfinished job by id (loaded, while restoring)
        self._backlog: _Backlog | None = None  # a restart still loading the journal
        #: jobs between Broker.submit's check for room and their SUBMIT event (being committed)
        self.reserved = 0
        #: unfinished jobs by (owner, idempotency key): each credential has keys of its own,
        #: so one producer's key can neither find nor block another's job
        self.idempotency: dict[tuple[str | None, str], Job] = {}
        self.workers: dict[str, WorkerSlot] = {}
        self._rotation: deque[str] = deque()
        self.paused: set[str] = set()
        self.known_tasks: set[str] = set()
        self.n_queued = 0
        self.n_scheduled = 0
        self.n_running = 0
        self.submitted = 0
        self.dispatched = 0
        self.completed = 0
        self.failed = 0  # task failures, retried or not
        self.dead = 0
        self.cancelled = 0
        self.requeued = 0
        self.retried = 0
        self._next_seq = 1
        #: finished jobs by (task, state): the broker seeds it from the store at start
        self.finished: dict[tuple[str, str], int] = {}
        self._room = trio.Event()
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[tuple](math.inf)
        self._wake_schedule = False
        #: told of every dispatched batch (the broker journals the RUNNING marks)
        self.on_dispatch: Callable[[WorkerSlot, list[Job]], None] | None = None
        self.on_requeue: Callable[[WorkerSlot | None, list[Job], str], None] | None = None

    # --- sequence numbers and recovery --------------------------------------

    def next_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def reserve_seqs(self, n: int) -> int:
        first = self._next_seq
        self._next_seq += n
        return first

    def restore(self, jobs: Iterable[Job], next_seq: int) -> list[Job]:
        """Put recovered unfinished jobs back in line; running ones count as lost."""
        self._next_seq = max(self._next_seq, next_seq)
        requeued, pending = self._recover(jobs)
        for key, batch in pending.items():
            self._line(key).extend(batch)
        return requeued

    # A restart that serves while it loads: begin_restore, then restore_summary once the
    # journal's priorities are known, then restore_chunk until the frontier reaches the end.

    def begin_restore(self, end: int) -> None:
        """Jobs from the journal have seq < ``end``; until restore_summary, none is dispatched."""
        self._next_seq = max(self._next_seq, end)
        self._backlog = _Backlog(end)

    @property
    def restoring(self) -> bool:
        return self._backlog is not None

    def restore_summary(self, summary: Iterable[tuple[str, str, int, int, int]]) -> None:
        """The journal's unfinished jobs by queue, task and priority: (queue, task, priority,
        count, largest seq)."""
        b = self._backlog
        assert b is not None and b.tails is None
        tails: dict[int, int] = {}
        for queue, task, priority, count, top in summary:
            tails[priority] = max(top, tails.get(priority, 0))
            b.unread[queue, task, priority] = count
            b.pending += count
        b.know(tails)
        self._release_held()
        if not self._room.is_set():
            self._room.set()  # counted: SUBMITs waiting under --max-queued look again

    def restore_chunk(self, jobs: list[Job], frontier: int) -> list[Job]:
        """The journal's next jobs in seq order; every one below ``frontier`` is now loaded."""
        b = self._backlog
        assert b is not None and b.tails is not None and not b.releasing
        final = frontier >= b.end
        opened = b.advance(frontier)
        if final:
            # Read whole: from here the held jobs are released a priority at a step, and a
            # job joins its line only if it is more urgent than every job still held.
            b.releasing = True
            b.first = min(b.held, default=None)
        elif opened:
            self._release_held()
        b.pending = max(0, b.pending - len(jobs))
        unread = b.unread
        for key, n in Counter((job.queue, job.task, job.priority) for job in jobs).items():
            left = unread.get(key, 0) - n
            if left > 0:
                unread[key] = left
            else:
                unread.pop(key, None)
        requeued, pending = self._recover(jobs)
        # A chunk's jobs all come before the frontier: one of them is held if its priority is
        # less urgent than ``first`` (or as urgent, once releasing), as holds() says.
        first = b.first
        limit = None if first is None else first if b.releasing else first + 1
        for key, batch in pending.items():
            if limit is not None:
                go = []
                out: dict[int, list[Job]] = {}
                for job in batch:
                    p = job.priority
                    if p >= limit:
                        same = out.get(p)
                        if same is None:
                            out[p] = [job]
                        else:
                            same.append(job)
                    else:
                        go.append(job)
                for p, same in out.items():
                    b.hold(key, p, same)
                batch = go
            self._line(key).extend(batch)
        if final:
            self._next_release()
        return requeued

    @property
    def releasing(self) -> bool:
        """The journal is read whole; held jobs still join their lines (restore_release)."""
        return self._backlog is not None and self._backlog.releasing

    def restore_release(self) -> bool:
        """The held jobs of the next priority join their lines; whether any are left."""
        b = self._backlog
        assert b is not None and b.releasing and b.first is not None
        for key, jobs in b.held.pop(b.first).items():
            go = [job for job in jobs if job.state is _QUEUED]  # cancelled ones are dropped
            if go:
                self._line(key).extend(go)
        self._next_release()
        return self._backlog is not None

    def _next_release(self) -> None:
        """The next priority to release, or the end of the restore if none is held."""
        b = self._backlog
        assert b is not None
        b.first = min(b.held, default=None)
        if b.first is None:
            self._backlog = None

    def _release_held(self) -> None:
        """Held jobs that may now reach their lines (cancelled ones are dropped)."""
        b = self._backlog
        assert b is not None
        for priority, lines in list(b.held.items()):
            for key, jobs in list(lines.items()):
                keep, go = [], []
                for job in jobs:
                    if job.state is _QUEUED:
                        (keep if b.holds(job) else go).append(job)
                if keep:
                    lines[key] = keep
                else:
                    del lines[key]
                if go:
                    self._line(key).extend(go)
            if not lines:
                del b.held[priority]

    def _recover(self, jobs: Iterable[Job]) -> tuple[list[Job], dict[tuple[str, str], list[Job]]]:
        """Jobs read back from the journal: running ones count as lost (requeued, or dead),
        scheduled ones wait for their time, the rest are returned per line, in seq order."""
        requeued: list[Job] = []
        live = self.live
        pending: dict[tuple[str, str], list[Job]] = {}
        now = self.now()
        queued = JobState.QUEUED
        running = JobState.RUNNING
        dead = JobState.DEAD
        idempotency = self.idempotency
        corrupt: list[Job] = []
        n = 0
        for job in jobs:
            if job.state is dead:  # a row no job could be read from (the store logged why)
                self._finish(job, dead, now=now, reason=job.dead_reason)
                corrupt.append(job)
                continue
            if job.state is running:
                job.worker = None
                self._lose(job)  # requeued through _enqueue, or dead
                requeued.append(job)
                if job.state.terminal:
                    continue
                live[job.id] = job
            else:
                live[job.id] = job
                if job.run_at is not None and job.run_at > now:
                    self._enqueue(job)  # scheduled
                else:
                    # The common case, a million times at a restart: gathered per line and
                    # put in seq order below, so nearly all go to the lanes' deques.
                    job.state = queued
                    key = (job.queue, job.task)
                    batch = pending.get(key)
                    if batch is None:
                        batch = pending[key] = []
                    batch.append(job)
                    n += 1
            if job.idempotency_key:
                idempotency[job.owner, job.idempotency_key] = job
        self.n_queued += n
        if corrupt:
            self.dead += len(corrupt)
            self.on_change(corrupt)  # journaled dead: the next start does not read them again
        return requeued, pending

    # --- the inbox ---------------------------------------------------------------

    def post(self, *event: Any) -> None:
        self._inbox_send.send_nowait(event)

    async def run(self, *, task_status: trio.TaskStatus[Dispatcher] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        recv = self._inbox_recv
        self.pump()
        while True:
            deadline = self.next_due()
            if deadline is not None:
                delay = deadline - self.now()
                with trio.move_on_after(max(0.0, delay)):
                    event = await recv.receive()
                    self._apply(event)
            else:
                event = await recv.receive()
                self._apply(event)
            # Drain what else is waiting: one pump per batch of events.
            for _ in range(10_000):
                try:
                    event = recv.receive_nowait()
                except trio.WouldBlock:
                    break
                self._apply(event)
            self.promote_due()
            self.pump()

    def _apply(self, event: tuple) -> None:
        tag = event[0]
        if tag == OUTCOME:
            self.outcome_nowait(event[1], event[2])
        elif tag == SUBMIT:
            self.submit_nowait(*event[1:])
        elif tag == JOIN:
            self.join_nowait(event[1])
        elif tag == LEAVE:
            self.leave_nowait(event[1], event[2])
        elif tag == RELEASE:
            self.release_nowait(event[1], event[2])
        elif tag == EXPIRE:
            self.expire_nowait(event[1], event[2])
        elif tag == CALL:
            event[1](*event[2:])
        else:  # pragma: no cover - programming error
            raise AssertionError(f"unknown dispatcher event {tag!r}")

    # --- queue state -------------------------------------------------------------

    def _enqueue(self, job: Job) -> None:
        """Into its line, or the schedule when it has a run_at in the future."""
        if job.run_at is not None and job.run_at > self.now():
            job.state = JobState.SCHEDULED
            heapq.heappush(self._scheduled, (job.run_at, job.seq, id(job), job))
            self.n_scheduled += 1
            return
        job.state = JobState.QUEUED
        key = (job.queue, job.task)
        b = self._backlog
        if b is not None and b.holds(job):
            b.hold(key, job.priority, [job])
        else:
            self._line(key).push(job)
        self.n_queued += 1

    def _line(self, key: tuple[str, str]) -> _Line:
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = _Line()
        return line

    def promote_due(self) -> list[Job]:
        now = self.now()
        due: list[Job] = []
        sched = self._scheduled
        while sched and sched[0][0] <= now:
            at, _, _, job = heapq.heappop(sched)
            if job.state is not JobState.SCHEDULED or job.run_at != at:
                continue  # cancelled or rescheduled meanwhile (lazy deletion)
            self.n_scheduled -= 1
            job.run_at = None
            self._enqueue(job)
            due.append(job)
        if due:
            self.on_change(due)
        return due

    def next_due(self) -> float | None:
        while self._scheduled and self._scheduled[0][3].run_at != self._scheduled[0][0]:
            heapq.heappop(self._scheduled)
        return self._scheduled[0][0] if self._scheduled else None

    def submit_nowait(self, jobs: list[Job], reserved: bool = False) -> None:
        """Accepted (and committed) jobs join the line; ``reserved``: counted in ``reserved``
        since Broker.submit found room for them, and now in ``live`` instead."""
        if reserved:
            self.reserved -= len(jobs)
        for job in jobs:
            self.live[job.id] = job
            if job.idempotency_key:
                self.idempotency[job.owner, job.idempotency_key] = job
            self._enqueue(job)
            self.known_tasks.add(job.task)
        self.submitted += len(jobs)

    def _line_keys(self, slot: WorkerSlot) -> list[tuple[str, str]]:
        keys = []
        lines = self._lines
        paused = self.paused
        for q in slot.queues:
            if q in paused:
                continue
            for t in slot.tasks:
                if (q, t) in lines:
                    keys.append((q, t))
        return keys

    def _pop_best(self, keys: list[tuple[str, str]]) -> Job | None:
        best_lane: _Lane | None = None
        best: Job | None = None
        lines = self._lines
        for key in keys:
            found = lines[key].front()
            if found is not None:
                lane, job = found
                if best is None or (job.priority, job.seq) < (best.priority, best.seq):
                    best, best_lane = job, lane
        if best_lane is not None:
            best_lane.pop_front()
        return best

    def _pop_each(self, keys: list[tuple[str, str]], credit: int, batch: list[Job]) -> None:
        """The best jobs of several lines, one at a time, into ``batch``, marked RUNNING."""
        for _ in range(credit):
            job = self._pop_best(keys)
            if job is None:
                return
            job.state = _RUNNING
            batch.append(job)

    def pump(self) -> int:
        """Give queued jobs to workers with credit; returns how many went out."""
        if not self.n_queued or not self._rotation:
            return 0
        sent = 0
        now = self.now()
        rotation = self._rotation
        for _ in range(len(rotation)):
            wid = rotation[0]
            rotation.rotate(-1)
            slot = self.workers[wid]
            # A session that has ended (its LEAVE still behind other events) takes nothing:
            # its leases' nursery is closed, and jobs sent there were never seen by a worker.
            if slot.draining or not slot.alive or slot.credit <= 0:
                continue
            keys = self._line_keys(slot)
            if not keys:
                continue
            batch: list[Job] = []
            held = slot.held
            if len(keys) == 1:  # one line to take from: in a run, not job by job
                self._lines[keys[0]].take(slot.credit, batch)
            else:
                self._pop_each(keys, slot.credit, batch)
            name = slot.name
            for job in batch:
                job.attempts += 1
                job.worker = name
                job.started_at = now
                job.progress = None
                held[job.id] = job
            if batch:
                n = len(batch)
                self.n_queued -= n
                self.n_running += n
                self.dispatched += n
                sent += n
                slot.deliver(batch)
                if self.on_dispatch is not None:
                    self.on_dispatch(slot, batch)
            if not self.n_queued:
                break
        return sent

    # --- workers -------------------------------------------------------------------

    def join_nowait(self, slot: WorkerSlot) -> None:
        self.workers[slot.id] = slot
        self._rotation.append(slot.id)
        self.known_tasks.update(slot.tasks)

    def leave_nowait(self, slot: WorkerSlot, reason: str) -> list[Job]:
        """A worker is gone: every job it held goes back, first in its priority."""
        slot.alive = False
        if self.workers.pop(slot.id, None) is not None:
            self._rotation.remove(slot.id)
        lost = sorted(slot.held.values(), key=lambda j: (j.priority, j.seq))
        slot.held.clear()
        back: list[Job] = []
        for job in lost:
            if job.state is not JobState.RUNNING:
                continue  # cancelled while running: already final
            self.n_running -= 1
            self._lose(job)
            back.append(job)
        if back:
            self.on_change(back)
            if self.on_requeue is not None:
                self.on_requeue(slot, back, reason)
        return back

    def _lose(self, job: Job) -> None:
        """A running job whose worker is gone: requeue, or dead after too many losses."""
        job.worker_losses += 1
        job.worker = None
        if job.worker_losses >= self.max_worker_losses:
            self._finish(job, JobState.DEAD, reason="worker_lost")
            self.dead += 1
            return
        self.requeued += 1
        self._enqueue(job)

    def drain_nowait(self, slot: WorkerSlot, *, stopping: bool = False) -> None:
        slot.draining = True
        slot.stopping = slot.stopping or stopping

    def release_nowait(self, slot: WorkerSlot, items: list[tuple[str, int]]) -> list[Job]:
        """The worker handed jobs back unfinished: requeue without counting a failure."""
        back = []
        for job_id, attempt in items:
            job = slot.held.get(job_id)
            if job is None or job.attempts != attempt:
                continue
            del slot.held[job_id]
            if job.state is not JobState.RUNNING:
                continue
            self.n_running -= 1
            job.worker = None
            self.requeued += 1
            self._enqueue(job)
            back.append(job)
        if back:
            self.on_change(back)
            if self.on_requeue is not None:
                self.on_requeue(slot, back, "released")
        return back

    def expire_nowait(self, slot: WorkerSlot, job_id: str) -> Job | None:
        """A lease ran past its job's timeout plus grace: the job is lost to that worker."""
        job = slot.held.pop(job_id, None)
        if job is None or job.state is not JobState.RUNNING:
            return None
        self.n_running -= 1
        slot.abort(job, "timeout")
        self._lose(job)
        self.on_change([job])
        if self.on_requeue is not None:
            self.on_requeue(slot, [job], "lease expired")
        return job

    def is_current(self, slot: WorkerSlot, job_id: str, attempt: int) -> bool:
        """Fencing: only the holder of the current attempt may report on a job."""
        job = slot.held.get(job_id)
        return job is not None and job.attempts == attempt

    # --- outcomes --------------------------------------------------------------------

    def outcome_nowait(self, slot: WorkerSlot, outcomes: list) -> list[Job]:
        """Record results; stale ones (another attempt is current) are ignored."""
        changed: list[Job] = []
        now = self.now()
        held = slot.held
        for oc in outcomes:
            job = held.get(oc.id)
            if job is None or job.attempts != oc.attempt:
                continue
            del held[oc.id]
            if job.state is not JobState.RUNNING:
                changed.append(job)  # cancelled while running; the lease is released
                continue
            self.n_running -= 1
            if oc.ok:
                job.result = oc.result
                job.error = None
                self._finish(job, JobState.COMPLETED, now=now)
                self.completed += 1
                slot.completed += 1
            else:
                self._fail(job, oc.error or ErrorInfo("Error", "unknown failure"), now)
                slot.failed += 1
            changed.append(job)
        if changed:
            self.on_change(changed)
        return changed

    def _fail(self, job: Job, error: ErrorInfo, now: float) -> None:
        job.error = error
        job.failures += 1
        job.worker = None
        self.failed += 1
        if error.retryable and job.failures < job.max_attempts:
            job.run_at = now + self.retry.delay(job.failures, self.rng)
            self.retried += 1
            self._enqueue(job)
        else:
            self._finish(job, JobState.DEAD, now=now, reason="failed" if error.retryable else "not_retryable")
            self.dead += 1

    def _finish(self, job: Job, state: JobState, *, now: float | None = None, reason: str | None = None) -> None:
        job.state = state
        job.finished_at = self.now() if now is None else now
        key = (job.task, state.value)
        self.finished[key] = self.finished.get(key, 0) + 1
        if state is JobState.DEAD:
            job.dead_reason = reason
        self.live.pop(job.id, None)
        if job.idempotency_key and self.idempotency.get((job.owner, job.idempotency_key)) is job:
            del self.idempotency[job.owner, job.idempotency_key]
        if not self._room.is_set():
            self._room.set()

    # --- operations ------------------------------------------------------------------

    def cancel_nowait(self, job_id: str) -> Job | None:
        """Cancel an unfinished job; a running one is aborted on its worker."""
        job = self.live.get(job_id)
        if job is None:
            return None
        prev = job.state
        if prev is JobState.QUEUED:
            self.n_queued -= 1
        elif prev is JobState.SCHEDULED:
            self.n_scheduled -= 1
        elif prev is JobState.RUNNING:
            self.n_running -= 1
            for slot in self.workers.values():
                if slot.held.get(job_id) is job:
                    slot.abort(job, "cancelled")
                    break
        self._finish(job, JobState.CANCELLED)
        self.cancelled += 1
        job.run_at = None
        self.on_change([job])
        return job

    def retry_nowait(self, job: Job) -> None:
        """A dead or cancelled job (loaded from the store) gets a fresh set of attempts."""
        self.forget_finished(job)
        for slot in self.workers.values():
            held = slot.held.get(job.id)
            if held is not None and held.state.terminal:
                # Cancelled while running and not yet reported: that attempt's lease is over,
                # or the worker would keep a slot for it and could be handed the job again.
                del slot.held[job.id]
        job.failures = 0
        job.worker_losses = 0
        job.finished_at = None
        job.dead_reason = None
        job.run_at = None
        job.error = None
        self.live[job.id] = job
        key = (job.owner, job.idempotency_key)
        if job.idempotency_key and key not in self.idempotency:
            # Unfinished again, so its key names it again; a newer job that took the key
            # meanwhile keeps it.
            self.idempotency[key] = job
        self._enqueue(job)
        self.on_change([job])

    def held_by(self, job_id: str) -> WorkerSlot | None:
        """The worker session holding an attempt of the job, if one does."""
        for slot in self.workers.values():
            if job_id in slot.held:
                return slot
        return None

    def forget_finished(self, job: Job) -> None:
        """A finished job leaves the counts (retried or discarded)."""
        key = (job.task, job.state.value)
        if self.finished.get(key, 0) > 0:
            self.finished[key] -= 1

    def set_paused(self, queue: str, paused: bool) -> None:
        (self.paused.add if paused else self.paused.discard)(queue)

    def has_room(self, limit: int) -> bool:
        """Fewer than ``limit`` unfinished jobs, counting those being committed (``reserved``):
        SUBMITs read together cannot all pass the check before the first of them is stored,
        so the limit is passed by at most one SUBMIT's batch."""
        b = self._backlog
        return len(self.live) + self.reserved + (b.most_pending() if b is not None else 0) < limit

    def unreserve(self, n: int) -> None:
        """Jobs counted by ``reserved`` that will not be stored after all (a failed commit)."""
        self.reserved -= n
        if not self._room.is_set():
            self._room.set()

    async def wait_room(self, limit: int) -> None:
        """Backpressure: wait until fewer than ``limit`` unfinished jobs are held."""
        while not self.has_room(limit):
            # One event for every waiter: room wakes them all, and each checks again.
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()

    # --- views --------------------------------------------------------------------------

    def queued_jobs(self) -> list[Job]:
        """Every queued job in dispatch order (for tests and status)."""
        # A job cancelled and retried has a stale entry beside its live one: count it once.
        held = [jobs for lines in self._backlog.held.values() for jobs in lines.values()] if self._backlog is not None else ()
        jobs = {j.id: j for line in (*self._lines.values(), *held) for j in line if j.state is JobState.QUEUED}
        return sorted(jobs.values(), key=lambda j: (j.priority, j.seq))

    def unread(self) -> dict[tuple[str, str, int], int]:
        """While a restart loads: the journal's unfinished jobs not loaded yet, by queue, task
        and priority (views of queue depth add them to what is loaded)."""
        b = self._backlog
        return dict(b.unread) if b is not None else {}

    def unread_depths(self) -> dict[tuple[str, int], int]:
        """unread() by queue and priority."""
        out: dict[tuple[str, int], int] = {}
        for (queue, _, priority), n in self.unread().items():
            out[queue, priority] = out.get((queue, priority), 0) + n
        return out

    def statistics(self) -> DispatcherStatistics:
        idle = sum(1 for s in self.workers.values() if not s.held and not s.draining)
        return DispatcherStatistics(
            queued=self.n_queued,
            scheduled=self.n_scheduled,
            running=self.n_running,
            workers=len(self.workers),
            idle_workers=idle,
            busy_workers=sum(1 for s in self.workers.values() if s.held),
            submitted=self.submitted,
            dispatched=self.dispatched,
            completed=self.completed,
            failed=self.failed,
            dead=self.dead,
            cancelled=self.cancelled,
            requeued=self.requeued,
            retried=self.retried,
            restoring=self._backlog.pending if self._backlog is not None else 0,
        )


__all__ = ["TERMINAL_STATES", "Dispatcher", "RetryPolicy", "WorkerSlot"]
