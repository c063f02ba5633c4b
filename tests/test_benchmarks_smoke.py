"""The benchmarks run end to end at a small size: every job acknowledged, run once, recorded.

Speed is never asserted here (it is measured by ``python -m benchmarks.*`` on a quiet machine);
this proves the harness itself counts right, with real broker and worker processes over TLS.
"""

from __future__ import annotations

import math

from benchmarks import trioq_bench


def test_throughput_harness_counts_every_job_once():
    n = 3_000
    r = trioq_bench.throughput(n, batch=500, concurrency=32)
    assert r["acked"] == n and r["completed"] == n
    assert r["journal"] == {"rows": n, "distinct_ids": n, "extra_attempts": 0}
    assert r["enqueue_rate"] > 0 and math.isfinite(r["drain_rate"]) and r["drain_rate"] > 0
    assert r["broker_cpu_per_1000"] > 0 and r["workers_cpu_per_1000"] > 0


def test_latency_harness_reports_ordered_percentiles():
    r = trioq_bench.latency(40)
    assert r["jobs"] == 40
    assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]


def test_stress_harness_runs_the_old_stress_shape():
    r = trioq_bench.stress(producers=20, jobs_each=3)
    assert r["jobs"] == 60 and r["succeeded"] == 60
    assert r["throughput"] > 0 and r["avg_ms"] > 0
