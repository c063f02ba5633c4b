"""The OpenAPI 3.1 description of the broker's HTTP API, written by hand."""

from __future__ import annotations

from typing import Any

from ..job import MAX_PRIORITY, MIN_PRIORITY, JobState

NAME_PATTERN = r"^[A-Za-z0-9_.:\-]{1,200}$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    t = schema["type"]
    return {**schema, "type": [t, "null"] if isinstance(t, str) else [*t, "null"]}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


INT = {"type": "integer"}
NUM = {"type": "number"}
STR = {"type": "string"}
BOOL = {"type": "boolean"}


def _object(props: dict[str, Any], required: list[str] | None = None, *, extra: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props, "required": required if required is not None else list(props)}
    if not extra:
        schema["additionalProperties"] = False
    return schema


SCHEMAS: dict[str, Any] = {
    "Error": _object({
        "error": _object({"code": STR, "message": STR}),
    }),
    "ErrorInfo": _object({"type": STR, "message": STR, "traceback": STR, "retryable": BOOL}),
    "Progress": _object({"value": NUM, "message": STR}),
    "JobState": {"type": "string", "enum": [s.value for s in JobState]},
    "Job": _object({
        "id": STR,
        "seq": INT,
        "task": STR,
        "payload": {"description": "Any JSON value"},
        "priority": {"type": "integer", "minimum": MIN_PRIORITY, "maximum": MAX_PRIORITY},
        "queue": STR,
        "state": _ref("JobState"),
        "attempts": INT,
        "failures": INT,
        "worker_losses": INT,
        "max_attempts": INT,
        "timeout": _nullable(NUM),
        "run_at": _nullable(NUM),
        "created_at": NUM,
        "started_at": _nullable(NUM),
        "finished_at": _nullable(NUM),
        "worker": _nullable(STR),
        "result": {"description": "The task's return value (any JSON value), null until completed"},
        "error": _nullable(_ref("ErrorInfo")),
        "progress": _nullable(_ref("Progress")),
        "idempotency_key": _nullable(STR),
        "dead_reason": _nullable(STR),
        "owner": _nullable(STR),
    }),
    "JobSummary": _object({
        "id": STR, "seq": INT, "task": STR, "queue": STR, "priority": INT, "state": _ref("JobState"),
        "attempts": INT, "failures": INT, "worker": _nullable(STR), "created_at": NUM,
        "started_at": _nullable(NUM), "finished_at": _nullable(NUM), "result": {},
        "error": _nullable(_object({"type": STR, "message": STR})),
        "progress": _nullable(_object({"value": NUM, "message": STR})),
    }),
    "JobPage": _object({
        "jobs": {"type": "array", "items": _ref("Job")},
        "next_cursor": _nullable(STR),
    }),
    "SubmitRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["task"],
        "properties": {
            "task": {"type": "string", "pattern": NAME_PATTERN, "description": "A task some worker has registered"},
            "payload": {"description": "Any JSON value, handed to the task (default {})"},
            "priority": {"type": "integer", "minimum": MIN_PRIORITY, "maximum": MAX_PRIORITY, "default": 5,
                         "description": "1 is the most urgent"},
            "queue": {"type": "string", "pattern": NAME_PATTERN, "default": "default"},
            "delay": _nullable({"type": "number", "minimum": 0, "description": "Seconds to wait before it may run"}),
            "run_at": _nullable({"type": "number", "minimum": 0, "description": "Unix time before which it does not run"}),
            "max_attempts": _nullable({"type": "integer", "minimum": 1, "maximum": 1000}),
            "timeout": _nullable({"type": "number", "exclusiveMinimum": 0, "description": "Seconds per attempt"}),
            "idempotency_key": _nullable({"type": "string", "minLength": 1, "maxLength": 200}),
        },
    },
    "SubmitResponse": _object({"id": STR, "existing": BOOL, "job": _ref("Job")}),
    "Stats": {
        "type": "object",
        "required": [
            "queue_size", "workers", "jobs", "requeued", "submitted_total", "completed_total",
            "failed_total", "total", "uptime",
        ],
        "properties": {
            "queue_size": INT,
            "restoring": {"type": "boolean", "description": "A restart is still loading the journal's unfinished jobs (it serves meanwhile)"},
            "stopping": {"type": "boolean", "description": "A shutdown is under way: nothing more is dispatched while running jobs finish"},
            "restore_pending": {**INT, "description": "The journal's unfinished jobs not loaded yet (0 until counted)"},
            "workers": _object({"total": INT, "idle": INT, "busy": INT}),
            "jobs": _object({s.value: INT for s in JobState}),
            "requeued": INT,
            "submitted_total": INT,
            "completed_total": INT,
            "failed_total": INT,
            "dead_total": INT,
            "cancelled_total": INT,
            "total": INT,
            "uptime": NUM,
            "store": {"type": "object"},
        },
    },
    "Worker": _object({
        "id": STR, "name": STR, "address": STR,
        "status": {"type": "string", "enum": ["idle", "busy", "quiet", "stopping"]},
        "current_jobs": {"type": "array", "items": STR}, "concurrency": INT,
        "tasks": {"type": "array", "items": STR}, "queues": {"type": "array", "items": STR},
        "last_heartbeat": NUM, "connected_at": NUM, "completed": INT, "failed": INT,
    }),
    "Queue": _object({
        "name": STR, "paused": BOOL, "depth": INT, "running": INT, "oldest_age": _nullable(NUM),
        "by_priority": {"type": "object", "additionalProperties": INT,
                        "description": "Waiting jobs by priority (keys are priorities as strings)"},
    }),
    "Task": _object({
        "name": STR, "queued": INT, "running": INT, "completed": INT, "dead": INT, "cancelled": INT, "total": INT,
    }),
    "Security": _object({
        "tls": BOOL,
        "tls_version": _nullable(STR),
        "protocol_version": INT,
        "certificate": _nullable(_object({"subject": STR, "issuer": STR, "not_after": STR,
                                          "sans": {"type": "array", "items": STR}})),
        "port": _nullable(INT),
        "http_port": _nullable(INT),
        "client_auth": {"type": "string", "enum": ["mutual TLS", "tokens", "open (loopback only)"]},
        "http_tls": BOOL,
    }),
    "Point": _object({
        "t": INT, "submitted": INT, "completed": INT, "failed": INT,
        "latency_p50_ms": _nullable(NUM), "latency_p99_ms": _nullable(NUM),
    }),
    "Timeseries": _object({"interval": INT, "points": {"type": "array", "items": _ref("Point")}}),
    "Health": _object({"status": {"type": "string", "enum": ["ok", "degraded", "stopping"]}, "store_healthy": BOOL}),
}

