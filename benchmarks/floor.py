"""The floor under idle latency on this machine: one hop and one commit, with none of trioq's code.

    python -m benchmarks.floor [--round-trips 2000] [--commits 1000]

An idle job's path is two request/response exchanges between processes that were asleep
(producer and broker, broker and worker) and two durable commits (the job, then its result).
This measures those parts on their own, so ``benchmarks.latency``'s figures can be read
against what the machine allows: an echo over TCP and over TLS between two Trio processes,
back to back and with the processes idle between messages (as they are between idle jobs),
a plain blocking-socket echo for comparison, and trioq's own SQLite store committing one new
job and one result.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import trio

from trioq import tls
from trioq.job import Job, JobState
from trioq.store.sqlite import SQLiteStore

from . import _report

MESSAGE = b"x" * 120  # about one small frame: a SUBMIT of a no-op job, or its ACK
ECHO_KINDS = ("blocking-tcp", "trio-tcp", "trio-tls")
ACCEPT_DEADLINE = 60.0  # an echo server that nobody connects to exits after this long
REPLY_DEADLINE = 30.0  # the blocking client's wait for one echo


def _percentile(sorted_samples: list[float], p: float) -> float:
    return sorted_samples[min(len(sorted_samples) - 1, int(p / 100 * len(sorted_samples)))]


# --- the echo server, in a process of its own -------------------------------------------------


def _serve_blocking(listener: socket.socket) -> None:
    listener.settimeout(ACCEPT_DEADLINE)
    conn, _ = listener.accept()
    conn.settimeout(None)
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(65536):
            conn.sendall(data)


async def _serve_trio(listener: socket.socket, certs: Path | None) -> None:
    """Until the client closes: it does, or the kernel does for it when its process ends."""
    with trio.fail_after(ACCEPT_DEADLINE):
        sock = trio.socket.from_stdlib_socket(listener)
        conn, _ = await sock.accept()
    stream: trio.abc.Stream = trio.SocketStream(conn)
    if certs is not None:
        paths, _ = tls.ensure_certs(certs)
        stream = trio.SSLStream(stream, tls.server_context(paths), server_side=True)
    async with stream:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except trio.BrokenResourceError:  # the client went without a TLS goodbye
            pass


def serve_echo(kind: str, certs: Path | None) -> None:
    """Serve one connection, then exit; the bound port goes to stdout once listening."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    print(listener.getsockname()[1], flush=True)
    if kind == "blocking-tcp":
        _serve_blocking(listener)
    else:
        trio.run(_serve_trio, listener, certs if kind == "trio-tls" else None)


# --- the client, here ------------------------------------------------------------------------


def _start_server(kind: str, certs: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.floor", "--echo-server", kind, "--certs", str(certs)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the server's readiness: its port, once it listens
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"echo server ({kind}) did not start: {line!r}")
    return proc, int(line)


def _summary(kind: str, idle: float, samples: list[float], cpu: float) -> dict[str, Any]:
    samples.sort()
    return {
        "kind": kind,
        "idle_ms": idle * 1000,
        "round_trips": len(samples),
        "p50_ms": _percentile(samples, 50) * 1000,
        "p99_ms": _percentile(samples, 99) * 1000,
        "client_cpu_us": cpu / len(samples) * 1e6,
    }


def _echo_blocking(port: int, n: int, idles: tuple[float, ...]) -> list[dict[str, Any]]:
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=REPLY_DEADLINE) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for idle in idles:
            samples = []
            cpu0 = time.process_time()
            for _ in range(n):
                t = time.perf_counter()
                s.sendall(MESSAGE)
                got = 0
                while got < len(MESSAGE):
                    got += _received(len(s.recv(65536)))
                samples.append(time.perf_counter() - t)
                if idle:
                    time.sleep(idle)
            out.append(_summary("blocking-tcp", idle, samples, time.process_time() - cpu0))
    return out


def _received(n: int) -> int:
    if not n:
        raise ConnectionError("the echo server closed the connection")
    return n


async def _echo_trio(kind: str, port: int, certs: Path, n: int, idles: tuple[float, ...]) -> list[dict[str, Any]]:
    out = []
    # Generous for any run (50 ms a round trip, besides the idle time), bounded all the same.
    with trio.fail_after(ACCEPT_DEADLINE + n * (0.05 * len(idles) + sum(idles))):
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
        if kind == "trio-tls":
            paths, _ = tls.ensure_certs(certs)
            stream = trio.SSLStream(stream, tls.client_context(paths.ca_cert), server_hostname="localhost")
        async with stream:
            for idle in idles:
                samples = []
                cpu0 = time.process_time()
                for _ in range(n):
                    t = time.perf_counter()
                    await stream.send_all(MESSAGE)
                    got = 0
                    while got < len(MESSAGE):
                        got += _received(len(await stream.receive_some(65536)))
                    samples.append(time.perf_counter() - t)
                    if idle:
                        await trio.sleep(idle)
                out.append(_summary(kind, idle, samples, time.process_time() - cpu0))
    return out


