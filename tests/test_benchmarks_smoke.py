"""The benchmarks run end to end at a small size: every job acknowledged, run once, recorded.

Speed is never asserted here (it is measured by ``python -m benchmarks.*`` on a quiet machine);
this proves the harness itself counts right, with real broker and worker processes over TLS.
"""

from __future__ import annotations

import math

import pytest

from benchmarks import floor, stepcount, trioq_bench
from trioq.store.sqlite import SQLiteStore


def test_throughput_harness_counts_every_job_once():
    n = 3_000
    r = trioq_bench.throughput(n, batch=500, concurrency=32)
    assert r["acked"] == n and r["completed"] == n
    assert r["journal"] == {"rows": n, "distinct_ids": n, "extra_attempts": 0}
    assert r["enqueue_rate"] > 0 and math.isfinite(r["drain_rate"]) and r["drain_rate"] > 0
    assert r["broker_cpu_per_1000"] > 0 and r["workers_cpu_per_1000"] > 0


@pytest.mark.parametrize("api", trioq_bench.LATENCY_APIS)
def test_latency_harness_reports_ordered_percentiles(api):
    r = trioq_bench.latency(40, api=api)
    assert r["jobs"] == 40 and r["api"] == api
    assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert r["p50_ms"] <= r["max_ms"] and 0 < r["mean_ms"] <= r["max_ms"]
    assert r["client_cpu_ms"] > 0  # measured here, to the nanosecond
    assert min(r["broker_cpu_ms"], r["workers_cpu_ms"]) >= 0  # /proc counts 10 ms ticks: 40 jobs may show none


def test_latency_counts_each_process_s_scheduler_work_per_job():
    """Each process runs under benchmarks.stepcount; only the measured jobs are counted."""
    r = trioq_bench.latency(20, api="run", workers=1, count_steps=True)
    steps = r["steps_per_job"]
    assert set(steps) == {"broker", "workers", "client"}
    broker = steps["broker"]
    # at the least: read the SUBMIT and the RESULT, write the ACK, the DISPATCH and the final JOB
    assert broker["task_steps"] >= 5 and broker["loop_turns"] >= 3
    assert broker["steps_by_task"]["_run_writer"] >= 3  # one writer task per connection sends every frame
    assert steps["workers"]["task_steps"] >= 2 and steps["client"]["task_steps"] >= 2
    # the warm-up's 50 jobs are left out: counted in, the figures would be 3.5x as large
    assert broker["task_steps"] < 50


def test_step_differences_are_per_job_and_keep_only_tasks_that_ran():
    before = {"loop_turns": 10, "spawned": 1, "steps": {"a": 4, "b": 7}}
    after = {"loop_turns": 30, "spawned": 5, "steps": {"a": 24, "b": 7, "c": 2}}
    assert stepcount.difference(after, before, per=4) == {
        "loop_turns": 5.0, "spawned": 1.0, "task_steps": 5.5, "steps_by_task": {"a": 5.0, "c": 0.5},
    }


@pytest.mark.parametrize("kind", floor.ECHO_KINDS)
def test_floor_echo_round_trips_through_another_process(kind):
    rows = floor.echo(kind, n=30, idles=(0.0, 0.001))
    assert [(r["kind"], r["idle_ms"], r["round_trips"]) for r in rows] == [(kind, 0.0, 30), (kind, 1.0, 30)]
    assert all(0 < r["p50_ms"] <= r["p99_ms"] for r in rows)
    assert all(r["client_cpu_us"] > 0 for r in rows)


def test_a_floor_echo_whose_server_closes_ends_with_an_error_not_a_spin():
    """An empty read is the end of the stream: counted as 0 bytes it would spin forever."""
    with pytest.raises(ConnectionError, match="closed"):
        floor._received(0)
    assert floor._received(7) == 7


@pytest.mark.parametrize("presize_wal", [True, False])
def test_floor_commits_store_every_job_and_result(presize_wal):
    r = floor.commits(25, "normal", presize_wal=presize_wal)
    assert r["commits"] == 50 and r["completed_rows"] == 25
    if presize_wal:  # every commit written inside the grown file
        assert r["wal_bytes_at_open"] == r["wal_bytes_at_end"] == SQLiteStore.wal_presize_bytes
    else:  # every commit extended it
        assert r["wal_bytes_at_open"] < r["wal_bytes_at_end"] < SQLiteStore.wal_presize_bytes
    assert 0 < r["insert_p50_ms"] <= r["insert_p99_ms"] and 0 < r["update_p50_ms"] <= r["update_p99_ms"]


def test_stress_harness_runs_the_old_stress_shape():
    r = trioq_bench.stress(producers=20, jobs_each=3)
    assert r["jobs"] == 60 and r["succeeded"] == 60
    assert r["throughput"] > 0 and r["avg_ms"] > 0


def test_profile_summary_counts_work_by_function_and_layer_and_sets_waits_apart():
    from benchmarks import profile

    folded = [
        "<module> (trioq/__main__.py:3);run (trio/_core/_run.py:2535);get_events (trio/_core/_io_epoll.py:243) 999\n",
        "<module> (trioq/__main__.py:3);run (trio/_core/_run.py:2535);EpollIOManager.get_events (trio/_core/_io_epoll.py:243) 50\n",
        "<module> (trioq/__main__.py:3);StoreWriter.run (trioq/store/writer.py:137);_transaction (trioq/store/sqlite.py:179) 30\n",
        "<module> (trioq/__main__.py:3);StoreWriter.run (trioq/store/writer.py:140);_transaction (trioq/store/sqlite.py:181) 10\n",
        "<module> (trioq/__main__.py:3);Broker.submit (trioq/broker/server.py:520);SSLObject.read (ssl.py:921) 20\n",
        "not a sample line\n",
    ]
    s = profile.summarize(folded, top=5)
    assert (s["samples"], s["idle_samples"], s["busy_samples"]) == (1109, 50, 1059)
    # an unknown leaf is work; lines of one function are one entry
    assert [(r["name"], r["samples"]) for r in s["self"]] == [
        ("get_events (trio/_core/_io_epoll.py)", 999),
        ("_transaction (trioq/store/sqlite.py)", 40),
        ("SSLObject.read (ssl.py)", 20),
    ]
    assert {r["name"]: r["samples"] for r in s["layers"]} == {"trio core": 999, "trioq.store": 40, "TLS (trio._ssl, ssl)": 20}
    # trioq's functions with their callees; the entry point under every sample is left out
    assert {r["name"]: r["samples"] for r in s["total"]} == {
        "StoreWriter.run (trioq/store/writer.py)": 40,
        "_transaction (trioq/store/sqlite.py)": 40,
        "Broker.submit (trioq/broker/server.py)": 20,
    }
    assert abs(sum(r["share"] for r in s["layers"]) - 1) < 1e-9


def test_restart_harness_writes_a_journal_a_restarted_broker_loads_whole(tmp_path):
    from benchmarks import restart

    journal = tmp_path / "journal.db"
    restart.write_journal(journal, 2_500, 3, progress=False)
    r = restart.time_restart(journal)
    assert r["queued"] == 2_500
    assert 0 < r["serving_s"] <= r["status_s"] <= r["loaded_s"]