_JOB_ID = {"name": "id", "in": "path", "required": True, "schema": STR, "description": "Job id"}
_WORKER_ID = {"name": "id", "in": "path", "required": True, "schema": STR, "description": "Worker (session) id"}
_QUEUE = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "pattern": NAME_PATTERN}}

_AUTH_ERRORS = {"401": _error("Missing or wrong bearer token")}
_BODY_ERRORS = {
    "400": _error("Bad JSON or a refused request (e.g. unknown_task)"),
    "413": _error("Body or payload too large"),
    "422": _error("A field is missing, of the wrong type or out of range (the message names it)"),
}


def _job_action(summary: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}],
            "parameters": [_JOB_ID],
            "responses": {
                "200": _json("The job after the change", _ref("Job")),
                **_AUTH_ERRORS,
                "404": _error("No such job"),
                **extra,
            },
        }
    }


def _queue_action(summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}],
            "parameters": [_QUEUE],
            "responses": {
                "200": _json("The queue", _ref("Queue")),
                **_AUTH_ERRORS,
                "422": _error("Bad queue name"),
            },
        }
    }


def _worker_action(summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}],
            "parameters": [_WORKER_ID],
            "responses": {
                "200": _json("The worker", _ref("Worker")),
                **_AUTH_ERRORS,
                "404": _error("No such worker"),
            },
        }
    }


