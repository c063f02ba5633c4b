"""/metrics: Prometheus text that parses, and counters that agree with /api/stats."""

from __future__ import annotations

import httpx
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from trioq.http.app import create_app
from trioq.http.metrics import Histogram, TimeSeries
from trioq.job import JobSpec, JobState
from trioq.worker.registry import Registry
from trioq.worker.runner import Worker

from .conftest import memory_broker, memory_connect


def boom() -> None:
    raise ValueError("boom")


def parse(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    families: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        families[fam.name] = [(s.name, s.labels, s.value) for s in fam.samples]
    return families


def total(samples: list[tuple[str, dict[str, str], float]], name: str) -> float:
    return sum(v for n, _, v in samples if n == name)


async def test_metrics_parse_and_agree_with_stats(nursery: trio.Nursery) -> None:
    broker = memory_broker(retry_base=0.01, retry_jitter=0.0)
    await broker.start_core(nursery)
    app = create_app(broker)
    reg = Registry()
    reg.register_task("boom", boom)
    worker = Worker(connect=memory_connect(broker, nursery), registry=reg, name="main", concurrency=4)
    await nursery.start(worker.run)
    # a second worker that takes a long job on its own queue, then stops and hands it back
    leaver = Worker(connect=memory_connect(broker, nursery), name="leaver", concurrency=1,
                    queues=("slowq",), grace=0.0)
    await nursery.start(leaver.run)
    await trio.testing.wait_all_tasks_blocked()

    ok_ids, _ = await broker.submit([JobSpec("noop") for _ in range(5)] + [JobSpec("reverse_string", {"data": "x"})])
    dead_ids, _ = await broker.submit([
        JobSpec("reverse_string", {"wrong": 1}),  # bad payload: dead at once, one failure
        JobSpec("boom", max_attempts=3),  # three failures, then dead
    ])
    (slow_id,), _ = await broker.submit([JobSpec("slow_task", {"seconds": 3600}, queue="slowq", priority=2)])
    for job_id in ok_ids + dead_ids:
        await broker.wait_job(job_id)
    await trio.testing.wait_all_tasks_blocked()
    assert broker.dispatcher.live[slow_id].state is JobState.RUNNING
    leaver.request_stop()
    await trio.testing.wait_all_tasks_blocked()
    assert broker.dispatcher.live[slow_id].state is JobState.QUEUED

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        stats = (await c.get("/api/stats")).json()
        r = await c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    fams = parse(r.text)

    assert stats["submitted_total"] == 9 and stats["completed_total"] == 6
    assert stats["failed_total"] == 4 and stats["requeued"] == 1
    assert total(fams["trioq_jobs_submitted"], "trioq_jobs_submitted_total") == stats["submitted_total"]
    assert total(fams["trioq_jobs_completed"], "trioq_jobs_completed_total") == stats["completed_total"]
    assert total(fams["trioq_jobs_failed"], "trioq_jobs_failed_total") == stats["failed_total"]
    assert total(fams["trioq_jobs_requeued"], "trioq_jobs_requeued_total") == stats["requeued"]

    by_task = {s[1]["task"]: s[2] for s in fams["trioq_jobs_failed"]}
    assert by_task == {"boom": 3, "reverse_string": 1}
    by_task = {s[1]["task"]: s[2] for s in fams["trioq_jobs_completed"]}
    assert by_task == {"noop": 5, "reverse_string": 1}
    assert {s[1]["task"]: s[2] for s in fams["trioq_jobs_requeued"]} == {"slow_task": 1}

    # dead letters can be alerted on: a counter, and what the store keeps by task and state
    assert total(fams["trioq_jobs_dead"], "trioq_jobs_dead_total") == 2
    assert total(fams["trioq_jobs_cancelled"], "trioq_jobs_cancelled_total") == 0
    finished = {(s[1]["task"], s[1]["state"]): s[2] for s in fams["trioq_finished_jobs"]}
    assert finished == {
        ("noop", "completed"): 5, ("reverse_string", "completed"): 1, ("reverse_string", "dead"): 1, ("boom", "dead"): 1,
    }

    depth = {(s[1]["queue"], s[1]["priority"]): s[2] for s in fams["trioq_queue_depth"]}
    assert depth == {("slowq", "2"): 1}
    ages = {(s[1]["queue"], s[1]["priority"]): s[2] for s in fams["trioq_oldest_queued_job_age_seconds"]}
    assert set(ages) == {("slowq", "2")} and ages["slowq", "2"] >= 0
    workers = {s[1]["status"]: s[2] for s in fams["trioq_workers"]}
    assert workers["idle"] == 1 and workers["busy"] == 0
    assert sum(workers.values()) == stats["workers"]["total"] == 1
    # every SUBMIT was answered, so the budget of uncommitted jobs is whole again
    assert fams["trioq_uncommitted_jobs_limit"][0][2] == broker.config.max_uncommitted
    assert fams["trioq_uncommitted_jobs"][0][2] == 0 and fams["trioq_submits_waiting_for_budget"][0][2] == 0
    held = broker.submit_budget.take_nowait(7)  # as while 7 jobs are being committed
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert parse((await c.get("/metrics")).text)["trioq_uncommitted_jobs"][0][2] == 7
    broker.submit_budget.give(held)

    # every dispatch is in the latency histogram; every finished attempt in the run time one
    dispatch = fams["trioq_dispatch_latency_seconds"]
    assert total(dispatch, "trioq_dispatch_latency_seconds_count") == broker.dispatcher.dispatched == 11
    buckets = [v for n, labels, v in dispatch if n.endswith("_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == 11
    run = fams["trioq_run_time_seconds"]
    counts = {labels["task"]: v for n, labels, v in run if n.endswith("_count")}
    assert counts == {"noop": 5, "reverse_string": 2, "boom": 3}


def test_histogram_buckets() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0, float("nan")):
        h.observe(v)
    assert h.counts == [2, 1, 1] and h.count == 4 and abs(h.sum - 2.65) < 1e-9


def test_timeseries_points_fill_gaps_and_forget_old_seconds() -> None:
    ts = TimeSeries(window=5, seed=1)
    ts.add_submitted(100.2, 3)
    ts.add_completed(100.7, 0.010)
    ts.add_completed(100.8, 0.030)
    ts.add_failed(102.1)
    pts = ts.points(103.5)
    assert [p["t"] for p in pts] == [100, 101, 102, 103]
    assert pts[0]["submitted"] == 3 and pts[0]["completed"] == 2
    assert pts[0]["latency_p50_ms"] == 10.0 and pts[0]["latency_p99_ms"] == 30.0
    assert pts[1]["completed"] == 0 and pts[1]["latency_p50_ms"] is None
    assert pts[2]["failed"] == 1
    # ten seconds later the window has moved past all of it
    assert ts.points(113.0) == []
    ts.add_submitted(200.0, 1)
    assert [p["t"] for p in ts.points(201.0)] == [200, 201]
