"""trioq under the benchmark workloads: a real broker process, real worker processes, TLS on.

Used by ``python -m benchmarks.throughput`` / ``latency`` / ``stress`` / ``backlog`` and by the peer
comparison (``benchmarks.peers_main`` imports ``throughput`` and ``latency`` from here).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio
from tqdm import tqdm

import trioq
from trioq.job import JobSpec

from . import stepcount

CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent


def bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A progress bar on stderr for long runs (silent when not enabled)."""
    return tqdm(total=total, desc=desc, unit="job", unit_scale=True, disable=not enabled, file=sys.stderr, leave=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Cluster:
    """A broker process and N worker processes in a temp dir; everything stopped on exit."""

    #: Called with (name, pid) for each process once it serves ("broker", "worker0", ...):
    #: how ``benchmarks.profile`` attaches a sampling profiler to a workload's processes.
    on_ready: Callable[[str, int], None] | None = None

    def __init__(self, workdir: Path, *, workers: int = 2, concurrency: int = 64, sync: str = "full",
                 broker_args: tuple[str, ...] = (), db: Path | None = None, count_steps: bool = False) -> None:
        self.workdir = workdir
        #: run each process under benchmarks.stepcount (Trio's scheduler work, see step_counts)
        self.count_steps = count_steps
        self.port = free_port()
        self.n_workers = workers
        self.concurrency = concurrency
        self.sync = sync
        self.broker_args = broker_args
        self.db = db or workdir / "bench.db"
        self.broker: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.logs.append(log)
        command = [sys.executable, "-m", "trioq", *args]
        env = None
        if self.count_steps:
            command[2:3] = ["benchmarks.stepcount", str(self.workdir / f"steps-{name}.json")]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        return subprocess.Popen(
            command, cwd=self.workdir, stdin=subprocess.DEVNULL, env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def snapshot_steps(self) -> None:
        """Each process counting its steps takes a snapshot (see benchmarks.stepcount)."""
        if not self.count_steps:  # SIGUSR1 would end a process that is not counting
            raise RuntimeError("this cluster was started without count_steps")
        for p in [*([self.broker] if self.broker else []), *self.workers]:
            os.kill(p.pid, signal.SIGUSR1)

    def step_counts(self, name: str, per: int) -> dict[str, Any]:
        """Per job, between the process's first two snapshots; read after stop()."""
        data = json.loads((self.workdir / f"steps-{name}.json").read_text())
        before, after = data["snapshots"][:2]
        return stepcount.difference(after, before, per)

    def _wait_log(self, name: str, needle: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        path = self.workdir / f"{name}.log"
        while time.monotonic() < deadline:
            if path.exists() and needle in path.read_text(errors="replace"):
                return
            time.sleep(0.02)
        raise TimeoutError(f"{name} did not log {needle!r} within {timeout}s:\n{path.read_text(errors='replace')[-2000:]}")

    def start_broker(self) -> None:
        self.broker = self._spawn(
            "broker", "broker", "--port", str(self.port), "--no-http", "--db", str(self.db),
            "--sync", self.sync, "--log-level", "warning", *self.broker_args,
        )
        self._wait_until_serving()
        if self.on_ready is not None:
            self.on_ready("broker", self.broker.pid)

    def workers_ready(self) -> None:
        """The workload saw every worker registered with the broker."""
        if self.on_ready is not None:
            for i, w in enumerate(self.workers):
                self.on_ready(f"worker{i}", w.pid)

    def _wait_until_serving(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.broker is not None
            if self.broker.poll() is not None:
                raise RuntimeError("broker exited:\n" + (self.workdir / "broker.log").read_text()[-2000:])
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.01)
        raise TimeoutError("broker did not start listening")

    def start_workers(self) -> None:
        for i in range(self.n_workers):
            self.workers.append(self._spawn(
                f"worker{i}", "worker", "--broker", f"127.0.0.1:{self.port}", "--concurrency",
                str(self.concurrency), "--name", f"bench-{i}", "--log-level", "warning",
            ))

    def client(self) -> trioq.Client:
        return trioq.Client("127.0.0.1", self.port, ca=self.workdir / "certs" / "ca.pem", role="admin")

    def stop(self) -> None:
        for p in [*self.workers, *( [self.broker] if self.broker else [])]:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in [*self.workers, *([self.broker] if self.broker else [])]:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in self.logs:
            log.close()

    def kill_broker(self) -> None:
        assert self.broker is not None
        os.killpg(self.broker.pid, signal.SIGKILL)
        self.broker.wait()


@contextlib.contextmanager
def cluster(**kw: Any) -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="trioq-bench-") as d:
        c = Cluster(Path(d), **kw)
        try:
            yield c
        finally:
            c.stop()


def _span(db: Path) -> tuple[float, float, int]:
    """(first dispatch, last finish, completed) as recorded by the broker in its store."""
    with sqlite3.connect(db) as conn:
        first, last, n = conn.execute(
            "SELECT min(started_at), max(finished_at), count(*) FROM jobs WHERE state='completed'"
        ).fetchone()
    return first or 0.0, last or 0.0, n


def _runs(db: Path) -> dict[str, int]:
    """How many times jobs ran, from the journal: a job run twice shows as attempts > 1."""
    with sqlite3.connect(db) as conn:
        total, distinct, extra = conn.execute(
            "SELECT count(*), count(DISTINCT id), coalesce(sum(attempts - 1), 0) FROM jobs"
        ).fetchone()
    return {"rows": total, "distinct_ids": distinct, "extra_attempts": extra}


def throughput(n_jobs: int = 100_000, workers: int = 2, *, batch: int = 5_000, concurrency: int = 256,
               sync: str = "full", progress: bool = False, prefill: bool = True) -> dict[str, Any]:
    """N no-op jobs submitted in batches by one producer, drained by worker processes.

    With ``prefill`` (the default, as the peer harness measures every peer) the workers start
    once every job is acknowledged, so the enqueue rate is the producer's alone and the drain
    rate is that of a full queue; without it the workers run during the enqueue.
    """
    with cluster(workers=workers, concurrency=concurrency, sync=sync) as c:
        c.start_broker()
        assert c.broker is not None
        out: dict[str, Any] = {}

        async def wait_workers(client: trioq.Client) -> None:
            c.start_workers()
            with trio.fail_after(120):
                # the broker is another process: poll its status, bounded by the deadline
                while (await client.status())["workers"]["total"] < workers:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            c.workers_ready()

        async def run() -> None:
            async with c.client() as client:
                if not prefill:
                    await wait_workers(client)  # warm connections before the clock starts
                cpu0 = cpu_seconds(c.broker.pid)
                pcpu0 = time.process_time()
                spec = JobSpec("noop", {})
                t0 = time.time()
                ids: list[str] = []
                acked = bar(n_jobs, "acknowledged", progress)
                async with trio.open_nursery() as nursery:
                    sem = trio.Semaphore(4)  # a few batches in flight, as a real producer would pipeline

                    async def send(k: int) -> None:
                        async with sem:
                            ids.extend(await client.submit_many([spec] * k))
                            acked.update(k)

                    sent = 0
                    while sent < n_jobs:
                        k = min(batch, n_jobs - sent)
                        await sem.acquire()
                        sem.release()
                        nursery.start_soon(send, k)
                        sent += k
                t_enq = time.time()
                acked.close()
                if prefill:
                    # held until both workers are in, so their CPU is counted from the first job
                    await client.pause()
                    await wait_workers(client)
                wcpu0 = sum(cpu_seconds(w.pid) for w in c.workers)
                if prefill:
                    await client.resume()
                with bar(n_jobs, "completed", progress) as done_bar, trio.fail_after(600):
                    while True:
                        done = (await client.status())["jobs"]["completed"]
                        done_bar.update(done - done_bar.n)
                        if done >= n_jobs:
                            break
                        await trio.sleep(0.05)
                cpu1 = cpu_seconds(c.broker.pid)
                wcpu = sum(cpu_seconds(w.pid) for w in c.workers) - wcpu0
                out.update(enqueue_seconds=t_enq - t0, cpu=cpu1 - cpu0, acked=len(ids), wcpu=wcpu,
                           pcpu=time.process_time() - pcpu0)

        trio.run(run)
        c.stop()  # the broker flushes its journal at shutdown
        first, last, completed = _span(c.db)
        drain = last - first
        return {
            "system": "trioq",
            "jobs": n_jobs,
            "acked": out["acked"],
            "journal": _runs(c.db),
            "completed": completed,
            "enqueue_rate": n_jobs / out["enqueue_seconds"],
            "drain_rate": completed / drain if drain > 0 else float("nan"),
            "total_seconds": drain,
            "broker_cpu_per_1000": out["cpu"] / n_jobs * 1000,
            "workers_cpu_per_1000": out["wcpu"] / n_jobs * 1000,
            "producer_cpu_per_1000": out["pcpu"] / n_jobs * 1000,
            "durability": f"SQLite WAL synchronous={sync.upper()}, ACK after commit, TLS 1.3",
        }


def latency(n_jobs: int = 1_000, *, sync: str = "full", workers: int = 2, api: str = "submit",
            count_steps: bool = False) -> dict[str, Any]:
    """Idle workers; one job at a time, submit to result.

    ``api``: "submit" is ``submit`` then ``result`` (two requests), "run" is ``Client.run``
    (one SUBMIT with wait). The CPU each process spent per job is reported beside the
    percentiles: on an idle path, time not spent waiting for the disk is CPU somewhere.
    ``count_steps`` adds each process's turns of Trio's run loop and task steps per job.
    """
    if api not in LATENCY_APIS:
        raise ValueError(f"api must be one of {LATENCY_APIS}")
    steps: dict[str, Any] = {}
    with cluster(workers=workers, concurrency=4, sync=sync, count_steps=count_steps) as c:
        c.start_broker()
        assert c.broker is not None
        samples: list[float] = []
        cpu: dict[str, float] = {}
        client_steps = stepcount.StepCounter()

        def snapshot() -> None:
            if count_steps:
                c.snapshot_steps()
                client_steps.take_snapshot()

        async def run() -> None:
            async with c.client() as client:
                async def one() -> trioq.Job:
                    if api == "run":
                        return await client.run("noop", {})
                    return await client.result(await client.submit("noop", {}))

                c.start_workers()
                with trio.fail_after(120):
                    # the broker is another process: poll its status, bounded by the deadline
                    while (await client.status())["workers"]["total"] < workers:  # noqa: ASYNC110
                        await trio.sleep(0.02)
                c.workers_ready()
                for _ in range(50):  # warm-up
                    await one()
                snapshot()
                broker0, workers0, client0 = cpu_seconds(c.broker.pid), _workers_cpu(c), time.process_time()
                for _ in range(n_jobs):
                    t = time.perf_counter()
                    job = await one()
                    samples.append(time.perf_counter() - t)
                    assert job.state is trioq.JobState.COMPLETED
                cpu.update(
                    broker=cpu_seconds(c.broker.pid) - broker0, workers=_workers_cpu(c) - workers0,
                    client=time.process_time() - client0,
                )
                snapshot()

        trio.run(run, instruments=[client_steps] if count_steps else [])
        if count_steps:
            c.stop()  # the processes write their counts as they exit
            steps["broker"] = c.step_counts("broker", n_jobs)
            per_worker = [c.step_counts(f"worker{i}", n_jobs) for i in range(workers)]
            steps["workers"] = {
                k: sum(w[k] for w in per_worker) for k in ("loop_turns", "spawned", "task_steps")
            }
            steps["client"] = stepcount.difference(*reversed(client_steps.snapshots[:2]), n_jobs)
    samples.sort()

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, int(p / 100 * len(samples)))] * 1000

    return {
        "system": "trioq",
        "api": api,
        "jobs": n_jobs,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": samples[-1] * 1000,
        "mean_ms": sum(samples) / len(samples) * 1000,
        **{f"{name}_cpu_ms": seconds / n_jobs * 1000 for name, seconds in cpu.items()},
        **({"steps_per_job": steps} if steps else {}),
        "durability": f"SQLite WAL synchronous={sync.upper()}, TLS 1.3",
    }


