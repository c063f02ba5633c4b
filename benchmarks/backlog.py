"""A million queued jobs: broker memory, restart after kill -9 (serving, first job done, journal
loaded: the broker serves while it loads), drain rate.

    python -m benchmarks.backlog [--jobs 1000000]
"""

from __future__ import annotations

import click

from . import _report
from .trioq_bench import backlog


@click.command()
@click.option("--jobs", default=1_000_000, show_default=True, type=click.IntRange(1))
@_report.sync_option
@_report.json_option
def main(jobs: int, sync: str, json_path: str | None) -> None:
    r = backlog(jobs, sync=sync)
    for key in ("jobs", "enqueue_rate", "queued", "broker_rss_mib", "broker_rss_settled_mib", "restart_to_serving_s",
                "restart_to_status_s", "restart_to_first_completed_s", "restart_to_restored_s", "rss_after_restart_mib",
                "unfinished_after_restart", "completed_while_restoring", "drain_rate", "drain_wall_rate", "completed"):
        v = r.get(key)
        print(f"{key:<24} {v:,.2f}" if isinstance(v, float) else f"{key:<24} {v}")
    print(f"wrote {_report.save('backlog', r, json_path)}")
    if r["completed"] != jobs:
        raise SystemExit("not every job completed")


if __name__ == "__main__":
    main()
