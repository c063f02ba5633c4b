"""A restart serves while it loads the journal, and keeps every promise of a full restore.

The dispatcher part is checked against the plain rule it must keep (a delivered job is the
most urgent of every job waiting, loaded or not); the broker part on a real SQLite file,
its reads of the journal stepped by the test.
"""

from __future__ import annotations

import gc
import secrets
import sqlite3
import threading
import weakref

import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trioq
from trioq.broker.config import BrokerConfig
from trioq.broker.dispatcher import Dispatcher, WorkerSlot
from trioq.broker.server import Broker
from trioq.broker.sessions import RequestError
from trioq.http.app import create_app
from trioq.http.metrics import Metrics, metrics_for
from trioq.job import ErrorInfo, Job, JobSpec, JobState
from trioq.protocol.messages import Outcome
from trioq.store.base import Backlog, Recovered
from trioq.store.sqlite import SQLiteStore

from .conftest import FakeWorker, memory_connect


def _job(seq: int, priority: int, task: str, state: JobState = JobState.QUEUED) -> Job:
    return Job(f"j{seq}", seq, task, {}, priority, "default", state, attempts=int(state is JobState.RUNNING))


# --- the dispatcher ---------------------------------------------------------------------

journal_st = st.lists(
    st.tuples(st.integers(1, 3), st.sampled_from("ab"), st.booleans()), min_size=0, max_size=40,
)
step_st = st.lists(
    st.one_of(
        st.tuples(st.just("chunk"), st.integers(1, 9)),
        st.tuples(st.just("submit"), st.integers(1, 3), st.sampled_from("ab")),
        st.tuples(st.just("pump"), st.integers(1, 3)),
        st.tuples(st.just("cancel"), st.integers(0, 60)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(journal=journal_st, steps=step_st, priorities_at=st.integers(0, 60))
def test_restoring_while_serving_never_dispatches_ahead_of_a_job_still_in_the_journal(journal, steps, priorities_at):
    """Journal jobs (some running at the crash) load in chunks while new jobs arrive, jobs
    are cancelled and a worker takes jobs: every delivery is the most urgent job waiting,
    counting those not loaded yet; at the end every job ran once or was cancelled."""
    now = 1000.0
    d = Dispatcher(now=lambda: now, max_worker_losses=5, seed=0)
    stored = [_job(i + 1, p, t, JobState.RUNNING if running else JobState.QUEUED)
              for i, (p, t, running) in enumerate(journal)]
    end = len(stored) + 1
    d.begin_restore(end)
    waiting: dict[str, tuple[int, int]] = {j.id: (j.priority, j.seq) for j in stored}
    delivered: list[str] = []

    def deliver(jobs: list[Job]) -> None:
        for job in jobs:
            assert waiting, job
            assert waiting[job.id] == min(waiting.values()), f"{job.id} went ahead of a more urgent job"
            del waiting[job.id]
            delivered.append(job.id)

    slot = WorkerSlot("w", "w", frozenset("ab"), ("default",), 2, deliver)
    d.join_nowait(slot)
    loaded = 0
    known = False
    new: list[Job] = []

    def know() -> None:
        nonlocal known
        per: dict[tuple[str, int], tuple[int, int]] = {}
        for j in stored:
            n, top = per.get((j.task, j.priority), (0, 0))
            per[j.task, j.priority] = (n + 1, max(top, j.seq))
        d.restore_summary([("default", t, p, n, top) for (t, p), (n, top) in per.items()])
        known = True

    def chunk(k: int) -> None:
        nonlocal loaded
        if not known:
            know()
        if d.releasing:  # read whole: the held jobs join their lines a priority at a step
            d.restore_release()
            return
        jobs = stored[loaded:loaded + k]
        loaded += len(jobs)
        d.restore_chunk(jobs, end if loaded >= len(stored) else jobs[-1].seq + 1)

    def finish_held() -> None:
        outcomes = [Outcome(job_id, job.attempts, True) for job_id, job in list(slot.held.items())]
        d.outcome_nowait(slot, outcomes)

    for i, step in enumerate(steps):
        if i == priorities_at and not known:
            know()
        if step[0] == "chunk" and d.restoring:
            chunk(step[1])
        elif step[0] == "submit":
            job = _job(d.next_seq(), step[1], step[2])
            job.id = f"n{job.seq}"
            new.append(job)
            waiting[job.id] = (job.priority, job.seq)
            d.submit_nowait([job])
        elif step[0] == "pump":
            for _ in range(step[1]):
                d.pump()
                finish_held()
        elif step[0] == "cancel":
            ids = sorted(waiting)
            if ids:
                job_id = ids[step[1] % len(ids)]
                if d.cancel_nowait(job_id) is not None:  # a job not loaded yet is not cancelled here
                    del waiting[job_id]
    while d.restoring:
        chunk(7)
    while d.pump():
        finish_held()
    assert not waiting, f"never dispatched: {sorted(waiting)}"
    assert len(delivered) == len(set(delivered))
    st_ = d.statistics()
    assert (st_.queued, st_.running, st_.restoring) == (0, 0, 0)
    assert st_.requeued == sum(1 for _, _, running in journal if running)


def test_a_job_that_must_wait_is_held_until_the_journal_can_no_longer_precede_it():
    d = Dispatcher(now=lambda: 0.0, seed=0)
    d.begin_restore(4)  # journal: seq 1 (priority 2), 2 (priority 1), 3 (priority 2)
    got: list[str] = []
    slot = WorkerSlot("w", "w", frozenset("a"), ("default",), 10, lambda jobs: got.extend(j.id for j in jobs))
    d.join_nowait(slot)
    urgent = _job(4, 1, "a")
    d.submit_nowait([urgent])
    d.pump()
    assert got == []  # the journal's priorities are not known: it could hold anything
    d.restore_summary([("default", "a", 1, 1, 2), ("default", "a", 2, 2, 3)])
    d.pump()
    assert got == []  # seq 2 (priority 1) is still in the journal, ahead of seq 4
    d.restore_chunk([_job(1, 2, "a")], 2)
    d.pump()
    assert got == []  # loaded: seq 1 (priority 2), but seq 2 at priority 1 still comes first
    d.restore_chunk([_job(2, 1, "a")], 3)
    assert d.statistics().restoring == 1
    d.pump()
    assert got == ["j2", "j4", "j1"]  # priority 1 whole; seq 3 may still precede nothing at priority 1
    d.restore_chunk([_job(3, 2, "a")], 4)
    d.pump()
    assert got == ["j2", "j4", "j1", "j3"]
    assert not d.restoring



def test_once_read_whole_held_jobs_join_their_lines_a_priority_at_a_step():
    """No step of the end of a restore releases every held job at once; between steps, new
    jobs more urgent than all still held go ahead, and the others wait behind their elders."""
    d = Dispatcher(now=lambda: 0.0, seed=0)
    d.begin_restore(5)  # journal: seq 1 (priority 3), 2 (2), 3 (2), 4 (1)
    got: list[str] = []
    slot = WorkerSlot("w", "w", frozenset("a"), ("default",), 100, lambda jobs: got.extend(j.id for j in jobs))
    d.join_nowait(slot)
    d.restore_summary([("default", "a", 1, 1, 4), ("default", "a", 2, 2, 3), ("default", "a", 3, 1, 1)])
    d.restore_chunk([_job(1, 3, "a"), _job(2, 2, "a"), _job(3, 2, "a")], 4)
    d.pump()
    assert got == []  # priority 1 is not read yet
    d.restore_chunk([_job(4, 1, "a")], 5)  # read whole: seq 4 goes straight to its line
    assert d.releasing
    d.submit_nowait([_job(d.next_seq(), 2, "a"), _job(d.next_seq(), 3, "a")])  # seq 5 and 6: behind their elders
    d.pump()
    assert got == ["j4"]
    assert d.restore_release()  # priority 2 joins its line; 3 is still held
    d.submit_nowait([_job(d.next_seq(), 2, "a")])  # seq 7: nothing as urgent is held any more
    d.pump()
    assert got == ["j4", "j2", "j3", "j5", "j7"]
    assert not d.restore_release()  # priority 3, and the restore is over
    assert not d.restoring
    d.pump()
    assert got == ["j4", "j2", "j3", "j5", "j7", "j1", "j6"]

# --- the store's snapshot -------------------------------------------------------------------


def test_a_backlog_reads_the_journal_as_it_was_at_open(tmp_path):
    path = tmp_path / "q.db"
    first = SQLiteStore(path)
    rec = first.open_sync()
    jobs = [Job(rec.job_ids.make(s, 1)[0], s, "t", {"n": s}, 1 + s % 3, "default", created_at=1.0) for s in range(1, 8)]
    jobs[0].state, jobs[0].finished_at = JobState.COMPLETED, 2.0
    first.commit_sync([first.insert_row(j) for j in jobs], [])
    first.close_sync()

    store = SQLiteStore(path)
    rec = store.open_sync(load=False)
    assert rec.jobs == [] and rec.next_seq == 8 and rec.backlog is not None
    # Written after open: a new job, one finished and one cancelled. The backlog never sees them.
    later = Job(rec.job_ids.make(8, 1)[0], 8, "t", {}, 1, "default", created_at=3.0)
    jobs[1].state, jobs[1].finished_at = JobState.COMPLETED, 3.0
    jobs[2].state, jobs[2].finished_at = JobState.CANCELLED, 3.0
    store.commit_sync([store.insert_row(later)], [store.update_row(jobs[1]), store.update_row(jobs[2])])
    b = rec.backlog
    # (queue, task, priority, count, largest seq)
    assert sorted(b.summary_sync()) == [("default", "t", 1, 2, 6), ("default", "t", 2, 2, 7), ("default", "t", 3, 2, 5)]
    assert [j.seq for j in b.chunk_sync(0, 4)] == [2, 3, 4, 5]
    assert [(j.seq, j.payload, j.state) for j in b.chunk_sync(5, 4)] == [(6, {"n": 6}, JobState.QUEUED), (7, {"n": 7}, JobState.QUEUED)]
    assert b.chunk_sync(7, 4) == []
    assert b.counts_sync() == {"t": {"completed": 1, "queued": 6}}
    assert store.counts_sync() == {"t": {"completed": 2, "cancelled": 1, "queued": 5}}
    b.close_sync()
    store.close_sync()


# --- the broker on a real journal --------------------------------------------------------------


class _SteppedBacklog(Backlog):
    """The real backlog, each read waiting for the test's go (and telling it that it waits)."""

    def __init__(self, inner: Backlog, reads: trio.MemorySendChannel[str]) -> None:
        self.inner = inner
        self.reads = reads
        self.go = threading.Semaphore(0)

    def _wait(self, what: str) -> None:
        trio.from_thread.run_sync(self.reads.send_nowait, what)
        assert self.go.acquire(timeout=10), "the test never let the read go"

    def summary_sync(self):
        self._wait("priorities")
        return self.inner.summary_sync()

    def chunk_sync(self, after, limit):
        self._wait(f"chunk after {after}")
        return self.inner.chunk_sync(after, limit)

    def counts_sync(self):
        return self.inner.counts_sync()

    def close_sync(self):
        self.inner.close_sync()


class _SteppedStore(SQLiteStore):
    def __init__(self, path, reads) -> None:
        super().__init__(path)
        self.reads = reads
        self.backlog: _SteppedBacklog | None = None

    def open_sync(self, *, load: bool = True) -> Recovered:
        rec = super().open_sync(load=load)
        if rec.backlog is None:
            return rec
        self.backlog = _SteppedBacklog(rec.backlog, self.reads)
        return Recovered(rec.jobs, rec.next_seq, rec.tasks, rec.paused_queues, rec.job_ids, self.backlog)


def _config(path, **kw) -> BrokerConfig:
    return BrokerConfig(http=False, db=str(path), dispatch_mark_delay=0, heartbeat_timeout=60.0, **kw)


async def _start_stepped(path, nursery: trio.Nursery, **config) -> tuple[Broker, _SteppedStore, trio.MemoryReceiveChannel[str]]:
    """A broker restarted on the journal at ``path``, its restore waiting at its first read
    (the summary) until the test lets it go."""
    send, reads = trio.open_memory_channel[str](100)
    store = _SteppedStore(path, send)
    broker = Broker(_config(path, **config), store=store, now=trio.current_time, seed=1)
    await broker.start_core(nursery)
    assert await reads.receive() == "priorities"
    return broker, store, reads


async def test_a_restarted_broker_serves_while_it_loads_and_keeps_order_keys_cancels_and_counts(tmp_path):
    path = tmp_path / "q.db"
    priorities = [3, 2, 3, 1, 2, 3, 1, 2]  # the journal, seq 2-9 (seq 1 finished before the crash)
    async with trio.open_nursery() as nursery:
        first = Broker(_config(path), now=trio.current_time, seed=1)
        await first.start_core(nursery)
        fw = await FakeWorker.connect(first, nursery, name="before", tasks=("noop",))
        (done_id,), _ = await first.submit([JobSpec("noop")])
        fw.complete(await fw.next_delivery())
        await first.wait_job(done_id)
        await first.set_paused("default", True)
        ids, _ = await first.submit([JobSpec("noop", priority=p, idempotency_key=f"k{i}") for i, p in enumerate(priorities)])
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        broker, store, reads = await _start_stepped(path, nursery, restore_chunk=3)
        await broker.set_paused("default", False)
        assert store.backlog is not None
        step = store.backlog.go.release
        fw = await FakeWorker.connect(broker, nursery, name="after", tasks=("noop",), concurrency=1)

        # Serving before anything is loaded: a new job is acknowledged, and a status answered.
        (new_id,), existing = await broker.submit([JobSpec("noop", priority=1)])
        assert existing == [False]
        assert broker.stats()["restoring"] is True
        with trio.fail_after(5):
            await broker.counted.wait()  # read beside the jobs, from the same snapshot
        assert broker.stats()["jobs"]["completed"] == 1  # the one finished before the crash

        # What needs a job not loaded yet waits for the restore: a key that names one, a
        # cancel of one; the worker gets nothing while the journal could hold a more urgent job.
        answers: dict[str, object] = {}

        async def keyed() -> None:
            answers["keyed"] = await broker.submit([JobSpec("noop", idempotency_key="k7")])

        async def cancel() -> None:
            answers["cancel"] = (await broker.cancel_job(ids[5])).state  # seq 7, priority 3

        nursery.start_soon(keyed)
        nursery.start_soon(cancel)
        await trio.testing.wait_all_tasks_blocked()
        assert answers == {} and fw.deliveries == []

        order: list[str] = []

        async def take_all_offered() -> None:
            await trio.testing.wait_all_tasks_blocked()
            while fw.inbox.statistics().current_buffer_used:
                with trio.fail_after(5):
                    d = await fw.next_delivery()
                order.append(d.id)
                fw.complete(d)
                await trio.testing.wait_all_tasks_blocked()

        step()  # the priorities: 1 has jobs at seq 5 and 8 still in the journal
        assert await reads.receive() == "chunk after 0"
        await take_all_offered()
        assert order == [] and broker.stats()["restore_pending"] == 8
        lines = Metrics(broker).render().splitlines()
        assert "trioq_restore_pending_jobs 8" in lines
        # Queue depth counts what is not loaded yet: the eight of the journal and the new job.
        assert broker.dispatcher.unread_depths() == {("default", 1): 2, ("default", 2): 3, ("default", 3): 3}
        for priority, n in ((1, 3), (2, 3), (3, 3)):
            assert f'trioq_queue_depth{{queue="default",priority="{priority}"}} {n}' in lines
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(broker)), base_url="http://t") as http:
            (noop,) = [t for t in (await http.get("/api/tasks")).json()["tasks"] if t["name"] == "noop"]
            assert (noop["queued"], noop["completed"]) == (9, 1)  # the journal's eight, unread, and the new job
            (queue,) = (await http.get("/api/queues")).json()["queues"]
            assert (queue["name"], queue["depth"], queue["by_priority"]) == ("default", 9, {"1": 3, "2": 3, "3": 3})
        step()  # seq 2-4 loaded: priority 1 still has seq 5 and 8 to come
        assert await reads.receive() == f"chunk after {4}"
        await take_all_offered()
        assert order == []
        assert broker.dispatcher.unread_depths() == {("default", 1): 2, ("default", 2): 2, ("default", 3): 1}
        lines = Metrics(broker).render().splitlines()
        for priority in (1, 2, 3):  # loaded (held) or not, each still counts once
            assert f'trioq_queue_depth{{queue="default",priority="{priority}"}} 3' in lines
        step()  # seq 5-7 loaded
        assert await reads.receive() == f"chunk after {7}"
        await take_all_offered()
        assert order == [ids[3]]  # seq 5, priority 1: seq 8 may still come after it
        step()  # seq 8-9: the journal is whole
        await broker.restored.wait()
        await take_all_offered()

        by_seq = dict(zip(range(2, 10), ids, strict=True))
        expected = [by_seq[s] for s, _ in sorted(((s, p) for s, p in zip(range(2, 10), priorities, strict=True) if s != 7),
                                                 key=lambda sp: (sp[1], sp[0]))]
        expected.insert(2, new_id)  # priority 1, after the journal's seq 5 and 8
        assert order == expected
        assert answers["cancel"] is JobState.CANCELLED
        assert answers["keyed"] == ([ids[7]], [True])
        stats = broker.stats()
        assert stats["restoring"] is False and stats["restore_pending"] == 0
        assert "trioq_restore_pending_jobs 0" in Metrics(broker).render().splitlines()
        assert stats["jobs"]["completed"] == 1 + 8  # one before the crash, seven of the journal and the new one
        assert stats["jobs"]["cancelled"] == 1
        nursery.cancel_scope.cancel()


async def test_a_retry_during_the_restore_is_never_loaded_twice(tmp_path):
    """A dead job is retried while the journal still loads (nothing of it read yet): the
    restore reads the journal as it was at open, so it never loads the retried job again."""
    path = tmp_path / "q.db"
    async with trio.open_nursery() as nursery:
        first = Broker(_config(path), now=trio.current_time, seed=1)
        await first.start_core(nursery)
        await first.submit([JobSpec("noop", queue="later")])  # no worker serves it: it stays queued
        fw = await FakeWorker.connect(first, nursery, name="before", tasks=("noop",))
        (dead_id,), _ = await first.submit([JobSpec("noop", max_attempts=1)])
        d = await fw.next_delivery()
        fw.fail(d, ErrorInfo("ValueError", "no", "", False))
        assert (await first.wait_job(dead_id)).state is JobState.DEAD
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        broker, store, reads = await _start_stepped(path, nursery)
        retried: list[Job] = []
        done = trio.Event()

        async def retry() -> None:
            retried.append(await broker.retry_job(dead_id))
            done.set()

        nursery.start_soon(retry)
        with trio.fail_after(10):
            await done.wait()  # the dead job's row is final: no need to wait for the restore
        assert not broker.restored.is_set()
        store.backlog.go.release()
        assert await reads.receive() == "chunk after 0"
        store.backlog.go.release()
        with trio.fail_after(10):
            await broker.restored.wait()
        assert [j.state for j in retried] == [JobState.QUEUED]
        queued = broker.dispatcher.queued_jobs()
        assert sorted(j.id for j in queued) == sorted({j.id for j in queued})  # each once
        assert broker.stats()["jobs"]["queued"] == 2 and broker.stats()["jobs"]["dead"] == 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("n", [0, 5, 6])
async def test_a_journal_of_any_length_ends_its_restore(tmp_path, n):
    """Empty, shorter than a chunk, and a whole number of chunks."""
    path = tmp_path / "q.db"
    async with trio.open_nursery() as nursery:
        first = Broker(_config(path), now=trio.current_time, seed=1)
        await first.start_core(nursery)
        await first.set_paused("default", True)
        if n:
            await first.submit([JobSpec("noop")] * n)
        nursery.cancel_scope.cancel()
    broker = Broker(_config(path, restore_chunk=3), now=trio.current_time, seed=1)
    async with trio.open_nursery() as nursery:
        await broker.start_core(nursery)
        with trio.fail_after(10):
            await broker.restored.wait()
        assert broker.stats()["jobs"]["queued"] == n and not broker.dispatcher.restoring
        nursery.cancel_scope.cancel()


# --- found by review: the edges of admission, metrics, gc and legacy ids -----------------------


def _write_journal(path, specs: list[dict]) -> list[Job]:
    """Jobs written straight through the store (as the broker would have), then closed."""
    store = SQLiteStore(path)
    rec = store.open_sync()
    jobs = []
    for i, kw in enumerate(specs):
        kw = dict(kw)
        seq = rec.next_seq + i
        job_id = kw.pop("id", None) or rec.job_ids.make(seq, 1)[0]
        j = Job(job_id, seq, kw.pop("task", "noop"), {}, kw.pop("priority", 5), "default", created_at=1.0)
        for k, v in kw.items():
            setattr(j, k, v)
        jobs.append(j)
    store.commit_sync([store.insert_row(j) for j in jobs], [])
    store.close_sync()
    return jobs


def _let_everything_go(store: _SteppedStore) -> None:
    if store.backlog is not None:
        for _ in range(50):
            store.backlog.go.release()


# 1. --max-queued is not enforced until the journal's priorities have been counted --------------


async def test_max_queued_holds_while_the_journal_is_not_counted_yet(tmp_path):
    path = tmp_path / "q.db"
    _write_journal(path, [{} for _ in range(5)])
    async with trio.open_nursery() as nursery:
        broker, store, reads = await _start_stepped(path, nursery, max_queued=5)
        accepted = None
        try:
            with trio.move_on_after(1):
                accepted, _ = await broker.submit([JobSpec("noop")])
            # 5 unfinished jobs in the journal, max_queued=5: the submit must not be accepted
            assert accepted is None, f"accepted {accepted} with the journal already at --max-queued"
        finally:
            _let_everything_go(store)
            nursery.cancel_scope.cancel()


# 2. Keyed SUBMITs waiting for the restore keep their share of the submit budget --------------------


async def test_keyed_submits_waiting_for_the_restore_do_not_block_other_producers(tmp_path):
    path = tmp_path / "q.db"
    _write_journal(path, [{} for _ in range(3)])
    async with trio.open_nursery() as nursery:
        broker, store, reads = await _start_stepped(path, nursery, max_uncommitted=2)
        try:
            async with trioq.Client(connect=memory_connect(broker, nursery)) as keyed, \
                    trioq.Client(connect=memory_connect(broker, nursery)) as plain:

                keyed_ids: list[str] = []
                keyed_done = trio.Event()

                async def keyed_submit() -> None:
                    keyed_ids.extend(await keyed.submit_many([JobSpec("noop", {}, idempotency_key=f"k{i}") for i in range(2)]))
                    keyed_done.set()

                nursery.start_soon(keyed_submit)
                await trio.testing.wait_all_tasks_blocked()
                got = None
                with trio.move_on_after(2):
                    got = await plain.submit("noop")  # no key: the restore need not be awaited
                assert got is not None, (
                    "a keyless SUBMIT waited for the whole restore: the keyed SUBMIT holds the "
                    f"submit budget while it waits ({broker.submit_budget.statistics()})"
                )
                assert keyed_ids == []  # still waiting for the restore
                _let_everything_go(store)
                with trio.fail_after(5):
                    await keyed_done.wait()
                assert len(keyed_ids) == 2 and got not in keyed_ids
        finally:
            _let_everything_go(store)
            nursery.cancel_scope.cancel()


# 3. Metrics installed while restoring count the journal's past failures as new ones ---------------


class _FullLoadStore(SQLiteStore):
    """The pre-change behaviour: every unfinished job read before serving."""

    def open_sync(self, *, load: bool = True):
        return super().open_sync(load=True)


async def _failed_after_restart(path, store) -> dict:
    broker = Broker(_config(path), store=store, now=trio.current_time, seed=1)
    async with trio.open_nursery() as nursery:
        await broker.start_core(nursery)
        m = metrics_for(broker)  # the HTTP server is started right after start_core
        with trio.fail_after(10):
            await broker.restored.wait()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return dict(m.failed)


async def test_metrics_do_not_count_failures_from_before_the_crash(tmp_path):
    err = ErrorInfo("ValueError", "boom", "", True)
    journal = [
        # failed twice, then running at the crash (requeued by the restart)
        {"state": JobState.RUNNING, "attempts": 3, "failures": 2, "error": err, "started_at": 1.0, "worker": "w"},
        # failed once, back in line
        {"state": JobState.QUEUED, "attempts": 1, "failures": 1, "error": err},
    ]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write_journal(tmp_path / "a" / "q.db", journal)
    _write_journal(tmp_path / "b" / "q.db", journal)
    before = await _failed_after_restart(tmp_path / "a" / "q.db", _FullLoadStore(tmp_path / "a" / "q.db"))
    after = await _failed_after_restart(tmp_path / "b" / "q.db", SQLiteStore(tmp_path / "b" / "q.db"))
    assert before == {}  # a full restore: nothing failed in this run
    assert after == before, f"failures of the previous run counted again: {after}"


# 4. gc.freeze() after the restore freezes the garbage made while serving ----------------------------


class _Cycle:
    pass


async def test_garbage_made_while_restoring_is_collected_afterwards(tmp_path):
    path = tmp_path / "q.db"
    _write_journal(path, [{} for _ in range(10_001)])  # > 10,000: the restore ends with gc.freeze()
    try:
        async with trio.open_nursery() as nursery:
            broker, store, reads = await _start_stepped(path, nursery)
            # a request served meanwhile leaves a reference cycle behind (an exception caught
            # with its traceback, a closure...): garbage for the cyclic collector
            c = _Cycle()
            c.me = c
            ref = weakref.ref(c)
            del c
            _let_everything_go(store)
            with trio.fail_after(20):
                await broker.restored.wait()
            nursery.cancel_scope.cancel()
        gc.collect()
        assert ref() is None, "cyclic garbage made while restoring was frozen forever by gc.freeze()"
    finally:
        gc.unfreeze()
        gc.enable()


# 5. A retry right after start_core waits for the restore, and never deadlocks with it ------------------------


async def test_a_retry_right_after_start_core_does_not_deadlock(tmp_path):
    path = tmp_path / "q.db"
    (dead,) = _write_journal(path, [{"state": JobState.DEAD, "attempts": 1, "failures": 1, "finished_at": 2.0,
                                    "error": ErrorInfo("ValueError", "no", "", False), "dead_reason": "not_retryable"}])
    broker = Broker(_config(path), now=trio.current_time, seed=1)
    async with trio.open_nursery() as nursery:
        await broker.start_core(nursery)
        try:
            with trio.fail_after(5):
                job = await broker.retry_job(dead.id)
            assert job.state is JobState.QUEUED
        finally:
            nursery.cancel_scope.cancel()


# 6. A job with a v1 (legacy, random hex) id is read from the store while not loaded ---------------


async def test_cancel_of_an_unloaded_job_with_a_legacy_id_waits_for_the_restore(tmp_path):
    path = tmp_path / "q.db"
    store0 = SQLiteStore(path)
    rec = store0.open_sync()
    # A v1 id: secrets.token_hex(8). Most of them decode to some seq far beyond the journal.
    while True:
        legacy_id = secrets.token_hex(8)
        s = rec.job_ids.seq_of(legacy_id)
        if s is not None and s > 1_000:
            break
    store0.close_sync()
    (legacy,) = _write_journal(path, [{"id": legacy_id}])
    with sqlite3.connect(path) as conn:  # as the v2 migration leaves a v1 database
        conn.execute("INSERT INTO meta(key, value) VALUES('legacy_id_max_seq', ?)", (str(legacy.seq),))

    async with trio.open_nursery() as nursery:
        broker, store, reads = await _start_stepped(path, nursery)
        result: list = []
        answered = trio.Event()

        async def cancel() -> None:
            try:
                result.append((await broker.cancel_job(legacy_id)).state)
            except RequestError as exc:
                result.append(exc)
            answered.set()

        try:
            nursery.start_soon(cancel)
            await trio.testing.wait_all_tasks_blocked()
            assert result == []  # not loaded yet: the cancel waits for the restore
            _let_everything_go(store)
            with trio.fail_after(10):
                await answered.wait()
            assert broker.restored.is_set()
            assert result == [JobState.CANCELLED], result
            assert broker.dispatcher.live.get(legacy_id) is None, "the job is still queued and will run"
        finally:
            nursery.cancel_scope.cancel()


# 7. Cancelled while the store opens: gc stays disabled for the life of the process ----------------


class _SlowOpenStore(SQLiteStore):
    def open_sync(self, **kw):
        import time

        rec = super().open_sync(**kw)
        time.sleep(0.3)  # a long journal's open (migration, WAL growth)
        return rec


async def test_a_start_cancelled_while_the_store_opens_leaves_gc_enabled(tmp_path):
    path = tmp_path / "q.db"
    _write_journal(path, [{} for _ in range(3)])
    assert gc.isenabled()
    broker = Broker(_config(path), store=_SlowOpenStore(path), now=trio.current_time, seed=1)
    try:
        with trio.move_on_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(broker.start_core, nursery)
                await trio.sleep(0.1)  # the broker is told to stop while the store opens
                nursery.cancel_scope.cancel()
        assert gc.isenabled(), "gc left disabled by a start cancelled during the store's open"
    finally:
        gc.enable()


async def test_a_job_finished_before_the_crash_is_answered_without_waiting_for_the_restore(tmp_path):
    path = tmp_path / "q.db"
    done, waiting = _write_journal(path, [
        {"state": JobState.COMPLETED, "attempts": 1, "finished_at": 2.0, "result": "ok"}, {},
    ])
    async with trio.open_nursery() as nursery:
        broker, store, reads = await _start_stepped(path, nursery)
        try:
            with trio.fail_after(5):
                job = await broker.wait_job(done.id)  # nothing loaded yet, its row is final
            assert (job.state, job.result) == (JobState.COMPLETED, "ok")
            got: list[Job] = []
            nursery.start_soon(lambda: _append(got, broker.get_job(waiting.id)))
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # unfinished and not loaded: it waits
            _let_everything_go(store)
            with trio.fail_after(5):
                await broker.restored.wait()
                while not got:  # noqa: ASYNC110 - the getter's store read runs in a thread
                    await trio.sleep(0.01)
            assert got[0] is broker.dispatcher.live[waiting.id]
        finally:
            nursery.cancel_scope.cancel()


async def _append(out: list, aw) -> None:
    out.append(await aw)


async def test_a_journal_row_that_cannot_be_read_is_marked_dead_and_the_rest_is_served(tmp_path, caplog):
    """Before, one bad value stopped a broker that already served (and a restart refused to
    start): now that job is dead, says why, keeps its row's payload for repair, and the
    others run in order."""
    path = tmp_path / "q.db"
    jobs = _write_journal(path, [
        dict(priority=2), dict(priority=1), dict(priority=3),
        dict(priority=1, attempts=1, failures=1),  # a row that has run: read in full
    ])
    conn = sqlite3.connect(path)
    conn.execute("UPDATE jobs SET payload=? WHERE seq=?", (b"{not json", jobs[1].seq))
    conn.execute("UPDATE jobs SET error=? WHERE seq=?", ("[1, 2", jobs[3].seq))
    conn.commit()
    conn.close()
    broker = Broker(_config(path, restore_chunk=2), now=trio.current_time, seed=1)
    async with trio.open_nursery() as nursery:
        await broker.start_core(nursery)
        with trio.fail_after(10):
            await broker.restored.wait()
        fw = await FakeWorker.connect(broker, nursery, name="w", tasks=("noop",), concurrency=10)
        got = await fw.deliveries_n(2)
        assert [d.id for d in got] == [jobs[0].id, jobs[2].id]
        for bad in (jobs[1], jobs[3]):
            job = await broker.get_job(bad.id)
            assert job is not None and job.state is JobState.DEAD and job.dead_reason == "corrupt_row"
            assert job.error is not None and job.error.type == "CorruptRow" and "cannot be read" in job.error.message
            with pytest.raises(RequestError) as refused:  # it has no payload to run with
                await broker.retry_job(bad.id)
            assert refused.value.code.value == "invalid_state" and "discard" in refused.value.message
        stats = broker.stats()
        assert stats["jobs"]["dead"] == 2 and stats["jobs"]["running"] == 2 and stats["jobs"]["queued"] == 0
        await broker.writer.write([])  # the dead rows are committed
        # read back from the store (the payload still cannot be read): the same dead job
        page = broker.store.list_sync(state=JobState.DEAD)
        assert {j.id for j in page.jobs} == {jobs[1].id, jobs[3].id}
        assert all(j.dead_reason == "corrupt_row" and j.finished_at is not None for j in page.jobs)
        nursery.cancel_scope.cancel()
    conn = sqlite3.connect(path)
    states = dict(conn.execute("SELECT seq, state FROM jobs"))
    assert states[jobs[1].seq] == "dead" and states[jobs[3].seq] == "dead"
    # the unreadable payload is kept as it was, for whoever repairs it
    assert conn.execute("SELECT payload FROM jobs WHERE seq=?", (jobs[1].seq,)).fetchone()[0] == b"{not json"
    conn.close()
    # said once per row, when it is marked dead, not at every read of it
    assert sum("the job is marked dead" in r.getMessage() for r in caplog.records) == 2
    again = SQLiteStore(path)
    try:  # journaled dead: the next start does not read them again
        assert {j.id for j in again.open_sync().jobs} == {jobs[0].id, jobs[2].id}
    finally:
        again.close_sync()
