"""kill -9 of a real broker process mid-run: on restart from its SQLite file nothing is lost."""

from __future__ import annotations

import random
import re
import sqlite3
import time
from pathlib import Path

import pytest
import trio

import trioq
from trioq.job import JobSpec, JobState

from .procs import TrioqProcess, free_port

pytestmark = pytest.mark.slow

N_BEFORE = 20  # finished before the crash
N_AFTER = 280  # submitted just before it, a mix of fast and slow jobs


def broker_args(port: int, db: str) -> list[str]:
    return [
        "broker", "--port", str(port), "--no-http", "--db", db,
        "--heartbeat-interval", "0.2", "--heartbeat-timeout", "2",
    ]


def expected_result(job: trioq.Job):
    if job.task == "reverse_string":
        return job.payload["data"][::-1]
    return f"slept {job.payload['seconds']:g}s"


async def all_jobs(c: trioq.Client, state: str) -> list[trioq.Job]:
    out: list[trioq.Job] = []
    cursor = None
    while True:
        page, cursor = await c.list_jobs(state=state, limit=1000, cursor=cursor)
        out.extend(page)
        if cursor is None:
            return out


async def test_kill9_broker_and_restart_loses_and_duplicates_nothing(nursery, tmp_path):
    port = free_port()
    db = str(tmp_path / "q.db")
    ca = tmp_path / "certs" / "ca.pem"
    rng = random.Random(20240601)
    procs: list[TrioqProcess] = []
    try:
        broker = await TrioqProcess.start(nursery, "broker", *broker_args(port, db), cwd=tmp_path)
        procs.append(broker)
        await broker.wait_for(r"broker listening on 127\.0\.0\.1:\d+")
        workers = {}
        for name in ("alpha", "beta"):
            workers[name] = await TrioqProcess.start(
                nursery, name, "worker", "--broker", f"127.0.0.1:{port}", "--name", name,
                "--concurrency", "4", cwd=tmp_path,
            )
            procs.append(workers[name])
        for name in workers:
            await broker.wait_for(rf"worker {name} joined")

        before_specs = [JobSpec("reverse_string", {"data": f"before-{i}"}) for i in range(N_BEFORE)]
        # eight 2 s jobs first: they fill every slot, so some are surely running at the crash
        after_specs = [JobSpec("slow_task", {"seconds": 2.0}) for _ in range(8)]
        for i in range(N_AFTER - 8):
            if rng.random() < 0.1:
                after_specs.append(JobSpec("slow_task", {"seconds": rng.choice([0.5, 1.0, 1.5, 2.0])}))
            else:
                after_specs.append(JobSpec("reverse_string", {"data": f"after-{i}-{rng.random():.6f}"}))

        async with trioq.Client("127.0.0.1", port, ca=ca) as c:
            before = await c.submit_many(before_specs)
            with trio.fail_after(30):
                finished_before = [await c.result(j) for j in before]
            assert [j.result for j in finished_before] == [f"before-{i}"[::-1] for i in range(N_BEFORE)]
            after = await c.submit_many(after_specs)
            acked = before + after
            assert len(set(acked)) == N_BEFORE + N_AFTER
            first_slow = after[0]
            # the store's view (committed rows): wait until the first slow job's RUNNING mark is on disk
            with trio.fail_after(30):
                while first_slow not in {j.id for j in (await c.list_jobs(state="running", limit=100))[0]}:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            broker.kill9()
        await broker.proc.wait()
        assert broker.proc.returncode == -9

        broker2 = await TrioqProcess.start(nursery, "broker2", *broker_args(port, db), cwd=tmp_path)
        procs.append(broker2)
        await broker2.wait_for(r"broker listening on 127\.0\.0\.1:\d+")
        m = await broker2.wait_for(r"recovered (\d+) running job\(s\) from the last run and requeued them: (.*)")
        n_recovered = int(m.group(1))
        recovered_ids = m.group(2).split(", ")
        assert n_recovered >= 1 and first_slow in recovered_ids
        restored = await broker2.wait_for(r"store .*: (\d+) unfinished job\(s\) restored")
        assert int(restored.group(1)) >= n_recovered
        # the workers come back by themselves
        for name in workers:
            await broker2.wait_for(rf"worker {name} joined", within=30)
            assert workers[name].proc.returncode is None
            await workers[name].wait_for(r"lost its broker connection; reconnecting")

        async with trioq.Client("127.0.0.1", port, ca=ca) as c:
            final: dict[str, trioq.Job] = {}

            async def wait_one(jid: str) -> None:
                final[jid] = await c.result(jid)

            with trio.fail_after(60):
                async with trio.open_nursery() as n:
                    for jid in acked:
                        n.start_soon(wait_one, jid)
            assert all(j.state is JobState.COMPLETED for j in final.values())
            completed = await all_jobs(c, "completed")
            ids = [j.id for j in completed]
            assert len(ids) == len(set(ids))  # each job completed exactly once
            assert set(ids) == set(acked)  # and none was lost
            for job in completed:
                assert job.result == expected_result(job), job
            # running at the crash: lost once, run again
            by_id = {j.id: j for j in completed}
            for jid in recovered_ids:
                assert by_id[jid].attempts >= 2 and by_id[jid].worker_losses >= 1, by_id[jid]
            # finished before the crash: still there, untouched
            for i, jid in enumerate(before):
                job = await c.get_job(jid)
                assert job.state is JobState.COMPLETED and job.result == f"before-{i}"[::-1]
                assert job.attempts == 1 and job.worker_losses == 0
            assert not await all_jobs(c, "dead") and not await all_jobs(c, "queued")
        assert not [line for line in broker2.lines if re.search(r"Traceback|ERROR", line)]
    finally:
        for p in reversed(procs):
            await p.stop()


