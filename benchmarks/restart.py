"""Restart of a broker on a long journal, nothing else running: when it serves, when it has loaded.

    python -m benchmarks.restart [--jobs 1000000] [--priorities 1] [--runs 3]

The journal is written straight through the store (the broker's own rows, as if submitted),
once; each run starts ``trioq broker`` on a fresh copy of it and times the port accepting,
a status answered, and the journal loaded (``restoring`` false in the status).
"""

from __future__ import annotations

import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import trio

from trioq.job import Job, JobState
from trioq.store.sqlite import SQLiteStore

from . import _report
from .trioq_bench import bar, cluster, rss_bytes


def write_journal(path: Path, n: int, priorities: int, *, progress: bool = True) -> None:
    """n never-run queued jobs, priorities 1..``priorities`` at random, in one store."""
    store = SQLiteStore(path, synchronous="off")
    rec = store.open_sync()
    rng = random.Random(1)
    seq = rec.next_seq
    now = time.time()
    with bar(n, "written", progress) as b:
        for start in range(0, n, 20_000):
            k = min(20_000, n - start)
            ids = rec.job_ids.make(seq, k)
            rows = [
                store.insert_row(Job(ids[i], seq + i, "noop", {}, rng.randint(1, priorities), "default", JobState.QUEUED, created_at=now))
                for i in range(k)
            ]
            store.commit_sync(rows, [])
            seq += k
            b.update(k)
    store.close_sync()


def time_restart(journal: Path) -> dict[str, Any]:
    with cluster(workers=0) as c:
        shutil.copy(journal, c.db)
        t0 = time.perf_counter()
        c.start_broker()
        res: dict[str, Any] = {"serving_s": time.perf_counter() - t0}

        async def watch() -> None:
            async with c.client() as client:
                s = await client.status()
                res["status_s"] = time.perf_counter() - t0
                while s.get("restoring"):
                    await trio.sleep(0.05)
                    s = await client.status()
                res["loaded_s"] = time.perf_counter() - t0
                res["queued"] = s["jobs"]["queued"]

        trio.run(watch)
        assert c.broker is not None
        res["rss_mib"] = rss_bytes(c.broker.pid) / 2**20
        return res


@click.command()
@click.option("--jobs", default=1_000_000, show_default=True, type=click.IntRange(1))
@click.option("--priorities", default=1, show_default=True, type=click.IntRange(1, 10), help="Jobs spread over priorities 1..N.")
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1))
@_report.json_option
def main(jobs: int, priorities: int, runs: int, json_path: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="trioq-restart-") as d:
        journal = Path(d) / "journal.db"
        write_journal(journal, jobs, priorities, progress=sys.stderr.isatty())
        results = [time_restart(journal) for _ in range(runs)]
    for r in results:
        if r["queued"] != jobs:
            raise SystemExit(f"{r['queued']} jobs queued after the restart, not {jobs}")
    print(_report.table(results, [("serving_s", "serving (s)", ".2f"), ("status_s", "status (s)", ".2f"),
                                  ("loaded_s", "loaded (s)", ".2f"), ("rss_mib", "RSS (MiB)", ".0f")]))
    summary = {k: statistics.median(r[k] for r in results) for k in ("serving_s", "status_s", "loaded_s", "rss_mib")}
    print("median: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items()))
    print(f"wrote {_report.save('restart', {'jobs': jobs, 'priorities': priorities, 'runs': results, 'median': summary}, json_path)}")


if __name__ == "__main__":
    main()
