"""The SQLite journal on a real file, and the group-commit writer in front of every store."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from functools import partial

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trioq
from trioq.broker.config import BrokerConfig
from trioq.broker.server import Broker
from trioq.broker.sessions import RequestError
from trioq.errors import ErrorCode, StoreError
from trioq.job import ErrorInfo, Job, JobSpec, JobState, Progress
from trioq.store.memory import MemoryStore
from trioq.store.sqlite import _COLUMNS, SCHEMA_VERSION, SQLiteStore
from trioq.store.writer import StoreWriter, _Request

from .conftest import FakeWorker, memory_connect


def make_job(seq: int, store=None, **kw) -> Job:
    """A job as the broker would make it: its id names its seq in the store's id scheme."""
    job_id = store.job_ids.make(seq, 1)[0] if store is not None else f"job{seq:012d}"
    fields = dict(id=job_id, seq=seq, task="noop", payload={"n": seq}, created_at=1000.0 + seq)
    fields.update(kw)
    return Job(**fields)


def as_dict(job: Job) -> dict:
    return attrs.asdict(job, recurse=True)


@pytest.fixture
def db(tmp_path):
    store = SQLiteStore(tmp_path / "q.db")
    store.open_sync()
    yield store
    store.close_sync()


def test_every_job_field_round_trips(db):
    full = Job(
        id=db.job_ids.make(7, 1)[0],
        seq=7,
        task="reverse_string",
        payload={"data": "héllo", "nested": [1, 2.5, None, {"k": True}]},
        priority=2,
        queue="high",
        state=JobState.DEAD,
        attempts=4,
        failures=3,
        worker_losses=1,
        max_attempts=6,
        timeout=12.5,
        run_at=2000.25,
        created_at=1000.5,
        started_at=1500.75,
        finished_at=1600.125,
        worker="alpha",
        result={"partial": ["a", "b"]},
        error=ErrorInfo("ValueError", "n must be positive", "Traceback (most recent call last):\n  boom\n", False),
        progress=Progress(0.75, "three quarters"),
        idempotency_key="order-42",
        dead_reason="not_retryable",
        owner="alice",
    )
    # every field differs from its default, so a column that is dropped shows up
    defaults = as_dict(Job(id="", seq=0, task="", payload=None))
    assert all(as_dict(full)[k] != v for k, v in defaults.items()), "test job leaves a field at its default"
    bare = make_job(8, db, payload=["a list", 1])
    db.write_sync([db.row(full), db.row(bare)])
    assert as_dict(db.get_sync(full.id)) == as_dict(full)
    assert as_dict(db.get_sync(bare.id)) == as_dict(bare)
    assert db.get_sync("nope") is None
    # an update rewrites the mutable columns and keeps the rest
    full.state = JobState.QUEUED
    full.error = None
    full.progress = None
    full.result = None
    full.attempts = 5
    db.write_sync([db.row(full)])
    again = db.get_sync(full.id)
    assert as_dict(again) == as_dict(full)
    assert again.error is None and again.progress is None and again.result is None


def _fill(db, n=25):
    jobs = []
    for seq in range(1, n + 1):
        state = [JobState.COMPLETED, JobState.QUEUED, JobState.DEAD, JobState.RUNNING, JobState.CANCELLED][seq % 5]
        jobs.append(
            make_job(
                seq,
                db,
                task=("noop", "reverse_string")[seq % 2],
                queue=("default", "high", "low")[seq % 3],
                state=state,
                finished_at=100.0 + seq if state.terminal else None,
            )
        )
    db.write_sync([db.row(j) for j in jobs])
    return jobs


def _page_all(db, **filters):
    out, cursor, pages = [], None, 0
    while True:
        page = db.list_sync(limit=4, before_seq=cursor, **filters)
        assert len(page.jobs) <= 4
        out.extend(page.jobs)
        pages += 1
        assert pages < 50
        if page.next_cursor is None:
            return out, pages
        assert page.next_cursor == page.jobs[-1].seq
        cursor = page.next_cursor


def test_listing_is_newest_first_with_cursor_paging_and_filters(db):
    jobs = _fill(db)
    listed, pages = _page_all(db)
    assert [j.seq for j in listed] == list(range(25, 0, -1))
    assert pages == 7  # 4+4+4+4+4+4+1
    exact = db.list_sync(limit=25)
    assert len(exact.jobs) == 25 and exact.next_cursor is None  # nothing more: no empty last page

    def expect(pred):
        return [j.seq for j in sorted(jobs, key=lambda j: -j.seq) if pred(j)]

    got, _ = _page_all(db, state=JobState.COMPLETED)
    assert [j.seq for j in got] == expect(lambda j: j.state is JobState.COMPLETED)
    got, _ = _page_all(db, queue="high")
    assert [j.seq for j in got] == expect(lambda j: j.queue == "high")
    got, _ = _page_all(db, task="reverse_string", queue="low")
    assert [j.seq for j in got] == expect(lambda j: j.task == "reverse_string" and j.queue == "low")
    got, _ = _page_all(db, state="dead", task="noop")
    assert [j.seq for j in got] == expect(lambda j: j.state is JobState.DEAD and j.task == "noop")
    assert got  # the filters select something
    assert db.list_sync(queue="nowhere").jobs == []