def _get(summary: str, response: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": response}, **more}}


def build_openapi() -> dict[str, Any]:
    from .. import __version__

    paths: dict[str, Any] = {
        "/": _get("The dashboard", {"description": "HTML page", "content": {"text/html": {"schema": STR}}}),
        "/static/{path}": {
            "get": {
                "summary": "A dashboard file",
                "parameters": [{"name": "path", "in": "path", "required": True, "schema": STR}],
                "responses": {"200": {"description": "The file"}, "404": _error("No such file")},
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness and store health",
                "responses": {
                    "200": _json("Healthy", _ref("Health")),
                    "503": _json("The store is failing, or the broker is shutting down", _ref("Health")),
                },
            }
        },
        "/metrics": _get(
            "Prometheus metrics",
            {"description": "Prometheus text format 0.0.4", "content": {"text/plain": {"schema": STR}}},
        ),
        "/openapi.json": _get("This document", _json("OpenAPI document", {"type": "object"})),
        "/api/stats": _get("Broker statistics", _json("Statistics", _ref("Stats"))),
        "/api/workers": _get(
            "Connected workers",
            _json("Workers", _object({"workers": {"type": "array", "items": _ref("Worker")}})),
        ),
        "/api/workers/{id}/quiet": _worker_action("Stop giving the worker new jobs"),
        "/api/workers/{id}/stop": _worker_action("Ask the worker to hand back its jobs and exit"),
        "/api/jobs": {
            "get": {
                "summary": "Jobs, newest first",
                "parameters": [
                    {"name": "state", "in": "query", "required": False, "schema": _ref("JobState")},
                    {"name": "task", "in": "query", "required": False, "schema": STR},
                    {"name": "queue", "in": "query", "required": False, "schema": STR},
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}},
                    {"name": "cursor", "in": "query", "required": False,
                     "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                     "description": "next_cursor of the previous page"},
                ],
                "responses": {
                    "200": _json("A page of jobs", _ref("JobPage")),
                    "422": _error("A bad query parameter"),
                },
            }
        },
        "/api/jobs/{id}": {
            "get": {
                "summary": "One job, every field",
                "parameters": [_JOB_ID],
                "responses": {"200": _json("The job", _ref("Job")), "404": _error("No such job")},
            }
        },
        "/api/jobs/{id}/cancel": _job_action(
            "Cancel an unfinished job", {"403": _error("Not allowed"), "409": _error("Already finished")},
        ),
        "/api/jobs/{id}/retry": _job_action(
            "Retry a dead or cancelled job", {"409": _error("The job is not dead or cancelled")},
        ),
        "/api/jobs/{id}/discard": _job_action(
            "Delete a finished job for good", {"409": _error("The job is not finished")},
        ),
        "/api/submit": {
            "post": {
                "summary": "Submit a job",
                "security": [{"bearer": []}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("SubmitRequest")}},
                },
                "responses": {
                    "201": _json("Accepted", _ref("SubmitResponse")),
                    "200": _json("An existing job with the same idempotency key", _ref("SubmitResponse")),
                    **_AUTH_ERRORS,
                    **_BODY_ERRORS,
                    "503": _error("The broker is full or its store is failing; try again later"),
                },
            }
        },
        "/api/queues": _get(
            "Queues: paused ones and those with unfinished jobs",
            _json("Queues", _object({"queues": {"type": "array", "items": _ref("Queue")}})),
        ),
        "/api/queues/{name}/pause": _queue_action("Pause a queue (no new dispatches from it)"),
        "/api/queues/{name}/resume": _queue_action("Resume a paused queue"),
        "/api/security": _get("Transport security and authentication", _json("Security", _ref("Security"))),
        "/api/tasks": _get(
            "Jobs per task, and every known task",
            _json("Tasks", _object({
                "tasks": {"type": "array", "items": _ref("Task")},
                "known": {"type": "array", "items": STR},
            })),
        ),
        "/api/timeseries": _get(
            "Per-second throughput and latency over the last 10 minutes",
            _json("Time series", _ref("Timeseries")),
        ),
        "/api/events": _get(
            "Live server-sent events: job, worker, stats",
            {
                "description": (
                    "`event: job` (a JobSummary), `event: worker` (a Worker with `event`: "
                    "joined/updated/lost), `event: stats` every second (Stats with `point`)"
                ),
                "content": {"text/event-stream": {"schema": STR}},
            },
        ),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "trioq broker API",
            "version": __version__,
            "description": (
                "Read freely; every mutating endpoint needs `Authorization: Bearer <token>`. "
                "Errors are `{\"error\": {\"code\", \"message\"}}`."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
