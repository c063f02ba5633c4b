"""Chaos, bounded: workers killed with SIGKILL and replaced while 400 jobs run, on loopback.

Every execution is recorded by the task itself (tests/chaos_tasks.py) in a file,
so the test sees what really ran, not only what the broker believes.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import pytest
import trio

import trioq
from trioq.job import JobSpec, JobState

from .procs import TrioqProcess, free_port

pytestmark = pytest.mark.slow

N_JOBS = 400
ROUNDS = 6
TASKS_FILE = str(Path(__file__).with_name("chaos_tasks.py"))


async def test_workers_killed_at_random_every_job_completes_once(nursery, tmp_path):
    port = free_port()
    log_path = tmp_path / "executions.log"
    env = {"TRIOQ_CHAOS_LOG": str(log_path)}
    rng = random.Random(1234)
    procs: list[TrioqProcess] = []
    workers: dict[str, TrioqProcess] = {}
    killed_pids: set[int] = set()
    n_started = 0

    async def start_worker() -> None:
        nonlocal n_started
        name = f"w{n_started}"
        n_started += 1
        p = await TrioqProcess.start(
            nursery, name, "worker", "--broker", f"127.0.0.1:{port}", "--name", name, "--concurrency", "4",
            "--tasks", TASKS_FILE, "--no-builtins", cwd=tmp_path, env=env,
        )
        procs.append(p)
        workers[name] = p
        await broker.wait_for(rf"worker {name} joined")

    try:
        broker = await TrioqProcess.start(
            nursery, "broker", "broker", "--port", str(port), "--no-http", "--db", str(tmp_path / "q.db"),
            "--task", "chaos", "--max-worker-losses", "100", "--heartbeat-interval", "0.5",
            "--heartbeat-timeout", "5", cwd=tmp_path,
        )
        procs.append(broker)
        await broker.wait_for(r"broker listening on 127\.0\.0\.1:\d+")
        for _ in range(3):
            await start_worker()

        async with trioq.Client("127.0.0.1", port, ca=tmp_path / "certs" / "ca.pem") as c:
            ids = await c.submit_many([JobSpec("chaos", {"n": i}) for i in range(N_JOBS)])
            with trio.fail_after(45):  # the chaos itself, bounded
                for r in range(1, ROUNDS + 1):
                    # let some work happen, then kill a worker at random and replace it
                    await c.result(ids[r * N_JOBS // (ROUNDS + 2)])
                    victim = rng.choice(sorted(workers))
                    p = workers.pop(victim)
                    killed_pids.add(p.proc.pid)
                    p.kill9()
                    await p.proc.wait()
                    await broker.wait_for(rf"worker {victim} lost")
                    await start_worker()
            final: dict[str, trioq.Job] = {}

            async def wait_one(jid: str) -> None:
                final[jid] = await c.result(jid)

            with trio.fail_after(60):
                async with trio.open_nursery() as n:
                    for jid in ids:
                        n.start_soon(wait_one, jid)
            completed, cursor = await c.list_jobs(state="completed", limit=1000)
            assert cursor is None

        assert len(killed_pids) == ROUNDS
        # exactly once in the results
        got = [j.id for j in completed]
        assert len(got) == len(set(got)) == N_JOBS and set(got) == set(ids)
        assert all(final[j].state is JobState.COMPLETED and final[j].result == i for i, j in enumerate(ids))

        runs: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for line in log_path.read_text().splitlines():
            jid, attempt, pid = line.split()
            runs[jid].append((int(attempt), int(pid)))
        assert set(runs) == set(ids)  # every job really ran
        lost_any = 0
        for jid in ids:
            job = final[jid]
            execs = runs[jid]
            attempts = [a for a, _ in execs]
            assert len(execs) <= job.attempts, (job, execs)
            assert len(set(attempts)) == len(attempts), (job, execs)  # no attempt ran twice
            assert job.attempts in attempts  # the attempt that completed did run
            # the only way to another attempt here is a lost worker (the task never fails)
            assert job.failures == 0 and job.attempts == 1 + job.worker_losses, job
            if len(execs) > 1:
                assert job.worker_losses >= 1 or job.attempts > 1
                lost_any += 1
            # every run but the last was on a worker that was killed
            for attempt, pid in execs:
                if attempt != job.attempts:
                    assert pid in killed_pids, (job, execs)
        assert lost_any >= ROUNDS  # the chaos did hit running jobs (each victim held several)
    finally:
        for p in reversed(procs):
            await p.stop()
