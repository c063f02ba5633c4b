"""The HTTP API as an ASGI app on Trio: a broker core, a real worker over memory streams."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import attrs
import httpx
import orjson
import pytest
import trio
import trio.testing

from trioq.broker.budget import JobBudgetStatistics
from trioq.broker.server import Broker
from trioq.http.app import create_app, dashboard_dir
from trioq.job import JobSpec, JobState
from trioq.worker.registry import Fatal, Registry
from trioq.worker.runner import Worker

from .conftest import memory_broker, memory_connect

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def boom(reason: str = "boom") -> None:
    raise ValueError(reason)


def fatal() -> None:
    raise Fatal("never retried")


@attrs.define
class Env:
    broker: Broker
    worker: Worker
    client: httpx.AsyncClient
    nursery: trio.Nursery
    app: Any


def make_registry() -> Registry:
    reg = Registry()
    reg.register_task("boom", boom)
    reg.register_task("fatal", fatal)
    return reg


@pytest.fixture
async def env(nursery: trio.Nursery) -> AsyncIterator[Env]:
    broker = memory_broker(http_token=TOKEN, retry_base=0.01, retry_jitter=0.0)
    await broker.start_core(nursery)
    app = create_app(broker)
    worker = Worker(
        connect=memory_connect(broker, nursery), registry=make_registry(), name="w1",
        concurrency=4, reconnect=False, grace=0.0,
    )
    await nursery.start(worker.run)
    await trio.testing.wait_all_tasks_blocked()
    assert len(broker.dispatcher.workers) == 1
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield Env(broker, worker, client, nursery, app)


async def submit(env: Env, **body: Any) -> dict[str, Any]:
    r = await env.client.post("/api/submit", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    return r.json()


async def finished(env: Env, job_id: str) -> dict[str, Any]:
    job = await env.broker.wait_job(job_id)
    assert job is not None
    r = await env.client.get(f"/api/jobs/{job_id}")
    assert r.status_code == 200
    return r.json()


def assert_error(r: httpx.Response, status: int, code: str | None = None, mentions: str | None = None) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str)
    if code is not None:
        assert body["error"]["code"] == code, body
    if mentions is not None:
        assert mentions in body["error"]["message"], body


# --- reading ----------------------------------------------------------------------------------


async def test_stats_and_workers(env: Env) -> None:
    r = await env.client.get("/api/stats")
    assert r.status_code == 200
    stats = r.json()
    for key in ("queue_size", "requeued", "submitted_total", "completed_total", "failed_total", "total", "uptime"):
        assert key in stats
    assert stats["workers"]["total"] == 1 and stats["workers"]["idle"] == 1 and stats["workers"]["busy"] == 0
    assert set(stats["jobs"]) >= {"queued", "scheduled", "running", "completed", "dead", "cancelled"}

    r = await env.client.get("/api/workers")
    assert r.status_code == 200
    (w,) = r.json()["workers"]
    assert w["name"] == "w1" and w["status"] == "idle" and w["concurrency"] == 4
    assert "boom" in w["tasks"] and w["queues"] == ["default"]


async def test_submit_runs_the_job_and_get_shows_every_field(env: Env) -> None:
    out = await submit(env, task="reverse_string", payload={"data": "hello"}, priority=2, queue="default")
    assert out["existing"] is False
    assert out["job"]["id"] == out["id"] and out["job"]["priority"] == 2
    assert out["job"]["payload"] == {"data": "hello"}
    job = await finished(env, out["id"])
    assert job["state"] == "completed" and job["result"] == "olleh"
    assert job["attempts"] == 1 and job["worker"] == "w1"
    for key in ("payload", "error", "progress", "created_at", "started_at", "finished_at", "max_attempts", "seq"):
        assert key in job
    assert job["finished_at"] >= job["started_at"] >= job["created_at"]


async def test_failed_job_shows_error_with_traceback(env: Env) -> None:
    out = await submit(env, task="fatal")
    job = await finished(env, out["id"])
    assert job["state"] == "dead" and job["dead_reason"] == "not_retryable"
    assert job["error"]["type"] == "Fatal"
    assert "Traceback" in job["error"]["traceback"]


async def test_idempotency_key_returns_the_existing_job(env: Env) -> None:
    env.broker.dispatcher.paused.add("held")  # keep the first one unfinished
    first = await submit(env, task="noop", queue="held", idempotency_key="k-1")
    r = await env.client.post("/api/submit", json={"task": "noop", "queue": "held", "idempotency_key": "k-1"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == first["id"] and r.json()["existing"] is True


async def test_list_jobs_newest_first_with_cursor_and_filters(env: Env) -> None:
    ids = [(await submit(env, task="noop"))["id"] for _ in range(5)]
    failed = (await submit(env, task="fatal"))["id"]
    for job_id in [*ids, failed]:
        await env.broker.wait_job(job_id)

    seen: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": "2", "task": "noop"}
        if cursor is not None:
            params["cursor"] = cursor
        r = await env.client.get("/api/jobs", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["jobs"]) <= 2
        seen.extend(page["jobs"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert isinstance(cursor, str)
    assert [j["id"] for j in seen] == list(reversed(ids))
    assert pages >= 3
    assert all(j["payload"] == {} and j["state"] == "completed" for j in seen)

    r = await env.client.get("/api/jobs", params={"state": "dead"})
    assert [j["id"] for j in r.json()["jobs"]] == [failed]
    r = await env.client.get("/api/jobs", params={"queue": "nope"})
    assert r.json() == {"jobs": [], "next_cursor": None}


async def test_tasks_and_timeseries(env: Env) -> None:
    ids = [(await submit(env, task="noop"))["id"] for _ in range(3)]
    ids.append((await submit(env, task="fatal"))["id"])
    for job_id in ids:
        await env.broker.wait_job(job_id)
    r = await env.client.get("/api/tasks")
    assert r.status_code == 200
    data = r.json()
    tasks = {t["name"]: t for t in data["tasks"]}
    assert tasks["noop"]["completed"] == 3 and tasks["noop"]["total"] == 3
    assert tasks["fatal"]["dead"] == 1 and tasks["fatal"]["total"] == 1
    assert {"boom", "fatal", "noop", "reverse_string"} <= set(data["known"])
    assert data["known"] == sorted(data["known"])

    r = await env.client.get("/api/timeseries")
    ts = r.json()
    assert ts["interval"] == 1
    points = ts["points"]
    assert points and all(set(p) == {"t", "submitted", "completed", "failed", "latency_p50_ms", "latency_p99_ms"} for p in points)
    assert [p["t"] for p in points] == list(range(points[0]["t"], points[0]["t"] + len(points)))
    assert sum(p["submitted"] for p in points) == 4
    assert sum(p["completed"] for p in points) == 3
    assert sum(p["failed"] for p in points) == 1
    lat = [p for p in points if p["completed"]]
    assert all(p["latency_p50_ms"] is not None and p["latency_p99_ms"] >= p["latency_p50_ms"] >= 0 for p in lat)


async def test_security_health_openapi_and_pages(env: Env) -> None:
    r = await env.client.get("/api/security")
    assert r.status_code == 200
    sec = r.json()
    assert sec["tls"] is False and sec["tls_version"] is None
    assert sec["client_auth"] == "open (loopback only)"
    assert sec["http_tls"] is False and sec["protocol_version"] == 1

    r = await env.client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "store_healthy": True}
    env.broker.writer.healthy = False
    r = await env.client.get("/healthz")
    assert r.status_code == 503 and r.json()["store_healthy"] is False
    env.broker.writer.healthy = True
    env.broker.closing = True  # as shutdown() sets it, for the grace and the close
    r = await env.client.get("/healthz")
    assert r.status_code == 503 and r.json() == {"status": "stopping", "store_healthy": True}
    env.broker.closing = False

    r = await env.client.get("/openapi.json")
    assert r.status_code == 200 and r.json()["openapi"].startswith("3.")

    r = await env.client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "trioq" in r.text
    if (dashboard_dir() / "app.js").is_file():
        r = await env.client.get("/static/app.js")
        assert r.status_code == 200
    r = await env.client.get("/static/..%2F..%2Fpyproject.toml")
    assert r.status_code == 404
    r = await env.client.get("/static/no-such-file.js")
    assert r.status_code == 404


async def test_index_placeholder_when_dashboard_is_missing(env: Env, tmp_path, monkeypatch) -> None:
    import trioq.http.app as app_mod

    monkeypatch.setattr(app_mod, "dashboard_dir", lambda: tmp_path / "nothing")
    app = create_app(env.broker)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/")
    assert r.status_code == 200 and "dashboard files are not installed" in r.text


# --- the token rule ---------------------------------------------------------------------------

MUTATIONS = [
    ("/api/submit", {"task": "noop"}),
    ("/api/jobs/x/cancel", None),
    ("/api/jobs/x/retry", None),
    ("/api/jobs/x/discard", None),
    ("/api/queues/default/pause", None),
    ("/api/queues/default/resume", None),
    ("/api/workers/x/quiet", None),
    ("/api/workers/x/stop", None),
]


@pytest.mark.parametrize(("path", "body"), MUTATIONS)
async def test_mutations_need_the_token(env: Env, path: str, body: Any) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": "Bearer"}, {"Authorization": f"Bearer {TOKEN}x"}):
        r = await env.client.post(path, json=body, headers=headers)
        assert_error(r, 401, "unauthenticated")
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert env.broker.stats()["submitted_total"] == 0
    assert not env.broker.dispatcher.paused
    r = await env.client.post(path, json=body, headers=AUTH)
    assert r.status_code in (200, 201, 404), r.text  # past the gate (404: no job/worker "x")


async def test_no_token_configured_refuses_mutations(env: Env) -> None:
    env.broker.config.http_token = None
    app = create_app(env.broker)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/api/submit", json={"task": "noop"}, headers={"Authorization": "Bearer "})
        assert_error(r, 401, "unauthenticated")
        r = await c.post("/api/submit", json={"task": "noop"}, headers=AUTH)
        assert_error(r, 401, "unauthenticated", "no API token")


# --- bad input --------------------------------------------------------------------------------


async def test_submit_bad_input(env: Env) -> None:
    post = env.client.post

    async def raw(content: bytes) -> httpx.Response:
        return await post("/api/submit", content=content, headers={**AUTH, "Content-Type": "application/json"})

    assert_error(await raw(b"{not json"), 400, "bad_json")
    assert_error(await raw(b""), 400, "bad_json")
    assert_error(await raw(b"[1, 2]"), 422, "invalid_field")
    assert_error(await raw(b'"noop"'), 422, "invalid_field")
    cases = [
        ({}, "task"),
        ({"task": 5}, "task"),
        ({"task": "noop", "priority": "1"}, "priority"),
        ({"task": "noop", "priority": True}, "priority"),
        ({"task": "noop", "priority": 1.5}, "priority"),
        ({"task": "noop", "priority": 0}, "priority"),
        ({"task": "noop", "priority": 11}, "priority"),
        ({"task": "noop", "delay": "soon"}, "delay"),
        ({"task": "noop", "delay": -1}, "delay"),
        ({"task": "noop", "timeout": 0}, "timeout"),
        ({"task": "noop", "max_attempts": 0}, "max_attempts"),
        ({"task": "noop", "queue": "bad queue!"}, "queue"),
        ({"task": "noop", "queue": None}, "queue"),
        ({"task": "noop", "idempotency_key": ""}, "idempotency_key"),
        ({"task": "noop", "idempotency_key": 7}, "idempotency_key"),
        ({"task": "noop", "prority": 1}, "prority"),
        ({"task": "bad task name"}, "task"),
    ]
    for body, field in cases:
        r = await post("/api/submit", json=body, headers=AUTH)
        assert_error(r, 422, "invalid_field", field)
    r = await post("/api/submit", json={"task": "no_such_task"}, headers=AUTH)
    assert_error(r, 400, "unknown_task", "no_such_task")
    big = {"task": "noop", "payload": {"x": "a" * (env.broker.config.max_payload + 10)}}
    r = await post("/api/submit", content=orjson.dumps(big), headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    assert env.broker.stats()["submitted_total"] == 0


async def test_unknown_ids_and_wrong_states(env: Env) -> None:
    c = env.client
    assert_error(await c.get("/api/jobs/0123456789abcdef"), 404, "unknown_job")
    assert_error(await c.get("/api/jobs/" + "x" * 300), 404, "unknown_job")
    for action in ("cancel", "retry", "discard"):
        assert_error(await c.post(f"/api/jobs/nope/{action}", headers=AUTH), 404, "unknown_job")
    for action in ("quiet", "stop"):
        assert_error(await c.post(f"/api/workers/nope/{action}", headers=AUTH), 404, "unknown_worker")

    done = await submit(env, task="noop")
    await env.broker.wait_job(done["id"])
    assert_error(await c.post(f"/api/jobs/{done['id']}/retry", headers=AUTH), 409, "invalid_state")
    assert_error(await c.post(f"/api/jobs/{done['id']}/cancel", headers=AUTH), 409, "invalid_state")
    later = await submit(env, task="noop", delay=3600)
    assert_error(await c.post(f"/api/jobs/{later['id']}/discard", headers=AUTH), 409, "invalid_state")
    assert_error(await c.post(f"/api/jobs/{later['id']}/retry", headers=AUTH), 409, "invalid_state")

    assert_error(await c.post("/api/queues/bad%20name/pause", headers=AUTH), 422, "invalid_field")
    assert_error(await c.get("/api/nothing"), 404, "not_found")
    assert_error(await c.get("/api/submit"), 405, "method_not_allowed")
    assert_error(await c.delete("/api/jobs/x"), 405)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"state": "sleeping"}, "state"),
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"cursor": "abc"}, "cursor"),
        ({"cursor": "1e3"}, "cursor"),
        ({"sort": "asc"}, "sort"),
    ],
)
async def test_list_jobs_bad_query(env: Env, params: dict[str, str], field: str) -> None:
    assert_error(await env.client.get("/api/jobs", params=params), 422, "invalid_field", field)


# --- operations -------------------------------------------------------------------------------


async def test_cancel_retry_discard(env: Env) -> None:
    c = env.client
    job = await submit(env, task="noop", delay=3600)
    assert job["job"]["state"] == "scheduled"
    r = await c.post(f"/api/jobs/{job['id']}/cancel", headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    await env.broker.set_paused("default", True)  # retried jobs wait where we can see them
    r = await c.post(f"/api/jobs/{job['id']}/retry", headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "queued"
    await env.broker.set_paused("default", False)
    assert (await finished(env, job["id"]))["state"] == "completed"
    r = await c.post(f"/api/jobs/{job['id']}/discard", headers=AUTH)
    assert r.status_code == 200 and r.json()["id"] == job["id"]
    assert_error(await c.get(f"/api/jobs/{job['id']}"), 404, "unknown_job")

    dead = await submit(env, task="boom", max_attempts=2)
    assert (await finished(env, dead["id"]))["failures"] == 2
    await env.broker.set_paused("default", True)
    r = await c.post(f"/api/jobs/{dead['id']}/retry", headers=AUTH)
    assert r.status_code == 200 and r.json()["failures"] == 0 and r.json()["state"] == "queued"
    await env.broker.set_paused("default", False)
    again = await finished(env, dead["id"])
    assert again["state"] == "dead" and again["failures"] == 2


async def test_pause_and_resume_a_queue(env: Env) -> None:
    c = env.client
    r = await c.post("/api/queues/default/pause", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["name"] == "default" and r.json()["paused"] is True
    job = await submit(env, task="noop", priority=3)
    await trio.testing.wait_all_tasks_blocked()
    assert env.broker.dispatcher.live[job["id"]].state is JobState.QUEUED

    r = await c.get("/api/queues")
    queues = {q["name"]: q for q in r.json()["queues"]}
    q = queues["default"]
    assert q["paused"] is True and q["depth"] == 1 and q["by_priority"] == {"3": 1}
    assert q["oldest_age"] is not None and q["oldest_age"] >= 0

    r = await c.post("/api/queues/other/pause", headers=AUTH)
    assert r.json() == {"name": "other", "paused": True, "depth": 0, "running": 0, "oldest_age": None, "by_priority": {}}
    assert "other" in {q["name"] for q in (await c.get("/api/queues")).json()["queues"]}

    r = await c.post("/api/queues/default/resume", headers=AUTH)
    assert r.status_code == 200 and r.json()["paused"] is False
    assert (await finished(env, job["id"]))["state"] == "completed"
    q = {q["name"]: q for q in (await c.get("/api/queues")).json()["queues"]}["default"]
    assert q["depth"] == 0 and q["oldest_age"] is None


async def test_quiet_and_stop_a_worker(env: Env) -> None:
    c = env.client
    (wid,) = env.broker.worker_sessions
    r = await c.post(f"/api/workers/{wid}/quiet", headers=AUTH)
    assert r.status_code == 200 and r.json()["id"] == wid and r.json()["status"] == "quiet"
    r = await c.post(f"/api/workers/{wid}/stop", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "stopping"
    await trio.testing.wait_all_tasks_blocked()
    assert (await c.get("/api/workers")).json() == {"workers": []}
    assert_error(await c.post(f"/api/workers/{wid}/quiet", headers=AUTH), 404, "unknown_worker")


# --- server-sent events -----------------------------------------------------------------------


class SSEClient:
    """Drives the ASGI app by hand: httpx's ASGI transport buffers whole responses."""

    def __init__(self, app: Any, path: str = "/api/events") -> None:
        self.app = app
        self.path = path
        self.disconnected = trio.Event()
        self.status: int | None = None
        self.headers: dict[bytes, bytes] = {}
        self.done = trio.Event()
        self._send, self._recv = trio.open_memory_channel[bytes](math.inf)
        self._buffer = b""

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": self.path, "raw_path": self.path.encode(), "root_path": "",
            "query_string": b"", "headers": [(b"host", b"testserver")], "client": ("127.0.0.1", 1),
            "server": ("testserver", 80), "state": {},
        }
        sent_request = False
        started = trio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal sent_request
            if not sent_request:
                sent_request = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await self.disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                self.headers = dict(message["headers"])
                started.set()
            else:
                self._send.send_nowait(message.get("body", b""))

        async def go() -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                self.done.set()
                self._send.close()

        async with trio.open_nursery() as n:
            n.start_soon(go)
            await started.wait()
            task_status.started()

    async def events(self):
        """(event, data) for each event; ('comment', text) for comments."""
        async for chunk in self._recv:
            self._buffer += chunk
            while b"\n\n" in self._buffer:
                block, self._buffer = self._buffer.split(b"\n\n", 1)
                event, data = None, None
                for line in block.decode().split("\n"):
                    if line.startswith(":"):
                        yield "comment", line[1:].strip()
                    elif line.startswith("event: "):
                        event = line[len("event: "):]
                    elif line.startswith("data: "):
                        data = orjson.loads(line[len("data: "):])
                if event is not None:
                    yield event, data


