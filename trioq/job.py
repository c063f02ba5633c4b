"""The job model shared by every layer: what a job is, its states and its limits."""

from __future__ import annotations

import enum
import re
import secrets
from typing import Any

import attrs

#: 1 is the most urgent priority, as in the system trioq replaces.
MIN_PRIORITY = 1
MAX_PRIORITY = 10
DEFAULT_PRIORITY = 5
DEFAULT_QUEUE = "default"
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_MAX_WORKER_LOSSES = 5

#: The demo tasks every worker has, kept from the system trioq replaces (plus noop).
#: Task and queue names: they go into logs, metrics labels and the store unescaped.
NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,200}\Z")  # \Z: no trailing newline

def is_printable_name(name: str, longest: int = 200) -> bool:
    """A name that goes into logs and job owners as it is: 1-``longest`` printable characters
    (no newline to forge a log line with)."""
    return 0 < len(name) <= longest and name.isprintable()


BUILTIN_TASKS = ("reverse_string", "to_uppercase", "fibonacci", "is_prime", "slow_task", "noop")


class JobState(enum.StrEnum):
    QUEUED = "queued"
    SCHEDULED = "scheduled"  # waiting for run_at (a delay, or a retry's backoff)
    RUNNING = "running"
    COMPLETED = "completed"
    DEAD = "dead"  # failed for good: out of attempts, not retryable, or worker_lost
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.COMPLETED, JobState.DEAD, JobState.CANCELLED})
STATE_BY_VALUE = {s.value: s for s in JobState}  # faster than JobState(value) on a million rows

#: Shared by every job whose payload is ``{}``. Nothing in trioq mutates a payload.
EMPTY_PAYLOAD: dict[str, Any] = {}
_NAMES: dict[str, str] = {}
_MAX_NAMES = 65_536


def shared_name(name: str) -> str:
    """One string object per task or queue name, so a million queued jobs share a handful."""
    got = _NAMES.get(name)
    if got is None:
        if len(_NAMES) >= _MAX_NAMES:
            return name
        got = _NAMES[name] = name
    return got


_M64 = (1 << 64) - 1


class JobIds:
    """Job ids as a keyed permutation of the job's sequence number.

    An id is 16 hex digits that look random (consecutive jobs share no visible pattern), yet
    map back to the sequence number, which is the store's primary key: the store needs no
    second index on ids, and two jobs can never get the same id. Ids are names, not secrets:
    who may read or change a job is decided by tokens and roles, not by knowing its id.
    """

    __slots__ = ("_inv1", "_inv2", "_k1", "_k2", "_k3")

    def __init__(self, key: bytes) -> None:
        if len(key) < 24:
            raise ValueError("a job id key needs at least 24 bytes")
        # Two odd multipliers (invertible mod 2**64) and a mask, around splitmix64's mixing.
        self._k1 = int.from_bytes(key[0:8], "big") | 1
        self._k2 = int.from_bytes(key[8:16], "big") | 1
        self._k3 = int.from_bytes(key[16:24], "big")
        self._inv1 = pow(self._k1, -1, 1 << 64)
        self._inv2 = pow(self._k2, -1, 1 << 64)

    @staticmethod
    def new_key() -> bytes:
        return secrets.token_bytes(24)

    def make(self, first_seq: int, n: int) -> list[str]:
        """Ids of the n jobs whose sequence numbers start at first_seq."""
        k1, k2, k3 = self._k1, self._k2, self._k3
        out = []
        append = out.append
        for x in range(first_seq, first_seq + n):
            x = (x * k1) & _M64
            x ^= x >> 29
            x = (x * k2) & _M64
            x ^= x >> 32
            append(f"{x ^ k3:016x}")
        return out

    def seq_of(self, job_id: str) -> int | None:
        """The sequence number an id stands for, or None if it is not one of ours."""
        if len(job_id) != 16:
            return None
        try:
            x = int(job_id, 16)
        except ValueError:
            return None
        if f"{x:016x}" != job_id:  # upper case, signs, underscores: not an id we made
            return None
        x ^= self._k3
        x ^= x >> 32
        x = (x * self._inv2) & _M64
        y = x
        x = y ^ (y >> 29)
        x = y ^ (x >> 29)  # two steps undo a right xorshift by 29 on 64 bits
        x = (x * self._inv1) & _M64
        return x if 0 < x < 1 << 62 else None


@attrs.define(slots=True)
class ErrorInfo:
    type: str
    message: str
    traceback: str = ""
    retryable: bool = True


@attrs.define(slots=True)
class Progress:
    value: float
    message: str = ""


@attrs.define(slots=True)
class JobSpec:
    """What a producer asks for; the broker turns it into a Job."""

    task: str
    payload: Any = attrs.field(factory=dict)
    priority: int = DEFAULT_PRIORITY
    queue: str = DEFAULT_QUEUE
    delay: float | None = None
    run_at: float | None = None
    max_attempts: int | None = None
    timeout: float | None = None
    idempotency_key: str | None = None


@attrs.define(slots=True, eq=False)
class Job:
    """One unit of work and everything the queue knows about it.

    ``seq`` is assigned once, at acceptance, and never changes: (priority, seq)
    is the job's place in line, also after a requeue.
    """

    id: str
    seq: int
    task: str
    payload: Any
    priority: int = DEFAULT_PRIORITY
    queue: str = DEFAULT_QUEUE
    state: JobState = JobState.QUEUED
    attempts: int = 0  # deliveries so far; the current delivery's number
    failures: int = 0  # executions that ended in a task error
    worker_losses: int = 0  # executions whose worker was lost under it
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout: float | None = None
    run_at: float | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    result: Any = None
    error: ErrorInfo | None = None
    progress: Progress | None = None
    idempotency_key: str | None = None
    dead_reason: str | None = None
    owner: str | None = None  # the credential name that submitted it, when tokens are on

    @property
    def key(self) -> tuple[int, int]:
        return (self.priority, self.seq)


#: Job's fields in order. The hot paths (a SUBMIT's jobs, a restart's million) pass every field by
#: position, which halves the cost of building a job; this guards them against a reordering.
FIELD_ORDER = (
    "id", "seq", "task", "payload", "priority", "queue", "state", "attempts", "failures", "worker_losses",
    "max_attempts", "timeout", "run_at", "created_at", "started_at", "finished_at", "worker", "result",
    "error", "progress", "idempotency_key", "dead_reason", "owner",
)
if tuple(f.name for f in attrs.fields(Job)) != FIELD_ORDER:  # pragma: no cover - a programming error
    raise ImportError("Job's fields changed: update FIELD_ORDER and every positional Job(...)")
