"""The small interface every store implements.

The broker keeps unfinished jobs in memory (the dispatcher's heaps) and uses
the store as a journal: every change to a job is written as the job's whole
row, so a batch can coalesce many changes to one job into one write. Reads
serve finished jobs, listings and recovery. A PostgreSQL store shared by
several brokers would implement the same methods (with a claim step at load).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import attrs

from ..job import Job, JobIds, JobState

#: the dead_reason of a job whose journal row cannot be read (it cannot run again)
CORRUPT_ROW = "corrupt_row"


@attrs.frozen
class Recovered:
    """What a store hands the broker at start."""

    jobs: list[Job]  # unfinished jobs, in seq order
    next_seq: int
    tasks: list[str]  # task names ever announced by a worker
    paused_queues: list[str]
    #: How this store names jobs: ids must map back to seq (see JobIds).
    job_ids: JobIds
    #: With ``open_sync(load=False)``, where the store can: the unfinished jobs to load
    #: while the broker serves (``jobs`` is then empty).
    backlog: Backlog | None = None


class Backlog(abc.ABC):
    """The journal as it was at open, read in parts while the broker already serves.

    Reads see the journal at open, whatever is written after: jobs the broker changed or
    added since are never read back as they were.
    """

    @abc.abstractmethod
    def summary_sync(self) -> list[tuple[str, str, int, int, int]]:
        """(queue, task, priority, count, largest seq) of the unfinished jobs."""

    @abc.abstractmethod
    def chunk_sync(self, after: int, limit: int) -> list[Job]:
        """Up to ``limit`` unfinished jobs with seq > ``after``, in seq order."""

    @abc.abstractmethod
    def counts_sync(self) -> dict[str, dict[str, int]]:
        """Jobs per task and state, as Store.counts_sync; may run in another thread at the
        same time as the other reads."""

    @abc.abstractmethod
    def close_sync(self) -> None: ...


@attrs.frozen
class JobPage:
    jobs: list[Job]
    next_cursor: int | None


class Store(abc.ABC):
    """Durable (or not) home of job rows. Sync methods run off the event loop."""

    #: True when write_sync is cheap enough to call on the event loop.
    inline: bool = False
    durable: bool = False
    description: str = ""

    @abc.abstractmethod
    def open_sync(self, *, load: bool = True) -> Recovered:
        """Create or migrate the schema; return what must be in memory. ``load=False``: a
        store that can may hand the unfinished jobs over later, as ``Recovered.backlog``."""

    @abc.abstractmethod
    def close_sync(self) -> None: ...

    @abc.abstractmethod
    def write_sync(self, rows: Sequence[tuple], tasks: Sequence[str] = ()) -> None:
        """Upsert rows (from ``row``) in one transaction; raise on any failure."""

    @abc.abstractmethod
    def row(self, job: Job) -> tuple:
        """A snapshot of the job, taken on the event loop, written later."""

    def insert_row(self, job: Job) -> tuple:
        """A snapshot of a job not stored yet, for ``commit_sync`` (default: the whole row)."""
        return self.row(job)

    def update_row(self, job: Job) -> tuple:
        """A snapshot of what can change in a job already stored (default: the whole row)."""
        return self.row(job)

    def commit_sync(self, inserts: Sequence[tuple], updates: Sequence[tuple], tasks: Sequence[str] = ()) -> None:
        """One transaction: new jobs (``row``) and changed ones (``update_row``)."""
        self.write_sync([*inserts, *updates], tasks)

    def commit_nowait(self, inserts: Sequence[tuple], updates: Sequence[tuple], tasks: Sequence[str] = ()) -> bool:
        """``commit_sync`` on the calling thread (the event loop) when that cannot hold it up
        for long; False, having written nothing, when the caller must take a thread."""
        if not self.inline:
            return False
        self.commit_sync(inserts, updates, tasks)
        return True

    @abc.abstractmethod
    def get_sync(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    def list_sync(
        self,
        *,
        state: JobState | None = None,
        queue: str | None = None,
        task: str | None = None,
        limit: int = 50,
        before_seq: int | None = None,
        owner: str | None = None,
    ) -> JobPage:
        """Newest first (highest seq first), from ``before_seq`` exclusive; ``owner`` keeps only
        the jobs that credential submitted."""

    @abc.abstractmethod
    def counts_sync(self) -> dict[str, dict[str, int]]:
        """{task: {state: n}} over every stored job."""

    def purge_sync(self, finished_before: float, limit: int = 10_000) -> int:
        """Delete terminal jobs finished before the time; returns how many."""
        return sum(self.purge_counted_sync(finished_before, limit).values())

    @abc.abstractmethod
    def purge_counted_sync(self, finished_before: float, limit: int = 10_000) -> dict[tuple[str, str], int]:
        """Delete up to ``limit`` terminal jobs finished before the time; how many of each
        (task, state) went, so that counts kept in memory can follow exactly."""

    @abc.abstractmethod
    def delete_sync(self, job_id: str) -> bool:
        """Remove one job for good (a discarded dead job)."""

    @abc.abstractmethod
    def set_paused_sync(self, queue: str, paused: bool) -> None: ...