def test_counts_purge_and_delete(db):
    jobs = _fill(db)
    want: dict[str, dict[str, int]] = {}
    for j in jobs:
        per = want.setdefault(j.task, {})
        per[j.state.value] = per.get(j.state.value, 0) + 1
    assert db.counts_sync() == want
    # an unfinished job with an old finished_at (say a retried one) is never purged
    stray = make_job(26, db, state=JobState.QUEUED, finished_at=1.0)
    db.write_sync([db.row(stray)])
    cutoff = 110.5  # finished_at = 100 + seq: terminal jobs with seq <= 10 are older
    old_terminal = {j.id for j in jobs if j.state.terminal and j.finished_at < cutoff}
    assert old_terminal and len(old_terminal) < sum(j.state.terminal for j in jobs)
    assert db.purge_sync(cutoff) == len(old_terminal)
    left = {j.id for j in db.list_sync(limit=100).jobs}
    assert not (left & old_terminal)
    assert left == {j.id for j in jobs if j.id not in old_terminal} | {stray.id}
    assert db.purge_sync(cutoff) == 0
    # the limit bounds one purge
    assert db.purge_sync(1e9, limit=2) == 2
    # what went, by task and state, for the counts the broker keeps in memory
    rest = db.counts_sync()
    gone = db.purge_counted_sync(1e9)
    assert sum(gone.values()) > 0
    for (task, state), n in gone.items():
        assert rest[task][state] >= n
    assert all(state not in ("completed", "dead", "cancelled") for per in db.counts_sync().values() for state, n in per.items() if n)
    # delete
    victim = next(j for j in jobs if j.id in left and j.state is JobState.RUNNING)
    assert db.delete_sync(victim.id) is True
    assert db.get_sync(victim.id) is None
    assert db.delete_sync(victim.id) is False


def test_reopen_restores_unfinished_in_seq_order_next_seq_tasks_and_paused(tmp_path):
    path = tmp_path / "q.db"
    store = SQLiteStore(path)
    first = store.open_sync()
    assert first.jobs == [] and first.next_seq == 1 and first.paused_queues == []
    # written out of order, the highest seq is a finished job
    order = [5, 2, 9, 1, 7, 3]
    states = {1: JobState.QUEUED, 2: JobState.RUNNING, 3: JobState.COMPLETED, 5: JobState.SCHEDULED,
              7: JobState.DEAD, 9: JobState.COMPLETED}
    store.write_sync([store.row(make_job(s, state=states[s], run_at=50.0 if s == 5 else None)) for s in order],
                     tasks=["noop", "custom"])
    store.set_paused_sync("low", True)
    store.set_paused_sync("high", True)
    store.set_paused_sync("high", False)
    store.close_sync()

    again = SQLiteStore(path)
    rec = again.open_sync()
    try:
        assert [j.seq for j in rec.jobs] == [1, 2, 5]
        assert [j.state for j in rec.jobs] == [JobState.QUEUED, JobState.RUNNING, JobState.SCHEDULED]
        assert rec.jobs[2].run_at == 50.0
        assert rec.next_seq == 10
        assert rec.tasks == ["custom", "noop"]
        assert rec.paused_queues == ["low"]
    finally:
        again.close_sync()


def test_recovery_reads_never_run_and_used_jobs_back_field_for_field(tmp_path):
    """Recovery reads never-run rows through a packed "shape" column and the others in full:
    every field must come back exactly, whichever way the row was read."""
    path = tmp_path / "q.db"
    store = SQLiteStore(path)
    store.open_sync()
    jobs = [
        make_job(1, store),  # the common case
        make_job(2, store, task="t2", queue="q2", priority=1, max_attempts=7, timeout=0.1,
                 idempotency_key='k "2"', owner="ann", payload={"x": [1, 2.5]}),
        make_job(3, store, state=JobState.SCHEDULED, run_at=1795894445.8515682),  # full precision
        make_job(4, store, attempts=1, failures=1, error=ErrorInfo("Boom", "b", "tb", True),
                 progress=Progress(0.5, "half")),  # retried: not pristine
        make_job(5, store, state=JobState.RUNNING, attempts=1, started_at=2000.0, worker="w1"),
        make_job(6, store, payload=None, owner="ann"),
        make_job(7, store, state=JobState.COMPLETED, attempts=1, result=7, finished_at=3000.0),
        make_job(8, store, idempotency_key='k "2"x', owner="bob"),  # the same shape but one field
    ]
    store.write_sync([store.row(j) for j in jobs], tasks=["noop"])
    store.close_sync()
    again = SQLiteStore(path)
    rec = again.open_sync()
    try:
        assert [as_dict(j) for j in rec.jobs] == [as_dict(j) for j in jobs if not j.state.terminal]
        assert rec.jobs[0].task is rec.jobs[2].task  # names are shared, one string per name
    finally:
        again.close_sync()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_times = st.floats(0, 4e9, allow_nan=False) | st.floats(0, 1, allow_nan=False)


@st.composite
def _batch_jobs(draw):
    """Jobs as the broker inserts them and then finishes them on their first attempt."""
    n = draw(st.integers(1, 12))
    jobs = []
    for seq in range(1, n + 1):
        job = make_job(
            seq, payload=draw(_json_values), priority=draw(st.integers(1, 10)),
            task=draw(st.sampled_from(["noop", "t-2"])), max_attempts=draw(st.integers(1, 1000)),
            timeout=draw(st.none() | _times.filter(bool)), created_at=draw(_times),
            run_at=draw(st.none() | _times), idempotency_key=draw(st.none() | st.text(min_size=1, max_size=20)),
            owner=draw(st.none() | st.text(min_size=1, max_size=10)),
        )
        done = attrs.evolve(
            job, state=JobState.COMPLETED, attempts=1, started_at=draw(_times), finished_at=draw(_times),
            worker=draw(st.text(max_size=10)), result=draw(_json_values),
            progress=draw(st.none() | st.builds(Progress, st.floats(0, 1), st.text(max_size=10))),
        )
        jobs.append((job, done))
    return jobs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=_batch_jobs())
