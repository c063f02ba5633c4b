"""The OpenAPI document is valid and complete, and fuzzing the API finds no server error.

Schemathesis drives the app through the real server (Hypercorn on port 0, in
this test's Trio loop) from a worker thread: its in-process ASGI client runs
apps on an asyncio loop of its own, and this app needs the broker's Trio loop.
"""

from __future__ import annotations

import requests
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from openapi_spec_validator import validate
from starlette.routing import Mount, Route

from trioq.broker.config import BrokerConfig
from trioq.broker.server import Broker
from trioq.http.app import create_app
from trioq.http.openapi import build_openapi
from trioq.worker.runner import Worker

from .conftest import memory_connect

TOKEN = "fuzz-token"
MAX_EXAMPLES = 15


def test_openapi_document_is_valid() -> None:
    validate(build_openapi())


def test_openapi_document_covers_every_route(tmp_path) -> None:
    broker = Broker(BrokerConfig(port=0, http=False, db=":memory:", certs_dir=str(tmp_path)))
    app = create_app(broker, token="x")
    documented = {(path, method) for path, ops in build_openapi()["paths"].items() for method in ops}
    served = set()
    for route in app.routes:
        if isinstance(route, Mount):
            served.add((route.path + "/{path}", "get"))
        elif isinstance(route, Route):
            served.update((route.path, m.lower()) for m in route.methods if m != "HEAD")
    assert served == documented


def fuzz(base_url: str) -> dict[str, int]:
    """Every operation, valid and invalid inputs; returns how many cases ran per operation."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        ignored_auth,
        negative_data_rejection,
        positive_data_acceptance,
        response_schema_conformance,
        status_code_conformance,
        unsupported_method,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        negative_data_rejection,
        positive_data_acceptance,
        ignored_auth,
        unsupported_method,
    ]
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    session = requests.Session()  # keep-alive: one connection, not one per case
    ran: dict[str, int] = {}
    failures: list[str] = []

    def fuzz_one(op, mode, label: str) -> None:
        @settings(
            max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
            phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case) -> None:
            case.call_and_validate(
                base_url=base_url, session=session, headers={"Authorization": f"Bearer {TOKEN}"}, checks=checks, timeout=10,
            )
            ran[label] = ran.get(label, 0) + 1

        try:
            run()
        except Unsatisfiable:
            if mode is GenerationMode.POSITIVE:
                failures.append(f"{label}: no valid input could be generated")
            # else: nothing about this operation can be made invalid (no parameters, no body)
        except (Exception, BaseExceptionGroup) as exc:  # keep going: report every failing operation
            failures.append(f"{label}: {exc}")

    for result in schema.get_all_operations():
        op = result.ok()
        if op.path == "/api/events":  # an endless stream; covered by the SSE tests
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz_one(op, mode, f"{op.method.upper()} {op.path} {mode.value}")
    assert not failures, "\n\n".join(failures)
    return ran


async def test_fuzzing_finds_no_server_error(tmp_path, nursery: trio.Nursery) -> None:
    cfg = BrokerConfig(
        port=0, http=True, http_port=0, db=":memory:", certs_dir=str(tmp_path), http_token=TOKEN,
        allow_unknown_tasks=True,  # valid submissions are accepted (201), not only refused
    )
    broker = Broker(cfg)
    handle = await nursery.start(broker.serve)
    worker = Worker(connect=memory_connect(broker, nursery), name="fuzz-worker", concurrency=2)
    await nursery.start(worker.run)
    base_url = f"http://127.0.0.1:{handle.http_port}"
    with trio.fail_after(120):
        ran = await trio.to_thread.run_sync(fuzz, base_url, abandon_on_cancel=True)
    operations = {
        f"{method.upper()} {path}"
        for path, ops in build_openapi()["paths"].items() for method in ops
        if path not in ("/api/events", "/openapi.json")  # schemathesis skips the schema's own URL
    }
    assert {label.rsplit(" ", 1)[0] for label in ran if label.endswith(" positive")} == operations
    negative = {label.rsplit(" ", 1)[0] for label in ran if label.endswith(" negative")}
    assert {"GET /api/jobs", "POST /api/submit", "POST /api/queues/{name}/pause", "POST /api/jobs/{id}/cancel"} <= negative
    assert broker.stats()["submitted_total"] > 0, "no valid submission got through"
