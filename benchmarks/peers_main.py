"""Run the throughput and latency workloads against trioq's peers and compare.

    python -m benchmarks.peers_main [--jobs N] [--latency-jobs M] [--only rq,celery,...]
                                    [--json PATH] [--timeout S] [--workers W]

Each peer runs in its own child process against its own server (Redis with AOF
``everysec``, or beanstalkd with a binlog), started here on a free loopback
port in a temp dir and stopped afterwards; every peer has a hard timeout and a
peer that fails, times out or is not installed becomes a row, not a crash.  If
``benchmarks.trioq_bench`` is importable and has ``throughput`` and
``latency``, trioq runs in the same session and the table shows
trioq/peer drain-rate and peer/trioq p50 ratios.  See ``benchmarks.peers`` for
how each number is taken.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.peers import (
    DEFAULT_TIMEOUT,
    DEFAULT_WORKERS,
    PEERS,
    REPO_ROOT,
    TRIOQ,
    Deadline,
    PeerError,
    PeerSpec,
    Server,
    beanstalkd_version,
    cleanup_pids,
    log_tail,
    redis_version,
    remove_tree,
    select,
    spawn,
    start_server,
    stop_tree,
)

DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "peers.json"
THROUGHPUT_KEYS = ("enqueue_rate", "drain_rate", "total_seconds", "completed", "durability")
LATENCY_KEYS = ("p50_ms", "p90_ms", "p99_ms", "max_ms")
METHOD = (
    "throughput: N no-op jobs enqueued by one producer while no worker runs (enqueue_rate), then "
    "2 worker processes drain the backlog; drain_rate = N / (last task body run - first task "
    "body started), from per-process counters flushed by the workers; total_seconds = enqueue "
    "time + drain time (worker boot excluded, see startup_seconds); completed = distinct job "
    "indices executed. latency: 2 idle, warmed-up worker processes; M jobs submitted one at a "
    "time, each awaited through the peer's result path; submit-to-result percentiles. trioq's "
    "numbers come from benchmarks.trioq_bench the same way: the queue is filled with no worker "
    "running, then 2 worker processes drain it; drain_rate = completed / (first dispatch - last "
    "finish) as the broker recorded them in its journal."
)


def trioq_hook_problem() -> str | None:
    """Why the trioq hook cannot run, or None if it can."""
    try:
        bench = importlib.import_module("benchmarks.trioq_bench")
    except Exception as exc:  # any import failure means: skip trioq
        return f"benchmarks.trioq_bench is not importable ({type(exc).__name__}: {exc})"
    missing = [
        name for name in ("throughput", "latency") if not callable(getattr(bench, name, None))
    ]
    if missing:
        return f"benchmarks.trioq_bench lacks {', '.join(missing)}()"
    return None


class _Status:
    """One progress line on stderr (rewritten in place on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._text = ""
        self._printed = 0.0

    def show(self, text: str) -> None:
        if not self.enabled or text == self._text:
            return
        now = time.monotonic()
        if self.tty:
            sys.stderr.write(f"\r\x1b[K{text}")
        elif now - self._printed >= 5.0 or text.endswith(("done", "starting")):
            sys.stderr.write(f"{text}\n")
            self._printed = now
        else:
            return
        sys.stderr.flush()
        self._text = text

    def end(self, text: str) -> None:
        if not self.enabled:
            return
        sys.stderr.write(f"\r\x1b[K{text}\n" if self.tty else f"{text}\n")
        sys.stderr.flush()
        self._text = ""


def _loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (other work on the machine skews the numbers)."""
    return [round(x, 2) for x in os.getloadavg()]


def _child_timeout(remaining: float) -> float:
    """The child's own deadline: early enough to report before it is killed."""
    return max(1.0, remaining - min(20.0, 0.1 * remaining))


def _base_row(spec: PeerSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "status": "ok",
        "error": None,
        "versions": spec.versions(),
        "server": None,
        "durability": spec.durability,
        "enqueue_api": spec.enqueue_api,
        "settings": spec.settings,
        "throughput": None,
        "latency": None,
        "seconds": None,
    }


def run_one(
    spec: PeerSpec,
    jobs: int,
    latency_jobs: int,
    *,
    workers: int = DEFAULT_WORKERS,
    timeout: float = DEFAULT_TIMEOUT,
    status: _Status | None = None,
    keep_temp: bool = False,
) -> dict[str, Any]:
    """Run one peer (or trioq) in a child process under a hard timeout; return its row."""
    status = status or _Status(False)
    row = _base_row(spec)
    if spec is TRIOQ:
        problem = trioq_hook_problem()
        if problem:
            row.update(status="skipped", error=problem)
            return row
    elif missing := spec.missing():
        row.update(status="not installed", error=f"missing Python package(s): {', '.join(missing)}")
        return row

    began = time.monotonic()
    row["loadavg_before"] = _loadavg()
    deadline = Deadline(timeout)
    run_dir = Path(tempfile.mkdtemp(prefix=f"trioq-peers-{spec.name}-"))
    server: Server | None = None
    proc = None
    timed_out = False
    last_progress = "starting"
    try:
        status.show(f"[{spec.name}] starting")
        argv = [sys.executable, "-m", spec.module, "bench"]
        if spec.server is not None:
            server = start_server(spec.server, run_dir)
            row["server"] = server.version
            argv += ["--url", server.url]
        argv += [
            "--jobs",
            str(jobs),
            "--latency-jobs",
            str(latency_jobs),
            "--workers",
            str(workers),
            "--run-dir",
            str(run_dir),
            "--timeout",
            str(_child_timeout(deadline.remaining())),
        ]
        proc = spawn(argv, run_dir / "bench.log")
        while proc.poll() is None:
            if deadline.expired():
                timed_out = True
                break
            try:
                last_progress = (run_dir / "progress").read_text() or last_progress
            except OSError:
                pass
            status.show(f"[{spec.name}] {last_progress} ({time.monotonic() - began:.0f} s)")
            time.sleep(0.25)
    except (PeerError, OSError) as exc:
        row.update(status="error", error=f"{type(exc).__name__}: {exc}")
    finally:
        if proc is not None:
            stop_tree(proc)
        cleanup_pids(run_dir)
        if server is not None:
            server.stop()

    if row["status"] == "ok":
        _collect(row, spec, proc, run_dir, jobs, timeout, timed_out, last_progress)
    row["seconds"] = round(time.monotonic() - began, 1)
    row["loadavg_after"] = _loadavg()
    status.end(f"[{spec.name}] {row['status']}" + (f": {row['error']}" if row["error"] else ""))
    if keep_temp:
        row["run_dir"] = str(run_dir)
    else:
        remove_tree(run_dir)
    return row


def _collect(
    row: dict[str, Any],
    spec: PeerSpec,
    proc: Any,
    run_dir: Path,
    jobs: int,
    timeout: float,
    timed_out: bool,
    last_progress: str,
) -> None:
    """Fill ``row`` from the child's result.json and exit status."""
    try:
        result = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        result = None
    errors: list[str] = []
    if result is not None:
        row["throughput"], row["latency"] = result.get("throughput"), result.get("latency")
        errors += result.get("errors", [])
    if timed_out:
        row["status"] = "timeout"
        errors.append(f"no result within {timeout:.0f} s (last progress: {last_progress})")
    elif result is None or (proc is not None and proc.returncode != 0):
        code = proc.returncode if proc is not None else None
        errors.append(f"benchmark process exited with {code}: {log_tail(run_dir / 'bench.log')}")

    tp = row["throughput"]
    if spec is TRIOQ and tp:
        row["durability"] = tp.get("durability", row["durability"])
    elif tp:
        tp["durability"] = spec.durability
    for part, keys in (("throughput", THROUGHPUT_KEYS), ("latency", LATENCY_KEYS)):
        missing = [k for k in keys if row[part] is not None and k not in row[part]]
        if missing:
            errors.append(f"{part} result lacks {', '.join(missing)}")
    if tp and tp.get("completed") != jobs:
        errors.append(f"completed {tp.get('completed')} of {jobs} jobs")
    if errors:
        row["error"] = "; ".join(errors)
        if row["status"] == "ok":
            row["status"] = "error"


def _ok_number(row: dict[str, Any] | None, part: str, key: str) -> float | None:
    value = ((row or {}).get(part) or {}).get(key)
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def add_trioq_ratios(rows: list[dict[str, Any]]) -> None:
    """Add ``vs_trioq`` (trioq/peer drain rate, peer/trioq p50) to each peer row."""
    trioq = next((r for r in rows if r["name"] == TRIOQ.name), None)
    trioq_drain = _ok_number(trioq, "throughput", "drain_rate")
    trioq_p50 = _ok_number(trioq, "latency", "p50_ms")
    for row in rows:
        if row["name"] == TRIOQ.name or trioq is None:
            continue
        drain = _ok_number(row, "throughput", "drain_rate")
        p50 = _ok_number(row, "latency", "p50_ms")
        row["vs_trioq"] = {
            "drain_rate_trioq_over_peer": round(trioq_drain / drain, 2)
            if trioq_drain and drain
            else None,
            "p50_peer_over_trioq": round(p50 / trioq_p50, 2) if trioq_p50 and p50 else None,
        }


def _complete(row: dict[str, Any]) -> bool:
    """Whether the row's throughput run completed every job it enqueued."""
    tp = row.get("throughput") or {}
    return bool(tp.get("completed") == tp.get("jobs"))


def best_of(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs of a peer: the throughput with the highest drain rate and
    the latency with the lowest p50 (the runs least disturbed by other work), plus a summary
    of every run under ``runs``."""
    row = dict(runs[0])
    failed = [(n, r) for n, r in enumerate(runs, 1) if r["status"] != "ok"]
    if failed:
        n, first = failed[0]
        prefix = f"run {n}/{len(runs)}: " if len(runs) > 1 else ""
        row["status"], row["error"] = first["status"], prefix + str(first["error"])
    with_tp = [r for r in runs if _ok_number(r, "throughput", "drain_rate") and _complete(r)]
    with_lat = [r for r in runs if _ok_number(r, "latency", "p50_ms")]
    if with_tp:
        row["throughput"] = max(with_tp, key=lambda r: r["throughput"]["drain_rate"])["throughput"]
    if with_lat:
        row["latency"] = min(with_lat, key=lambda r: r["latency"]["p50_ms"])["latency"]
    if len(runs) > 1:
        row["runs"] = [
            {
                "status": r["status"],
                "drain_rate": (r.get("throughput") or {}).get("drain_rate"),
                "enqueue_rate": (r.get("throughput") or {}).get("enqueue_rate"),
                "p50_ms": (r.get("latency") or {}).get("p50_ms"),
                "p99_ms": (r.get("latency") or {}).get("p99_ms"),
                "loadavg_before": r.get("loadavg_before"),
            }
            for r in runs
        ]
    return row


def run_peers(
    names: Iterable[str] | None = None,
    jobs: int = 20000,
    latency_jobs: int = 500,
    *,
    workers: int = DEFAULT_WORKERS,
    timeout: float = DEFAULT_TIMEOUT,
    repeat: int = 1,
    progress: bool = False,
    keep_temp: bool = False,
) -> list[dict[str, Any]]:
    """Run the named peers (None: trioq, if its hook exists, and every peer); one row each.

    With ``repeat`` > 1 the whole list runs that many times in turn (so a burst of
    other work on the machine hits one run of a peer, not all) and :func:`best_of`
    condenses each peer's runs.
    """
    status = _Status(progress)
    specs = {TRIOQ.name: TRIOQ, **PEERS}
    chosen = select(names)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
    for _ in range(max(1, repeat)):
        for name in chosen:
            previous = runs[name]
            if previous and previous[0]["status"] in ("not installed", "skipped"):
                continue
            row = run_one(
                specs[name],
                jobs,
                latency_jobs,
                workers=workers,
                timeout=timeout,
                status=status,
                keep_temp=keep_temp,
            )
            previous.append(row)
    rows = [best_of(runs[name]) for name in chosen]
    add_trioq_ratios(rows)
    return rows


def _fmt(value: Any, digits: int = 0) -> str:
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return "-"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a plain-text table, followed by durability notes and errors."""
    has_ratios = any("vs_trioq" in r for r in rows)
    header = [
        "peer",
        "status",
        "enqueue/s",
        "drain/s",
        "total s",
        "completed",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
    ]
    if has_ratios:
        header += ["trioq/peer drain", "peer/trioq p50"]
    table = [header]
    for r in rows:
        tp, lat = r.get("throughput") or {}, r.get("latency") or {}
        line = [
            r["name"],
            r["status"],
            _fmt(tp.get("enqueue_rate")),
            _fmt(tp.get("drain_rate")),
            _fmt(tp.get("total_seconds"), 2),
            _fmt(tp.get("completed")),
            _fmt(lat.get("p50_ms"), 2),
            _fmt(lat.get("p90_ms"), 2),
            _fmt(lat.get("p99_ms"), 2),
            _fmt(lat.get("max_ms"), 2),
        ]
        if has_ratios:
            ratios = r.get("vs_trioq") or {}
            line += [
                _fmt(ratios.get("drain_rate_trioq_over_peer"), 2),
                _fmt(ratios.get("p50_peer_over_trioq"), 2),
            ]
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    out = []
    for n, line in enumerate(table):
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("")
    out.append("durability:")
    out += [
        f"  {r['name']}: {r['durability']}"
        for r in rows
        if r["status"] in ("ok", "error", "timeout")
    ]
    problems = [r for r in rows if r["error"]]
    if problems:
        out.append("")
        out.append("notes:")
        out += [f"  {r['name']} ({r['status']}): {r['error']}" for r in problems]
    return "\n".join(out)


def host_info() -> dict[str, Any]:
    """What machine and software the numbers come from."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "redis_server": redis_version(),
        "beanstalkd": beanstalkd_version(),
        "loadavg_at_start": _loadavg(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers_main", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--jobs", type=int, default=20000, help="throughput jobs (default 20000)")
    parser.add_argument("--latency-jobs", type=int, default=500, help="latency jobs (default 500)")
    parser.add_argument("--only", help=f"comma-separated subset of: trioq,{','.join(PEERS)}")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per peer")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="worker processes")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per peer, best kept (default 1)"
    )
    parser.add_argument("--keep-temp", action="store_true", help="keep each peer's temp dir")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)

    try:
        names = select(args.only.split(",")) if args.only else None
    except ValueError as exc:
        parser.error(str(exc))
    if names is None or TRIOQ.name in names:
        problem = trioq_hook_problem()
        if problem:
            print(f"note: trioq skipped: {problem}", file=sys.stderr)

    started = datetime.now(UTC)
    host = host_info()
    rows = run_peers(
        names,
        args.jobs,
        args.latency_jobs,
        workers=args.workers,
        timeout=args.timeout,
        repeat=args.repeat,
        progress=not args.quiet,
        keep_temp=args.keep_temp,
    )
    report = {
        "generated_at": started.isoformat(timespec="seconds"),
        "host": host,
        "settings": {
            "jobs": args.jobs,
            "latency_jobs": args.latency_jobs,
            "workers": args.workers,
            "timeout_seconds": args.timeout,
            "repeat": args.repeat,
        },
        "method": METHOD,
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(rows))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