async def test_sse_delivers_completed_job_and_stats(env: Env) -> None:
    sse = SSEClient(env.app)
    with trio.fail_after(10):
        await env.nursery.start(sse.run)
        assert sse.status == 200
        assert sse.headers[b"content-type"].startswith(b"text/event-stream")
        out = await submit(env, task="reverse_string", payload={"data": "abc"})
        saw_stats = False
        states = []
        async for event, data in sse.events():
            if event == "stats":
                saw_stats = True
                assert "queue_size" in data and "point" in data and "t" in data["point"]
            elif event == "job" and data["id"] == out["id"]:
                states.append(data["state"])
                if data["state"] == "completed":
                    assert data["result"] == "cba" and data["task"] == "reverse_string"
                    assert "payload" not in data
                    break
        assert saw_stats
        assert states[-1] == "completed"
        sse.disconnected.set()
        await sse.done.wait()  # the stream ends when the client goes


async def test_sse_worker_events(env: Env) -> None:
    sse = SSEClient(env.app)
    with trio.fail_after(10):
        await env.nursery.start(sse.run)
        (wid,) = env.broker.worker_sessions
        await env.client.post(f"/api/workers/{wid}/quiet", headers=AUTH)
        async for event, data in sse.events():
            if event == "worker":
                assert data["id"] == wid and data["event"] == "updated" and data["status"] == "quiet"
                break
        sse.disconnected.set()
        await sse.done.wait()


