"""Idle submit-to-result latency: one job at a time, two idle workers.

    python -m benchmarks.latency [--jobs 1000] [--sync full]
"""

from __future__ import annotations

import click

from trioq.store.sqlite import SYNC_MODES

from . import _report
from .trioq_bench import latency

COLUMNS = [
    ("sync", "sync", ""),
    ("p50_ms", "p50 ms", ".3f"),
    ("p90_ms", "p90 ms", ".3f"),
    ("p99_ms", "p99 ms", ".3f"),
    ("max_ms", "max ms", ".3f"),
]


@click.command()
@click.option("--jobs", default=1_000, show_default=True, type=click.IntRange(1))
@click.option("--sync", "syncs", multiple=True, type=click.Choice(SYNC_MODES), help="Repeatable [default: full and normal].")
@_report.json_option
def main(jobs: int, syncs: tuple[str, ...], json_path: str | None) -> None:
    rows = []
    for sync in syncs or ("full", "normal"):
        r = latency(jobs, sync=sync)
        r["sync"] = sync
        rows.append(r)
    print(_report.table(rows, COLUMNS))
    print(f"wrote {_report.save('latency', {'runs': rows}, json_path)}")


if __name__ == "__main__":
    main()
