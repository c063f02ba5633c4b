"""Idle submit-to-result latency: one job at a time, two idle workers.

    python -m benchmarks.latency [--jobs 1000] [--sync full] [--api submit] [--steps]

Each row also gives the CPU that the broker, the workers and the client spent per job:
their sum against the mean latency shows how much of an idle job is CPU on this machine
(``python -m benchmarks.floor`` measures the parts that are not trioq's). ``--steps`` runs each
process under ``benchmarks.stepcount`` and adds its turns of Trio's run loop and task steps per job.
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

PROCESSES = ("broker", "workers", "client")
STEP_COLUMNS = [("sync", "sync", ""), ("api", "api", "")] + [
    (f"{proc}_{k}", f"{proc} {label}/job", ".1f")
    for proc in PROCESSES for k, label in (("loop_turns", "loop turns"), ("task_steps", "task steps"))
]


@click.command()
@click.option("--jobs", default=1_000, show_default=True, type=click.IntRange(1))
@click.option("--sync", "syncs", multiple=True, type=click.Choice(SYNC_MODES), help="Repeatable [default: full and normal].")
@click.option(
    "--api", "apis", multiple=True, type=click.Choice(LATENCY_APIS),
    help="submit: submit() then result(), two requests; run: Client.run, one. Repeatable [default: both].",
)
@click.option("--steps", is_flag=True, help="Count Trio's run-loop turns and task steps per job in each process.")
@_report.json_option
def main(jobs: int, syncs: tuple[str, ...], apis: tuple[str, ...], steps: bool, json_path: str | None) -> None:
    rows = []
    for sync in syncs or ("full", "normal"):
        for api in apis or LATENCY_APIS:
            r = latency(jobs, sync=sync, api=api, count_steps=steps)
            r["sync"] = sync
            rows.append(r)
    print(_report.table(rows, COLUMNS))
    if steps:
        print("(the counting instrument runs at every task step: with --steps, read the counts, not the times)")
        step_rows = [
            {"sync": r["sync"], "api": r["api"], **{
                f"{proc}_{k}": r["steps_per_job"][proc][k] for proc in PROCESSES for k in ("loop_turns", "task_steps")
            }}
            for r in rows
        ]
        print(_report.table(step_rows, STEP_COLUMNS))
        for r in rows:
            print(f"broker task steps per job by task ({r['sync']}, {r['api']}): {r['steps_per_job']['broker']['steps_by_task']}")
    name = "latency-steps" if steps else "latency"  # instrumented times must not replace the plain run's
    print(f"wrote {_report.save(name, {'runs': rows}, json_path)}")


if __name__ == "__main__":
    main()
