"""End-to-end durable throughput: N no-op jobs, one producer in batches, two worker processes.

    python -m benchmarks.throughput [--jobs 100000] [--workers 2] [--sync full] [--runs 1] [--live]

By default the queue is filled first and the workers start after the last ACK (how the peer
harness measures every peer); ``--live`` starts the workers first, so they drain while the
producer is still submitting.
"""

from __future__ import annotations

import statistics

import click

from . import _report
from .trioq_bench import throughput

COLUMNS = [
    ("run", "run", ""),
    ("enqueue_rate", "enqueue jobs/s", ",.0f"),
    ("drain_rate", "drain jobs/s", ",.0f"),
    ("total_seconds", "drain s", ".2f"),
    ("broker_cpu_per_1000", "broker CPU s/1000", ".4f"),
    ("workers_cpu_per_1000", "workers CPU s/1000", ".4f"),
    ("completed", "completed", ","),
]


@click.command()
@click.option("--jobs", default=100_000, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--concurrency", default=256, show_default=True, type=click.IntRange(1))
@click.option("--batch", default=5_000, show_default=True, type=click.IntRange(1))
@_report.sync_option
@click.option("--runs", default=1, show_default=True, type=click.IntRange(1, 20))
@click.option("--live", is_flag=True, help="Start the workers before submitting (drain while enqueueing).")
@_report.json_option
def main(jobs: int, workers: int, concurrency: int, batch: int, sync: str, runs: int, live: bool,
         json_path: str | None) -> None:
    rows = []
    for i in range(runs):
        r = throughput(jobs, workers, batch=batch, concurrency=concurrency, sync=sync, progress=True, prefill=not live)
        r["run"] = i + 1
        if r["completed"] != jobs:
            raise SystemExit(f"only {r['completed']} of {jobs} jobs completed")
        rows.append(r)
    print(_report.table(rows, COLUMNS))
    summary = {k: statistics.median(r[k] for r in rows) for k in ("enqueue_rate", "drain_rate", "broker_cpu_per_1000")}
    print(f"median of {runs}: enqueue {summary['enqueue_rate']:,.0f} jobs/s, drain {summary['drain_rate']:,.0f} jobs/s "
          f"({rows[0]['durability']})")
    out = _report.save("throughput", {"runs": rows, "median": summary}, json_path)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
