"""The sync scheduling core against a plain reference model, driven by hypothesis.

The model is deliberately naive: a dict of job records and, for dispatch
order, a sorted list of what is queued. After every step the dispatcher's
counters, heaps and leases must agree with it, and every delivery made by
``pump`` must be exactly the job the model says is first in line.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from trioq.broker.dispatcher import Dispatcher, RetryPolicy, WorkerSlot, _Line
from trioq.job import ErrorInfo, Job, JobState
from trioq.protocol.messages import Outcome

TASKS = ("a", "b", "c")
QUEUES = ("default", "high")
MAX_LOSSES = 3
RETRY_BASE = 2.0  # RetryPolicy(base=2, factor=2, jitter=0): 2, 4, 8...

UNFINISHED = (JobState.QUEUED, JobState.SCHEDULED, JobState.RUNNING)


class Rec:
    """The model's record of one job."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.state = job.state
        self.run_at = job.run_at
        self.attempts = 0
        self.failures = 0
        self.losses = 0
        self.holder: str | None = None  # worker id while running
        self.completions = 0


class _Fixed:
    """Stands in for hypothesis's data when a rule reuses another with a chosen value."""

    def __init__(self, value) -> None:
        self.value = value

    def draw(self, strategy):
        return self.value


class DispatcherModel(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.now = 1000.0
        self.d = Dispatcher(
            now=lambda: self.now,
            retry=RetryPolicy(base=RETRY_BASE, factor=2.0, max_delay=60.0, jitter=0.0),
            max_worker_losses=MAX_LOSSES,
            seed=0,
        )
        self.recs: dict[str, Rec] = {}
        self.slots: dict[str, WorkerSlot] = {}  # live workers
        self.leases: dict[str, dict[str, int]] = {}  # worker id -> {job id: attempt} the model expects held
        self.aborts: list[tuple[str, str, str]] = []
        self.n_workers = 0
        self.sent_in_pump = 0
        self.delivered_attempts: set[tuple[str, int]] = set()

    # --- the reference model ---------------------------------------------------------------

    def model_queued(self) -> list[Rec]:
        return sorted((r for r in self.recs.values() if r.state is JobState.QUEUED),
                      key=lambda r: (r.job.priority, r.job.seq))

    def deliver(self, slot: WorkerSlot, batch: list[Job]) -> None:
        """Called by pump: each job must be the model's first in line for this worker."""
        assert slot.alive and slot.id in self.slots
        for job in batch:
            eligible = [r for r in self.model_queued()
                        if r.job.task in slot.tasks and r.job.queue in slot.queues]
            assert eligible, f"{job.id} delivered to {slot.name} but nothing was eligible"
            best = eligible[0]
            assert job is best.job, (
                f"delivered {job.id} {job.priority, job.seq}, expected {best.job.id} "
                f"{best.job.priority, best.job.seq}"
            )
            best.state = JobState.RUNNING
            best.attempts += 1
            best.holder = slot.id
            assert job.attempts == best.attempts
            assert (job.id, job.attempts) not in self.delivered_attempts  # an attempt is delivered once
            self.delivered_attempts.add((job.id, job.attempts))
            self.leases[slot.id][job.id] = job.attempts
            assert len(self.leases[slot.id]) <= slot.concurrency
        self.sent_in_pump += len(batch)

    def abort(self, slot: WorkerSlot, job: Job, reason: str) -> None:
        self.aborts.append((slot.id, job.id, reason))

    def requeue_lost(self, rec: Rec) -> None:
        rec.losses += 1
        rec.holder = None
        if rec.losses >= MAX_LOSSES:
            rec.state = JobState.DEAD
        else:
            rec.state = JobState.QUEUED

    # --- rules --------------------------------------------------------------------------------

    @rule(
        priority=st.integers(1, 10),
        task=st.sampled_from(TASKS),
        queue=st.sampled_from(QUEUES),
        max_attempts=st.integers(1, 3),
        delay=st.sampled_from([None, None, None, 1.0, 5.0]),
        n=st.integers(1, 3),
        then_pump=st.booleans(),
    )
    def submit(self, priority, task, queue, max_attempts, delay, n, then_pump) -> None:
        jobs = []
        for _ in range(n):
            seq = self.d.next_seq()
            job = Job(id=f"j{seq}", seq=seq, task=task, payload=None, priority=priority, queue=queue,
                      max_attempts=max_attempts, run_at=None if delay is None else self.now + delay,
                      created_at=self.now)
            jobs.append(job)
        self.d.submit_nowait(jobs)
        for job in jobs:
            rec = self.recs[job.id] = Rec(job)
            rec.state = JobState.SCHEDULED if delay is not None else JobState.QUEUED
            assert job.state is rec.state
        if then_pump:  # as the dispatcher task does after each batch of events
            self.pump()

    @rule(
        concurrency=st.integers(1, 3),
        # generalists half the time: workers that compete for the same jobs
        tasks=st.one_of(st.just(set(TASKS)), st.sets(st.sampled_from(TASKS), min_size=1)),
        queues=st.one_of(st.just(set(QUEUES)), st.sets(st.sampled_from(QUEUES), min_size=1)),
        then_pump=st.booleans(),
    )
    def join(self, concurrency, tasks, queues, then_pump) -> None:
        self.n_workers += 1
        wid = f"w{self.n_workers}"
        slot = WorkerSlot(
            id=wid, name=wid, tasks=frozenset(tasks), queues=tuple(sorted(queues)), concurrency=concurrency,
            deliver=lambda batch, wid=wid: self.deliver(self.slots[wid], batch),
            abort=lambda job, reason, wid=wid: self.abort(self.slots[wid], job, reason),
        )
        self.slots[wid] = slot
        self.leases[wid] = {}
        self.d.join_nowait(slot)
        if then_pump:
            self.pump()

    @rule()
    def pump(self) -> None:
        self.sent_in_pump = 0
        sent = self.d.pump()
        assert sent == self.sent_in_pump
        # work-conserving: no idle slot is left next to a job it could run
        queued = self.model_queued()
        for slot in self.slots.values():
            if slot.credit > 0:
                assert not [r for r in queued if r.job.task in slot.tasks and r.job.queue in slot.queues], (
                    f"{slot.name} has credit {slot.credit} and eligible jobs after pump"
                )

    def has_lease(self) -> bool:
        return any(self.leases.values())

    def has_running(self) -> bool:
        return any(r.state is JobState.RUNNING for r in self.recs.values())

    def _held(self, data, *, running_only: bool = True):
        choices = sorted(
            (wid, jid, att)
            for wid, held in self.leases.items()
            if wid in self.slots
            for jid, att in held.items()
            if not running_only or self.recs[jid].state is JobState.RUNNING
        )
        if not choices:
            return None
        return data.draw(st.sampled_from(choices))

    @precondition(lambda self: self.has_lease())
    @rule(data=st.data())
    def complete(self, data) -> None:
        pick = self._held(data, running_only=False)
        if pick is None:
            return
        wid, jid, att = pick
        rec = self.recs[jid]
        changed = self.d.outcome_nowait(self.slots[wid], [Outcome(jid, att, True, f"r{jid}")])
        assert [j.id for j in changed] == [jid]
        del self.leases[wid][jid]
        if rec.state is JobState.RUNNING:
            rec.state = JobState.COMPLETED
            rec.holder = None
            rec.completions += 1
            assert rec.job.result == f"r{jid}"
        # else: cancelled while running; the report only releases the lease

    @precondition(lambda self: self.has_running())
    @rule(data=st.data(), retryable=st.booleans())
    def fail(self, data, retryable) -> None:
        pick = self._held(data)
        if pick is None:
            return
        wid, jid, att = pick
        rec = self.recs[jid]
        err = ErrorInfo("ValueError", "boom", "tb", retryable)
        self.d.outcome_nowait(self.slots[wid], [Outcome(jid, att, False, error=err)])
        del self.leases[wid][jid]
        rec.failures += 1
        rec.holder = None
        if retryable and rec.failures < rec.job.max_attempts:
            rec.state = JobState.SCHEDULED
            rec.run_at = self.now + RETRY_BASE * 2 ** (rec.failures - 1)
            assert rec.job.run_at == rec.run_at
        else:
            rec.state = JobState.DEAD
            assert rec.job.dead_reason == ("failed" if retryable else "not_retryable")

    @precondition(lambda self: bool(self.delivered_attempts))
    @rule(data=st.data())
    def stale_report(self, data) -> None:
        """A result for an attempt that is not current (a duplicate, or a lost worker's) changes nothing."""
        if not self.delivered_attempts:
            return
        jid, att = data.draw(st.sampled_from(sorted(self.delivered_attempts)))
        rec = self.recs[jid]
        for wid, slot in self.slots.items():
            if self.leases[wid].get(jid) == att:
                continue  # current: not stale
            before = (rec.job.state, rec.job.attempts, rec.job.result, self.d.completed)
            changed = self.d.outcome_nowait(slot, [Outcome(jid, att, True, "stale")])
            assert changed == []
            assert (rec.job.state, rec.job.attempts, rec.job.result, self.d.completed) == before

    @precondition(lambda self: bool(self.slots))
    @rule(data=st.data())
    def lose_worker(self, data) -> None:
        if not self.slots:
            return
        wid = data.draw(st.sampled_from(sorted(self.slots)))
        slot = self.slots.pop(wid)
        back = self.d.leave_nowait(slot, "lost")
        expected = sorted(
            (jid for jid in self.leases.pop(wid) if self.recs[jid].state is JobState.RUNNING),
            key=lambda j: (self.recs[j].job.priority, self.recs[j].job.seq),
        )
        assert [j.id for j in back] == expected
        for jid in expected:
            self.requeue_lost(self.recs[jid])
        assert not slot.held and not slot.alive

    @precondition(lambda self: self.has_running())
    @rule(data=st.data())
    def expire_lease(self, data) -> None:
        pick = self._held(data)
        if pick is None:
            return
        wid, jid, _ = pick
        assert self.d.expire_nowait(self.slots[wid], jid) is self.recs[jid].job
        del self.leases[wid][jid]
        assert self.aborts[-1] == (wid, jid, "timeout")
        self.requeue_lost(self.recs[jid])

    @precondition(lambda self: self.has_lease())
    @rule(data=st.data())
    def release(self, data) -> None:
        pick = self._held(data, running_only=False)
        if pick is None:
            return
        wid, jid, att = pick
        rec = self.recs[jid]
        back = self.d.release_nowait(self.slots[wid], [(jid, att)])
        del self.leases[wid][jid]
        if rec.state is JobState.RUNNING:
            assert back == [rec.job]
            rec.state = JobState.QUEUED  # no failure, no loss counted
            rec.holder = None
        else:
            assert back == []

    @precondition(lambda self: any(r.state in UNFINISHED for r in self.recs.values()))
    @rule(data=st.data())
    def cancel(self, data) -> None:
        live = sorted(jid for jid, r in self.recs.items() if r.state in UNFINISHED)
        assert self.d.cancel_nowait("nope") is None
        jid = data.draw(st.sampled_from(live))
        rec = self.recs[jid]
        n_aborts = len(self.aborts)
        assert self.d.cancel_nowait(jid) is rec.job
        if rec.state is JobState.RUNNING:
            assert self.aborts[n_aborts:] == [(rec.holder, jid, "cancelled")]
            rec.holder = None  # the lease stays until the worker reports
        else:
            assert len(self.aborts) == n_aborts
        rec.state = JobState.CANCELLED
        assert self.d.cancel_nowait(jid) is None  # twice is a no-op

    @precondition(lambda self: self.has_running())
    @rule(data=st.data())
    def cancel_running(self, data) -> None:
        """Cancelling a running job is the interesting case: give it a rule of its own."""
        pick = self._held(data)
        if pick is not None:
            self.cancel(_Fixed(pick[1]))

    @precondition(lambda self: any(r.state in (JobState.DEAD, JobState.CANCELLED) for r in self.recs.values()))
    @rule(data=st.data(), then_pump=st.booleans())
    def retry_finished(self, data, then_pump) -> None:
        """An admin's retry of a dead or cancelled job (what Broker.retry_job does)."""
        done = sorted(jid for jid, r in self.recs.items() if r.state in (JobState.DEAD, JobState.CANCELLED))
        if not done:
            return
        jid = data.draw(st.sampled_from(done))
        rec = self.recs[jid]
        self.d.retry_nowait(rec.job)
        for held in self.leases.values():
            held.pop(jid, None)  # a cancelled attempt's lease ends with the retry
        rec.state = JobState.QUEUED
        rec.failures = 0
        rec.losses = 0
        rec.run_at = None
        if then_pump:
            self.pump()

    @rule(dt=st.sampled_from([0.5, 1.0, 2.0, 4.0, 10.0]))
    def advance_clock(self, dt) -> None:
        self.now += dt
        due = self.d.promote_due()
        expected = [r for r in self.recs.values() if r.state is JobState.SCHEDULED and r.run_at <= self.now]
        assert {j.id for j in due} == {r.job.id for r in expected}
        for r in expected:
            r.state = JobState.QUEUED
            r.run_at = None

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def every_job_is_in_exactly_one_place(self) -> None:
        if not hasattr(self, "d"):
            return
        d = self.d
        queued = {j.id for j in d.queued_jobs()}
        scheduled = {e[3].id for e in d._scheduled if e[3].state is JobState.SCHEDULED and e[3].run_at == e[0]}
        held_running: dict[str, list[str]] = {}
        for wid, slot in d.workers.items():
            assert slot.alive
            for jid, job in slot.held.items():
                if job.state is JobState.RUNNING:
                    held_running.setdefault(jid, []).append(wid)
        for jid, rec in self.recs.items():
            job = rec.job
            assert job.state is rec.state, (jid, job.state, rec.state)
            places = [jid in queued, jid in scheduled, jid in held_running, job.state.terminal]
            assert sum(places) == 1, (jid, job.state, places)
            if job.state is JobState.RUNNING:
                assert held_running[jid] == [rec.holder], (jid, held_running[jid], rec.holder)
                assert job.worker == rec.holder
            assert (jid in d.live) == (not job.state.terminal)
            assert job.attempts == rec.attempts
            assert job.failures == rec.failures
            assert job.worker_losses == rec.losses
            assert rec.completions <= 1
            assert (job.state is JobState.COMPLETED) == (rec.completions == 1)
        # the same jobs queued (dispatch order itself is checked as each batch is delivered)
        assert [j.id for j in d.queued_jobs()] == [r.job.id for r in self.model_queued()]

    @invariant()
    def counters_match(self) -> None:
        if not hasattr(self, "d"):
            return
        d = self.d
        states = [r.state for r in self.recs.values()]
        assert d.n_queued == states.count(JobState.QUEUED)
        assert d.n_scheduled == states.count(JobState.SCHEDULED)
        assert d.n_running == states.count(JobState.RUNNING)
        assert len(d.live) == sum(s in UNFINISHED for s in states)
        assert d.completed == sum(r.completions for r in self.recs.values())

    @invariant()
    def leases_match_and_respect_concurrency(self) -> None:
        if not hasattr(self, "d"):
            return
        assert set(self.d.workers) == set(self.slots)
        for wid, slot in self.slots.items():
            assert len(slot.held) <= slot.concurrency
            assert {jid: j.attempts for jid, j in slot.held.items()} == self.leases[wid]
            assert slot.credit == slot.concurrency - len(self.leases[wid])


DispatcherModel.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDispatcherModel = DispatcherModel.TestCase


def test_model_catches_a_wrong_order():
    """The reference itself is not vacuous: a dispatcher that ignores priority is caught."""
    machine = DispatcherModel()
    machine.setup()
    for p in (5, 1, 3):
        machine.submit(p, "a", "default", 1, None, 1, False)
    line = machine.d._lines[("default", "a")]
    in_seq_order = sorted(line, key=lambda j: j.seq)  # seq order only, priority ignored: wrong
    for lane in line.lanes.values():
        lane.fifo.clear()
    line.lanes[line.active[0]].fifo.extend(in_seq_order)
    machine.join(1, {"a"}, {"default"}, False)
    with pytest.raises(AssertionError, match="expected"):
        machine.pump()


def test_retry_of_a_job_cancelled_while_running():
    """Cancelled on w1 (its report still pending), retried, then given to w2: w1 must not keep it."""
    m = DispatcherModel()
    m.setup()
    m.join(2, {"a"}, {"default"}, False)
    m.submit(1, "a", "default", 1, None, 2, True)
    assert m.leases["w1"] == {"j1": 1, "j2": 1}
    m.cancel(_Fixed("j1"))
    m.retry_finished(_Fixed("j1"), False)
    m.join(1, {"a"}, {"default"}, True)
    m.release(_Fixed(("w1", "j2", 1)))
    m.pump()
    for check in (m.every_job_is_in_exactly_one_place, m.counters_match, m.leases_match_and_respect_concurrency):
        check()
    assert {jid for slot in m.slots.values() for jid in slot.held} == {"j1", "j2"}
    # the cancelled attempt's late report is stale now: it changes nothing
    assert m.d.outcome_nowait(m.slots["w1"], [Outcome("j1", 1, False)]) == []


@given(st.binary(min_size=24, max_size=24), st.integers(min_value=1, max_value=(1 << 62) - 51), st.integers(1, 50))
def test_job_ids_are_distinct_16_hex_names_that_map_back_to_their_seq(key, first, n):
    from trioq.job import JobIds

    codec = JobIds(key)
    ids = codec.make(first, n)
    assert len(set(ids)) == n
    assert all(len(i) == 16 and i == i.lower() and int(i, 16) >= 0 for i in ids)
    assert [codec.seq_of(i) for i in ids] == list(range(first, first + n))
    # anything else is not an id: None, never an exception
    for bad in ("", "0" * 15, "g" * 16, " " + ids[0][1:], ids[0] + "0", "+" + ids[0][1:]):
        assert codec.seq_of(bad) is None
    if ids[0] != ids[0].upper():
        assert codec.seq_of(ids[0].upper()) is None


@settings(max_examples=300, deadline=None)
@given(st.lists(
    st.tuples(st.sampled_from(["push", "fresh", "extend", "pop", "cancel", "take"]), st.integers(1, 4), st.integers(0, 40)),
    max_size=80,
), st.integers(1, 5))
def test_a_line_gives_jobs_by_priority_then_seq_whatever_order_they_arrive_in(ops, drain_by):
    """Out-of-order pushes (the late heap), batches (a restore), cancelled entries, twins pushed
    again, and fresh copies of a job (read back from the store) beside a stale entry of it;
    taken one by one (front, pop_front) or in runs (take, as the pump does for one line)."""
    line = _Line()
    jobs: dict[int, Job] = {}
    queued: set[int] = set()
    for op, priority, seq in ops:
        if op in ("push", "fresh"):
            job = jobs.get(seq)
            if job is None or op == "fresh":
                if job is not None:
                    job.state = JobState.CANCELLED  # the old object's entries are stale now
                job = jobs[seq] = Job(f"j{seq}", seq, "a", {}, priority=job.priority if job else priority)
            job.state = JobState.QUEUED  # a twin if it was pushed before
            queued.add(seq)
            line.push(job)
        elif op == "extend":
            batch = []
            for s in range(seq, seq + 3):
                if s not in jobs:
                    jobs[s] = Job(f"j{s}", s, "a", {}, priority=priority)
                    jobs[s].state = JobState.QUEUED
                    queued.add(s)
                    batch.append(jobs[s])
            line.extend(batch)
        elif op == "cancel" and seq in queued:
            jobs[seq].state = JobState.CANCELLED
            queued.discard(seq)
        elif op == "pop":
            found = line.front()
            expected = min(queued, key=lambda s: (jobs[s].priority, s)) if queued else None
            assert (found[1].seq if found else None) == expected
            if found:
                assert found[1] is jobs[found[1].seq]  # never a stale copy
                found[0].pop_front()
                found[1].state = JobState.RUNNING
                queued.discard(found[1].seq)
        elif op == "take":
            n = priority
            expected = sorted(queued, key=lambda s: (jobs[s].priority, s))[:n]
            out: list[Job] = []
            assert line.take(n, out) == len(expected)
            assert [j.seq for j in out] == expected
            assert all(j is jobs[j.seq] and j.state is JobState.RUNNING for j in out)
            queued.difference_update(expected)
    drained = []
    while True:
        out = []
        line.take(drain_by, out)
        if not out:
            break
        drained.extend(j.seq for j in out)
    assert drained == sorted(queued, key=lambda s: (jobs[s].priority, s))
    assert line.front() is None and not line.active