CHAOS_TASKS = str(Path(__file__).with_name("chaos_tasks.py"))


async def test_a_broker_killed_while_it_loads_its_journal_and_serves_loses_and_duplicates_nothing(nursery, tmp_path):
    """20,000 jobs in the journal; a broker restarted on it serves workers while it loads in
    small steps, and is killed with SIGKILL before it has loaded everything; a third broker
    finishes the work. Every job completes once in the journal; the chaos jobs' own log shows
    each ran at most once more than its attempts (a result lost with a killed broker, for a
    job whose RUNNING mark was not on disk yet) and the attempt that completed did run."""
    port = free_port()
    db = str(tmp_path / "q.db")
    ca = tmp_path / "certs" / "ca.pem"
    env = {"TRIOQ_CHAOS_LOG": str(tmp_path / "executions.log")}
    rng = random.Random(7)
    n = 20_000
    specs = [
        JobSpec("chaos", {"n": i, "sleep": 0.3}, priority=1) if i % 100 == 0  # most urgent: never held
        else JobSpec("noop", {}, priority=rng.randint(1, 3))
        for i in range(n)
    ]
    args = [*broker_args(port, db), "--task", "chaos"]
    procs: list[TrioqProcess] = []

    async def start_broker(*extra: str) -> TrioqProcess:
        p = await TrioqProcess.start(nursery, "broker", *args, *extra, cwd=tmp_path)
        procs.append(p)
        await p.wait_for(r"broker listening on 127\.0\.0\.1:\d+")
        return p

    try:
        first = await start_broker()
        async with trioq.Client("127.0.0.1", port, ca=ca) as c:
            ids = [jid for k in range(0, n, 5_000) for jid in await c.submit_many(specs[k:k + 5_000])]
        first.kill9()
        await first.proc.wait()

        second = await start_broker("--restore-chunk", "2")
        for name in ("alpha", "beta"):
            procs.append(await TrioqProcess.start(
                nursery, name, "worker", "--broker", f"127.0.0.1:{port}", "--name", name, "--concurrency", "8",
                "--tasks", CHAOS_TASKS, cwd=tmp_path, env=env,
            ))
        async with trioq.Client("127.0.0.1", port, ca=ca) as c:
            with trio.fail_after(60):
                # some work done, and a chaos job's RUNNING mark on disk, the job started so
                # lately that it is still running when the broker is killed (it sleeps 0.3 s)
                while True:
                    s = await c.status()
                    assert s["restoring"], "the journal was loaded before the workers had done anything"
                    if s["completed_total"] >= 50:
                        running, _ = await c.list_jobs(state="running", task="chaos")
                        if any(time.time() - j.started_at < 0.15 for j in running):
                            break
                    await trio.sleep(0.01)
        assert s["restore_pending"] > 0  # killed while it still loads
        second.kill9()
        await second.proc.wait()

        await start_broker()
        async with trioq.Client("127.0.0.1", port, ca=ca) as c:
            with trio.fail_after(120):
                async with trio.open_nursery() as waits:
                    for jid in ids:
                        waits.start_soon(c.result, jid)
            s = await c.status()
            assert s["jobs"] == {**s["jobs"], "queued": 0, "running": 0, "dead": 0, "cancelled": 0, "completed": n}
            chaos = {ids[i]: i for i in range(0, n, 100)}
            finals = [await c.get_job(jid) for jid in chaos]
        for p in procs:
            await p.stop()
    finally:
        for p in reversed(procs):
            await p.stop()

    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id, state, attempts, worker_losses, failures FROM jobs").fetchall()
    assert len(rows) == n and {r[0] for r in rows} == set(ids)
    assert all(state == "completed" and attempts == 1 + losses and failures == 0 for _, state, attempts, losses, failures in rows)
    assert any(losses for *_, losses, _ in rows)  # the kill caught a job running
    runs: dict[str, list[int]] = {}
    for line in (tmp_path / "executions.log").read_text().splitlines():
        jid, attempt, _pid = line.split()
        runs.setdefault(jid, []).append(int(attempt))
    assert set(runs) == set(chaos)
    for job in finals:
        assert job.state is JobState.COMPLETED and job.result == chaos[job.id]
        assert job.attempts in runs[job.id] and len(runs[job.id]) <= job.attempts + 2, (job, runs[job.id])
