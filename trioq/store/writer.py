"""The one writer task: drains a channel of job changes and commits them in batches.

Group commit is what makes durability cheap: while one transaction is being
synced off the event loop, new changes pile up in the channel and go into the
next one. Several changes to the same job in one batch become one row write.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import attrs
import trio

from ..errors import StoreError
from ..job import ErrorInfo, Job
from .base import Store

log = logging.getLogger("trioq.store")

MAX_BATCH_ROWS = 20_000
RETRY_INTERVAL = 0.5  # seconds between retries of a failed commit while idle


@attrs.define(slots=True, eq=False)
class _Request:
    jobs: list[Job]
    new: bool
    done: trio.Event | None
    error: BaseException | None = None
    tasks: tuple[str, ...] = ()
    committed: Callable[[], object] | None = None


@attrs.frozen
class WriterStatistics:
    commits: int
    rows: int
    requests: int
    failures: int
    pending: int
    last_error: str | None
    healthy: bool


class StoreWriter:
    """Owns every write to a store. Start it with ``await nursery.start(writer.run)``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._send, self._recv = trio.open_memory_channel[_Request](math.inf)
        self._dirty: dict[str, Job] = {}  # updates whose commit failed; retried next batch
        self.commits = 0
        self.rows = 0
        self.requests = 0
        self.failures = 0
        self.last_error: str | None = None
        self.healthy = True
        #: callbacks([(job, state as committed)]) after each successful commit
        self.on_commit: list = []
        self._stopped = False
        self._pending_tasks: set[str] = set()  # task names of requests dropped by _stop

    async def write(
        self, jobs: list[Job], *, new: bool = False, tasks: Iterable[str] = (), committed: Callable[[], object] | None = None,
    ) -> None:
        """Write and wait for the commit; StoreError if it failed (nothing of ``new`` is kept).

        ``committed`` runs in the writer task as soon as the commit succeeds, a turn of the
        scheduler before the caller wakes, and whether or not the caller is still waiting.
        """
        if self._stopped:
            raise StoreError("store write failed: the broker is stopping")
        req = _Request(jobs, new, trio.Event(), tasks=tuple(tasks), committed=committed)
        self._send.send_nowait(req)
        assert req.done is not None
        await req.done.wait()
        if req.error is not None:
            raise StoreError(f"store write failed: {req.error}") from req.error

    def write_nowait(self, jobs: list[Job], tasks: Iterable[str] = ()) -> None:
        """Journal changes without waiting; a failed commit is retried with the next batch."""
        self._send.send_nowait(_Request(jobs, False, None, tasks=tuple(tasks)))

    def statistics(self) -> WriterStatistics:
        return WriterStatistics(
            commits=self.commits,
            rows=self.rows,
            requests=self.requests,
            failures=self.failures,
            pending=self._recv.statistics().current_buffer_used + len(self._dirty),
            last_error=self.last_error,
            healthy=self.healthy,
        )

    def flush_sync(self) -> int:
        """At shutdown: write whatever is still queued, synchronously; returns rows written."""
        pending: dict[str, Job] = self._dirty
        self._dirty = {}
        tasks: set[str] = self._pending_tasks
        self._pending_tasks = set()
        while True:
            try:
                req = self._recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            for job in req.jobs:
                pending[job.id] = job
            tasks.update(req.tasks)
        if not pending and not tasks:
            return 0
        rows = [self.store.row(job) for job in pending.values()]
        try:
            self.store.write_sync(rows, sorted(tasks))
        except Exception as exc:
            log.error("final store flush failed: %s", exc)
            return 0
        return len(rows)

    async def run(self, *, task_status: trio.TaskStatus[StoreWriter] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        try:
            await self._run()
        finally:
            self._stop()

    def _stop(self) -> None:
        """The writer is gone (the broker is stopping): nobody may wait for it any more.

        Callers of write() wait inside shields, so a request left in the channel would keep
        the broker from ever stopping. New jobs not yet committed are dropped and their
        callers told so (no ACK was sent for them); changes to stored jobs go to _dirty,
        for flush_sync.
        """
        self._stopped = True
        left: list[_Request] = []
        while True:
            try:
                left.append(self._recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        for req in left:
            if not req.new:
                for job in req.jobs:
                    self._dirty[job.id] = job
        self._abandon(left)

    def _abandon(self, requests: list[_Request]) -> None:
        """Requests the stopping writer will not commit: their callers are told, and their
        task names kept for flush_sync (the rows are the caller's to keep or drop)."""
        error = StoreError("the broker is stopping")
        for req in requests:
            self._pending_tasks.update(req.tasks)
            if req.done is not None:
                req.error = error
                req.done.set()

    async def _run(self) -> None:
        recv = self._recv
        store = self.store
        while True:
            batch: list[_Request] = []
            if self._dirty or not self.healthy:
                # A failed commit left work behind: retry it even if nothing new comes.
                with trio.move_on_after(RETRY_INTERVAL):
                    batch.append(await recv.receive())
            else:
                batch.append(await recv.receive())
            n = sum(len(req.jobs) for req in batch)
            while n < MAX_BATCH_ROWS:
                try:
                    req = recv.receive_nowait()
                except trio.WouldBlock:
                    break
                batch.append(req)
                n += len(req.jobs)
            await self._commit(store, batch)

    async def _commit(self, store: Store, batch: list[_Request]) -> None:
        pending: dict[str, Job] = self._dirty
        self._dirty = {}
        tasks: set[str] = set()
        new: set[str] = set()
        for req in batch:
            if req.new:
                new.update(job.id for job in req.jobs)
            for job in req.jobs:
                pending[job.id] = job
            tasks.update(req.tasks)
        # The snapshot is taken here, on the event loop: rows are consistent.
        row = store.insert_row
        update_row = store.update_row
        try:
            inserts = [row(job) for job in pending.values() if job.id in new]
            updates = [update_row(job) for job in pending.values() if job.id not in new]
        except Exception:  # a value no row can hold: that job's result, not the writer, pays
            inserts, updates = [], []
            for job in pending.values():
                build = row if job.id in new else update_row
                try:
                    r = build(job)
                except Exception as exc:
                    log.error("job %s cannot be stored as it is (%s): its result is dropped", job.id, exc)
                    job.result = None
                    job.progress = None
                    job.error = ErrorInfo("Unstorable", f"the job's result could not be stored: {exc}", "", False)
                    r = build(job)
                (inserts if job.id in new else updates).append(r)
        # What each row says, as of the snapshot: the job object may move on before the commit.
        states = [(job, job.state) for job in pending.values()]
        rows = inserts
        try:
            task_names = sorted(tasks)
            if not store.commit_nowait(inserts, updates, task_names):
                await trio.to_thread.run_sync(store.commit_sync, inserts, updates, task_names)
        except Exception as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self.healthy:
                log.error("store write failed, not acknowledging until it recovers: %s", self.last_error)
            self.healthy = False
            new_ids = {job.id for req in batch if req.new for job in req.jobs}
            for job_id, job in pending.items():
                if job_id not in new_ids:
                    self._dirty[job_id] = job
            for req in batch:
                req.error = exc
                if req.done is not None:
                    req.done.set()
            # Do not spin on a broken disk: back off a little before the next try.
            await trio.sleep(0.05)
            return
        except BaseException:
            # Cancelled before the commit began (the broker is stopping): nothing was written.
            # Changes to stored jobs go back for flush_sync, or a clean stop would lose them;
            # new jobs go as those left in the channel do (see _stop), their callers told.
            for job_id, job in pending.items():
                if job_id not in new:
                    self._dirty[job_id] = job
            self._abandon(batch)
            raise
        if not self.healthy:
            log.warning("store writes succeed again")
        self.healthy = True
        self.commits += 1
        self.rows += len(rows) + len(updates)
        self.requests += len(batch)
        for cb in self.on_commit:
            cb(states)
        for req in batch:
            if req.committed is not None:
                try:
                    req.committed()
                except Exception:  # one caller's callback must not strand the batch's others
                    log.exception("a commit callback failed")
            if req.done is not None:
                req.done.set()
