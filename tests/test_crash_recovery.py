"""kill -9 of a real broker process mid-run: on restart from its SQLite file nothing is lost."""

from __future__ import annotations

import random
import re

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
