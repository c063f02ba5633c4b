"""The broker's HTTP face: a JSON API, server-sent events, Prometheus metrics, the dashboard.

Reading is open; every mutating endpoint wants ``Authorization: Bearer <token>``.
Every error is ``{"error": {"code": ..., "message": ...}}`` with a 4xx status
(503 only when the broker itself cannot take work). The app runs on Trio: it
calls the broker directly, so serve it in the broker's own event loop.
"""

from __future__ import annotations

import hmac
import importlib.resources
import logging
from collections import deque
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import orjson
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

import trioq

from ..broker.server import worker_view
from ..broker.sessions import RequestError
from ..errors import ErrorCode, StoreError
from ..job import Job, JobSpec, JobState
from ..protocol.messages import PROTOCOL_VERSION, converter, describe_structure_error
from .metrics import CONTENT_TYPE, Metrics, metrics_for
from .openapi import build_openapi

if TYPE_CHECKING:
    from ..broker.server import Broker

log = logging.getLogger("trioq.http")

MAX_LIST_LIMIT = 500
#: job events sent per second per event-stream client at most (latest state per job wins)
SSE_JOB_RATE = 200.0
SSE_JOB_BURST = 50
SSE_MAX_PENDING = 5_000
SSE_STATS_INTERVAL = 1.0
SSE_KEEPALIVE = 15.0
SSE_FLUSH_INTERVAL = 0.05

SUBMIT_FIELDS = frozenset(a.name for a in attrs.fields(JobSpec))