LATENCY_APIS = ("submit", "run")


def _workers_cpu(c: Cluster) -> float:
    return sum(cpu_seconds(w.pid) for w in c.workers)


STRESS_TASKS = [
    ("reverse_string", lambda r: {"data": "".join(r.choice("abcdefgh") for _ in range(16))}),
    ("to_uppercase", lambda r: {"data": "hello trioq"}),
    ("fibonacci", lambda r: {"n": r.randint(10, 200)}),
    ("is_prime", lambda r: {"n": r.randint(1_000, 1_000_000)}),
]


def stress(producers: int = 100, jobs_each: int = 10, *, sync: str = "full", seed: int = 1) -> dict[str, Any]:
    """The old stress test's shape: many producers at once, random tasks and priorities, TLS."""
    import random

    with cluster(workers=2, concurrency=32, sync=sync) as c:
        c.start_broker()
        latencies: list[float] = []
        failures = 0
        out: dict[str, float] = {}

        async def producer(i: int) -> None:
            nonlocal failures
            rng = random.Random(seed * 1000 + i)
            async with c.client() as client:
                for _ in range(jobs_each):
                    task, make = rng.choice(STRESS_TASKS)
                    t = time.perf_counter()
                    # submit and wait in one round trip (a SUBMIT with wait), as an RPC-style caller would
                    job = await client.run(task, make(rng), priority=rng.randint(1, 10))
                    latencies.append(time.perf_counter() - t)
                    if job.state is not trioq.JobState.COMPLETED:
                        failures += 1

        async def run() -> None:
            async with c.client() as client:
                c.start_workers()
                with trio.fail_after(120):
                    while (await client.status())["workers"]["total"] < 2:  # noqa: ASYNC110
                        await trio.sleep(0.02)
            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(producers):
                    nursery.start_soon(producer, i)
            out["seconds"] = time.perf_counter() - t0

        trio.run(run)
    latencies.sort()
    n = len(latencies)
    return {
        "system": "trioq",
        "producers": producers,
        "jobs": producers * jobs_each,
        "succeeded": n - failures,
        "total_seconds": out["seconds"],
        "avg_ms": sum(latencies) / n * 1000,
        "p99_ms": latencies[min(n - 1, int(0.99 * n))] * 1000,
        "throughput": n / out["seconds"],
    }


