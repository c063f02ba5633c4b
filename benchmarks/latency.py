"""Idle submit-to-result latency: one job at a time, two idle workers.

    python -m benchmarks.latency [--jobs 1000] [--sync full] [--api submit]

Each row also gives the CPU that the broker, the workers and the client spent per job:
their sum against the mean latency shows how much of an idle job is CPU on this machine
(``python -m benchmarks.floor`` measures the parts that are not trioq's).
"""

from __future__ import annotations

import click

from trioq.store.sqlite import SYNC_MODES

from . import _report
from .trioq_bench import LATENCY_APIS, latency

COLUMNS = [
    ("sync", "sync", ""),
    ("api", "api", ""),
    ("p50_ms", "p50 ms", ".3f"),
    ("p90_ms", "p90 ms", ".3f"),
    ("p99_ms", "p99 ms", ".3f"),
    ("max_ms", "max ms", ".3f"),
    ("mean_ms", "mean ms", ".3f"),
    ("broker_cpu_ms", "broker CPU ms/job", ".3f"),
    ("workers_cpu_ms", "workers", ".3f"),
    ("client_cpu_ms", "client", ".3f"),
]


@click.command()
@click.option("--jobs", default=1_000, show_default=True, type=click.IntRange(1))
@click.option("--sync", "syncs", multiple=True, type=click.Choice(SYNC_MODES), help="Repeatable [default: full and normal].")
@click.option(
    "--api", "apis", multiple=True, type=click.Choice(LATENCY_APIS),
    help="submit: submit() then result(), two requests; run: Client.run, one. Repeatable [default: both].",
)
@_report.json_option
def main(jobs: int, syncs: tuple[str, ...], apis: tuple[str, ...], json_path: str | None) -> None:
    rows = []
    for sync in syncs or ("full", "normal"):
        for api in apis or LATENCY_APIS:
            r = latency(jobs, sync=sync, api=api)
            r["sync"] = sync
            rows.append(r)
    print(_report.table(rows, COLUMNS))
    print(f"wrote {_report.save('latency', {'runs': rows}, json_path)}")


if __name__ == "__main__":
    main()