def test_a_batch_written_as_one_json_value_stores_what_executemany_stores(tmp_path_factory, batch):
    """Large batches are bound as one JSON text (no GIL convoy); the rows must be the same,
    value for value and type for type, as sqlite3's own binding writes them."""
    stored = []
    for json_rows in (0, 10**9):  # always JSON, never JSON
        store = SQLiteStore(tmp_path_factory.mktemp("db") / "q.db", synchronous="off")
        store.json_batch_rows = json_rows
        store.open_sync()
        try:
            store.commit_sync([store.insert_row(job) for job, _ in batch], [])
            inserted = store._w.execute("SELECT *, typeof(payload), typeof(timeout) FROM jobs ORDER BY seq").fetchall()
            store.commit_sync([], [store.update_row(done) for _, done in batch])
            updated = store._w.execute("SELECT *, typeof(result), typeof(progress) FROM jobs ORDER BY seq").fetchall()
            assert [j.seq for j in store.open_sync().jobs] == []  # all finished
            jobs = [store._job(r) for r in store._w.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs ORDER BY seq")]
            assert [as_dict(j) for j in jobs] == [as_dict(d) for _, d in batch]
        finally:
            store.close_sync()
        stored.append((inserted, updated))
    assert stored[0] == stored[1]


def test_wal_and_synchronous_full_by_default(tmp_path, db):
    w = db._w
    r = db._r
    assert w is not None and r is not None and w is not r
    for conn in (w, r):
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    # WAL is a property of the file: a plain connection sees it too
    with sqlite3.connect(db.path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert "synchronous=FULL" in db.description and db.durable
    normal = SQLiteStore(tmp_path / "n.db", synchronous="normal")
    normal.open_sync()
    try:
        assert normal._w.execute("PRAGMA synchronous").fetchone()[0] == 1
        assert not normal.durable
    finally:
        normal.close_sync()
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteStore(tmp_path / "x.db", synchronous="sometimes")


def test_a_newer_schema_is_refused_clearly(tmp_path):
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION + 1),))
    store = SQLiteStore(path)
    with pytest.raises(RuntimeError, match=rf"schema version {SCHEMA_VERSION + 1}.*knows up to {SCHEMA_VERSION}"):
        store.open_sync()
    store.close_sync()
    with sqlite3.connect(path) as conn:  # and it was left untouched
        assert conn.execute("SELECT name FROM sqlite_master WHERE name='jobs'").fetchone() is None


def test_migration_from_an_empty_file_creates_the_current_version(tmp_path):
    path = tmp_path / "empty.db"
    path.write_bytes(b"")
    store = SQLiteStore(path)
    rec = store.open_sync()
    store.close_sync()
    assert rec.jobs == [] and rec.next_seq == 1
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(SCHEMA_VERSION),)
        # no index on ids: an id names its seq, the primary key
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE type='index' AND tbl_name='jobs'").fetchone() == (0,)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "jobs", "tasks", "paused_queues"} <= tables
    # opening again does not migrate twice
    store = SQLiteStore(path)
    store.open_sync()
    store.close_sync()


def test_migration_from_version_1_keeps_old_random_ids_findable(tmp_path):
    """A version-1 file (random ids, UNIQUE index) opens as version 2 with nothing lost."""
    from trioq.store.sqlite import MIGRATIONS

    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    for stmt in MIGRATIONS[1]:
        conn.execute(stmt)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    old = [make_job(seq, id=f"{seq:02d}aa55aa55aa55aa", state=JobState.COMPLETED, finished_at=5.0) for seq in (1, 2)]
    old.append(make_job(3, id="33bb66bb66bb66bb"))  # still queued
    probe = SQLiteStore(":memory:")
    conn.executemany(probe._insert, [probe.row(j) for j in old])
    conn.close()

    store = SQLiteStore(path)
    rec = store.open_sync()
    assert [j.id for j in rec.jobs] == ["33bb66bb66bb66bb"] and rec.next_seq == 4
    for j in old:  # found by their random ids through the partial index
        assert store.get_sync(j.id).seq == j.seq
    # new jobs get codec ids, found without any index, beside the old ones
    new_job = make_job(rec.next_seq, store)
    store.write_sync([store.row(new_job)])
    assert store.get_sync(new_job.id).seq == 4
    assert store.get_sync("ffffffffffffffff") is None and store.get_sync("not-an-id") is None
    assert store.delete_sync(old[0].id) is True and store.get_sync(old[0].id) is None
    store.close_sync()
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(SCHEMA_VERSION),)
        (idx,) = c.execute("SELECT sql FROM sqlite_master WHERE type='index' AND tbl_name='jobs'").fetchone()
        assert "WHERE seq <= 3" in idx  # covers the old rows only: new inserts skip it
        assert c.execute("SELECT count(*) FROM jobs").fetchone() == (3,)


def test_job_ids_survive_a_restart_and_differ_between_databases(tmp_path):
    a = SQLiteStore(tmp_path / "a.db")
    a.open_sync()
    ids = a.job_ids.make(1, 5)
    a.close_sync()
    again = SQLiteStore(tmp_path / "a.db")
    again.open_sync()
    assert again.job_ids.make(1, 5) == ids  # the key is kept in the file
    assert [again.job_ids.seq_of(i) for i in ids] == [1, 2, 3, 4, 5]
    again.close_sync()
    b = SQLiteStore(tmp_path / "b.db")
    b.open_sync()
    assert not set(b.job_ids.make(1, 5)) & set(ids)  # another key, other names
    b.close_sync()


# --- the writer -----------------------------------------------------------------------------------


async def test_concurrent_writes_share_commits(tmp_path, nursery):
    store = SQLiteStore(tmp_path / "q.db")
    store.open_sync()
    writer = StoreWriter(store)
    await nursery.start(writer.run)
    n = 200
    done = []

    async def one(i: int) -> None:
        await writer.write([make_job(i + 1)], new=True)
        done.append(i)

    with trio.fail_after(30):
        async with trio.open_nursery() as n_:
            for i in range(n):
                n_.start_soon(one, i)
    st = writer.statistics()
    assert len(done) == n
    assert st.requests == n and st.rows == n and st.failures == 0 and st.healthy
    assert 1 <= st.commits < n / 2, st  # group commit: far fewer transactions than calls
    assert len(store.list_sync(limit=1000).jobs) == n
    store.close_sync()


