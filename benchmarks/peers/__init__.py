"""Peer-comparison harness: the registry of peers and the helpers they share.

Every peer module (``benchmarks/peers/<name>_peer.py``) is a small CLI::

    python -m benchmarks.peers.rq_peer worker --url redis://127.0.0.1:PORT/0
    python -m benchmarks.peers.rq_peer bench --url ... --jobs N --latency-jobs M --run-dir DIR

``worker`` runs one worker process of that peer; ``bench`` runs both workloads
(the producer side) and launches its worker processes itself.  The harness in
``benchmarks/peers_main.py`` starts the server (Redis or beanstalkd), runs
``bench`` in a child process with a hard timeout and kills everything left
over by process group.

How the numbers are taken (the same for every peer):

* throughput: the producer enqueues N no-op jobs while no worker runs
  (``enqueue_rate``); then 2 worker processes start and drain the backlog.  The
  no-op task calls :func:`record`, which keeps per-process counters (count,
  first and last ``time.time()`` seen inside a task body, and the job indices)
  and flushes them to a stats directory every 50 ms from a background thread,
  so measuring costs no extra round trip to the peer's server.
  ``drain_rate`` is N / (last task executed - first task started) over all
  workers; ``total_seconds`` is enqueue time + that drain time (worker boot,
  reported as ``startup_seconds``, is left out); ``completed`` counts distinct
  job indices seen, which must equal N.
* latency: 2 idle worker processes, warmed up until both have answered; then
  M jobs are submitted one at a time, each awaited through the peer's own
  result path before the next one; submit-to-result times are percentiles.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import functools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata, util
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

Phase = Literal["throughput", "latency"]
T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TIMEOUT = 300.0
DEFAULT_WORKERS = 2
STATS_ENV = "PEER_STATS_DIR"
URL_ENV = "PEER_URL"
PHASE_ENV = "PEER_PHASE"
QUEUE = "bench"
FLUSH_INTERVAL = 0.05
ENQUEUE_CHUNK = 1000
STALL_SECONDS = 60.0
MIN_WARMUP, MAX_WARMUP = 20, 200

REDIS_DURABILITY = "Redis AOF: appendonly yes, appendfsync everysec (RDB snapshots off)"


class PeerTimeout(Exception):
    """A bounded wait ran past its deadline."""


class PeerError(Exception):
    """A peer (server, worker or producer) misbehaved."""


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerSpec:
    """Static description of one peer: how to run it and what it promises."""

    name: str
    module: str
    requires: tuple[str, ...]
    distributions: tuple[str, ...]
    server: Literal["redis", "beanstalkd"] | None
    durability: str
    enqueue_api: str
    settings: str

    def missing(self) -> list[str]:
        """Import names of the required packages that are not installed."""
        return [name for name in self.requires if util.find_spec(name) is None]

    def versions(self) -> dict[str, str]:
        """Installed versions of the peer's distributions."""
        found: dict[str, str] = {}
        for dist in self.distributions:
            try:
                found[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
        return found


PEERS: dict[str, PeerSpec] = {
    spec.name: spec
    for spec in (
        PeerSpec(
            name="rq",
            module="benchmarks.peers.rq_peer",
            requires=("rq", "redis"),
            distributions=("rq", "redis"),
            server="redis",
            durability=REDIS_DURABILITY
            + "; job moved to StartedJobRegistry while it runs (re-queued if the worker dies)",
            enqueue_api="Queue.enqueue_many() in pipelines of 1000 (Queue.prepare_data)",
            settings="rq SimpleWorker (no fork per job), 1 per process; throughput jobs "
            "result_ttl=0; latency results read with Job.latest_result(timeout) (blocking XREAD)",
        ),
        PeerSpec(
            name="celery",
            module="benchmarks.peers.celery_peer",
            requires=("celery", "kombu", "redis"),
            distributions=("celery", "kombu", "redis"),
            server="redis",
            durability=REDIS_DURABILITY
            + "; Celery default acks_late=False (message acked when received by the worker)",
            enqueue_api="apply_async() loop on one pooled producer (Celery has no bulk publish)",
            settings="celery worker --pool=solo, prefetch multiplier 4 (default), gossip/mingle/"
            "heartbeat off; Redis broker + Redis result backend; throughput task ignore_result=True; "
            "latency via AsyncResult.get() (pub/sub)",
        ),
        PeerSpec(
            name="dramatiq",
            module="benchmarks.peers.dramatiq_peer",
            requires=("dramatiq", "redis"),
            distributions=("dramatiq", "redis"),
            server="redis",
            durability=REDIS_DURABILITY + "; acked after the actor runs (at-least-once)",
            enqueue_api="Actor.send() loop (RedisBroker enqueues one Lua call per message; "
            "no bulk API)",
            settings="dramatiq CLI --processes 1 --threads 8 (default threads and prefetch); "
            "RedisBroker; Results middleware with RedisBackend for the latency actor only; "
            "latency via Message.get_result(block=True) (BRPOPLPUSH)",
        ),
        PeerSpec(
            name="arq",
            module="benchmarks.peers.arq_peer",
            requires=("arq", "redis"),
            distributions=("arq", "redis"),
            server="redis",
            durability=REDIS_DURABILITY
            + "; job kept in the queue zset with an in-progress lock until done (re-run on "
            "worker death)",
            enqueue_api="ArqRedis.enqueue_job(), 50 concurrent calls on one asyncio loop "
            "(no bulk API)",
            settings="arq Worker max_jobs=10 (default), poll_delay=0.01 s (default 0.5 s); "
            "throughput jobs keep_result=0; latency via Job.result(poll_delay=0.001)",
        ),
        PeerSpec(
            name="huey",
            module="benchmarks.peers.huey_peer",
            requires=("huey", "redis"),
            distributions=("huey", "redis"),
            server="redis",
            durability=REDIS_DURABILITY
            + "; task popped from the list before it runs (lost if the consumer dies)",
            enqueue_api="TaskWrapper.map() (one LPUSH per task; no pipelining)",
            settings="RedisHuey(blocking=True, notify_result=True); huey consumer 1 thread "
            "worker per process; no result stored for None; latency via "
            "Result.get(blocking=True) (BLPOP on the notify key)",
        ),
        PeerSpec(
            name="taskiq",
            module="benchmarks.peers.taskiq_peer",
            requires=("taskiq", "taskiq_redis", "redis"),
            distributions=("taskiq", "taskiq-redis", "redis"),
            server="redis",
            durability=REDIS_DURABILITY
            + "; RedisStreamBroker consumer group, acked when the result is saved "
            "(ack_type when_saved)",
            enqueue_api="AsyncTaskiqDecoratedTask.kiq(), 50 concurrent calls on one asyncio loop "
            "(no bulk API)",
            settings="taskiq worker --workers 1 per process (max-async-tasks 100, default); "
            "RedisStreamBroker; RedisAsyncResultBackend for the latency phase only; latency via "
            "wait_result(check_interval=0.001)",
        ),
        PeerSpec(
            name="beanstalkd",
            module="benchmarks.peers.beanstalkd_peer",
            requires=("greenstalk",),
            distributions=("greenstalk",),
            server="beanstalkd",
            durability="beanstalkd binlog on (-b DIR) without -f: beanstalkd's default "
            "fsync policy (at most every 50 ms in 1.12); reserve/delete (at-least-once via TTR)",
            enqueue_api="greenstalk Client.put() loop (one round trip per job; no bulk API)",
            settings="hand-written greenstalk worker loop: reserve -> run -> delete; latency "
            "replies put into a per-producer reply tube",
        ),
    )
}

TRIOQ = PeerSpec(
    name="trioq",
    module="benchmarks.peers.trioq_peer",
    requires=("benchmarks.trioq_bench",),
    distributions=("trioq", "trio"),
    server=None,
    durability="(reported by benchmarks.trioq_bench)",
    enqueue_api="(see benchmarks.trioq_bench)",
    settings="benchmarks.trioq_bench.throughput(n_jobs, workers=2) and latency(n_jobs)",
)


# --------------------------------------------------------------------------
# Deadlines, processes, servers
# --------------------------------------------------------------------------


class Deadline:
    """A point in time that bounded waits must not pass."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end


def wait_until(
    probe: Callable[[], T | None],
    deadline: Deadline,
    what: str,
    interval: float = 0.05,
) -> T:
    """Call ``probe`` until it returns something other than None, or raise PeerTimeout."""
    while True:
        value = probe()
        if value is not None:
            return value
        if deadline.expired():
            raise PeerTimeout(f"timed out waiting for {what}")
        time.sleep(min(interval, max(deadline.remaining(), 0.001)))


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for harness children: the repository importable, plus ``extra``."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def spawn(
    argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session (own process group), output to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=child_env(env),
            start_new_session=True,
        )


def kill_group(pid: int, grace: float = 5.0, poll: Callable[[], object] | None = None) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL whatever is left after ``grace``.

    ``poll`` reaps the leader when it is our own child (e.g. ``Popen.poll``), so
    that a zombie leader does not keep the group alive.
    """
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + grace
    while time.monotonic() < end:
        if poll is not None:
            poll()
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Stop a process started by :func:`spawn` together with its whole group."""
    kill_group(proc.pid, grace, proc.poll)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


def descendants(pid: int) -> list[int]:
    """Pids of every living descendant of ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        kids = children.get(stack.pop(), [])
        found += kids
        stack += kids
    return found


def stop_tree(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Stop ``proc``, its group, and the groups of all its descendants (even in new sessions)."""
    own = os.getpgrp()
    groups: set[int] = set()
    for pid in descendants(proc.pid):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    stop_process(proc, grace)
    for group in groups - {own, proc.pid}:
        kill_group(group, grace)


def log_tail(path: Path, lines: int = 15) -> str:
    """Last ``lines`` lines of a log file (empty if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _probe(port: int, request: bytes, expect: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(request)
            return sock.recv(64).startswith(expect)
    except OSError:
        return False


@dataclass
class Server:
    """A queue server started by the harness on a loopback port."""

    kind: str
    url: str
    version: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        stop_process(self.proc)


def _start_server(
    kind: str,
    argv_for: Callable[[int], list[str]],
    url_for: Callable[[int], str],
    probe: tuple[bytes, bytes],
    log: Path,
    version: str,
    timeout: float = 15.0,
) -> Server:
    last_error = ""
    for _attempt in range(3):  # a free port can be taken before the server binds it
        port = free_port()
        server = Server(kind, url_for(port), version, spawn(argv_for(port), log), log)
        try:
            ready = functools.partial(_server_ready, server, port, probe)
            return wait_until(ready, Deadline(timeout), f"{kind} on port {port}")
        except (PeerError, PeerTimeout) as exc:
            last_error = str(exc)
            server.stop()
    raise PeerError(last_error)


def _server_ready(server: Server, port: int, probe: tuple[bytes, bytes]) -> Server | None:
    """``server`` once it answers ``probe`` on ``port``; PeerError if it died."""
    if server.proc.poll() is not None:
        log = log_tail(server.log, 5)
        raise PeerError(f"{server.kind} exited with {server.proc.returncode}: {log}")
    return server if _probe(port, *probe) else None


def _tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.strip()


def redis_version() -> str:
    """``redis-server`` version, e.g. ``7.0.15``."""
    out = _tool_version(["redis-server", "--version"])
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return out or "unknown"


def beanstalkd_version() -> str:
    """``beanstalkd`` version, e.g. ``1.12``."""
    return _tool_version(["beanstalkd", "-v"]).removeprefix("beanstalkd").strip() or "unknown"


def start_redis(workdir: Path) -> Server:
    """Start redis-server on a free loopback port with AOF (fsync every second) in ``workdir``."""
    data = workdir / "redis"
    data.mkdir(parents=True, exist_ok=True)

    def argv(port: int) -> list[str]:
        options = f"--bind 127.0.0.1 --port {port} --daemonize no"
        durable = "--appendonly yes --appendfsync everysec"
        return ["redis-server", *f"{options} {durable}".split(), "--save", "", "--dir", str(data)]

    return _start_server(
        "redis-server",
        argv,
        lambda port: f"redis://127.0.0.1:{port}/0",
        (b"PING\r\n", b"+PONG"),
        workdir / "redis.log",
        f"redis-server {redis_version()}",
    )


def start_beanstalkd(workdir: Path) -> Server:
    """Start beanstalkd on a free loopback port with its binlog in ``workdir`` (no ``-f``)."""
    binlog = workdir / "binlog"
    binlog.mkdir(parents=True, exist_ok=True)
    return _start_server(
        "beanstalkd",
        lambda port: ["beanstalkd", "-l", "127.0.0.1", "-p", str(port), "-b", str(binlog)],
        lambda port: f"beanstalk://127.0.0.1:{port}",
        (b"stats\r\n", b"OK "),
        workdir / "beanstalkd.log",
        f"beanstalkd {beanstalkd_version()}",
    )


def start_server(kind: str, workdir: Path) -> Server:
    """Start the server a peer needs (``redis`` or ``beanstalkd``)."""
    if kind == "redis":
        return start_redis(workdir)
    if kind == "beanstalkd":
        return start_beanstalkd(workdir)
    raise ValueError(f"unknown server kind {kind!r}")


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linearly interpolated."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of latencies given in seconds, in milliseconds."""
    ms = [s * 1000.0 for s in seconds]
    return {
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "max_ms": round(max(ms), 3),
        "mean_ms": round(sum(ms) / len(ms), 3),
    }


class _Recorder:
    """Per-process task counters, flushed to ``<dir>/<pid>.json`` and ``<pid>.idx``."""

    def __init__(self, directory: Path) -> None:
        self.pid = os.getpid()
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self._pending = array("q")
        self._lock = threading.Lock()
        self._json = directory / f"{self.pid}.json"
        self._idx = directory / f"{self.pid}.idx"
        threading.Thread(target=self._run, name="peer-stats", daemon=True).start()

    def record(self, index: int) -> None:
        now = time.time()
        with self._lock:
            if not self.count:
                self.first = now
            self.count += 1
            self.last = now
            self._pending.append(index)

    def _run(self) -> None:
        while True:
            time.sleep(FLUSH_INTERVAL)
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._pending:
                return
            pending, self._pending = self._pending, array("q")
            state = {"pid": self.pid, "count": self.count, "first": self.first, "last": self.last}
        with open(self._idx, "ab") as idx:
            idx.write(pending.tobytes())
        tmp = self._json.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self._json)


_recorder: _Recorder | None = None
_recorder_lock = threading.Lock()


def record(index: int) -> None:
    """Count one executed job in this worker process (no-op outside a benchmark run)."""
    global _recorder
    rec = _recorder
    if rec is None or rec.pid != os.getpid():
        directory = os.environ.get(STATS_ENV)
        if not directory:
            return
        with _recorder_lock:
            if _recorder is None or _recorder.pid != os.getpid():
                _recorder = _Recorder(Path(directory))
            rec = _recorder
    rec.record(index)


@dataclass
class Stats:
    """Sum of all worker counters in a stats directory."""

    count: int = 0
    first: float = math.inf
    last: float = 0.0
    pids: set[int] = field(default_factory=set)


def read_stats(directory: Path) -> Stats:
    """Read the counters every worker flushed to ``directory``."""
    stats = Stats()
    for path in directory.glob("*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        stats.count += int(state["count"])
        stats.first = min(stats.first, float(state["first"]))
        stats.last = max(stats.last, float(state["last"]))
        stats.pids.add(int(state["pid"]))
    return stats


def read_indices(directory: Path) -> set[int]:
    """Distinct job indices that workers recorded in ``directory``."""
    seen: set[int] = set()
    for path in directory.glob("*.idx"):
        values = array("q")
        data = path.read_bytes()
        values.frombytes(data[: len(data) - len(data) % values.itemsize])
        seen.update(values)
    return seen


class Progress:
    """Progress text written to ``<run_dir>/progress`` for the harness to display."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "progress"
        self._last = 0.0

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------
# Peer drivers and the generic benchmark flow
# --------------------------------------------------------------------------


class Driver(abc.ABC):
    """Producer side of one peer; the generic flow in :func:`run_benchmark` drives it."""

    module: ClassVar[str]

    def __init__(self, url: str) -> None:
        self.url = url

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Connect the producer (not timed)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release producer resources."""

    @abc.abstractmethod
    def enqueue(self, start: int, stop: int) -> None:
        """Enqueue no-op throughput jobs with indices ``start .. stop-1``."""

    @abc.abstractmethod
    def call(self, index: int, timeout: float) -> Sequence[int]:
        """Submit latency job ``index``, wait for its result and return it (``[index, pid]``)."""

    def settle(self) -> None:  # noqa: B027 - optional hook
        """Untimed clean-up after each latency sample (e.g. deleting a reply)."""

    def worker_argv(self, phase: Phase, index: int) -> list[str]:
        """Command line of worker process number ``index`` for ``phase``."""
        options = f"--url {self.url} --phase {phase} --index {index}".split()
        return [sys.executable, "-m", self.module, "worker", *options]


class AsyncDriver(Driver):
    """A driver whose producer API is asyncio; keeps one event loop for all calls."""

    concurrency: ClassVar[int] = 50

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def setup(self) -> None:
        self.run(self.asetup())

    def close(self) -> None:
        try:
            self.run(self.aclose())
        finally:
            self.loop.close()

    def enqueue(self, start: int, stop: int) -> None:
        self.run(self._enqueue(start, stop))

    async def _enqueue(self, start: int, stop: int) -> None:
        indices = iter(range(start, stop))

        async def pump() -> None:
            for index in indices:
                await self.aenqueue(index)

        await asyncio.gather(*(pump() for _ in range(self.concurrency)))

    def call(self, index: int, timeout: float) -> Sequence[int]:
        return self.run(asyncio.wait_for(self.acall(index), timeout))

    async def asetup(self) -> None:
        """Connect the producer."""

    async def aclose(self) -> None:
        """Release producer resources."""

    @abc.abstractmethod
    async def aenqueue(self, index: int) -> None:
        """Enqueue one no-op throughput job."""

    @abc.abstractmethod
    async def acall(self, index: int) -> Sequence[int]:
        """Submit one latency job and await its result (the caller bounds the wait)."""


class Workers:
    """Worker processes of one phase, recorded in ``<run_dir>/pids`` for cleanup."""

    def __init__(self, driver: Driver, phase: Phase, count: int, run_dir: Path, stats: Path):
        self.logs = [run_dir / f"worker-{phase}-{i}.log" for i in range(count)]
        env = {STATS_ENV: str(stats), URL_ENV: driver.url, PHASE_ENV: phase}
        self.procs: list[subprocess.Popen[bytes]] = []
        with open(run_dir / "pids", "a") as pids:
            for i in range(count):
                proc = spawn(driver.worker_argv(phase, i), self.logs[i], env)
                self.procs.append(proc)
                pids.write(f"{proc.pid}\n")

    def check(self) -> None:
        """Raise PeerError if a worker process has exited."""
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                raise PeerError(f"worker exited with code {proc.returncode}:\n{log_tail(log)}")

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)


def _throughput(
    driver: Driver, jobs: int, workers: int, run_dir: Path, deadline: Deadline, progress: Progress
) -> dict[str, Any]:
    stats_dir = run_dir / "stats-throughput"
    stats_dir.mkdir()
    started = time.time()
    for start in range(0, jobs, ENQUEUE_CHUNK):
        if deadline.expired():
            raise PeerTimeout(f"enqueue not finished at {start}/{jobs}")
        driver.enqueue(start, min(start + ENQUEUE_CHUNK, jobs))
        progress.update(f"throughput: enqueued {min(start + ENQUEUE_CHUNK, jobs)}/{jobs}")
    enqueued = time.time()

    pool = Workers(driver, "throughput", workers, run_dir, stats_dir)
    launched = time.time()
    try:
        last_count, last_change = -1, time.monotonic()
        while True:
            stats = read_stats(stats_dir)
            progress.update(f"throughput: drained {stats.count}/{jobs}")
            if stats.count >= jobs:
                seen = read_indices(stats_dir)
                completed = len(seen.intersection(range(jobs)))
                if completed == jobs:
                    break
            if stats.count != last_count:
                last_count, last_change = stats.count, time.monotonic()
            elif time.monotonic() - last_change > STALL_SECONDS:
                raise PeerError(f"drain stalled at {stats.count}/{jobs} executed")
            if deadline.expired():
                raise PeerTimeout(f"drain not finished: {stats.count}/{jobs} executed")
            pool.check()
            time.sleep(FLUSH_INTERVAL)
    finally:
        pool.stop()

    drain = stats.last - stats.first
    return {
        "jobs": jobs,
        "workers": workers,
        "enqueue_rate": round(jobs / (enqueued - started), 1),
        "drain_rate": round(jobs / drain, 1) if drain > 0 else None,
        "total_seconds": round(enqueued - started + drain, 3),
        "completed": completed,
        "executions": stats.count,
        "enqueue_seconds": round(enqueued - started, 3),
        "startup_seconds": round(stats.first - launched, 3),
        "drain_seconds": round(drain, 3),
        "worker_processes_seen": len(stats.pids),
    }


def _latency(
    driver: Driver, jobs: int, workers: int, run_dir: Path, deadline: Deadline, progress: Progress
) -> dict[str, Any]:
    stats_dir = run_dir / "stats-latency"
    stats_dir.mkdir()
    pool = Workers(driver, "latency", workers, run_dir, stats_dir)
    try:

        def call(index: int) -> int:
            if deadline.expired():
                raise PeerTimeout("latency run not finished")
            pool.check()
            result = driver.call(index, min(30.0, deadline.remaining()))
            if int(result[0]) != index:
                raise PeerError(f"job {index} answered {result!r}")
            return int(result[1])

        # Warm-up: the first call also waits for the workers to boot.
        seen: set[int] = set()
        warmup = 0
        while warmup < MIN_WARMUP or (len(seen) < workers and warmup < MAX_WARMUP):
            seen.add(call(-1 - warmup))
            driver.settle()
            warmup += 1
            progress.update(f"latency: warm-up {warmup}, {len(seen)}/{workers} workers answered")

        samples: list[float] = []
        pids: set[int] = set()
        for index in range(jobs):
            begin = time.perf_counter()
            pid = call(index)
            samples.append(time.perf_counter() - begin)
            driver.settle()
            pids.add(pid)
            progress.update(f"latency: {index + 1}/{jobs}")
    finally:
        pool.stop()
    return {
        "jobs": jobs,
        **latency_summary(samples),
        "warmup_jobs": warmup,
        "worker_processes_seen": len(pids),
    }


def run_benchmark(
    driver: Driver,
    jobs: int,
    latency_jobs: int,
    workers: int,
    run_dir: Path,
    timeout: float,
) -> dict[str, Any]:
    """Run both workloads against ``driver``; partial results go to ``<run_dir>/result.json``."""
    deadline = Deadline(timeout)
    progress = Progress(run_dir)
    result: dict[str, Any] = {"throughput": None, "latency": None, "errors": []}
    out = run_dir / "result.json"

    def save() -> None:
        out.write_text(json.dumps(result, indent=2))

    driver.setup()
    try:
        for name, phase, n in (
            ("throughput", _throughput, jobs),
            ("latency", _latency, latency_jobs),
        ):
            if n <= 0:
                continue
            try:
                result[name] = phase(driver, n, workers, run_dir, deadline, progress)
            except Exception as exc:  # the harness's own errors or a peer library failing
                result["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            save()
    finally:
        driver.close()
    progress.update("done", force=True)
    return result


def peer_main(
    driver_class: type[Driver],
    run_worker: Callable[[str, Phase, int], None],
    argv: Sequence[str] | None = None,
) -> None:
    """Command line of a peer module: ``worker`` or ``bench`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog=f"python -m {driver_class.module}")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="run one worker process")
    worker.add_argument("--url", "--redis-url", dest="url", required=True)
    worker.add_argument("--phase", choices=("throughput", "latency"), default="latency")
    worker.add_argument("--index", type=int, default=0)
    bench = sub.add_parser("bench", help="run both workloads (producer side)")
    bench.add_argument("--url", "--redis-url", dest="url", required=True)
    bench.add_argument("--jobs", type=int, default=20000)
    bench.add_argument("--latency-jobs", type=int, default=500)
    bench.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    bench.add_argument("--run-dir", type=Path, required=True)
    bench.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    args = parser.parse_args(argv)

    os.environ[URL_ENV] = args.url
    if args.command == "worker":
        os.environ.setdefault(PHASE_ENV, args.phase)
        run_worker(args.url, args.phase, args.index)
        return
    result = run_benchmark(
        driver_class(args.url),
        args.jobs,
        args.latency_jobs,
        args.workers,
        args.run_dir,
        args.timeout,
    )
    json.dump(result, sys.stdout, indent=2)
    print()


def cleanup_pids(run_dir: Path) -> None:
    """Kill the process groups of every worker listed in ``<run_dir>/pids``."""
    try:
        lines = (run_dir / "pids").read_text().split()
    except OSError:
        return
    for line in lines:
        kill_group(int(line), grace=2.0)


def remove_tree(path: Path) -> None:
    """Delete a run directory, ignoring errors."""
    shutil.rmtree(path, ignore_errors=True)


def select(names: Iterable[str] | None) -> list[str]:
    """Validated names to run, in table order (``None`` means trioq plus every peer)."""
    order = [TRIOQ.name, *PEERS]
    if names is None:
        return order
    chosen = {n.strip() for n in names if n.strip()}
    unknown = sorted(chosen.difference(order))
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(order)}")
    return [n for n in order if n in chosen]
