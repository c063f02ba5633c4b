"""The embedded durable store: one SQLite file in WAL mode.

Writes come only from the broker's writer task, one transaction per batch
(group commit); reads use a second connection, which WAL lets run beside a
write. ``synchronous=FULL`` by default: a commit is on disk when it returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from ..job import (
    DEFAULT_PRIORITY,
    EMPTY_PAYLOAD,
    STATE_BY_VALUE,
    ErrorInfo,
    Job,
    JobIds,
    JobState,
    Progress,
    shared_name,
)
from .base import CORRUPT_ROW, Backlog, JobPage, Recovered, Store

log = logging.getLogger("trioq.store")

_WAL_HEADER = 32  # bytes before a WAL's first frame
_WAL_FRAME_HEADER = 24  # bytes before each frame's page

SCHEMA_VERSION = 2

_COLUMNS = (
    "seq", "id", "task", "queue", "priority", "state", "payload", "attempts", "failures",
    "worker_losses", "max_attempts", "timeout", "run_at", "created_at", "started_at",
    "finished_at", "worker", "result", "error", "progress", "idempotency_key", "dead_reason", "owner",
)
_NEW_COLUMNS = (
    "seq", "id", "task", "queue", "priority", "state", "payload", "max_attempts", "timeout",
    "run_at", "created_at", "idempotency_key", "owner",
)
#: A row still as it was inserted: every column left out of _NEW_COLUMNS at its default.
_PRISTINE = (
    "(attempts = 0 AND failures = 0 AND worker_losses = 0 AND started_at IS NULL AND finished_at IS NULL "
    "AND worker IS NULL AND result IS NULL AND error IS NULL AND progress IS NULL AND dead_reason IS NULL)"
)
_FIRST_ATTEMPT_COLUMNS = ("state", "attempts", "started_at", "finished_at", "worker", "result", "run_at", "progress")
_IMMUTABLE = {"seq", "id", "task", "queue", "priority", "payload", "created_at", "idempotency_key", "owner"}
_MUTABLE = (
    "state", "attempts", "failures", "worker_losses", "max_attempts", "timeout", "run_at",
    "started_at", "finished_at", "worker", "result", "error", "progress", "dead_reason",
)

#: Columns holding orjson's bytes: they go through a JSON batch as text and are stored as BLOB.
_BLOB_COLUMNS = {"payload", "result", "progress", "error"}


def _json_columns(columns: Sequence[str], source: str) -> list[str]:
    """SQL that takes column i of a row from element i of a JSON array."""
    return [
        f"CAST(json_extract({source}, '$[{i}]') AS BLOB)" if c in _BLOB_COLUMNS else f"json_extract({source}, '$[{i}]')"
        for i, c in enumerate(columns)
    ]


def _json_batch(rows: Sequence[tuple]) -> str:
    """Rows as one JSON array of arrays (bytes as text), bound as a single value.

    sqlite3's executemany gives up the GIL around each row's step and must take it back for
    the next: with the event loop busy in the other thread, every row of a large batch can
    wait out a whole switch interval (5 ms) for it. One INSERT ... SELECT FROM json_each(?)
    runs the batch in SQLite's C code without the GIL. JSON numbers read back exactly.
    """
    return _dumps(rows, default=bytes.decode).decode()


def _drop_id_index(conn: sqlite3.Connection) -> None:
    (create,) = conn.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name='jobs'").fetchone()
    conn.execute(create.replace("CREATE TABLE jobs", "CREATE TABLE jobs_v2", 1).replace(
        "id TEXT NOT NULL UNIQUE", "id TEXT NOT NULL", 1))
    conn.execute("INSERT INTO jobs_v2 SELECT * FROM jobs")
    conn.execute("DROP TABLE jobs")
    conn.execute("ALTER TABLE jobs_v2 RENAME TO jobs")
    (legacy,) = conn.execute("SELECT max(seq) FROM jobs").fetchone()
    if legacy:
        conn.execute(f"CREATE INDEX jobs_legacy_id ON jobs(id) WHERE seq <= {int(legacy)}")
        conn.execute("INSERT INTO meta(key, value) VALUES('legacy_id_max_seq', ?)", (str(int(legacy)),))


#: version -> statements that bring a database from version-1 to version.
MIGRATIONS: dict[int, list[str | Callable[[sqlite3.Connection], None]]] = {
    1: [
        """CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            task TEXT NOT NULL,
            queue TEXT NOT NULL,
            priority INTEGER NOT NULL,
            state TEXT NOT NULL,
            payload BLOB,
            attempts INTEGER NOT NULL,
            failures INTEGER NOT NULL,
            worker_losses INTEGER NOT NULL,
            max_attempts INTEGER NOT NULL,
            timeout REAL,
            run_at REAL,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            worker TEXT,
            result BLOB,
            error BLOB,
            progress BLOB,
            idempotency_key TEXT,
            dead_reason TEXT,
            owner TEXT
        )""",
        "CREATE TABLE tasks (name TEXT PRIMARY KEY)",
        "CREATE TABLE paused_queues (name TEXT PRIMARY KEY)",
    ],
    # Ids became a keyed permutation of seq (JobIds): the UNIQUE index on id goes, which
    # makes every insert cheaper. Rows from version 1 keep random ids, found through a
    # partial index that covers only them.
    2: [_drop_id_index],
}


UNFINISHED = (JobState.QUEUED.value, JobState.SCHEDULED.value, JobState.RUNNING.value)
TERMINAL = (JobState.COMPLETED.value, JobState.DEAD.value, JobState.CANCELLED.value)
SYNC_MODES = ("full", "normal", "off")

_dumps = orjson.dumps
_loads = orjson.loads

#: What recovery reads of a never-run job. sqlite3 pays per column, and in a backlog the
#: columns that repeat (task, queue, state, attempts allowed, key, owner) come as one JSON
#: "shape" that is parsed once per distinct value: 8 columns instead of 13, a third faster.
#: timeout and run_at stay columns: SQLite's JSON would round a REAL to 15 digits.
_FRESH_SELECT = (
    "seq, id, priority, payload, created_at, timeout, run_at, "
    "json_array(task, queue, state, max_attempts, idempotency_key, owner)"
)


class _FreshRows:
    """Builds never-run jobs from _FRESH_SELECT rows, every field by position (half the cost
    of keywords on a million rows); trioq.job.FIELD_ORDER guards the order."""

    MAX_SHAPES = 10_000  # distinct shapes remembered; keys make every shape distinct

    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}
        #: the last created_at read: the jobs of one SUBMIT share one, and so one float object
        #: (24 bytes a job, 24 MB a million)
        self.created_at: float | None = None

    def _shape(self, text: str) -> tuple:
        task, queue, state, max_attempts, key, owner = _loads(text)
        shape = (shared_name(task), shared_name(queue), STATE_BY_VALUE[state], max_attempts, key, owner)
        if len(self.shapes) < self.MAX_SHAPES:
            self.shapes[text] = shape
        return shape

    def job(self, r: Sequence[Any]) -> Job:
        task, queue, state, max_attempts, key, owner = self.shapes.get(r[7]) or self._shape(r[7])
        payload = r[3]
        created_at = r[4]
        if created_at == self.created_at:
            created_at = self.created_at
        else:
            self.created_at = created_at
        return Job(
            r[1], r[0], task, EMPTY_PAYLOAD if payload == b"{}" else _loads(payload) if payload is not None else None,
            r[2], queue, state, 0, 0, 0, max_attempts, r[5], r[6], created_at,
            None, None, None, None, None, None, key, None, owner,
        )


@contextmanager
def _transaction(w: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[None]:
    """BEGIN ... COMMIT, rolled back on any error (the connection is in autocommit mode)."""
    w.execute(begin)
    try:
        yield
        w.execute("COMMIT")
    except BaseException:
        if w.in_transaction:
            w.execute("ROLLBACK")
        raise


def _add_tasks(w: sqlite3.Connection, tasks: Sequence[str]) -> None:
    if tasks:
        w.executemany("INSERT OR IGNORE INTO tasks(name) VALUES (?)", [(t,) for t in tasks])


def _text_bytes(rows: Sequence[tuple]) -> int:
    """About how many bytes of text and blobs the rows carry."""
    return sum(len(v) for r in rows for v in r if type(v) is bytes or type(v) is str)


class _SnapshotBacklog(Backlog):
    """Reads through connections of its own that hold one read transaction each from open to
    close: SQLite's WAL keeps that snapshot for them, whatever the broker commits meanwhile.
    Two, opened before the broker writes anything (so they see the same journal): the counts
    are read on one while the jobs are read on the other."""

    def __init__(self, store: SQLiteStore, end: int) -> None:
        self.end = end
        self._fresh = _FreshRows()
        self._store = store
        self._conn = self._snapshot(store)
        self._counting = self._snapshot(store)

    @staticmethod
    def _snapshot(store: SQLiteStore) -> sqlite3.Connection:
        conn = store._connect()
        conn.execute("BEGIN")
        conn.execute("SELECT count(*) FROM meta").fetchone()  # the snapshot starts at a read
        return conn

    def summary_sync(self) -> list[tuple[str, str, int, int, int]]:
        return self._conn.execute(
            "SELECT queue, task, priority, count(*), max(seq) FROM jobs WHERE state IN (?, ?, ?) "
            "GROUP BY queue, task, priority",
            UNFINISHED,
        ).fetchall()

    def chunk_sync(self, after: int, limit: int) -> list[Job]:
        return self._store._unfinished(self._conn, after, limit, self._fresh)

    def counts_sync(self) -> dict[str, dict[str, int]]:
        return _counts(self._counting)

    def close_sync(self) -> None:
        self._conn.close()
        self._counting.close()


def _counts(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for task, state, n in conn.execute("SELECT task, state, count(*) FROM jobs GROUP BY task, state"):
        out.setdefault(task, {})[state] = n
    return out


def _corrupt_job(r: Sequence[Any], exc: Exception) -> Job:
    """A row no job can be read from (a value that is not JSON, an unknown state): the job is
    dead, says why, and cannot be retried. Journaled dead, its row keeps every column the
    error does not replace (the payload as it was), for whoever repairs it; the broker serves
    on. A row that is final already keeps its state (a completed job whose result is bad)."""

    def plain(i: int, kind: type | tuple[type, ...], default: Any) -> Any:
        v = r[i]
        return v if isinstance(v, kind) and not isinstance(v, bool) else default

    state = STATE_BY_VALUE.get(r[5])
    final = state is not None and state.terminal
    return Job(
        seq=r[0], id=str(r[1]), task=str(r[2]), queue=str(r[3]), priority=plain(4, int, DEFAULT_PRIORITY),
        state=state if final else JobState.DEAD, payload=None, attempts=plain(7, int, 0), failures=plain(8, int, 0),
        worker_losses=plain(9, int, 0), max_attempts=plain(10, int, 1), created_at=plain(13, (int, float), 0.0),
        started_at=plain(14, (int, float), None), finished_at=plain(15, (int, float), None),
        error=ErrorInfo("CorruptRow", f"its journal row cannot be read ({type(exc).__name__}: {exc})", "", False),
        idempotency_key=None, dead_reason=CORRUPT_ROW if not final or r[5] == JobState.DEAD.value else None,
        owner=plain(22, str, None),
    )


class SQLiteStore(Store):
    inline = False
    #: Batches of at least this many rows are written as one JSON value (_json_batch).
    json_batch_rows = 64
    #: commit_nowait commits on the loop up to this many rows, while small commits have
    #: been taking no longer than inline_max_seconds (a moving average).
    inline_max_rows = 16
    inline_max_seconds = 0.002
    #: ... and whose text and blobs come to no more than this.
    inline_max_bytes = 256 * 1024
    #: The WAL is checkpointed (from a thread) after this many commits or rows, whichever
    #: comes first: about what SQLite's default of 4,000 pages held.
    checkpoint_commits = 1_000
    checkpoint_rows = 40_000
    #: At open the WAL file is grown to this size with zeros (see _presize_wal); 0: never.
    wal_presize_bytes = 8 * 2**20
    durable = True

    def __init__(self, path: str | Path, *, synchronous: str = "full") -> None:
        if synchronous not in SYNC_MODES:
            raise ValueError(f"synchronous must be one of {SYNC_MODES}, not {synchronous!r}")
        self.path = str(path)
        self.synchronous = synchronous
        self.durable = synchronous == "full"
        self.description = f"sqlite {self.path} (WAL, synchronous={synchronous.upper()})"
        self._w: sqlite3.Connection | None = None
        self._r: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._wlock = threading.Lock()  # the write connection is used from worker threads
        self._small_commit_seconds = 0.0
        self._unchecked_commits = 0
        self._unchecked_rows = 0
        self.checkpoints = 0
        cols = ", ".join(_COLUMNS)
        marks = ", ".join("?" * len(_COLUMNS))
        updates = ", ".join(f"{c}=excluded.{c}" for c in _COLUMNS if c not in _IMMUTABLE)
        self._upsert = (
            f"INSERT INTO jobs ({cols}) VALUES ({marks}) ON CONFLICT(seq) DO UPDATE SET {updates}"
        )
        self._insert = f"INSERT INTO jobs ({cols}) VALUES ({marks})"
        # A new job has most columns at their defaults: binding fewer parameters makes an
        # insert more than twice as fast (sqlite3 pays per bound value).
        self._insert_new = (
            f"INSERT INTO jobs ({', '.join(_NEW_COLUMNS)}, attempts, failures, worker_losses) "
            f"VALUES ({', '.join('?' * len(_NEW_COLUMNS))}, 0, 0, 0)"
        )
        self._update = "UPDATE jobs SET {} WHERE seq=?".format(
            ", ".join(f"{c}=?" for c in _MUTABLE)
        )
        self._update_first = "UPDATE jobs SET {} WHERE seq=?".format(
            ", ".join(f"{c}=?" for c in _FIRST_ATTEMPT_COLUMNS)
        )
        # The same two statements for a whole batch bound as one JSON text (see _json_batch).
        self._insert_new_json = (
            f"INSERT INTO jobs ({', '.join(_NEW_COLUMNS)}, attempts, failures, worker_losses) "
            f"SELECT {', '.join(_json_columns(_NEW_COLUMNS, 'value'))}, 0, 0, 0 FROM json_each(?)"
        )
        *first, seq = _json_columns((*_FIRST_ATTEMPT_COLUMNS, "seq"), "v.value")
        self._update_first_json = "UPDATE jobs SET {} FROM json_each(?) AS v WHERE jobs.seq = {}".format(
            ", ".join(f"{c}={e}" for c, e in zip(_FIRST_ATTEMPT_COLUMNS, first, strict=True)), seq,
        )

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    # --- lifecycle ----------------------------------------------------------------

    def open_sync(self, *, load: bool = True) -> Recovered:
        if self.path != ":memory:":
            path = Path(self.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                # Payloads and results are plain JSON in here: readable by the broker's user only.
                # SQLite gives the -wal and -shm files the same mode as the database.
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        w = self._w = self._connect()
        # Checkpoints are run by _note_writes, from a thread: left to SQLite, the commit that
        # crossed the threshold ran one, and that could be a small commit on the event loop.
        w.execute("PRAGMA wal_autocheckpoint=0")
        self._migrate(w)
        self._presize_wal()
        self.job_ids = JobIds(self._id_key(w))
        (legacy,) = w.execute("SELECT value FROM meta WHERE key='legacy_id_max_seq'").fetchone() or (0,)
        self._legacy_max_seq = int(legacy)
        self._r = self._connect() if self.path != ":memory:" else w
        (max_seq,) = w.execute("SELECT max(seq) FROM jobs").fetchone()
        end = (max_seq or 0) + 1
        backlog = None
        if load or self.path == ":memory:":
            jobs = self._unfinished(w)
        else:
            jobs = []
            backlog = _SnapshotBacklog(self, end)
        tasks = [r[0] for r in w.execute("SELECT name FROM tasks ORDER BY name")]
        paused = [r[0] for r in w.execute("SELECT name FROM paused_queues ORDER BY name")]
        return Recovered(jobs, end, tasks, paused, self.job_ids, backlog)

    #: How long growing the WAL at open waits for another connection's write lock before it
    #: gives up (it is an optimisation: the broker starts either way).
    wal_presize_wait = 1.0

    def _presize_wal(self) -> None:
        """Grow the WAL file once, so that commits overwrite it instead of extending it.

        SQLite writes a WAL from its start again after each checkpoint, and never shrinks it
        (no journal_size_limit), so only the first checkpoint cycle after a start extends the
        file; but a commit that extends it waits for a journal flush of the file's new size
        besides its data (small FULL commits here, `benchmarks.floor`: 0.53-0.81 ms extending, 0.26-0.37 ms
        overwriting). Zeros past the end are safe: SQLite reads a WAL frame by frame and stops
        at the first whose header and checksum do not match, which a zero frame never does
        (the stale frames it leaves behind itself after a checkpoint are the same case).
        """
        if self.path == ":memory:" or self.wal_presize_bytes <= 0 or not hasattr(os, "pwrite"):
            return
        w = self._w
        assert w is not None
        # Under the WAL's write lock: no other connection, in this process or another, can
        # append a frame past the end measured here while the zeros go in.
        (busy_ms,) = w.execute("PRAGMA busy_timeout").fetchone()
        w.execute(f"PRAGMA busy_timeout={int(self.wal_presize_wait * 1000)}")
        try:
            with _transaction(w, "BEGIN IMMEDIATE"):
                (page_size,) = w.execute("PRAGMA page_size").fetchone()
                self._grow_wal(os.path.realpath(self.path) + "-wal", page_size)
        except sqlite3.OperationalError as exc:  # busy elsewhere, or read-only: start anyway
            log.warning("did not grow the WAL file: %s", exc)
        finally:
            w.execute(f"PRAGMA busy_timeout={busy_ms}")

    def _grow_wal(self, wal: str, page_size: int) -> None:
        try:
            fd = os.open(wal, os.O_WRONLY)
        except OSError as exc:  # no WAL after all, or not ours to write: nothing to grow
            log.warning("could not open the WAL file to grow it: %r", exc)
            return
        try:
            start = end = os.fstat(fd).st_size
            if end and (end - _WAL_HEADER) % (page_size + _WAL_FRAME_HEADER):
                # A frame torn by a crash while the file grew: zeros could complete it into a
                # valid frame of a commit nobody was told of. Left as SQLite wrote it.
                return
            zeros = bytes(min(1 << 20, self.wal_presize_bytes))
            try:
                while end < self.wal_presize_bytes:
                    end += os.pwrite(fd, zeros[: self.wal_presize_bytes - end], end)
                os.fsync(fd)
            except OSError as exc:  # a full disk: give the space back, the commits need it more
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                log.warning("could not grow the WAL file to %d bytes: %r", self.wal_presize_bytes, exc)
        finally:
            os.close(fd)

    def _unfinished(
        self, w: sqlite3.Connection, after: int = 0, limit: int = -1, fresh_rows: _FreshRows | None = None,
    ) -> list[Job]:
        """Unfinished jobs in seq order after ``after``, for the dispatcher's lines.

        One scan: most of them were never run and are read with the few columns of
        _FRESH_SELECT; the rare others are flagged and read again in full by seq.
        """
        fresh = (fresh_rows or _FreshRows()).job
        jobs: list[Job] = []
        used: list[tuple[int, int]] = []  # positions in jobs, and seqs, of rows that are not pristine
        # Row by row, not fetchall(): a million rows held at once would stay in the process's
        # memory long after they are freed.
        for r in w.execute(
            f"SELECT {_FRESH_SELECT}, {_PRISTINE} FROM jobs WHERE state IN (?, ?, ?) AND seq > ? ORDER BY seq LIMIT ?",
            (*UNFINISHED, after, limit),
        ):
            if r[8]:
                try:
                    jobs.append(fresh(r))
                    continue
                except Exception:  # read again in full: _job says what is wrong with it
                    pass
            used.append((len(jobs), r[0]))
            jobs.append(None)  # type: ignore[arg-type]  # replaced below
        for i, seq in used:
            row = w.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE seq=?", (seq,)).fetchone()
            job = jobs[i] = self._job(row)
            if job.state is JobState.DEAD:  # it was unfinished: a row that cannot be read
                assert job.error is not None
                log.error(
                    "journal row seq %s (job %s): %s: the job is marked dead (%s)",
                    seq, job.id, job.error.message, CORRUPT_ROW,
                )
        return jobs

    @staticmethod
    def _id_key(conn: sqlite3.Connection) -> bytes:
        """The database's job id key: made once, kept for the life of the file."""
        row = conn.execute("SELECT value FROM meta WHERE key='job_id_key'").fetchone()
        if row is not None:
            return bytes.fromhex(row[0])
        key = JobIds.new_key()
        conn.execute("INSERT INTO meta(key, value) VALUES('job_id_key', ?)", (key.hex(),))
        return key

    def _where_id(self, job_id: str) -> list[tuple[str, tuple]]:
        """WHERE clauses that find a job by id without an index on ids."""
        out: list[tuple[str, tuple]] = []
        seq = self.job_ids.seq_of(job_id)
        if seq is not None:
            out.append(("seq=? AND id=?", (seq, job_id)))
        if self._legacy_max_seq:  # a literal, so SQLite uses the partial index
            out.append((f"id=? AND seq <= {self._legacy_max_seq}", (job_id,)))
        return out

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        current = int(row[0]) if row else 0
        if current > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {current}; this trioq knows up to {SCHEMA_VERSION}"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            with _transaction(conn, "BEGIN IMMEDIATE"):
                for stmt in MIGRATIONS[version]:
                    if callable(stmt):
                        stmt(conn)
                    else:
                        conn.execute(stmt)
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES('schema_version', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    (str(version),),
                )

    def close_sync(self) -> None:
        for conn in {id(c): c for c in (self._r, self._w) if c is not None}.values():
            conn.close()
        self._w = self._r = None

    # --- writes ---------------------------------------------------------------------

    def row(self, job: Job) -> tuple:
        err = job.error
        prog = job.progress
        return (
            job.seq, job.id, job.task, job.queue, job.priority, job.state,
            _dumps(job.payload), job.attempts, job.failures, job.worker_losses,
            job.max_attempts, job.timeout, job.run_at, job.created_at, job.started_at,
            job.finished_at, job.worker,
            None if job.result is None else _dumps(job.result),
            None if err is None else _dumps((err.type, err.message, err.traceback, err.retryable)),
            None if prog is None else _dumps((prog.value, prog.message)),
            job.idempotency_key, job.dead_reason, job.owner,
        )

    def insert_row(self, job: Job) -> tuple:
        if (
            job.attempts or job.failures or job.worker_losses or job.started_at is not None
            or job.finished_at is not None or job.worker is not None or job.result is not None
            or job.error is not None or job.progress is not None or job.dead_reason is not None
        ):
            return self.row(job)  # it moved on before its first commit: the whole row
        return (
            job.seq, job.id, job.task, job.queue, job.priority, job.state, _dumps(job.payload),
            job.max_attempts, job.timeout, job.run_at, job.created_at, job.idempotency_key, job.owner,
        )

    def update_row(self, job: Job) -> tuple:
        err = job.error
        prog = job.progress
        if (
            job.attempts == 1 and not job.failures and not job.worker_losses and err is None
            and job.dead_reason is None and job.state is not JobState.QUEUED
        ):
            # A first attempt that has not failed: the columns left out still hold what the
            # insert wrote, so fewer values are bound (the common case of a job finishing).
            # Not a job back in line after one attempt (a retry by request): its row still
            # holds that attempt's failure, which the full form clears.
            return (
                job.state, job.attempts, job.started_at, job.finished_at, job.worker,
                None if job.result is None else _dumps(job.result),
                job.run_at, None if prog is None else _dumps((prog.value, prog.message)), job.seq,
            )
        if not job.state.terminal:
            # A job back in line (requeued, retried, due again) or on a later attempt: its row
            # is written whole, as an upsert. A retry answered 'busy' while the store was failing
            # is committed later; a purge in between may have deleted the dead row it replaces.
            return self.row(job)
        return (
            job.state, job.attempts, job.failures, job.worker_losses, job.max_attempts,
            job.timeout, job.run_at, job.started_at, job.finished_at, job.worker,
            None if job.result is None else _dumps(job.result),
            None if err is None else _dumps((err.type, err.message, err.traceback, err.retryable)),
            None if prog is None else _dumps((prog.value, prog.message)),
            job.dead_reason, job.seq,
        )

    def commit_sync(self, inserts: Sequence[tuple], updates: Sequence[tuple], tasks: Sequence[str] = ()) -> None:
        with self._wlock:
            self._commit_locked(inserts, updates, tasks)
            self._note_writes(len(inserts) + len(updates))

    def _note_writes(self, rows: int, *, may_checkpoint: bool = True) -> None:
        """Count what went into the WAL since its last checkpoint; run one when due (never on
        the event loop: commit_nowait passes may_checkpoint=False and refuses while one is due)."""
        self._unchecked_commits += 1
        self._unchecked_rows += rows
        if may_checkpoint and self._checkpoint_due():
            assert self._w is not None
            self._w.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._unchecked_commits = self._unchecked_rows = 0
            self.checkpoints += 1

    def _checkpoint_due(self) -> bool:
        return self._unchecked_commits >= self.checkpoint_commits or self._unchecked_rows >= self.checkpoint_rows

    def commit_nowait(self, inserts: Sequence[tuple], updates: Sequence[tuple], tasks: Sequence[str] = ()) -> bool:
        """A small commit runs on the event loop while small commits are quick here.

        Handing a commit of a row or two to a thread and back costs more than the commit
        itself on a fast disk (two thread wake-ups, three turns of the scheduler): it is
        most of an idle job's latency. A slow disk, or a purge holding the write
        connection, sends every commit back to a thread.
        """
        if (
            len(inserts) + len(updates) > self.inline_max_rows
            or self._small_commit_seconds > self.inline_max_seconds
            or self._checkpoint_due()
            or _text_bytes(inserts) + _text_bytes(updates) > self.inline_max_bytes
        ):
            return False
        if not self._wlock.acquire(blocking=False):
            return False
        try:
            self._commit_locked(inserts, updates, tasks)
            self._note_writes(len(inserts) + len(updates), may_checkpoint=False)
        finally:
            self._wlock.release()
        return True

    def _commit_locked(self, inserts: Sequence[tuple], updates: Sequence[tuple], tasks: Sequence[str]) -> None:
        w = self._w
        assert w is not None, "store is not open"
        small = len(inserts) + len(updates) <= self.inline_max_rows
        started = time.perf_counter() if small else 0.0
        with _transaction(w):
            if inserts:
                n_new = len(_NEW_COLUMNS)
                fresh = [r for r in inserts if len(r) == n_new]
                if fresh:
                    self._write_many(w, self._insert_new, self._insert_new_json, fresh)
                if len(fresh) < len(inserts):
                    w.executemany(self._insert, [r for r in inserts if len(r) != n_new])
            if updates:
                n_first = len(_FIRST_ATTEMPT_COLUMNS) + 1
                first = [r for r in updates if len(r) == n_first]
                if first:
                    self._write_many(w, self._update_first, self._update_first_json, first)
                if len(first) < len(updates):
                    n_all = len(_COLUMNS)
                    whole = [r for r in updates if len(r) == n_all]
                    if whole:
                        w.executemany(self._upsert, whole)
                    if len(first) + len(whole) < len(updates):
                        w.executemany(self._update, [r for r in updates if len(r) != n_first and len(r) != n_all])
            _add_tasks(w, tasks)
        if small:
            # Recent small commits, whichever thread ran them: what one would cost the loop now.
            self._small_commit_seconds += (time.perf_counter() - started - self._small_commit_seconds) / 8

    def _write_many(self, w: sqlite3.Connection, sql: str, json_sql: str, rows: Sequence[tuple]) -> None:
        if len(rows) >= self.json_batch_rows:
            try:
                batch = _json_batch(rows)
            except (TypeError, orjson.JSONEncodeError):  # pragma: no cover - rows hold JSON types
                pass
            else:
                # SQLite's JSON functions cut a string at an escaped NUL; sqlite3's binding does not.
                if "\\u0000" not in batch:
                    w.execute(json_sql, (batch,))
                    return
        w.executemany(sql, rows)

    def write_sync(self, rows: Sequence[tuple], tasks: Sequence[str] = ()) -> None:
        w = self._w
        assert w is not None, "store is not open"
        with self._wlock:
            with _transaction(w):
                w.executemany(self._upsert, rows)
                _add_tasks(w, tasks)
            self._note_writes(len(rows))

    def set_paused_sync(self, queue: str, paused: bool) -> None:
        w = self._w
        assert w is not None
        with self._wlock:
            if paused:
                w.execute("INSERT OR IGNORE INTO paused_queues(name) VALUES (?)", (queue,))
            else:
                w.execute("DELETE FROM paused_queues WHERE name=?", (queue,))

    def delete_sync(self, job_id: str) -> bool:
        w = self._w
        assert w is not None
        with self._wlock:
            return any(
                w.execute(f"DELETE FROM jobs WHERE {where}", params).rowcount > 0
                for where, params in self._where_id(job_id)
            )

    def purge_counted_sync(self, finished_before: float, limit: int = 10_000) -> dict[tuple[str, str], int]:
        w = self._w
        assert w is not None
        with self._wlock:
            with _transaction(w, "BEGIN IMMEDIATE"):
                rows = w.execute(
                    "SELECT seq, task, state FROM jobs WHERE finished_at < ? AND state IN (?, ?, ?) LIMIT ?",
                    (finished_before, *TERMINAL, limit),
                ).fetchall()
                if rows:
                    w.executemany("DELETE FROM jobs WHERE seq=?", [(r[0],) for r in rows])
            self._note_writes(len(rows))
        counts: dict[tuple[str, str], int] = {}
        for _, task, state in rows:
            counts[task, state] = counts.get((task, state), 0) + 1
        return counts

    # --- reads ----------------------------------------------------------------------

    @staticmethod
    def _job(r: Sequence[Any]) -> Job:
        try:
            return SQLiteStore._whole_job(r)
        except Exception as exc:
            return _corrupt_job(r, exc)

    @staticmethod
    def _whole_job(r: Sequence[Any]) -> Job:
        err = _loads(r[18]) if r[18] is not None else None
        prog = _loads(r[19]) if r[19] is not None else None
        payload = r[6]
        return Job(
            seq=r[0], id=r[1], task=shared_name(r[2]), queue=shared_name(r[3]), priority=r[4],
            state=STATE_BY_VALUE[r[5]],
            payload=EMPTY_PAYLOAD if payload == b"{}" else _loads(payload) if payload is not None else None,
            attempts=r[7], failures=r[8], worker_losses=r[9], max_attempts=r[10],
            timeout=r[11], run_at=r[12], created_at=r[13], started_at=r[14],
            finished_at=r[15], worker=r[16],
            result=_loads(r[17]) if r[17] is not None else None,
            error=ErrorInfo(*err) if err is not None else None,
            progress=Progress(*prog) if prog is not None else None,
            idempotency_key=r[20], dead_reason=r[21], owner=r[22],
        )

    def _read(self, sql: str, params: Sequence[Any]) -> list[tuple]:
        r = self._r
        assert r is not None, "store is not open"
        with self._read_lock:
            return r.execute(sql, params).fetchall()

    def get_sync(self, job_id: str) -> Job | None:
        for where, params in self._where_id(job_id):
            rows = self._read(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE {where}", params)
            if rows:
                return self._job(rows[0])
        return None

    def list_sync(self, *, state=None, queue=None, task=None, limit=50, before_seq=None, owner=None) -> JobPage:
        where, params = [], []
        if owner is not None:
            where.append("owner=?")
            params.append(owner)
        if state is not None:
            where.append("state=?")
            params.append(JobState(state).value)
        if queue is not None:
            where.append("queue=?")
            params.append(queue)
        if task is not None:
            where.append("task=?")
            params.append(task)
        if before_seq is not None:
            where.append("seq<?")
            params.append(before_seq)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._read(
            f"SELECT {', '.join(_COLUMNS)} FROM jobs {clause} ORDER BY seq DESC LIMIT ?",
            (*params, limit + 1),
        )
        jobs = [self._job(r) for r in rows[:limit]]
        return JobPage(jobs, jobs[-1].seq if len(rows) > limit else None)

    def counts_sync(self) -> dict[str, dict[str, int]]:
        assert self._r is not None, "store is not open"
        with self._read_lock:
            return _counts(self._r)