async def test_sse_coalesces_job_bursts(mock_clock: trio.testing.MockClock) -> None:
    """Thousands of changes a second: at most ~200 job events a second, latest state per job."""
    mock_clock.autojump_threshold = 0
    broker = memory_broker()
    app = create_app(broker)
    sse = SSEClient(app)
    async with trio.open_nursery() as nursery:
        await nursery.start(sse.run)
        await trio.testing.wait_all_tasks_blocked()
        n_jobs = 2000
        for state in ("queued", "running", "completed"):  # 6000 changes in one instant
            for i in range(n_jobs):
                broker.hub.publish("job", {"id": f"j{i}", "state": state})
        t0 = trio.current_time()
        received: dict[str, str] = {}
        in_first_second = 0
        keepalives = 0
        t_last = t0
        async for event, data in sse.events():
            if event == "job":
                assert data["id"] not in received, "a job was sent twice: not coalesced"
                received[data["id"]] = data["state"]
                t_last = trio.current_time()
                if t_last - t0 <= 1.0:
                    in_first_second += 1
            elif event == "comment" and data == "keepalive":
                keepalives += 1
            if len(received) == n_jobs and keepalives:
                break
        assert set(received.values()) == {"completed"}
        assert 200 <= in_first_second <= 260
        # 2000 jobs at 200/s: about ten seconds of (virtual) time
        assert 9.0 <= t_last - t0 <= 11.0
        sse.disconnected.set()
        await sse.done.wait()


