"""Real processes: `trioq broker` and `trioq worker`, a worker killed with SIGKILL mid-job."""

from __future__ import annotations

import pytest
import trio

import trioq
from trioq.job import JobState

from .procs import TrioqProcess, free_port

pytestmark = pytest.mark.slow


async def test_kill9_worker_mid_job_requeues_to_the_other(nursery, tmp_path):
    port = free_port()
    broker = await TrioqProcess.start(
        nursery, "broker", "broker", "--port", str(port), "--no-http", "--db", str(tmp_path / "q.db"),
        "--heartbeat-interval", "0.2", "--heartbeat-timeout", "2", cwd=tmp_path,
    )
    await broker.wait_for(r"broker listening on 127\.0\.0\.1:\d+")
    workers = {}
    for name in ("alpha", "beta"):
        workers[name] = await TrioqProcess.start(
            nursery, name, "worker", "--broker", f"127.0.0.1:{port}", "--name", name, "--concurrency", "1", cwd=tmp_path,
        )
    for name in workers:
        await broker.wait_for(rf"worker {name} joined")
    try:
        async with trioq.Client("127.0.0.1", port, ca=tmp_path / "certs" / "ca.pem") as c:
            slow = await c.submit("slow_task", {"seconds": 3}, priority=1)
            with trio.fail_after(30):
                # another process's state: poll it, bounded by the deadline
                while (job := await c.get_job(slow)).state is not JobState.RUNNING:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            victim = job.worker
            assert victim in workers
            survivor = next(n for n in workers if n != victim)
            workers[victim].kill9()
            await workers[victim].proc.wait()
            others = [await c.submit("reverse_string", {"data": str(i)}) for i in range(20)]
            done = await c.result(slow, timeout=60)
            assert done.state is JobState.COMPLETED
            assert done.worker == survivor
            assert done.attempts == 2 and done.worker_losses == 1
            finished = [await c.result(j, timeout=60) for j in others]
            assert [j.result for j in finished] == [str(i)[::-1] for i in range(20)]
            completed, _ = await c.list_jobs(state="completed", limit=1000)
            ids = [j.id for j in completed]
            assert len(ids) == len(set(ids)) == 21  # none lost, none duplicated
            assert any(f"worker {victim} lost" in line for line in broker.lines)
            assert any(f"job {slow} requeued" in line for line in broker.lines)
    finally:
        for p in [*workers.values(), broker]:
            await p.stop()
