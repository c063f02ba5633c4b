"""What the broker has done, counted as it happens: Prometheus metrics and a time series.

One ``Metrics`` per broker (``metrics_for``), fed by the broker's observer hooks,
which run synchronously in the task that made the change:

* ``("submitted", jobs)``: accepted jobs, right after their commit;
* ``("changed", jobs)``: jobs the dispatcher just changed, in order, before any
  later change (completions and failures are read here, exactly once each);
* ``("requeued", jobs)``: jobs handed back by a lost, released or expired lease;
* and the dispatcher's ``on_dispatch`` hook: jobs pushed to a worker.

The per-task counters therefore add up to the dispatcher's own totals (the ones
``Broker.stats`` reports), except for work done before the metrics were
installed (jobs requeued while recovering at start, for instance).
"""

from __future__ import annotations

import bisect
import logging
import math
import random
import weakref
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..job import Job, JobState

if TYPE_CHECKING:
    from ..broker.dispatcher import WorkerSlot
    from ..broker.server import Broker

log = logging.getLogger("trioq.http")

#: seconds of per-second history kept for /api/timeseries
WINDOW = 600
#: latency samples kept per second for the percentiles (reservoir sampling)
SAMPLES_PER_SECOND = 1024

DISPATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
RUN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """A Prometheus histogram: cumulative buckets, a sum and a count."""

    __slots__ = ("bounds", "counts", "count", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        if not math.isfinite(value):
            return
        value = max(0.0, value)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value


class _Second:
    __slots__ = ("t", "submitted", "completed", "failed", "latencies", "seen")

    def __init__(self, t: int) -> None:
        self.t = t
        self.submitted = 0
        self.completed = 0
        self.failed = 0
        self.latencies: list[float] = []
        self.seen = 0  # latencies offered (for reservoir sampling)

    def point(self) -> dict[str, Any]:
        p50 = p99 = None
        if self.latencies:
            lat = sorted(self.latencies)
            p50 = round(_percentile(lat, 0.50) * 1000.0, 3)
            p99 = round(_percentile(lat, 0.99) * 1000.0, 3)
        return {
            "t": self.t,
            "submitted": self.submitted,
            "completed": self.completed,
            "failed": self.failed,
            "latency_p50_ms": p50,
            "latency_p99_ms": p99,
        }


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted, non-empty list."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


class TimeSeries:
    """A ring of per-second buckets over the last ``window`` seconds."""

    def __init__(self, window: int = WINDOW, *, seed: int | None = None) -> None:
        self.window = window
        self._buckets: deque[_Second] = deque(maxlen=window)
        self._rng = random.Random(seed)

    def _bucket(self, now: float) -> _Second:
        t = int(math.floor(now))
        buckets = self._buckets
        if buckets and buckets[-1].t == t:
            return buckets[-1]
        if buckets and buckets[-1].t > t:  # a clock step backwards: count it in the newest second
            return buckets[-1]
        b = _Second(t)
        buckets.append(b)
        return b

    def add_submitted(self, now: float, n: int) -> None:
        self._bucket(now).submitted += n

    def add_failed(self, now: float, n: int = 1) -> None:
        self._bucket(now).failed += n

    def add_completed(self, now: float, latency: float | None) -> None:
        b = self._bucket(now)
        b.completed += 1
        if latency is None or not math.isfinite(latency):
            return
        b.seen += 1
        if len(b.latencies) < SAMPLES_PER_SECOND:
            b.latencies.append(latency)
        else:
            i = self._rng.randrange(b.seen)
            if i < SAMPLES_PER_SECOND:
                b.latencies[i] = latency

    def points(self, now: float, *, until: int | None = None) -> list[dict[str, Any]]:
        """Every second from the oldest kept (at most ``window`` back) to now, gaps as zeros."""
        end = int(math.floor(now)) if until is None else until
        start = end - self.window + 1
        by_t = {b.t: b for b in self._buckets if start <= b.t <= end}
        if not by_t:
            return []
        first = min(by_t)
        return [(by_t.get(t) or _Second(t)).point() for t in range(first, end + 1)]

    def point(self, t: int) -> dict[str, Any]:
        for b in reversed(self._buckets):
            if b.t == t:
                return b.point()
            if b.t < t:
                break
        return _Second(t).point()


class Metrics:
    """Per-task counters, latency histograms and the time series of one broker."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.submitted: dict[str, int] = {}
        self.completed: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.requeued: dict[str, int] = {}
        self.dispatch_latency = Histogram(DISPATCH_BUCKETS)
        self.run_time: dict[str, Histogram] = {}
        self.series = TimeSeries()
        self._errors = 0
        #: failures last seen per unfinished job that has failed at least once
        self._failures_seen: dict[str, int] = {}

    # --- feeding ------------------------------------------------------------------------

    def install(self) -> None:
        broker = self.broker
        d = broker.dispatcher
        self._seen(d.live.values())
        broker.observers.append(self._observe)
        previous = d.on_dispatch

        def on_dispatch(slot: WorkerSlot, jobs: list[Job]) -> None:
            if previous is not None:
                previous(slot, jobs)
            self._guard(self._dispatched, jobs)

        d.on_dispatch = on_dispatch

    def _observe(self, kind: str, data: Any) -> None:
        if kind == "changed":
            self._guard(self._changed, data)
        elif kind == "submitted":
            self._guard(self._submitted, data)
        elif kind == "requeued":
            self._guard(self._requeued, data)
        elif kind == "restored":  # loaded by a restart that serves meanwhile: seen, not new
            self._guard(self._seen, data)
        # ("job", job) after each commit: not needed here

    def _seen(self, jobs: Iterable[Job]) -> None:
        """Failures of jobs from before this broker (a restart): not counted as new."""
        for job in jobs:
            if job.failures:
                self._failures_seen[job.id] = job.failures

    def _guard(self, fn, jobs: Iterable[Job]) -> None:
        """The hooks run inside the dispatcher: a bug here must never stop it."""
        try:
            fn(jobs)
        except Exception:
            self._errors += 1
            if self._errors <= 3:
                log.exception("metrics hook failed (ignored)")

    def _submitted(self, jobs: Iterable[Job]) -> None:
        n = 0
        counts = self.submitted
        for job in jobs:
            counts[job.task] = counts.get(job.task, 0) + 1
            n += 1
        if n:
            self.series.add_submitted(self.broker.now(), n)

    def _dispatched(self, jobs: Iterable[Job]) -> None:
        hist = self.dispatch_latency
        for job in jobs:
            if job.started_at is not None:
                hist.observe(job.started_at - job.created_at)

    def _requeued(self, jobs: Iterable[Job]) -> None:
        counts = self.requeued
        for job in jobs:
            if job.state is not JobState.DEAD:  # dead after too many losses: not requeued
                counts[job.task] = counts.get(job.task, 0) + 1

    def _changed(self, jobs: Iterable[Job]) -> None:
        """Read completions and failures at the moment the dispatcher makes them.

        A job is journaled COMPLETED exactly once. ``failures`` only grows by
        one per task failure (and is reset by a retry request), so a failure is
        a change whose count is above the one last seen for that job.
        """
        now = None
        seen = self._failures_seen
        for job in jobs:
            state = job.state
            f = job.failures
            prev = seen.get(job.id, 0)
            if f > prev:
                now = self.broker.now() if now is None else now
                task = job.task
                self.failed[task] = self.failed.get(task, 0) + (f - prev)
                end = job.finished_at if job.finished_at is not None else now
                if job.started_at is not None:
                    self._run_hist(task).observe(end - job.started_at)
                self.series.add_failed(now, f - prev)
            if state is JobState.COMPLETED:
                now = self.broker.now() if now is None else now
                task = job.task
                self.completed[task] = self.completed.get(task, 0) + 1
                end = job.finished_at if job.finished_at is not None else now
                if job.started_at is not None:
                    self._run_hist(task).observe(end - job.started_at)
                self.series.add_completed(now, end - job.created_at)
            if f and not state.terminal:
                seen[job.id] = f
            elif prev:
                del seen[job.id]

    def _run_hist(self, task: str) -> Histogram:
        h = self.run_time.get(task)
        if h is None:
            h = self.run_time[task] = Histogram(RUN_BUCKETS)
        return h

    # --- reading ------------------------------------------------------------------------

    def timeseries(self) -> dict[str, Any]:
        return {"interval": 1, "points": self.series.points(self.broker.now())}

    def last_complete_point(self) -> dict[str, Any]:
        """The newest second that is over (its numbers are final)."""
        return self.series.point(int(math.floor(self.broker.now())) - 1)

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        broker = self.broker
        d = broker.dispatcher
        now = broker.now()
        out: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        for name, counts, help_ in (
            ("trioq_jobs_submitted_total", self.submitted, "Jobs accepted, by task."),
            ("trioq_jobs_completed_total", self.completed, "Jobs completed, by task."),
            ("trioq_jobs_failed_total", self.failed, "Task failures (retried or not), by task."),
            ("trioq_jobs_requeued_total", self.requeued, "Jobs put back in line after a lost, released or expired lease, by task."),
        ):
            family(name, "counter", help_)
            for task in sorted(counts):
                out.append(f'{name}{{task="{_label(task)}"}} {counts[task]}')

        depths: dict[tuple[str, int], int] = {}
        oldest: dict[tuple[str, int], float] = {}
        for job in d.live.values():
            state = job.state
            if state is JobState.QUEUED or state is JobState.SCHEDULED:
                key = (job.queue, job.priority)
                depths[key] = depths.get(key, 0) + 1
                if state is JobState.QUEUED:
                    c = oldest.get(key)
                    if c is None or job.created_at < c:
                        oldest[key] = job.created_at
        for key, n in d.unread_depths().items():  # a restart still loading the journal
            depths[key] = depths.get(key, 0) + n
        family("trioq_queue_depth", "gauge", "Jobs waiting (queued or scheduled), by queue and priority.")
        for (queue, prio), n in sorted(depths.items()):
            out.append(f'trioq_queue_depth{{queue="{_label(queue)}",priority="{prio}"}} {n}')
        family(
            "trioq_oldest_queued_job_age_seconds", "gauge",
            "Age of the oldest job ready to run, by queue and priority.",
        )
        for (queue, prio), created in sorted(oldest.items()):
            age = max(0.0, now - created)
            out.append(
                f'trioq_oldest_queued_job_age_seconds{{queue="{_label(queue)}",priority="{prio}"}} {_num(age)}'
            )

        family("trioq_restore_pending_jobs", "gauge",
               "Unfinished jobs of the journal a restart has not loaded yet (it serves meanwhile).")
        out.append(f"trioq_restore_pending_jobs {d.statistics().restoring}")

        statuses = {"idle": 0, "busy": 0, "quiet": 0, "stopping": 0}
        for slot in d.workers.values():
            statuses[slot.status] = statuses.get(slot.status, 0) + 1
        family("trioq_workers", "gauge", "Connected workers, by status.")
        for status, n in statuses.items():
            out.append(f'trioq_workers{{status="{status}"}} {n}')

        st = d.statistics()
        family("trioq_jobs", "gauge", "Unfinished jobs, by state.")
        for state, n in (("queued", st.queued), ("scheduled", st.scheduled), ("running", st.running)):
            out.append(f'trioq_jobs{{state="{state}"}} {n}')
        # Dead letters and cancellations, for alerts: counters since the broker started, and
        # the finished jobs kept (until --result-ttl purges them) by task and state.
        family("trioq_jobs_dead_total", "counter", "Jobs that failed for good (dead letters) since the broker started.")
        out.append(f"trioq_jobs_dead_total {st.dead}")
        family("trioq_jobs_cancelled_total", "counter", "Jobs cancelled since the broker started.")
        out.append(f"trioq_jobs_cancelled_total {st.cancelled}")
        family("trioq_finished_jobs", "gauge", "Finished jobs kept in the store, by task and state.")
        for (task, state), n in sorted(d.finished.items()):
            if n:
                out.append(f'trioq_finished_jobs{{task="{_label(task)}",state="{state}"}} {n}')

        family(
            "trioq_dispatch_latency_seconds", "histogram",
            "Time from a job's acceptance to its dispatch to a worker.",
        )
        _histogram(out, "trioq_dispatch_latency_seconds", "", self.dispatch_latency)
        family("trioq_run_time_seconds", "histogram", "Time a job ran on its worker (finished attempts), by task.")
        for task in sorted(self.run_time):
            _histogram(out, "trioq_run_time_seconds", f'task="{_label(task)}"', self.run_time[task])

        budget = broker.submit_budget.statistics()
        family(
            "trioq_uncommitted_jobs", "gauge",
            "Submitted jobs between their frame and their commit (of --max-uncommitted).",
        )
        out.append(f"trioq_uncommitted_jobs {budget.total - budget.free}")
        family("trioq_uncommitted_jobs_limit", "gauge", "--max-uncommitted.")
        out.append(f"trioq_uncommitted_jobs_limit {budget.total}")
        family("trioq_submits_waiting_for_budget", "gauge", "SUBMITs whose connections are not read until commits catch up.")
        out.append(f"trioq_submits_waiting_for_budget {budget.waiting}")
        family("trioq_store_healthy", "gauge", "1 when the store accepts writes.")
        out.append(f"trioq_store_healthy {1 if broker.writer.healthy else 0}")
        family("trioq_uptime_seconds", "gauge", "Seconds since the broker started.")
        out.append(f"trioq_uptime_seconds {_num(max(0.0, now - broker.started_at))}")
        return "\n".join(out) + "\n"


def _histogram(out: list[str], name: str, labels: str, h: Histogram) -> None:
    sep = "," if labels else ""
    cumulative = 0
    for bound, n in zip(h.bounds, h.counts, strict=False):
        cumulative += n
        out.append(f'{name}_bucket{{{labels}{sep}le="{_num(bound)}"}} {cumulative}')
    out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {h.count}')
    suffix = f"{{{labels}}}" if labels else ""
    out.append(f"{name}_sum{suffix} {_num(h.sum)}")
    out.append(f"{name}_count{suffix} {h.count}")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    return repr(float(v))


_by_broker: weakref.WeakKeyDictionary[Broker, Metrics] = weakref.WeakKeyDictionary()


def metrics_for(broker: Broker) -> Metrics:
    """The broker's Metrics, installed on first use (once, however many apps are made)."""
    m = _by_broker.get(broker)
    if m is None:
        m = _by_broker[broker] = Metrics(broker)
        m.install()
    return m