async def test_an_http_submit_counts_in_the_budget_of_uncommitted_jobs(env: Env):
    """Like a producer's SUBMIT, it waits while other submits hold the whole budget."""
    budget = env.broker.submit_budget
    held = budget.take_nowait(budget.total)
    answered: list[int] = []

    async def post() -> None:
        r = await env.client.post("/api/submit", json={"task": "noop"}, headers=AUTH)
        answered.append(r.status_code)

    env.nursery.start_soon(post)
    await trio.testing.wait_all_tasks_blocked()
    assert answered == [] and env.broker.dispatcher.submitted == 0
    assert budget.statistics().waiting == 1
    budget.give(held)
    with trio.fail_after(5):
        while not answered:
            await trio.testing.wait_all_tasks_blocked()
    assert answered == [201] and env.broker.dispatcher.submitted == 1
    assert budget.statistics() == JobBudgetStatistics(budget.total, budget.total, 0)


async def test_an_http_submit_waiting_for_room_holds_no_budget(nursery, autojump_clock):
    broker = memory_broker(http_token=TOKEN, max_queued=1, max_uncommitted=1)
    await broker.start_core(nursery)
    await broker.submit([JobSpec("noop", {})])  # the broker is full; no worker takes it
    transport = httpx.ASGITransport(app=create_app(broker))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        answered: list[httpx.Response] = []

        async def post() -> None:
            answered.append(await client.post("/api/submit", json={"task": "noop"}, headers=AUTH))

        nursery.start_soon(post)
        await trio.sleep(1)
        # It waits for room, and the budget's one job is free for others meanwhile.
        assert answered == [] and broker.submit_budget.statistics() == JobBudgetStatistics(1, 1, 0)
        await trio.sleep(60)
        assert len(answered) == 1 and answered[0].status_code == 503
        assert answered[0].json()["error"]["code"] == "busy"
    assert broker.submit_budget.statistics() == JobBudgetStatistics(1, 1, 0)


async def test_a_retry_while_the_store_fails_is_busy_and_says_it_is_kept(env: Env):
    body = await submit(env, task="noop", queue="held")
    r = await env.client.post(f"/api/jobs/{body['id']}/cancel", headers=AUTH)
    assert r.status_code == 200
    env.broker.store.fail_writes = OSError("No space left on device")
    try:
        r = await env.client.post(f"/api/jobs/{body['id']}/retry", headers=AUTH)
    finally:
        env.broker.store.fail_writes = None
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["code"] == "busy" and "is made and is stored when it recovers" in error["message"]
    assert env.broker.dispatcher.live[body["id"]].state is JobState.QUEUED