def backlog(n_jobs: int = 1_000_000, *, batch: int = 10_000, sync: str = "full", progress: bool = True) -> dict[str, Any]:
    """A million queued jobs: broker memory, restart-to-serving time, then the drain rate."""
    with cluster(workers=2, concurrency=256, sync=sync) as c:
        c.start_broker()
        assert c.broker is not None
        spec = JobSpec("noop", {})
        res: dict[str, Any] = {}

        async def fill() -> None:
            async with c.client() as client:
                t0 = time.perf_counter()
                with bar(n_jobs, "acknowledged", progress) as queued_bar:
                    async with trio.open_nursery() as nursery:
                        sem = trio.Semaphore(4)

                        async def send(k: int) -> None:
                            async with sem:
                                await client.submit_many([spec] * k)
                                queued_bar.update(k)

                        for start in range(0, n_jobs, batch):
                            await sem.acquire()
                            sem.release()
                            nursery.start_soon(send, min(batch, n_jobs - start))
                res["enqueue_rate"] = n_jobs / (time.perf_counter() - t0)
                s = await client.status()
                res["queued"] = s["jobs"]["queued"]

        trio.run(fill)
        res["broker_rss_mib"] = rss_bytes(c.broker.pid) / 2**20  # at the last ACK
        time.sleep(3)  # the broker trims its heap a second or two after writes stop
        res["broker_rss_settled_mib"] = rss_bytes(c.broker.pid) / 2**20
        c.kill_broker()  # a crash, not a clean stop: recovery reads the journal
        t_kill = time.perf_counter()
        c.start_broker()  # returns once the broker accepts connections
        res["restart_to_serving_s"] = time.perf_counter() - t_kill

        async def drain() -> None:
            async with c.client() as client:
                s = await client.status()  # answered while the journal still loads
                res["restart_to_status_s"] = time.perf_counter() - t_kill
                c.start_workers()
                t0 = time.perf_counter()
                with bar(n_jobs, "completed", progress) as done_bar, trio.fail_after(1800):
                    while (done := (s := await client.status())["jobs"]["completed"]) < n_jobs:
                        if done and "restart_to_first_completed_s" not in res:
                            res["restart_to_first_completed_s"] = time.perf_counter() - t_kill
                        if not s.get("restoring") and "restart_to_restored_s" not in res:
                            res["restart_to_restored_s"] = time.perf_counter() - t_kill
                            res["rss_after_restart_mib"] = rss_bytes(c.broker.pid) / 2**20
                            res["unfinished_after_restart"] = s["jobs"]["queued"] + s["jobs"]["running"] + s["jobs"]["scheduled"]
                            res["completed_while_restoring"] = done
                        done_bar.update(done - done_bar.n)
                        await trio.sleep(0.05 if "restart_to_restored_s" not in res else 0.2)
                res["drain_wall_rate"] = n_jobs / (time.perf_counter() - t0)

        trio.run(drain)
        c.stop()
        first, last, completed = _span(c.db)
        res.update(
            system="trioq", jobs=n_jobs, completed=completed,
            drain_rate=completed / (last - first) if last > first else float("nan"),
        )
        return res