async def test_several_changes_to_one_job_in_a_batch_are_one_row(nursery):
    store = MemoryStore()
    writer = StoreWriter(store)
    await nursery.start(writer.run)
    job = make_job(1)
    for _ in range(5):
        writer.write_nowait([job])
    await writer.write([job])
    st = writer.statistics()
    assert st.requests == 6 and st.rows == 1 and st.commits == 1


class RecordingStore(MemoryStore):
    """A memory store that remembers, per job, the state each successful commit carried."""

    def __init__(self) -> None:
        super().__init__()
        self.committed: dict[str, JobState] = {}
        self.tried = trio.Event()  # set at every write attempt, failed or not

    def write_sync(self, rows, tasks=()) -> None:
        self.tried.set()
        super().write_sync(rows, tasks)
        for (job,) in rows:
            self.committed[job.id] = job.state


async def test_failing_store_refuses_submits_and_recovers(autojump_clock, nursery):
    store = RecordingStore()
    broker = Broker(
        BrokerConfig(http=False, db=":memory:", heartbeat_interval=1.0, heartbeat_timeout=10.0,
                     dispatch_mark_delay=0),  # RUNNING marks journaled at once
        store=store, now=trio.current_time, seed=1,
    )
    await broker.start_core(nursery)
    d = broker.dispatcher
    w = await FakeWorker.connect(broker, nursery, name="w", concurrency=1, heartbeat=1.0)
    commits = trio.Event()
    broker.writer.on_commit.append(lambda jobs: commits.set())
    async with trioq.Client(connect=memory_connect(broker, nursery)) as c:
        first = await c.submit("noop", {"n": 1})
        delivery = await w.next_delivery()
        assert delivery.id == first
        await trio.testing.wait_all_tasks_blocked()
        assert store.committed[first] is JobState.RUNNING

        store.fail_writes = OSError("disk full")
        submitted = d.submitted
        # the first submit meets the failure in its own commit: refused, its key not claimed
        with pytest.raises(StoreError, match="disk full"):
            await broker.submit([JobSpec("noop", {"n": 2}, idempotency_key="k1")])
        assert not broker.writer.healthy and (None, "k1") not in d.idempotency
        # the writer itself: a new job is not kept, the error says why
        ghost = make_job(10_000, id="ghost")
        with pytest.raises(StoreError, match="disk full"):
            await broker.writer.write([ghost], new=True)
        # the worker finishes meanwhile: the change is journaled but cannot be committed
        store.tried = trio.Event()
        w.complete(delivery, "done")
        await store.tried.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert broker.writer.statistics().failures == 3
        assert store.committed[first] is JobState.RUNNING
        # producers are refused with "busy" while the store fails
        for key in ("k1", None):
            with pytest.raises(trioq.RemoteError) as info:
                await c.submit("noop", {"n": 3}, idempotency_key=key)
            assert info.value.code == "busy" and "store" in info.value.message
        with pytest.raises(RequestError) as refused:
            await broker.submit([JobSpec("noop", {"n": 4})])
        assert refused.value.code is ErrorCode.BUSY
        assert d.submitted == submitted
        assert set(d.live) == set() and not d.idempotency
        assert set(store.committed) == {first}
        assert broker.stats()["store"]["healthy"] is False

        # the disk comes back: the writer retries on its own, the pending update lands
        store.fail_writes = None
        commits = trio.Event()
        with trio.fail_after(10):
            await commits.wait()
        assert store.committed[first] is JobState.COMPLETED
        assert broker.writer.healthy
        assert "ghost" not in store.committed  # the refused new job was never written
        again = await c.submit("noop", {"n": 4}, idempotency_key="k1")
        d2 = await w.next_delivery()
        assert d2.id == again
        w.complete(d2, "ok")
        done = await c.result(again, timeout=10)
        assert done.state is JobState.COMPLETED and done.result == "ok"
        assert store.committed[again] is JobState.COMPLETED
        assert (await c.result(first, timeout=10)).result == "done"


def test_inserts_of_new_and_moved_on_jobs_keep_every_field(db):
    """The writer inserts a fresh job with its default columns unbound: nothing may be lost."""
    fresh = make_job(1, db, priority=2, queue="high", timeout=3.5, run_at=99.0, max_attempts=7,
                     idempotency_key="k", owner="alice", payload={"a": [1, "b"]})
    moved = make_job(2, db, state=JobState.COMPLETED, attempts=1, started_at=5.0, finished_at=6.0,
                     worker="w1", result={"ok": True})
    rows = [db.insert_row(fresh), db.insert_row(moved)]
    assert len(rows[0]) < len(rows[1])  # the narrow form only where it is exact
    db.commit_sync(rows, [])
    for job in (fresh, moved):
        assert as_dict(db.get_sync(job.id)) == as_dict(job)


def test_updates_of_first_and_later_attempts_keep_every_field(db):
    """A first attempt finishing is written with fewer columns: what it leaves out must be right."""
    jobs = [make_job(s, db) for s in (1, 2, 3)]
    db.commit_sync([db.insert_row(j) for j in jobs], [])
    first, failed, cancelled = jobs
    first.state, first.attempts, first.started_at, first.finished_at = JobState.COMPLETED, 1, 5.0, 6.0
    first.worker, first.result, first.progress = "w1", ["done"], Progress(1.0, "all")
    failed.state, failed.attempts, failed.failures, failed.run_at = JobState.SCHEDULED, 1, 1, 50.0
    failed.error = ErrorInfo("ValueError", "bad", "tb", True)
    cancelled.state, cancelled.attempts, cancelled.finished_at = JobState.CANCELLED, 1, 7.0
    rows = [db.update_row(j) for j in jobs]
    assert len(rows[0]) == len(rows[2]) < len(rows[1])
    db.commit_sync([], rows)
    for job in jobs:
        assert as_dict(db.get_sync(job.id)) == as_dict(job)
    # the failed one succeeds on its second attempt: the whole row again, error cleared
    failed.state, failed.attempts, failed.error, failed.result, failed.run_at = JobState.COMPLETED, 2, None, 1, None
    db.commit_sync([], [db.update_row(failed)])
    assert as_dict(db.get_sync(failed.id)) == as_dict(failed)


