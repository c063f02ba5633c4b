"""Real processes: `trioq broker` and `trioq worker`, a worker killed with SIGKILL mid-job."""

from __future__ import annotations

import os
import signal

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


async def _running(c: trioq.Client, job_id: str) -> trioq.Job:
    with trio.fail_after(30):
        # another process's state: poll it, bounded by the deadline
        while (job := await c.get_job(job_id)).state is not JobState.RUNNING:  # noqa: ASYNC110
            await trio.sleep(0.05)
    return job


async def _result_into(c: trioq.Client, job_id: str, into: list[trioq.Job]) -> None:
    into.append(await c.result(job_id, timeout=120))


async def _broker(nursery, tmp_path, port: int, *flags: str) -> TrioqProcess:
    broker = await TrioqProcess.start(
        nursery, "broker", "broker", "--port", str(port), "--no-http", "--db", str(tmp_path / "q.db"), *flags, cwd=tmp_path,
    )
    await broker.wait_for(r"broker listening on 127\.0\.0\.1:\d+")
    return broker


async def test_sigterm_lets_the_running_job_finish_and_its_waiting_client_gets_the_result(nursery, tmp_path):
    """SIGTERM to the broker alone (its local worker keeps running): the job in hand finishes
    within the grace, the client waiting on it gets the result, and the broker exits by itself."""
    port = free_port()
    broker = await _broker(nursery, tmp_path, port, "--workers", "1")
    await broker.wait_for(r"worker local-1 joined")
    try:
        # reconnect_timeout=0: the broker's own answers, not a client that connects again
        async with trioq.Client("127.0.0.1", port, ca=tmp_path / "certs" / "ca.pem", reconnect_timeout=0) as c:
            job_id = await c.submit("slow_task", {"seconds": 2})
            await _running(c, job_id)
            waited: list[trioq.Job] = []
            async with trio.open_nursery() as n:
                n.start_soon(_result_into, c, job_id, waited)
                broker.proc.send_signal(signal.SIGTERM)
            assert [j.state for j in waited] == [JobState.COMPLETED]
            with trio.fail_after(30):  # it exits by itself: nobody sends SIGKILL
                assert await broker.proc.wait() == 0
            with pytest.raises(trioq.BrokerShuttingDown):
                await c.status()  # the broker said why the connection ended
        assert any("shutting down: waiting up to 10s for 1 running job(s)" in line for line in broker.lines)
    finally:
        await broker.stop()
    again = await _broker(nursery, tmp_path, port)
    try:
        async with trioq.Client("127.0.0.1", port, ca=tmp_path / "certs" / "ca.pem") as c:
            assert (await c.get_job(job_id)).state is JobState.COMPLETED
    finally:
        await again.stop()


async def test_sigterm_hands_a_job_past_the_grace_back_in_line_and_tells_its_waiter(nursery, tmp_path):
    port = free_port()
    broker = await _broker(nursery, tmp_path, port, "--workers", "1", "--shutdown-grace", "0.5")
    await broker.wait_for(r"worker local-1 joined")
    try:
        # reconnect_timeout=0: the broker's own answers, not a client that connects again
        async with trioq.Client("127.0.0.1", port, ca=tmp_path / "certs" / "ca.pem", reconnect_timeout=0) as c:
            job_id = await c.submit("slow_task", {"seconds": 600})
            await _running(c, job_id)
            broker.proc.send_signal(signal.SIGTERM)
            with pytest.raises(trioq.BrokerShuttingDown, match=job_id):
                await c.result(job_id, timeout=60)
        with trio.fail_after(30):
            assert await broker.proc.wait() == 0
        assert any("handed back to their queues: " + job_id in line for line in broker.lines), "\n".join(broker.lines)
    finally:
        await broker.stop()
    again = await _broker(nursery, tmp_path, port)
    try:
        async with trioq.Client("127.0.0.1", port, ca=tmp_path / "certs" / "ca.pem") as c:
            job = await c.get_job(job_id)
            # in line, its attempt spent, no failure and no worker loss counted against it
            assert (job.state, job.attempts, job.failures, job.worker_losses) == (JobState.QUEUED, 1, 0, 0)
    finally:
        await again.stop()


async def test_a_client_waiting_on_a_job_rides_through_a_broker_restart(nursery, tmp_path):
    """The broker stops (SIGTERM, the job handed back after a short grace) and starts again on
    the same journal: the client's wait connects again by itself and returns the result."""
    port = free_port()
    flags = ("--workers", "1", "--shutdown-grace", "0.5")
    broker = await _broker(nursery, tmp_path, port, *flags)
    await broker.wait_for(r"worker local-1 joined")
    again = None
    try:
        async with trioq.Client("127.0.0.1", port, ca=tmp_path / "certs" / "ca.pem") as c:
            job_id = await c.submit("slow_task", {"seconds": 3})
            await _running(c, job_id)
            done: list[trioq.Job] = []
            async with trio.open_nursery() as n:
                n.start_soon(_result_into, c, job_id, done)
                broker.proc.send_signal(signal.SIGTERM)
                with trio.fail_after(30):
                    assert await broker.proc.wait() == 0
                again = await _broker(nursery, tmp_path, port, *flags)
            assert len(done) == 1
            job = done[0]
            assert (job.state, job.result, job.attempts, job.failures) == (JobState.COMPLETED, "slept 3s", 2, 0)
            assert c.reconnects >= 1
            assert (await c.status())["jobs"]["completed"] == 1  # the same client goes on
    finally:
        await broker.stop()
        if again is not None:
            await again.stop()


async def test_local_workers_end_with_a_broker_killed_with_sigkill(nursery, tmp_path):
    """No orphan: the supervised worker sees its broker gone (no signal could tell it) and stops."""
    port = free_port()
    broker = await _broker(nursery, tmp_path, port, "--workers", "1")
    started = await broker.wait_for(r"started local worker 1 \(pid (\d+)\)")
    await broker.wait_for(r"worker local-1 joined")
    pid = int(started.group(1))
    try:
        os.kill(broker.proc.pid, signal.SIGKILL)  # the broker alone, not its process group
        await broker.proc.wait()
        with trio.fail_after(30):
            while _alive(pid):  # noqa: ASYNC110 - another process's end: polled, bounded
                await trio.sleep(0.05)
    finally:
        await broker.stop()
        if _alive(pid):  # the broker's group is gone with it: this one is not, if the test failed
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (not reaped yet) has ended
        return f.read().split(")")[-1].split()[0] != "Z"