def echo(kind: str, n: int = 2_000, idles: tuple[float, ...] = (0.0, 0.001)) -> list[dict[str, Any]]:
    """Round trips of one small message to an echo server in another process.

    With ``idle`` the client sleeps that long between messages, so both processes go to
    sleep as an idle broker and worker do between jobs, and every message wakes them.
    """
    if kind not in ECHO_KINDS:
        raise ValueError(f"kind must be one of {ECHO_KINDS}")
    with tempfile.TemporaryDirectory(prefix="trioq-floor-") as d:
        certs = Path(d) / "certs"
        tls.ensure_certs(certs)
        proc, port = _start_server(kind, certs)
        try:
            if kind == "blocking-tcp":
                return _echo_blocking(port, n, idles)
            return trio.run(_echo_trio, kind, port, certs, n, idles)
        finally:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def commits(n: int = 500, sync: str = "full", *, presize_wal: bool = True) -> dict[str, Any]:
    """trioq's store committing one new job, then its result, n times: an idle job's two commits.

    Without ``presize_wal`` the store's WAL starts empty, as before trioq grew it at open:
    every commit of the first checkpoint cycle after a start then extends the file. The
    store's checkpoints are held off, so that every commit measured is of that first cycle;
    up to about 950 jobs, the grown WAL holds all of them.
    """
    with tempfile.TemporaryDirectory(prefix="trioq-floor-") as d:
        store = SQLiteStore(Path(d) / "floor.db", synchronous=sync)
        store.checkpoint_commits = store.checkpoint_rows = 10**9
        if not presize_wal:
            store.wal_presize_bytes = 0
        store.open_sync()
        wal = Path(d) / "floor.db-wal"
        wal_at_open = wal.stat().st_size if wal.exists() else 0
        try:
            inserts: list[float] = []
            updates: list[float] = []
            for seq in range(1, n + 1):
                job = Job(store.job_ids.make(seq, 1)[0], seq, "noop", {}, created_at=time.time())
                t = time.perf_counter()
                store.commit_sync([store.insert_row(job)], [])
                inserts.append(time.perf_counter() - t)
                job.state, job.attempts, job.worker = JobState.COMPLETED, 1, "w"
                job.started_at = job.finished_at = time.time()
                t = time.perf_counter()
                store.commit_sync([], [store.update_row(job)])
                updates.append(time.perf_counter() - t)
            stored = store.counts_sync()
            wal_at_end = wal.stat().st_size
        finally:
            store.close_sync()
    inserts.sort()
    updates.sort()
    return {
        "sync": sync,
        "wal": "grown at open" if presize_wal else "growing",
        "wal_bytes_at_open": wal_at_open,
        "wal_bytes_at_end": wal_at_end,
        "commits": 2 * n,
        "completed_rows": stored.get("noop", {}).get("completed", 0),
        "insert_p50_ms": _percentile(inserts, 50) * 1000,
        "insert_p99_ms": _percentile(inserts, 99) * 1000,
        "update_p50_ms": _percentile(updates, 50) * 1000,
        "update_p99_ms": _percentile(updates, 99) * 1000,
    }


def fsync_floor(n: int = 500) -> dict[str, Any]:
    """One 4 KiB overwrite made durable with fdatasync: the disk's own cost per commit."""
    samples = []
    with tempfile.TemporaryDirectory(prefix="trioq-floor-") as d:
        fd = os.open(Path(d) / "f", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            block = b"\0" * 4096
            for _ in range(n):
                os.pwrite(fd, block, 0)
                t = time.perf_counter()
                os.fdatasync(fd)
                samples.append(time.perf_counter() - t)
        finally:
            os.close(fd)
    samples.sort()
    return {"fdatasync_p50_ms": _percentile(samples, 50) * 1000, "fdatasync_p99_ms": _percentile(samples, 99) * 1000}


ECHO_COLUMNS = [
    ("kind", "echo", ""),
    ("idle_ms", "idle between, ms", ".0f"),
    ("p50_ms", "p50 ms", ".3f"),
    ("p99_ms", "p99 ms", ".3f"),
    ("client_cpu_us", "client CPU µs/round trip", ".0f"),
]
COMMIT_COLUMNS = [
    ("sync", "sync", ""),
    ("wal", "WAL file", ""),
    ("insert_p50_ms", "new job p50 ms", ".3f"),
    ("insert_p99_ms", "p99", ".3f"),
    ("update_p50_ms", "result p50 ms", ".3f"),
    ("update_p99_ms", "p99", ".3f"),
]


@click.command()
@click.option("--round-trips", default=2_000, show_default=True, type=click.IntRange(10, 1_000_000))
@click.option("--commits", "n_commits", default=500, show_default=True, type=click.IntRange(10, 1_000_000),
              help="Jobs committed, then completed: twice as many commits, all in one checkpoint cycle.")
@click.option("--echo-server", type=click.Choice(ECHO_KINDS), hidden=True)
@click.option("--certs", type=click.Path(path_type=Path), hidden=True)
@_report.json_option
def main(round_trips: int, n_commits: int, echo_server: str | None, certs: Path | None, json_path: str | None) -> None:
    if echo_server:
        serve_echo(echo_server, certs)
        return
    echoes = [row for kind in ECHO_KINDS for row in echo(kind, round_trips)]
    stores = [commits(n_commits, "full"), commits(n_commits, "full", presize_wal=False), commits(n_commits, "normal")]
    disk = fsync_floor()
    print(_report.table(echoes, ECHO_COLUMNS))
    print()
    print(_report.table(stores, COMMIT_COLUMNS))
    print(f"\nfdatasync of one 4 KiB block: p50 {disk['fdatasync_p50_ms']:.3f} ms, p99 {disk['fdatasync_p99_ms']:.3f} ms")
    idle_tls = next(r for r in echoes if r["kind"] == "trio-tls" and r["idle_ms"])
    full = stores[0]
    floor = {
        "idle_tls_round_trips": 2,
        "commits": "one new job, one result (FULL)",
        "p50_ms": 2 * idle_tls["p50_ms"] + full["insert_p50_ms"] + full["update_p50_ms"],
    }
    print(
        f"\nan idle job's floor here, with none of trioq's own work: two idle TLS round trips and two FULL"
        f" commits = {floor['p50_ms']:.2f} ms at the p50"
    )
    print(f"wrote {_report.save('floor', {'echo': echoes, 'commits': stores, 'disk': disk, 'floor': floor}, json_path)}")


if __name__ == "__main__":
    main()