PLACEHOLDER_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>trioq broker</title></head>
<body><h1>trioq broker</h1>
<p>The dashboard files are not installed. The API is at <a href="/api/stats">/api/stats</a>,
its description at <a href="/openapi.json">/openapi.json</a>, metrics at <a href="/metrics">/metrics</a>.</p>
</body></html>
"""

_STATUS_BY_CODE = {
    ErrorCode.UNKNOWN_JOB: 404,
    ErrorCode.INVALID_STATE: 409,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.INVALID_FIELD: 422,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.BUSY: 503,
    ErrorCode.TIMEOUT: 503,
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def dashboard_dir() -> Path:
    """The dashboard's files: packaged in the wheel, or the repository's folder in a checkout."""
    try:
        packaged = importlib.resources.files("trioq") / "_dashboard"
        if packaged.is_dir():
            return Path(str(packaged))
    except (ModuleNotFoundError, OSError, TypeError):  # pragma: no cover - exotic loaders
        pass
    return Path(trioq.__file__).resolve().parent.parent / "dashboard"


def job_json(job: Job) -> dict[str, Any]:
    """Every field of a job (payload, result, error with traceback, progress)."""
    return converter.unstructure(job)


class HttpApi:
    """The endpoints, bound to one broker."""

    def __init__(self, broker: Broker, token: str | None) -> None:
        self.broker = broker
        self.token = token.encode() if token else None
        self.metrics: Metrics = metrics_for(broker)
        self.dashboard = dashboard_dir()
        self.openapi = orjson.dumps(build_openapi())
        self.max_body = broker.config.max_payload + 64 * 1024

    # --- helpers -------------------------------------------------------------------------

    def require_token(self, request: Request) -> None:
        challenge = {"WWW-Authenticate": 'Bearer realm="trioq"'}
        if self.token is None:
            raise ApiError(401, "unauthenticated", "no API token is configured on this broker; mutations are disabled", challenge)
        header = request.headers.get("authorization")
        if not header:
            raise ApiError(401, "unauthenticated", "this endpoint needs 'Authorization: Bearer <token>'", challenge)
        scheme, _, given = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "unauthenticated", "the Authorization header must be 'Bearer <token>'", challenge)
        if not hmac.compare_digest(given.strip().encode("latin-1"), self.token):
            raise ApiError(401, "unauthenticated", "wrong token", challenge)

    async def read_json(self, request: Request) -> Any:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise ApiError(413, "too_large", f"request body over {self.max_body} bytes")
        if not body.strip():
            raise ApiError(400, "bad_json", "the request body is empty; expected a JSON object")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "bad_json", f"the request body is not valid JSON: {exc}") from None

    @staticmethod
    def refused(exc: RequestError) -> ApiError:
        return ApiError(_STATUS_BY_CODE.get(exc.code, 400), exc.code.value, exc.message)

    async def job_or_404(self, job_id: str) -> Job:
        job = await self.broker.get_job(job_id)
        if job is None:
            raise ApiError(404, "unknown_job", f"no job with id {job_id!r}")
        return job

    def queues(self) -> dict[str, dict[str, Any]]:
        d = self.broker.dispatcher
        now = self.broker.now()
        info: dict[str, dict[str, Any]] = {}

        def entry(name: str) -> dict[str, Any]:
            q = info.get(name)
            if q is None:
                q = info[name] = {
                    "name": name, "paused": name in d.paused, "depth": 0, "running": 0,
                    "oldest_age": None, "by_priority": {}, "_oldest": None,
                }
            return q

        for job in d.live.values():
            q = entry(job.queue)
            state = job.state
            if state is JobState.RUNNING:
                q["running"] += 1
                continue
            q["depth"] += 1
            key = str(job.priority)
            q["by_priority"][key] = q["by_priority"].get(key, 0) + 1
            if state is JobState.QUEUED and (q["_oldest"] is None or job.created_at < q["_oldest"]):
                q["_oldest"] = job.created_at
        for (name, priority), n in d.unread_depths().items():  # a restart still loading
            q = entry(name)
            q["depth"] += n
            key = str(priority)
            q["by_priority"][key] = q["by_priority"].get(key, 0) + n
        for name in d.paused:
            entry(name)
        for slot in d.workers.values():
            for name in slot.queues:
                entry(name)
        for q in info.values():
            oldest = q.pop("_oldest")
            if oldest is not None:
                q["oldest_age"] = max(0.0, now - oldest)
            q["by_priority"] = dict(sorted(q["by_priority"].items(), key=lambda kv: int(kv[0])))
        return info

    def queue(self, name: str) -> dict[str, Any]:
        q = self.queues().get(name)
        if q is None:
            return {"name": name, "paused": name in self.broker.dispatcher.paused, "depth": 0,
                    "running": 0, "oldest_age": None, "by_priority": {}}
        return q

    # --- pages ---------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        index = self.dashboard / "index.html"
        if index.is_file():
            return FileResponse(index, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})
        return HTMLResponse(PLACEHOLDER_PAGE, headers={"Cache-Control": "no-cache"})

    async def openapi_json(self, request: Request) -> Response:
        return Response(self.openapi, media_type="application/json")

    async def healthz(self, request: Request) -> Response:
        healthy = self.broker.writer.healthy
        # A broker shutting down still answers, but a load balancer should send no one new.
        status = "stopping" if self.broker.closing else "ok" if healthy else "degraded"
        return JSONResponse(
            {"status": status, "store_healthy": healthy},
            status_code=200 if status == "ok" else 503,
        )

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # --- reading -------------------------------------------------------------------------

    async def stats(self, request: Request) -> Response:
        return JSONResponse(self.broker.stats())

    async def workers(self, request: Request) -> Response:
        return JSONResponse({"workers": self.broker.workers()})

    async def list_jobs(self, request: Request) -> Response:
        params = request.query_params
        unknown = sorted(set(params) - {"state", "task", "queue", "limit", "cursor"})
        if unknown:
            raise ApiError(422, "invalid_field", f"unknown query parameter(s): {', '.join(unknown)}")
        state = None
        raw_state = params.get("state")
        if raw_state is not None:
            try:
                state = JobState(raw_state)
            except ValueError:
                allowed = ", ".join(s.value for s in JobState)
                raise ApiError(422, "invalid_field", f"state must be one of {allowed}, not {raw_state[:50]!r}") from None
        limit = _int_param(params.get("limit"), "limit", 50, 1, MAX_LIST_LIMIT)
        cursor = _int_param(params.get("cursor"), "cursor", None, 0, 10**18 - 1)
        page = await self.broker.list_jobs(
            state=state, queue=params.get("queue") or None, task=params.get("task") or None,
            limit=limit, cursor=cursor,
        )
        return JSONResponse({
            "jobs": [job_json(j) for j in page.jobs],
            "next_cursor": None if page.next_cursor is None else str(page.next_cursor),
        })

    async def get_job(self, request: Request) -> Response:
        return JSONResponse(job_json(await self.job_or_404(request.path_params["id"])))

    async def list_queues(self, request: Request) -> Response:
        return JSONResponse({"queues": sorted(self.queues().values(), key=lambda q: q["name"])})

    async def security(self, request: Request) -> Response:
        broker = self.broker
        cfg = broker.config
        tls = broker.ssl_context is not None
        certificate = None
        cert_path = Path(cfg.certs_dir) / "server.pem"
        if tls or cfg.http_tls:
            try:
                from ..tls import describe_certificate

                certificate = describe_certificate(cert_path)
            except (OSError, ValueError):
                certificate = None
        if cfg.require_client_cert:
            client_auth = "mutual TLS"
        elif not broker.auth.open:
            client_auth = "tokens"
        else:
            client_auth = "open (loopback only)"
        return JSONResponse({
            "tls": tls,
            # what a client gets: 1.3 only, or 1.3 unless it can speak no more than 1.2
            "tls_version": (
                ("TLSv1.3 (minimum TLSv1.3)" if cfg.tls_min_version == "1.3" else "TLSv1.3 or TLSv1.2 (minimum TLSv1.2)")
                if tls else None
            ),
            "protocol_version": PROTOCOL_VERSION,
            "certificate": certificate,
            "port": broker.port,
            "http_port": broker.http_port,
            "client_auth": client_auth,
            "http_tls": cfg.http_tls,
        })

    async def tasks(self, request: Request) -> Response:
        d = self.broker.dispatcher
        rows: dict[str, dict[str, int]] = {}

        def row(task: str) -> dict[str, int]:
            r = rows.get(task)
            if r is None:
                r = rows[task] = {"queued": 0, "running": 0, "completed": 0, "dead": 0, "cancelled": 0}
            return r

        for job in d.live.values():
            r = row(job.task)
            if job.state is JobState.RUNNING:
                r["running"] += 1
            else:
                r["queued"] += 1  # queued or scheduled: waiting
        for (_, task, _), n in d.unread().items():  # a restart still loading the journal
            row(task)["queued"] += n
        for (task, state), n in d.finished.items():
            if n and state in ("completed", "dead", "cancelled"):
                row(task)[state] += n
        out = [{"name": name, **r, "total": sum(r.values())} for name, r in sorted(rows.items())]
        return JSONResponse({"tasks": out, "known": sorted(d.known_tasks)})

    async def timeseries(self, request: Request) -> Response:
        return JSONResponse(self.metrics.timeseries())

    # --- changing ------------------------------------------------------------------------

    async def submit(self, request: Request) -> Response:
        self.require_token(request)
        body = await self.read_json(request)
        if not isinstance(body, dict):
            raise ApiError(422, "invalid_field", "the body must be a JSON object with at least a 'task'")
        unknown = sorted(set(body) - SUBMIT_FIELDS)
        if unknown:
            raise ApiError(422, "invalid_field", f"unknown field(s): {', '.join(unknown)}")
        for name in ("priority", "max_attempts"):  # JSON Schema integers: 3.0 is 3
            v = body.get(name)
            if type(v) is float and v.is_integer() and abs(v) < 2**53:
                body[name] = int(v)
        try:
            spec = converter.structure(body, JobSpec)
        except Exception as exc:  # cattrs raises validation error groups and more
            raise ApiError(422, "invalid_field", describe_structure_error(exc)) from None
        broker = self.broker
        # Counted with the producers' SUBMITs in the budget of uncommitted jobs.
        share = await broker.submit_share(1)
        try:
            ids, existing = await broker.submit([spec], before_waiting=share.give_back)
        except RequestError as exc:
            raise self.refused(exc) from None
        except StoreError as exc:
            raise ApiError(503, "busy", f"not accepted, the store is failing: {exc}") from None
        finally:
            share.give_back()
        # In order with the SUBMIT event: the job as the dispatcher holds it (scheduled, queued...).
        job = await self.broker._call(self.broker.dispatcher.live.get, ids[0])
        if job is None:  # an idempotency match that has finished already
            job = await self.job_or_404(ids[0])
        return JSONResponse(
            {"id": ids[0], "existing": existing[0], "job": job_json(job)},
            status_code=200 if existing[0] else 201,
        )

    async def job_action(self, request: Request, action: str) -> Response:
        self.require_token(request)
        job_id = request.path_params["id"]
        broker = self.broker
        try:
            if action == "cancel":
                job = await broker.cancel_job(job_id)
            elif action == "retry":
                job = await broker.retry_job(job_id)
            else:
                job = await broker.discard_job(job_id)
        except RequestError as exc:
            raise self.refused(exc) from None
        except StoreError as exc:
            # The change is made and kept: the writer commits it again until the store recovers.
            raise ApiError(
                503, "busy", f"the store is failing ({exc}); the {action} is made and is stored when it recovers",
            ) from None
        return JSONResponse(job_json(job))

    async def queue_action(self, request: Request, pause: bool) -> Response:
        self.require_token(request)
        name = request.path_params["name"]
        try:
            await self.broker.set_paused(name, pause)
        except RequestError as exc:
            raise self.refused(exc) from None
        return JSONResponse(self.queue(name))

    async def worker_action(self, request: Request, stop: bool) -> Response:
        self.require_token(request)
        worker_id = request.path_params["id"]
        if worker_id not in self.broker.worker_sessions:
            raise ApiError(404, "unknown_worker", f"no worker with id {worker_id!r}")
        try:
            slot = await self.broker.drain_worker(worker_id, stop=stop)
        except RequestError as exc:  # gone meanwhile
            raise ApiError(404, "unknown_worker", exc.message) from None
        return JSONResponse(worker_view(slot))


def _int_param(raw: str | None, name: str, default: int | None, lo: int, hi: int) -> int | None:
    if raw is None:
        return default
    if not (0 < len(raw) <= 18 and raw.isascii() and raw.isdigit()):
        raise ApiError(422, "invalid_field", f"{name} must be an integer {lo}-{hi}, not {raw[:50]!r}")
    value = int(raw)
    if not lo <= value <= hi:
        raise ApiError(422, "invalid_field", f"{name} must be {lo}-{hi}, not {value}")
    return value


# --- server-sent events ---------------------------------------------------------------------


def _sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS) + b"\n\n"


class EventStream:
    """``GET /api/events``: job, worker and stats events as server-sent events.

    Job events are coalesced: when jobs change faster than ``SSE_JOB_RATE`` per
    second, only the latest state of each job is sent. The stream ends when the
    client goes away (``http.disconnect``) or the server is cancelled.
    """

    def __init__(self, api: HttpApi) -> None:
        self.api = api

    async def __call__(self, scope: dict, receive, send) -> None:
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache, no-transform"),
                (b"x-accel-buffering", b"no"),
            ],
        })
        if scope.get("method") == "HEAD":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        broker = self.api.broker
        with broker.hub.subscribe() as sub:
            async with trio.open_nursery() as nursery:
                state = _StreamState()
                nursery.start_soon(_until_disconnect, receive, nursery.cancel_scope)
                nursery.start_soon(_collect, sub.receive, state)
                await self._emit(send, state)

    async def _emit(self, send, state: _StreamState) -> None:
        api = self.api
        broker = api.broker
        clock = trio.current_time
        now = clock()
        tokens = float(SSE_JOB_BURST)
        last_refill = now
        next_stats = now
        next_keepalive = now + SSE_KEEPALIVE
        await send({"type": "http.response.body", "body": b": trioq events\n\n", "more_body": True})
        while True:
            now = clock()
            tokens = min(float(SSE_JOB_BURST), tokens + (now - last_refill) * SSE_JOB_RATE)
            last_refill = now
            chunks: list[bytes] = []
            while state.workers:
                chunks.append(_sse("worker", state.workers.popleft()))
            pending = state.jobs
            while pending and tokens >= 1.0:
                job_id = next(iter(pending))
                chunks.append(_sse("job", pending.pop(job_id)))
                tokens -= 1.0
            if now >= next_stats:
                chunks.append(_sse("stats", {**broker.stats(), "point": api.metrics.last_complete_point()}))
                next_stats = max(next_stats + SSE_STATS_INTERVAL, now)
            if now >= next_keepalive:
                chunks.append(b": keepalive\n\n")
                next_keepalive = now + SSE_KEEPALIVE
            if chunks:
                await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
            deadline = min(next_stats, next_keepalive)
            if pending:
                # more to send once the budget refills; flush in small batches
                refill = (1.0 - tokens) / SSE_JOB_RATE if tokens < 1.0 else 0.0
                deadline = min(deadline, clock() + max(SSE_FLUSH_INTERVAL, refill))
                await trio.sleep_until(deadline)
            else:
                state.wake = trio.Event()
                with trio.move_on_at(deadline):
                    await state.wake.wait()
                if state.jobs and not state.workers:
                    # let a burst gather before sending it
                    await trio.sleep(min(SSE_FLUSH_INTERVAL, max(0.0, deadline - clock())))


@attrs.define(eq=False)
class _StreamState:
    jobs: dict[str, Any] = attrs.Factory(dict)  # id -> latest summary, oldest change first
    workers: deque = attrs.Factory(lambda: deque(maxlen=1000))
    wake: trio.Event = attrs.Factory(trio.Event)


async def _collect(events: trio.MemoryReceiveChannel, state: _StreamState) -> None:
    async for kind, data in events:
        if kind == "job":
            jobs = state.jobs
            job_id = data["id"]
            jobs.pop(job_id, None)
            jobs[job_id] = data
            if len(jobs) > SSE_MAX_PENDING:
                del jobs[next(iter(jobs))]  # the stalest change goes first
        elif kind == "worker":
            state.workers.append(data)
        else:
            continue
        state.wake.set()


async def _until_disconnect(receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            scope.cancel()
            return


# --- the application -------------------------------------------------------------------------


class _SecurityHeaders:
    """A few headers every response gets."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"x-frame-options", b"DENY"))
                headers.append((b"referrer-policy", b"no-referrer"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _AllowedHosts:
    """Answers only requests whose Host header names this server: a page on another site that
    rebinds its DNS name to 127.0.0.1 would otherwise read the loopback API (payloads,
    results) as if it were its own origin."""

    def __init__(self, app, hosts: frozenset[str]) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            host = None
            for name, value in scope.get("headers", ()):
                if name == b"host":
                    host = value.decode("latin-1").lower()
                    break
            if host is not None and _host_name(host) not in self.hosts:
                response = error_response(
                    421, "bad_host", "this API answers requests to localhost or its configured names only (Host header)",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    """The name in a Host header, without its port."""
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


_HTTP_CODES = {
    400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type",
}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        message = f"no such endpoint: {request.url.path}"
    return error_response(exc.status_code, code, message, dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", f"internal error: {type(exc).__name__}")


def create_app(broker: Broker, *, token: str | None = None, allowed_hosts: Iterable[str] | None = None) -> Starlette:
    """The ASGI app for ``broker``; mutations need ``token`` (default: ``config.http_token``).
    With ``allowed_hosts``, requests whose Host header names another server get 421.

    With neither, mutating endpoints answer 401 (``serve_http`` always resolves one).
    """
    api = HttpApi(broker, token if token is not None else broker.config.http_token)
    static = StaticFiles(directory=api.dashboard, check_dir=False)
    routes = [
        Route("/", api.index, methods=["GET"]),
        Mount("/static", app=static, name="static"),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/metrics", api.prometheus, methods=["GET"]),
        Route("/openapi.json", api.openapi_json, methods=["GET"]),
        Route("/api/stats", api.stats, methods=["GET"]),
        Route("/api/workers", api.workers, methods=["GET"]),
        Route("/api/workers/{id}/quiet", partial(api.worker_action, stop=False), methods=["POST"]),
        Route("/api/workers/{id}/stop", partial(api.worker_action, stop=True), methods=["POST"]),
        Route("/api/jobs", api.list_jobs, methods=["GET"]),
        Route("/api/jobs/{id}", api.get_job, methods=["GET"]),
        Route("/api/jobs/{id}/cancel", partial(api.job_action, action="cancel"), methods=["POST"]),
        Route("/api/jobs/{id}/retry", partial(api.job_action, action="retry"), methods=["POST"]),
        Route("/api/jobs/{id}/discard", partial(api.job_action, action="discard"), methods=["POST"]),
        Route("/api/submit", api.submit, methods=["POST"]),
        Route("/api/queues", api.list_queues, methods=["GET"]),
        Route("/api/queues/{name}/pause", partial(api.queue_action, pause=True), methods=["POST"]),
        Route("/api/queues/{name}/resume", partial(api.queue_action, pause=False), methods=["POST"]),
        Route("/api/security", api.security, methods=["GET"]),
        Route("/api/tasks", api.tasks, methods=["GET"]),
        Route("/api/timeseries", api.timeseries, methods=["GET"]),
        Route("/api/events", EventStream(api), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(_SecurityHeaders),
            *([Middleware(_AllowedHosts, frozenset(h.lower() for h in allowed_hosts))] if allowed_hosts is not None else []),
        ],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error},
    )
    app.state.api = api
    return app


__all__ = ["ApiError", "HttpApi", "create_app", "dashboard_dir", "job_json"]
