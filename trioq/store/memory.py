"""A store that lives and dies with the process: tests and throwaway runs."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from ..job import TERMINAL_STATES, Job, JobIds
from .base import JobPage, Recovered, Store


class MemoryStore(Store):
    inline = True
    durable = False
    description = "memory (not durable)"

    def __init__(self) -> None:
        self._by_id: dict[str, Job] = {}
        self._seqs: list[int] = []  # sorted, for newest-first paging
        self._by_seq: dict[int, Job] = {}
        self._tasks: set[str] = set()
        self._paused: set[str] = set()
        self.fail_writes: BaseException | None = None  # fault injection for tests
        self.job_ids = JobIds(JobIds.new_key())

    def open_sync(self, *, load: bool = True) -> Recovered:
        jobs = [self._by_seq[s] for s in self._seqs if not self._by_seq[s].state.terminal]
        nxt = self._seqs[-1] + 1 if self._seqs else 1
        return Recovered(jobs, nxt, sorted(self._tasks), sorted(self._paused), self.job_ids)

    def close_sync(self) -> None:
        pass

    def row(self, job: Job) -> tuple:
        return (job,)

    def write_sync(self, rows: Sequence[tuple], tasks: Sequence[str] = ()) -> None:
        if self.fail_writes is not None:
            raise self.fail_writes
        for (job,) in rows:
            if job.id not in self._by_id:
                self._by_id[job.id] = job
                self._by_seq[job.seq] = job
                if not self._seqs or job.seq > self._seqs[-1]:
                    self._seqs.append(job.seq)
                else:
                    bisect.insort(self._seqs, job.seq)
        self._tasks.update(tasks)

    def get_sync(self, job_id: str) -> Job | None:
        return self._by_id.get(job_id)

    def list_sync(self, *, state=None, queue=None, task=None, limit=50, before_seq=None, owner=None) -> JobPage:
        hi = len(self._seqs) if before_seq is None else bisect.bisect_left(self._seqs, before_seq)
        out: list[Job] = []
        i = hi - 1
        while i >= 0 and len(out) < limit:
            job = self._by_seq[self._seqs[i]]
            if (
                (state is None or job.state == state)
                and (queue is None or job.queue == queue)
                and (task is None or job.task == task)
                and (owner is None or job.owner == owner)
            ):
                out.append(job)
            i -= 1
        nxt = out[-1].seq if len(out) == limit and i >= 0 else None
        return JobPage(out, nxt)

    def counts_sync(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for job in self._by_id.values():
            per = out.setdefault(job.task, {})
            per[job.state.value] = per.get(job.state.value, 0) + 1
        return out

    def purge_counted_sync(self, finished_before: float, limit: int = 10_000) -> dict[tuple[str, str], int]:
        gone = [
            j
            for j in self._by_id.values()
            if j.state in TERMINAL_STATES and j.finished_at is not None and j.finished_at < finished_before
        ][:limit]
        for j in gone:
            del self._by_id[j.id]
            del self._by_seq[j.seq]
            i = bisect.bisect_left(self._seqs, j.seq)
            del self._seqs[i]
        counts: dict[tuple[str, str], int] = {}
        for j in gone:
            counts[j.task, j.state.value] = counts.get((j.task, j.state.value), 0) + 1
        return counts

    def delete_sync(self, job_id: str) -> bool:
        job = self._by_id.pop(job_id, None)
        if job is None:
            return False
        del self._by_seq[job.seq]
        del self._seqs[bisect.bisect_left(self._seqs, job.seq)]
        return True

    def set_paused_sync(self, queue: str, paused: bool) -> None:
        (self._paused.add if paused else self._paused.discard)(queue)