def test_the_row_of_a_job_back_in_line_is_written_even_if_a_purge_deleted_it(db):
    """A retry answered 'busy' while the store was failing is committed once it recovers; a
    purge may have run first and deleted the dead row the retry replaces: the job must not
    be left in line without a row (a restart would lose it)."""
    job = make_job(1, db)
    job.state, job.attempts, job.failures, job.finished_at = JobState.DEAD, 1, 1, 5.0
    job.error, job.dead_reason = ErrorInfo("ValueError", "bad", "", False), "not_retryable"
    db.commit_sync([db.row(job)], [])
    assert db.purge_counted_sync(finished_before=10.0) == {(job.task, "dead"): 1}
    job.state, job.failures, job.finished_at, job.error, job.dead_reason = JobState.QUEUED, 0, None, None, None
    db.commit_sync([], [db.update_row(job)])
    assert as_dict(db.get_sync(job.id)) == as_dict(job)
    job.state, job.attempts, job.started_at, job.worker = JobState.RUNNING, 2, 20.0, "w"  # its next attempt
    db.commit_sync([], [db.update_row(job)])
    assert as_dict(db.get_sync(job.id)) == as_dict(job)


async def test_delayed_jobs_are_stored_as_scheduled(tmp_path, nursery):
    broker = Broker(BrokerConfig(http=False, db=str(tmp_path / "d.db")), store=SQLiteStore(tmp_path / "d.db"))
    await broker.start_core(nursery)
    (later,), _ = await broker.submit([JobSpec("noop", {}, delay=3600)])
    (now,), _ = await broker.submit([JobSpec("noop", {})])
    by_state = {s: [j.id for j in broker.store.list_sync(state=s).jobs] for s in (JobState.SCHEDULED, JobState.QUEUED)}
    assert by_state == {JobState.SCHEDULED: [later], JobState.QUEUED: [now]}


async def test_a_writer_stopped_before_its_commit_leaves_every_row_to_the_final_flush(tmp_path):
    """The broker stopping between a batch's receipt and its commit once lost those rows."""
    store = SQLiteStore(tmp_path / "stop.db")
    store.inline_max_rows = 0  # every commit takes a thread, so there is a moment before it
    store.open_sync()
    writer = StoreWriter(store)
    jobs = [make_job(s, store) for s in (1, 2, 3)]
    store.write_sync([store.row(j) for j in jobs])
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for j in jobs:
            j.state, j.attempts, j.finished_at = JobState.COMPLETED, 1, 9.0
        writer.write_nowait(jobs)  # the writer wakes with the batch in hand...
        nursery.cancel_scope.cancel()  # ...and is cancelled before its commit can start
    assert writer.commits == 0
    assert writer.flush_sync() == 3
    assert [store.get_sync(j.id).state for j in jobs] == [JobState.COMPLETED] * 3
    store.close_sync()


def test_recovery_reads_untouched_and_used_jobs_alike(tmp_path):
    """Recovery reads never-run jobs with fewer columns: they must come back whole, in seq order."""
    store = SQLiteStore(tmp_path / "rec.db")
    store.open_sync()
    jobs = [
        make_job(1, store, priority=2, queue="high", timeout=3.0, idempotency_key="a", owner="o"),
        make_job(2, store, state=JobState.RUNNING, attempts=1, started_at=5.0, worker="w"),
        make_job(3, store, run_at=99.0, state=JobState.SCHEDULED),
        make_job(4, store, state=JobState.SCHEDULED, attempts=1, failures=1, run_at=50.0,
                 error=ErrorInfo("E", "m", "tb", True)),
        make_job(5, store, state=JobState.COMPLETED, attempts=1, finished_at=6.0, result=1),
        make_job(6, store, payload={"x": [1]}),
    ]
    store.write_sync([store.row(j) for j in jobs])
    store.close_sync()
    again = SQLiteStore(tmp_path / "rec.db")
    rec = again.open_sync()
    assert [j.seq for j in rec.jobs] == [1, 2, 3, 4, 6]
    assert [as_dict(j) for j in rec.jobs] == [as_dict(j) for j in jobs if not j.state.terminal]
    again.close_sync()


def test_a_new_journal_and_its_wal_are_readable_by_the_broker_only(tmp_path):
    import os
    import stat

    old = os.umask(0o022)  # a usual umask would leave the file world-readable
    try:
        store = SQLiteStore(tmp_path / "private.db")
        store.open_sync()
        store.write_sync([store.row(make_job(1, store))])
        for name in ("private.db", "private.db-wal", "private.db-shm"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
        store.close_sync()
    finally:
        os.umask(old)


def test_small_commits_run_on_the_calling_thread_only_while_they_are_quick_and_the_connection_is_free(tmp_path):
    """commit_nowait spares an idle job two thread hand-offs, but never waits for the write lock
    nor blocks the loop on a slow disk or a big batch: each refusal writes nothing."""
    store = SQLiteStore(tmp_path / "inline.db")
    store.open_sync()
    jobs = [make_job(s, store) for s in range(1, 20)]

    def stored() -> int:
        return len(store.list_sync(limit=100).jobs)

    assert store.commit_nowait([store.insert_row(jobs[0])], [])
    assert stored() == 1
    big = [store.insert_row(j) for j in jobs[1 : 2 + store.inline_max_rows]]
    assert not store.commit_nowait(big, [])
    assert stored() == 1
    with store._wlock:  # a purge or a threaded commit holds the connection
        assert not store.commit_nowait([store.insert_row(jobs[1])], [])
    assert stored() == 1
    store.inline_max_seconds = 0.0  # the small commits measured so far now count as slow
    assert not store.commit_nowait([store.insert_row(jobs[1])], [])
    assert stored() == 1
    store.commit_sync([store.insert_row(jobs[1])], [])  # the thread's way still writes
    store.inline_max_seconds = 60.0
    assert store.commit_nowait([store.insert_row(jobs[2])], [])
    assert [j.id for j in reversed(store.list_sync(limit=100).jobs)] == [j.id for j in jobs[:3]]
    store.close_sync()


async def test_a_writes_committed_callback_runs_after_its_commit_and_never_after_a_failure(tmp_path):
    store = SQLiteStore(tmp_path / "cb.db")
    store.open_sync()
    writer = StoreWriter(store)
    seen: list[tuple[str, int]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        job = make_job(1, store)
        await writer.write([job], new=True, committed=lambda: seen.append((job.id, len(store.list_sync().jobs))))
        assert seen == [(job.id, 1)]  # called once, and the row was already there
        with pytest.raises(StoreError):  # the same seq again: the insert fails
            await writer.write([make_job(1, store)], new=True, committed=lambda: seen.append(("again", 0)))
        assert seen == [(job.id, 1)]
        nursery.cancel_scope.cancel()
    store.close_sync()


def test_the_wal_is_checkpointed_from_the_threads_path_never_by_a_commit_on_the_loop(tmp_path):
    """SQLite's own autocheckpoint ran in whichever commit crossed its threshold, an inline one
    too: a 30 ms stall of the event loop. Now commit_nowait refuses once a checkpoint is due,
    and commit_sync (in a thread) runs it."""
    store = SQLiteStore(tmp_path / "wal.db")
    store.checkpoint_commits = 5
    store.open_sync()
    assert store._w.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    jobs = iter(make_job(s, store) for s in range(1, 100))
    inline = [store.commit_nowait([store.insert_row(next(jobs))], []) for _ in range(6)]
    assert inline == [True] * 5 + [False]  # the sixth would have to checkpoint
    assert store.checkpoints == 0
    store.commit_sync([store.insert_row(next(jobs))], [])
    assert store.checkpoints == 1
    assert store.commit_nowait([store.insert_row(next(jobs))], [])  # counting starts again
    # and the checkpoint did its work: the WAL's frames are in the database file
    busy, log_frames, done = store._w.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and done == log_frames
    assert len(store.list_sync(limit=100).jobs) == 7
    store.close_sync()


def test_a_small_commit_of_large_values_still_takes_a_thread(tmp_path):
    store = SQLiteStore(tmp_path / "big.db")
    store.open_sync()
    big = make_job(1, store, payload={"blob": "x" * (store.inline_max_bytes + 1)})
    assert not store.commit_nowait([store.insert_row(big)], [])
    assert store.list_sync().jobs == []
    store.commit_sync([store.insert_row(big)], [])
    assert store.get_sync(big.id).payload == big.payload
    store.close_sync()


async def test_a_failing_commit_callback_leaves_the_writer_and_the_batchs_other_callers_unharmed(tmp_path):
    store = SQLiteStore(tmp_path / "cbfail.db")
    store.open_sync()
    writer = StoreWriter(store)
    calls: list[str] = []

    def boom() -> None:
        calls.append("boom")
        raise RuntimeError("a callback bug")

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        a, b = make_job(1, store), make_job(2, store)
        async with trio.open_nursery() as both:  # both in one batch
            both.start_soon(partial(writer.write, [a], new=True, committed=boom))
            both.start_soon(partial(writer.write, [b], new=True, committed=lambda: calls.append("b")))
        assert sorted(calls) == ["b", "boom"]
        await writer.write([make_job(3, store)], new=True)  # the writer still runs
        assert len(store.list_sync().jobs) == 3
        nursery.cancel_scope.cancel()
    store.close_sync()


def test_the_wal_is_grown_once_at_open_and_a_crash_copy_of_it_recovers_every_commit(tmp_path):
    """Commits overwrite a grown WAL instead of extending it (a journal flush fewer each). The
    zeros past its last frame are never read as frames: a copy of the files taken mid-run, as
    a crash leaves them (the wal-index in -shm is rebuilt from the WAL), holds what was committed."""
    store = SQLiteStore(tmp_path / "grown.db")
    store.checkpoint_commits = 10**9  # every commit stays in the WAL
    store.open_sync()
    wal = tmp_path / "grown.db-wal"
    assert wal.stat().st_size == store.wal_presize_bytes
    jobs = [make_job(s, store) for s in range(1, 41)]
    for job in jobs:
        store.commit_sync([store.insert_row(job)], [])
    done = jobs[:10]
    for job in done:
        job.state, job.attempts, job.worker, job.result = JobState.COMPLETED, 1, "w1", {"ok": job.seq}
        job.started_at = job.finished_at = 2000.0
    store.commit_sync([], [store.update_row(job) for job in done])
    assert wal.stat().st_size == store.wal_presize_bytes  # written inside, never extended
    crash = tmp_path / "crash"
    crash.mkdir()
    for name in ("grown.db", "grown.db-wal"):
        shutil.copyfile(tmp_path / name, crash / name)
    again = SQLiteStore(crash / "grown.db")
    rec = again.open_sync()
    assert [j.id for j in rec.jobs] == [j.id for j in jobs[10:]]
    assert [as_dict(j) for j in rec.jobs] == [as_dict(j) for j in jobs[10:]]
    assert as_dict(again.get_sync(done[3].id)) == as_dict(done[3])
    assert rec.next_seq == 41
    again.close_sync()
    store.close_sync()


def test_growing_the_wal_never_cuts_a_longer_one_holding_commits(tmp_path):
    store = SQLiteStore(tmp_path / "long.db")
    store.checkpoint_commits = 10**9
    store.wal_presize_bytes = 64 * 1024
    store.open_sync()
    jobs = [make_job(s, store, payload={"pad": "x" * 2000}) for s in range(1, 300)]
    store.commit_sync([store.insert_row(j) for j in jobs], [])
    wal = tmp_path / "long.db-wal"
    longer = wal.stat().st_size
    assert longer > 64 * 1024
    store._presize_wal()  # as a reopen after a crash would
    assert wal.stat().st_size == longer
    assert len(store.list_sync(limit=1000).jobs) == len(jobs)
    store.close_sync()


def test_the_wal_is_grown_only_under_its_write_lock_and_a_busy_lock_only_skips_it(tmp_path, caplog):
    """Another connection appending frames while the zeros go in would lose them: growing
    waits for the write lock, briefly, and then leaves the WAL as it is; the store opens."""
    store = SQLiteStore(tmp_path / "locked.db")
    store.wal_presize_bytes = 64 * 1024
    store.open_sync()
    wal = tmp_path / "locked.db-wal"
    other = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO meta(key, value) VALUES ('x', 'y')")
    store.wal_presize_bytes = 4 * 2**20
    store.wal_presize_wait = 0.05
    before = wal.stat().st_size
    store._presize_wal()
    assert wal.stat().st_size == before
    assert "did not grow the WAL file" in caplog.text
    assert store._w.execute("PRAGMA busy_timeout").fetchone() == (30000,)  # as it was
    other.execute("COMMIT")
    other.close()
    store._presize_wal()
    assert wal.stat().st_size == 4 * 2**20
    store.close_sync()


def test_a_wal_ending_in_a_torn_frame_is_not_grown(tmp_path):
    """Zeros after half a frame could complete it into a commit nobody was told of."""
    store = SQLiteStore(tmp_path / "torn.db")
    store.wal_presize_bytes = 0
    store.checkpoint_commits = 10**9
    store.open_sync()
    store.commit_sync([store.insert_row(make_job(1, store))], [])
    wal = tmp_path / "torn.db-wal"
    size = wal.stat().st_size
    with open(wal, "r+b") as f:
        f.truncate(size - 100)  # as a crash in the middle of writing the last page leaves it
    store.wal_presize_bytes = 1 << 20
    store._presize_wal()
    assert wal.stat().st_size == size - 100
    store.close_sync()


def test_growing_the_wal_gives_the_space_back_when_the_disk_fills(tmp_path, monkeypatch):
    import errno
    import os

    store = SQLiteStore(tmp_path / "full.db")
    store.wal_presize_bytes = 0
    store.open_sync()
    wal = tmp_path / "full.db-wal"
    size = wal.stat().st_size
    real_pwrite = os.pwrite
    calls = []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 1:  # the first megabyte fits, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    store.wal_presize_bytes = 4 * 2**20
    store._presize_wal()
    monkeypatch.undo()
    assert len(calls) == 2
    assert wal.stat().st_size == size
    store.commit_sync([store.insert_row(make_job(1, store))], [])
    assert len(store.list_sync().jobs) == 1
    store.close_sync()


def test_a_database_reached_through_a_symlink_grows_the_wal_beside_the_real_file(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    store = SQLiteStore(real / "j.db")
    store.open_sync()
    store.close_sync()
    link = tmp_path / "link.db"
    link.symlink_to(real / "j.db")
    linked = SQLiteStore(link)
    linked.open_sync()
    assert (real / "j.db-wal").stat().st_size == linked.wal_presize_bytes
    assert not (tmp_path / "link.db-wal").exists()
    linked.close_sync()


class _GatedStore(MemoryStore):
    """Commits in a thread that waits for the test's go-ahead."""

    inline = False

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def commit_sync(self, inserts, updates, tasks=()) -> None:
        self.gate.wait(10)
        super().commit_sync(inserts, updates, tasks)


async def test_a_stopping_writer_answers_every_write_left_in_its_channel():
    """Callers wait for their commit inside shields (Broker.submit): a request the cancelled
    writer never answered kept the broker from stopping. New jobs left behind are dropped and
    their callers told; changes to stored jobs are kept for the final flush. Real clock: the
    commit runs in a real thread."""
    store = _GatedStore()
    writer = StoreWriter(store)
    answers: dict[str, str] = {}

    async def write(name: str, job: Job, new: bool) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await writer.write([job], new=new)
                answers[name] = "committed"
            except StoreError as exc:
                answers[name] = str(exc)
            return
        answers[name] = "never answered"

    stored = make_job(1, state=JobState.COMPLETED)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        nursery.start_soon(write, "first", make_job(2), True)  # its commit goes to the thread
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(write, "second", make_job(3), True)  # waits in the channel behind it
        nursery.start_soon(write, "update", stored, False)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()  # the broker stops
        store.gate.set()
    assert answers["first"] == "committed"
    assert answers["second"] == answers["update"] == "store write failed: the broker is stopping"
    with pytest.raises(StoreError, match="stopping"):
        await writer.write([make_job(4)], new=True)  # a writer that is gone waits for nobody
    assert writer.flush_sync() == 1  # the change to a stored job, not the unacknowledged new one
    assert store.get_sync(stored.id) is stored and store.get_sync(make_job(3).id) is None


async def test_a_writer_cancelled_before_its_commit_begins_answers_the_batch_it_took():
    store = _GatedStore()
    store.gate.set()
    writer = StoreWriter(store)
    stored = make_job(1, state=JobState.COMPLETED)
    new = _Request([make_job(2)], True, trio.Event())
    update = _Request([stored], False, trio.Event())
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await trio.testing.wait_all_tasks_blocked()  # the writer waits for work
        writer._send.send_nowait(new)
        writer._send.send_nowait(update)
        nursery.cancel_scope.cancel()  # before it runs again: its commit's thread never starts
    assert new.done.is_set() and update.done.is_set()
    assert str(new.error) == str(update.error) == "the broker is stopping"
    assert writer.flush_sync() == 1  # the change to a stored job, not the unacknowledged new one
    assert store.get_sync(stored.id) is stored and store.get_sync(make_job(2).id) is None


@pytest.mark.parametrize("stored", [True, False])
async def test_a_key_that_names_a_job_being_stored_is_answered_after_its_commit(stored: bool):
    """Producer B's SUBMIT names, by its idempotency key, the job producer A's SUBMIT is still
    committing: B's ACK waits for that commit, and if the commit fails B is told to try again
    (its ACK came first, naming a job that was never stored). Real clock: a real thread."""
    store = _GatedStore()
    broker = Broker(BrokerConfig(http=False, db=":memory:"), store=store, seed=1)
    answers: dict[str, object] = {}
    both = trio.Event()

    async def submit(name: str) -> None:
        try:
            answers[name] = await broker.submit([JobSpec("noop", idempotency_key="order-42")])
        except (RequestError, StoreError) as exc:
            answers[name] = type(exc).__name__
        if len(answers) == 2:
            both.set()

    async with trio.open_nursery() as nursery:
        await broker.start_core(nursery)
        nursery.start_soon(submit, "a")
        await trio.testing.wait_all_tasks_blocked()  # A's commit waits in its thread
        nursery.start_soon(submit, "b")
        await trio.testing.wait_all_tasks_blocked()
        assert answers == {}  # B is not answered before A's job is stored
        if not stored:
            store.fail_writes = OSError("No space left on device")
        store.gate.set()
        with trio.fail_after(10):
            await both.wait()
        nursery.cancel_scope.cancel()
    if stored:
        (a_ids, a_existing), (b_ids, b_existing) = answers["a"], answers["b"]
        assert b_ids == a_ids and (a_existing, b_existing) == ([False], [True])
        assert store.get_sync(a_ids[0]) is not None
    else:
        assert answers == {"a": "StoreError", "b": "RequestError"}


async def test_a_job_retried_after_dying_on_its_first_attempt_is_stored_as_retried(nursery, autojump_clock, tmp_path):
    """The row of a job back in line after one attempt must not keep that attempt's failure:
    lists read it, and a restart would give the job one attempt fewer."""
    store = SQLiteStore(tmp_path / "q.db")
    broker = Broker(BrokerConfig(http=False, db=str(tmp_path / "q.db"), dispatch_mark_delay=0),
                    store=store, now=trio.current_time, seed=1)
    await broker.start_core(nursery)
    fw = await FakeWorker.connect(broker, nursery, name="w", tasks=("noop",))
    (job_id,), _ = await broker.submit([JobSpec("noop", max_attempts=3)])
    d = await fw.next_delivery()
    fw.fail(d, ErrorInfo("ValueError", "bad input", "", False))  # not retryable: dead at attempt 1
    job = await broker.wait_job(job_id)
    assert job.state is JobState.DEAD and job.attempts == 1
    await broker.set_paused("default", True)  # it stays in line after the retry
    await broker.retry_job(job_id)
    row = await trio.to_thread.run_sync(store.get_sync, job_id)
    assert (row.state, row.failures, row.error, row.dead_reason) == (JobState.QUEUED, 0, None, None)
    assert [j.id for j in (await broker.list_jobs(state=JobState.QUEUED)).jobs] == [job_id]


class _GatedPurgeStore(SQLiteStore):
    """A purge that stops, in its thread, right after its DELETE: the moment a retry slipped in."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.deleted = threading.Event()
        self.go_on = threading.Event()

    def purge_counted_sync(self, finished_before: float, limit: int = 10_000) -> dict[tuple[str, str], int]:
        gone = super().purge_counted_sync(finished_before, limit)
        if gone:
            self.deleted.set()
            self.go_on.wait(10)
        return gone


async def test_a_retry_during_a_purge_never_leaves_a_live_job_without_a_row(tmp_path):
    """The purge deleted a cancelled job's row while a retry put the job back in line from the
    broker's memory of it: the job then ran with no row, and a restart would have lost it.
    Real clock: the purge runs in a real thread."""
    store = _GatedPurgeStore(tmp_path / "q.db")
    broker = Broker(BrokerConfig(http=False, db=str(tmp_path / "q.db"), result_ttl=0.0, purge_interval=0.05),
                    store=store, seed=1)
    async with trio.open_nursery() as nursery:
        await broker.start_core(nursery)
        (job_id,), _ = await broker.submit([JobSpec("noop", queue="held")])
        await broker.cancel_job(job_id)
        await broker.writer.write([])  # the cancel is committed
        with trio.fail_after(10):
            await trio.to_thread.run_sync(store.deleted.wait)  # the row is gone, the purge not over
        outcome: list[str] = []
        answered = trio.Event()

        async def retry() -> None:
            try:
                outcome.append((await broker.retry_job(job_id)).state.value)
            except RequestError as exc:
                outcome.append(exc.code.value)
            answered.set()

        nursery.start_soon(retry)
        await trio.testing.wait_all_tasks_blocked()
        store.go_on.set()
        with trio.fail_after(10):
            await answered.wait()
        nursery.cancel_scope.cancel()
    row = store.get_sync(job_id)
    assert outcome == ["unknown_job"] and row is None and job_id not in broker.dispatcher.live
