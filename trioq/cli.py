"""The ``trioq`` command. Every option can also come from a TRIOQ_* environment variable."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import os
import signal
import sqlite3
import ssl
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import click
import orjson
import trio

from . import __version__
from .errors import ConnectError, ConnectionLost, JobNotFound, RemoteError, TrioqError
from .job import MAX_PRIORITY, MIN_PRIORITY, NAME_RE, Job, JobSpec, JobState

log = logging.getLogger("trioq")

LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class Seconds(click.FloatRange):
    """A FloatRange that refuses nan and inf: a delay of inf ran a job at once, a heartbeat
    interval of nan started a broker that refused every client."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return rv


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a JSON number")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_payload(text: str) -> Any:
    """JSON as the broker takes it: no NaN or Infinity, numbers that fit (ints of 64 bits)."""
    try:
        payload = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
        orjson.dumps(payload)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--payload") from None
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(f"not valid for a payload: {exc}", param_hint="--payload") from None
    return payload


def _check_sans(names: tuple[str, ...], param: click.Parameter) -> tuple[str, ...]:
    from .tls import check_san

    for name in names:
        try:
            check_san(name)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param=param) from None
    return names


def _leaves(exc: BaseException):
    """The exceptions inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def load_task_modules(spec: str | None) -> list[str]:
    """Import 'pkg.mod,other' or 'path/to/tasks.py'; each registers tasks on import."""
    loaded = []
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        try:
            if item.endswith(".py") or os.sep in item:
                path = Path(item)
                if not path.exists():
                    raise click.BadParameter(f"task file {item} does not exist", param_hint="--tasks")
                mod_spec = importlib.util.spec_from_file_location(path.stem, path)
                assert mod_spec and mod_spec.loader
                module = importlib.util.module_from_spec(mod_spec)
                sys.modules[path.stem] = module
                mod_spec.loader.exec_module(module)
            else:
                sys.path.insert(0, os.getcwd())
                importlib.import_module(item)
        except click.BadParameter:
            raise
        except Exception as exc:
            raise click.BadParameter(f"cannot import task module {item!r}: {type(exc).__name__}: {exc}", param_hint="--tasks") from None
        loaded.append(item)
    return loaded


def parse_broker(value: str) -> tuple[str, int]:
    from .protocol.connect import parse_address

    try:
        return parse_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from None


# --- shared client options ------------------------------------------------------------------------

def client_options(f):
    f = click.option("--broker", "broker_addr", default="127.0.0.1:65432", envvar="TRIOQ_BROKER", show_default=True, help="Broker address HOST:PORT.")(f)
    f = click.option("--ca", default=None, envvar="TRIOQ_CA", help="CA certificate to verify the broker [default: CERTS_DIR/ca.pem].")(f)
    f = click.option("--certs-dir", default="certs", envvar="TRIOQ_CERTS_DIR", show_default=True, help="Where the certificates are.")(f)
    f = click.option("--token", default=None, envvar="TRIOQ_TOKEN", help="Credential sent in HELLO (never logged).")(f)
    f = click.option("--cert", default=None, envvar="TRIOQ_CLIENT_CERT", help="Client certificate for mutual TLS.")(f)
    f = click.option("--key", default=None, envvar="TRIOQ_CLIENT_KEY", help="Key of the client certificate.")(f)
    return f


def make_client(opts: dict[str, Any], role: str = "producer"):
    from .client import Client

    host, port = parse_broker(opts["broker_addr"])
    ca = opts["ca"] or str(Path(opts["certs_dir"]) / "ca.pem")
    if not Path(ca).exists():
        fail(f"CA certificate {ca} not found: start the broker once (it creates certs/) or pass --ca")
    return Client(host, port, ca=ca, token=opts["token"], cert=opts["cert"], key=opts["key"], role=role, name=f"cli-{os.getpid()}")


def run_client(main, opts: dict[str, Any], *args: Any, role: str = "producer") -> Any:
    """Run an async client function with errors turned into one line and an exit status."""
    client = make_client(opts, role)

    async def go():
        async with client as c:
            return await main(c, *args)

    try:
        return trio.run(go)
    except JobNotFound as exc:
        fail(f"unknown job id {exc.job_id}", 2)
    except RemoteError as exc:
        fail(f"{exc.code}: {exc.message}", 2 if exc.code in ("unknown_job", "invalid_state") else 1)
    except ConnectError as exc:
        fail(str(exc), 3)
    except ConnectionLost as exc:  # the broker went away (a restart) while this waited
        fail(f"lost the connection to the broker: {exc}", 3)
    except TrioqError as exc:
        fail(str(exc), 1)
    except KeyboardInterrupt:
        fail("interrupted", 130)


def job_dict(job: Job) -> dict[str, Any]:
    from .protocol.messages import converter

    d = converter.unstructure(job)
    return d


def fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="trioq")
def main() -> None:
    """trioq: a distributed job queue on Trio (TLS broker, priority push dispatch, durable store)."""


# --- broker -----------------------------------------------------------------------------------------

@main.command()
@click.option("--host", default="127.0.0.1", envvar="TRIOQ_HOST", show_default=True, help="Address to listen on.")
@click.option("--port", default=65432, type=click.IntRange(0, 65535), envvar="TRIOQ_PORT", show_default=True)
@click.option("--certs-dir", default="certs", envvar="TRIOQ_CERTS_DIR", show_default=True, help="CA and server certificate (created if missing).")
@click.option("--san", multiple=True, envvar="TRIOQ_SAN", callback=lambda ctx, param, value: _check_sans(value, param), help="Extra name or IP for a newly created server certificate (repeatable).")
@click.option("--tls-min-version", type=click.Choice(["1.2", "1.3"]), default="1.3", envvar="TRIOQ_TLS_MIN_VERSION", show_default=True)
@click.option("--require-client-cert", is_flag=True, envvar="TRIOQ_REQUIRE_CLIENT_CERT", help="Mutual TLS: the role comes from the client certificate.")
@click.option("--auth-file", default=None, envvar="TRIOQ_AUTH_FILE", help="Token file made by 'trioq token create' [default: CERTS_DIR/tokens.jsonl if it exists].")
@click.option("--db", default="trioq.db", envvar="TRIOQ_DB", show_default=True, help="SQLite journal; ':memory:' keeps nothing.")
@click.option("--sync", type=click.Choice(["full", "normal", "off"]), default="full", envvar="TRIOQ_SYNC", show_default=True, help="full: an ACKed job survives power loss; normal: survives a process crash.")
@click.option("--workers", default=0, type=click.IntRange(0, 256), envvar="TRIOQ_WORKERS", show_default=True, help="Local worker processes to supervise.")
@click.option("--concurrency", default=8, type=click.IntRange(1, 10_000), envvar="TRIOQ_CONCURRENCY", show_default=True, help="Concurrency of each local worker.")
@click.option("--tasks", default=None, envvar="TRIOQ_TASKS", help="Task modules for local workers (comma separated).")
@click.option("--task", "extra_tasks", multiple=True, help="Declare a task name accepted before any worker announces it.")
@click.option("--allow-unknown-tasks", is_flag=True, envvar="TRIOQ_ALLOW_UNKNOWN_TASKS", help="Accept jobs for tasks no worker has announced.")
@click.option("--heartbeat-interval", default=2.0, type=Seconds(0.01, 3600), envvar="TRIOQ_HEARTBEAT_INTERVAL", show_default=True)
@click.option("--heartbeat-timeout", default=10.0, type=Seconds(0.05, 36000), envvar="TRIOQ_HEARTBEAT_TIMEOUT", show_default=True)
@click.option("--handshake-timeout", default=10.0, type=Seconds(0.1, 600), envvar="TRIOQ_HANDSHAKE_TIMEOUT", show_default=True, help="Seconds a new connection has to complete TLS.")
@click.option("--hello-timeout", default=10.0, type=Seconds(0.1, 600), envvar="TRIOQ_HELLO_TIMEOUT", show_default=True, help="Seconds after TLS before the client's HELLO must have arrived.")
@click.option("--lease-grace", default=5.0, type=Seconds(0, 3600), envvar="TRIOQ_LEASE_GRACE", show_default=True)
@click.option("--dispatch-mark-delay", default=0.05, type=Seconds(0, 60), envvar="TRIOQ_DISPATCH_MARK_DELAY", show_default=True, help="Journal a job's RUNNING mark this long after dispatch unless it ended first; 0 journals at once.")
@click.option("--max-frame", default=4 * 1024 * 1024, type=click.IntRange(1024, 1 << 30), envvar="TRIOQ_MAX_FRAME", show_default=True)
@click.option("--max-batch", default=10_000, type=click.IntRange(1, 1_000_000), envvar="TRIOQ_MAX_BATCH", show_default=True)
@click.option("--max-payload", default=1024 * 1024, type=click.IntRange(16, 1 << 30), envvar="TRIOQ_MAX_PAYLOAD", show_default=True)
@click.option("--max-connections", default=1024, type=click.IntRange(1, 1_000_000), envvar="TRIOQ_MAX_CONNECTIONS", show_default=True, help="Connections beyond it are closed at once.")
@click.option("--max-errors", default=20, type=click.IntRange(1, 1_000_000), envvar="TRIOQ_MAX_ERRORS", show_default=True, help="Refused requests on one connection before it is closed.")
@click.option("--max-queued", default=2_000_000, type=click.IntRange(1, 100_000_000), envvar="TRIOQ_MAX_QUEUED", show_default=True, help="Unfinished jobs held before producers are slowed.")
@click.option("--restore-chunk", default=20_000, type=click.IntRange(1, 1_000_000), envvar="TRIOQ_RESTORE_CHUNK", show_default=True, help="Unfinished jobs a restart reads from the journal per step while it already serves (each step holds the broker's loop for about 2 µs a job).")
@click.option("--max-uncommitted", default=20_000, type=click.IntRange(1, 10_000_000), envvar="TRIOQ_MAX_UNCOMMITTED", show_default=True, help="Submitted jobs held between their frame and their commit, all producers together; past it, producers' connections are not read until commits catch up (bounds that part of the broker's memory, plus one decoded SUBMIT per waiting connection).")
@click.option("--max-worker-losses", default=5, type=click.IntRange(1, 1000), envvar="TRIOQ_MAX_WORKER_LOSSES", show_default=True)
@click.option("--result-ttl", default=7 * 24 * 3600.0, type=Seconds(0), envvar="TRIOQ_RESULT_TTL", show_default=True, help="Seconds finished jobs are kept.")
@click.option("--shutdown-grace", default=10.0, type=Seconds(0, 3600), envvar="TRIOQ_SHUTDOWN_GRACE", show_default=True, help="On SIGTERM or Ctrl-C, seconds running jobs have to report before they are handed back to their queues (a second signal stops at once).")
@click.option("--http/--no-http", default=True, envvar="TRIOQ_HTTP", show_default=True, help="Serve the REST API and dashboard.")
@click.option("--http-host", default="127.0.0.1", envvar="TRIOQ_HTTP_HOST", show_default=True)
@click.option("--http-port", default=8080, type=click.IntRange(0, 65535), envvar="TRIOQ_HTTP_PORT", show_default=True)
@click.option("--http-token", default=None, envvar="TRIOQ_HTTP_TOKEN", help="Bearer token for mutating API calls [default: generated, kept in CERTS_DIR/http-token].")
@click.option("--http-tls", is_flag=True, envvar="TRIOQ_HTTP_TLS", help="Serve the API over HTTPS with the broker's certificate.")
@click.option("--http-allowed-host", multiple=True, callback=lambda ctx, param, value: _check_sans(value, param), help="A Host header name the HTTP API answers to besides localhost, 127.0.0.1 and --san names (repeatable): requests naming any other host get 421 (DNS rebinding).")
@click.option("--gc-tuning/--no-gc-tuning", default=True, envvar="TRIOQ_GC_TUNING", show_default=True,
              help="Rarer garbage collections: the broker holds every unfinished job in memory.")
@click.option("--log-level", type=LOG_LEVELS, default="info", envvar="TRIOQ_LOG_LEVEL", show_default=True)
def broker(**o: Any) -> None:
    """Run the broker (and, with --workers N, N supervised local workers)."""
    setup_logging(o["log_level"])
    from .broker.auth import Authenticator, AuthFileError, Credential, hash_token, new_token
    from .broker.collector import tune_collector
    from .broker.config import BrokerConfig
    from .broker.server import Broker
    from .tls import ensure_certs, server_context

    if o["workers"] and o["require_client_cert"]:
        fail("--workers cannot be combined with --require-client-cert: local workers have no client certificate "
             "(issue one with 'trioq certs client NAME --role worker' and run 'trioq worker --cert ... --key ...')")
    if o["tasks"]:
        load_task_modules(o["tasks"])  # fail early, in the broker, on a bad module
    try:
        paths, created = ensure_certs(o["certs_dir"], list(o["san"]))
    except OSError as exc:
        fail(f"cannot create certificates in {o['certs_dir']}: {exc}")
    if created:
        log.info("created a private CA and server certificate in %s (clients verify with %s)", paths.dir, paths.ca_cert)
    auth_file = o["auth_file"] or (str(paths.dir / "tokens.jsonl") if (paths.dir / "tokens.jsonl").exists() else None)
    if o["auth_file"] and not Path(o["auth_file"]).exists():
        fail(f"auth file {o['auth_file']} does not exist (create it with 'trioq token create')")
    try:
        auth = Authenticator.load(auth_file)
    except AuthFileError as exc:
        fail(str(exc))
    worker_token = None
    if o["workers"] and not auth.open:
        worker_token = new_token()  # local workers get a credential that lives as long as this process
        auth.credentials.append(Credential("local-workers", "worker", hash_token(worker_token)))
    config = BrokerConfig(
        host=o["host"], port=o["port"], certs_dir=o["certs_dir"], sans=tuple(o["san"]),
        tls_min_version=o["tls_min_version"], require_client_cert=o["require_client_cert"], auth_file=auth_file,
        heartbeat_interval=o["heartbeat_interval"], heartbeat_timeout=o["heartbeat_timeout"],
        handshake_timeout=o["handshake_timeout"], hello_timeout=o["hello_timeout"], lease_grace=o["lease_grace"],
        dispatch_mark_delay=o["dispatch_mark_delay"], max_frame=o["max_frame"],
        max_batch=o["max_batch"], max_payload=o["max_payload"], max_connections=o["max_connections"],
        max_errors=o["max_errors"],
        max_queued=o["max_queued"], max_uncommitted=o["max_uncommitted"], restore_chunk=o["restore_chunk"], max_worker_losses=o["max_worker_losses"], result_ttl=o["result_ttl"],
        shutdown_grace=o["shutdown_grace"],
        allow_unknown_tasks=o["allow_unknown_tasks"], tasks=tuple(o["extra_tasks"]), db=o["db"], sync=o["sync"],
        http=o["http"], http_host=o["http_host"], http_port=o["http_port"], http_token=o["http_token"],
        http_tls=o["http_tls"], http_allowed_hosts=tuple(o["http_allowed_host"]),
    )
    try:
        ssl_context = server_context(paths, min_version=o["tls_min_version"], require_client_cert=o["require_client_cert"])
    except (ssl.SSLError, OSError) as exc:
        fail(f"cannot load the server certificate and key from {paths.dir}: {exc}")
    try:
        b = Broker(config, ssl_context=ssl_context, authenticator=auth)
    except ValueError as exc:
        fail(str(exc))

    if o["gc_tuning"]:
        tune_collector()

    async def stop_gracefully(everything: trio.CancelScope) -> None:
        try:
            await b.shutdown()
        finally:
            everything.cancel()  # the broker, and the local workers' supervisor

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(b.serve)
            if o["workers"]:
                from .broker.supervisor import supervise_workers

                await nursery.start(partial(
                    supervise_workers, o["workers"], handle.port, str(paths.ca_cert), o["concurrency"],
                    o["tasks"], worker_token, o["log_level"], stopping=lambda: b.closing,
                ))
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for sig in signals:
                    if b.closing:
                        log.warning("second %s: stopping now; jobs still running are requeued at the next start", signal.Signals(sig).name)
                        nursery.cancel_scope.cancel()
                        break
                    log.info("received %s: shutting down (a second signal stops at once)", signal.Signals(sig).name)
                    nursery.start_soon(stop_gracefully, nursery.cancel_scope)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        # What an operator can fix (a port in use, a file that is not a journal, a refused
        # setting) is one line, not a traceback through the nursery that hit it.
        leaves = list(_leaves(exc))
        if leaves and all(isinstance(e, (OSError, sqlite3.Error, ValueError)) for e in leaves):
            first = leaves[0]
            if isinstance(first, sqlite3.Error):
                fail(f"cannot open the journal {o['db']}: {first}")
            fail(f"cannot start the broker: {first}")
        raise


# --- worker -------------------------------------------------------------------------------------------

@main.command()
@client_options
@click.option("--concurrency", "-c", default=8, type=click.IntRange(1, 10_000), envvar="TRIOQ_CONCURRENCY", show_default=True, help="Jobs run at once.")
@click.option("--tasks", default=None, envvar="TRIOQ_TASKS", help="Modules (or .py files) that register tasks, comma separated.")
@click.option("--queues", default="default", envvar="TRIOQ_QUEUES", show_default=True, help="Queues to serve, comma separated.")
@click.option("--name", default=None, envvar="TRIOQ_WORKER_NAME", help="Worker name [default: host:pid].")
@click.option("--grace", default=30.0, type=Seconds(0, 86400), envvar="TRIOQ_GRACE", show_default=True, help="Seconds to finish running jobs on SIGTERM before handing them back.")
@click.option("--no-builtins", is_flag=True, help="Do not serve the built-in demo tasks.")
@click.option("--log-level", type=LOG_LEVELS, default="info", envvar="TRIOQ_LOG_LEVEL", show_default=True)
def worker(**o: Any) -> None:
    """Run a worker that executes registered tasks pushed by the broker."""
    setup_logging(o["log_level"])
    from .tls import client_context
    from .worker.runner import Worker

    load_task_modules(o["tasks"])
    host, port = parse_broker(o["broker_addr"])
    queues = [q.strip() for q in o["queues"].split(",") if q.strip()]
    if not queues:
        raise click.BadParameter("name at least one queue", param_hint="--queues")
    for q in queues:
        if not NAME_RE.match(q):
            raise click.BadParameter(f"{q!r}: a queue name is 1-200 letters, digits or _.:-", param_hint="--queues")
    ca = o["ca"] or str(Path(o["certs_dir"]) / "ca.pem")
    if not Path(ca).exists():
        fail(f"CA certificate {ca} not found: start the broker once (it creates certs/) or pass --ca")
    w = Worker(
        host, port, ssl_context=client_context(ca, cert=o["cert"], key=o["key"]), token=o["token"],
        name=o["name"], concurrency=o["concurrency"], queues=queues, builtins=not o["no_builtins"],
        grace=o["grace"],
    )

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    n = 0
                    async for sig in signals:
                        n += 1
                        if n == 1:
                            log.info("received %s: finishing running jobs (grace %gs)", signal.Signals(sig).name, w.grace)
                            w.request_stop()
                        else:
                            log.warning("second signal: exiting now; running jobs will be requeued")
                            nursery.cancel_scope.cancel()

            nursery.start_soon(on_signals)
            parent = os.environ.get("TRIOQ_PARENT_PID", "")
            if parent.isdigit():
                nursery.start_soon(_end_with_parent, int(parent), nursery.cancel_scope)
            await w.run()
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    except (ConnectError, RemoteError) as exc:
        fail(str(exc), 3)


async def _end_with_parent(parent: int, scope: trio.CancelScope) -> None:
    """A local worker of ``trioq broker --workers`` stops when that broker is gone, even
    SIGKILLed: no orphan reconnecting forever, or serving a broker started after it."""
    try:
        fd = os.pidfd_open(parent)
    except (OSError, AttributeError):  # gone already, or no pidfd here: look every second
        while os.getppid() == parent:  # noqa: ASYNC110 - a process's end has no trio event without pidfd
            await trio.sleep(1)
    else:
        try:
            await trio.lowlevel.wait_readable(fd)  # readable once the process has ended
        finally:
            os.close(fd)
    log.warning("the broker that started this worker (pid %d) is gone: stopping", parent)
    scope.cancel()


# --- submit -------------------------------------------------------------------------------------------

@main.command()
@client_options
@click.argument("task", required=False)
@click.option("--payload", "-p", default="{}", envvar="TRIOQ_PAYLOAD", show_default=True, help="JSON payload.")
@click.option("--priority", default=5, type=click.IntRange(MIN_PRIORITY, MAX_PRIORITY), show_default=True, help="1 is the most urgent.")
@click.option("--queue", default="default", show_default=True)
@click.option("--delay", default=None, type=Seconds(0), help="Seconds before the job may run.")
@click.option("--max-attempts", default=None, type=click.IntRange(1, 1000))
@click.option("--timeout", default=None, type=Seconds(0.001), help="Seconds the job may run.")
@click.option("--idempotency-key", default=None)
@click.option("--count", default=1, type=click.IntRange(1, 10_000_000), show_default=True, help="Submit N copies (in batches).")
@click.option("--wait", is_flag=True, help="Wait for the result(s).")
@click.option("--wait-timeout", default=None, type=Seconds(0), help="Give up waiting after N seconds.")
@click.option("--demo", is_flag=True, help="Show priorities at work: slow jobs at 5, then an urgent one at 1.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable output.")
def submit(**o: Any) -> None:
    """Submit TASK with a JSON payload (or run the priority demo with --demo)."""
    if o["demo"]:
        if o["task"]:
            raise click.UsageError("--demo submits its own jobs: leave TASK out")
        run_client(_demo, o)
        return
    if not o["task"]:
        raise click.UsageError("TASK is required (or use --demo)")
    if o["idempotency_key"] is not None and o["count"] > 1:
        raise click.UsageError("--idempotency-key names one job: it cannot be combined with --count over 1")
    payload = parse_payload(o["payload"])
    spec = JobSpec(
        task=o["task"], payload=payload, priority=o["priority"], queue=o["queue"], delay=o["delay"],
        max_attempts=o["max_attempts"], timeout=o["timeout"], idempotency_key=o["idempotency_key"],
    )
    run_client(_submit, o, spec)


async def _submit(c, spec: JobSpec) -> None:
    o = click.get_current_context().params
    n = o["count"]
    t0 = time.perf_counter()
    ids = await c.submit_many([spec] * n)
    dt = time.perf_counter() - t0
    if n == 1 and not o["wait"]:
        click.echo(json.dumps({"id": ids[0]}) if o["as_json"] else ids[0])
        return
    if n > 1:
        click.echo(f"submitted {n} jobs in {dt:.2f}s ({n / max(dt, 1e-9):,.0f} jobs/s)", err=True)
    if not o["wait"]:
        for jid in ids:  # one line a job, as with --count 1
            click.echo(json.dumps({"id": jid}) if o["as_json"] else jid)
        return
    jobs = await _wait_all(c, ids, o["wait_timeout"], progress=n > 1)
    failed = 0
    for job in jobs:
        failed += job.state is not JobState.COMPLETED
        if o["as_json"]:
            click.echo(json.dumps(job_dict(job)))
        elif n == 1:
            _print_outcome(job)
    if n > 1 and not o["as_json"]:
        total = time.perf_counter() - t0
        click.echo(f"{n - failed} completed, {failed} not completed, in {total:.2f}s ({n / total:,.0f} jobs/s)")
    if failed:
        sys.exit(4)


async def _wait_all(c, ids: list[str], within: float | None, progress: bool) -> list[Job]:
    from tqdm import tqdm

    results: dict[str, Job] = {}
    bar = tqdm(total=len(ids), unit="job", disable=not progress or not sys.stderr.isatty(), file=sys.stderr)

    async def one(jid: str, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            results[jid] = await c.result(jid)
        bar.update(1)

    try:
        with trio.fail_after(within if within is not None else float("inf")):
            limiter = trio.CapacityLimiter(10_000)
            async with trio.open_nursery() as n:
                for jid in ids:
                    n.start_soon(one, jid, limiter)
    except trio.TooSlowError:
        bar.close()
        fail(f"timed out after {within}s with {len(results)} of {len(ids)} jobs finished", 5)
    bar.close()
    return [results[j] for j in ids]


def _print_outcome(job: Job) -> None:
    if job.state is JobState.COMPLETED:
        click.echo(json.dumps(job.result) if not isinstance(job.result, str) else job.result)
    else:
        err = job.error
        click.echo(f"job {job.id} {job.state.value}" + (f": {err.type}: {err.message}" if err else ""), err=True)


async def _demo(c) -> None:
    stats = await c.status()
    if not stats["workers"]["total"]:
        fail("no worker is connected: start one with 'trioq worker' or 'trioq broker --workers 1'")
    free = max(1, stats["workers"].get("free", 1))
    n_slow = free + 2
    click.echo(f"{stats['workers']['total']} worker(s) with {free} free slot(s): submitting {n_slow} x slow_task at priority 5, then reverse_string at priority 1")
    slow = await c.submit_many([JobSpec("slow_task", {"seconds": 1.0}, priority=5) for _ in range(n_slow)])
    urgent = await c.submit("reverse_string", {"data": "urgent job"}, priority=1)
    order: list[tuple[float, str, Job]] = []

    async def watch(jid: str, label: str) -> None:
        job = await c.result(jid)
        order.append((time.time(), label, job))
        click.echo(f"  finished: {label:<16} priority {job.priority}  at {fmt_time(job.finished_at)}  -> {job.result!r}")

    async with trio.open_nursery() as n:
        for i, jid in enumerate(slow):
            n.start_soon(watch, jid, f"slow_task #{i + 1}")
        n.start_soon(watch, urgent, "reverse_string")
    labels = [label for _, label, _ in sorted(order, key=lambda x: x[2].finished_at or 0)]
    pos = labels.index("reverse_string")
    click.echo(f"the urgent job finished {pos + 1} of {len(labels)}: ahead of every slow job still waiting in line")


# --- status and jobs ------------------------------------------------------------------------------------

@main.command()
@client_options
@click.option("--json", "as_json", is_flag=True)
def status(**o: Any) -> None:
    """Queue size, workers and job counts."""

    async def go(c):
        s = await c.status()
        if o["as_json"]:
            click.echo(json.dumps(s, indent=2))
            return
        w = s["workers"]
        click.echo(f"queue size  {s['queue_size']}")
        if s.get("restoring"):
            pending = s.get("restore_pending") or "?"
            click.echo(f"restoring   {pending} job(s) of the journal not loaded yet, counted as queued (the broker serves meanwhile)")
        click.echo(f"workers     {w['total']} ({w['idle']} idle, {w['busy']} busy, {w.get('capacity', 0)} slots)")
        click.echo("jobs        " + ", ".join(f"{k} {v}" for k, v in s["jobs"].items()))
        click.echo(f"requeued    {s['requeued']}")
        click.echo(f"uptime      {s['uptime']:.0f}s   store: {s['store']['description']}")

    run_client(go, o)


@main.command()
@client_options
@click.option("--state", type=click.Choice([s.value for s in JobState]), default=None)
@click.option("--queue", default=None)
@click.option("--task", default=None)
@click.option("--limit", default=20, type=click.IntRange(1, 1000), show_default=True)
@click.option("--json", "as_json", is_flag=True)
def jobs(**o: Any) -> None:
    """List jobs, newest first."""

    async def go(c):
        items, _ = await c.list_jobs(state=o["state"], queue=o["queue"], task=o["task"], limit=o["limit"])
        if o["as_json"]:
            for j in items:
                click.echo(json.dumps(job_dict(j)))
            return
        click.echo(f"{'ID':<17} {'TASK':<16} {'PRI':>3} {'STATE':<10} {'ATT':>3} {'CREATED':<13} RESULT/ERROR")
        for j in items:
            if j.error and j.state is not JobState.COMPLETED:
                tail = j.error.message
            elif j.state is JobState.DEAD and j.dead_reason:  # worker_lost leaves no error behind
                tail = f"dead: {j.dead_reason}"
            else:
                tail = json.dumps(j.result)
            click.echo(f"{j.id:<17} {j.task[:16]:<16} {j.priority:>3} {j.state.value:<10} {j.attempts:>3} {fmt_time(j.created_at):<13} {str(tail)[:60]}")

    run_client(go, o, role="admin")


@main.command()
@client_options
@click.argument("job_id")
def job(**o: Any) -> None:
    """Show every field of one job, with its error and traceback."""

    async def go(c):
        j = await c.get_job(o["job_id"])
        d = job_dict(j)
        tb = (d.get("error") or {}).pop("traceback", "") if d.get("error") else ""
        click.echo(json.dumps(d, indent=2))
        if tb:
            click.echo("traceback:\n" + tb)

    run_client(go, o)


def _job_op(name: str, doc: str, role: str):
    @main.command(name=name, help=doc)
    @client_options
    @click.argument("job_id")
    def cmd(**o: Any) -> None:
        async def go(c):
            j = await getattr(c, name)(o["job_id"])
            click.echo(f"job {j.id}: {name} done, state {j.state.value}")

        run_client(go, o, role=role)

    return cmd


_job_op("cancel", "Cancel a queued or running job.", "producer")
_job_op("retry", "Put a dead or cancelled job back in line (admin).", "admin")
_job_op("discard", "Delete a finished job for good (admin).", "admin")


def _queue_op(name: str, doc: str):
    @main.command(name=name, help=doc)
    @client_options
    @click.argument("queue", default="default")
    def cmd(**o: Any) -> None:
        async def go(c):
            paused = await c.pause(o["queue"], paused=name == "pause")
            click.echo(f"queue {o['queue']}: {'paused' if paused else 'dispatching'}")

        run_client(go, o, role="admin")

    return cmd


_queue_op("pause", "Stop dispatching a queue; its jobs stay queued (admin).")
_queue_op("resume", "Dispatch a paused queue again (admin).")


@main.command()
@client_options
@click.argument("job_id")
@click.option("--wait", is_flag=True, help="Wait until the job is final.")
@click.option("--timeout", default=None, type=Seconds(0), help="With --wait: give up after N seconds.")
def result(**o: Any) -> None:
    """Print a job's result (exit 4 if it failed, 5 if not finished)."""

    async def go(c):
        if o["wait"]:
            try:
                j = await c.result(o["job_id"], timeout=o["timeout"])
            except TimeoutError:
                fail(f"job {o['job_id']} did not finish within {o['timeout']}s", 5)
        else:
            j = await c.get_job(o["job_id"])
        if not j.state.terminal:
            fail(f"job {j.id} is {j.state.value}", 5)
        _print_outcome(j)
        if j.state is not JobState.COMPLETED:
            sys.exit(4)

    run_client(go, o)


# --- certificates and tokens --------------------------------------------------------------------------

@main.group(invoke_without_command=True)
@click.option("--dir", "certs_dir", default="certs", envvar="TRIOQ_CERTS_DIR", show_default=True)
@click.option("--san", multiple=True, callback=lambda ctx, param, value: _check_sans(value, param), help="Extra DNS name or IP for the server certificate (repeatable).")
@click.option("--force", is_flag=True, help="Replace an existing server certificate (the CA is kept).")
@click.pass_context
def certs(ctx: click.Context, certs_dir: str, san: tuple[str, ...], force: bool) -> None:
    """Create a private CA and a server certificate (localhost, 127.0.0.1, --san)."""
    ctx.obj = certs_dir
    if ctx.invoked_subcommand is not None:
        return
    from .tls import CertPaths, create_server_cert, ensure_certs

    paths = CertPaths.in_dir(certs_dir)
    if force and paths.ca_cert.exists():
        create_server_cert(paths, list(san))
        click.echo(f"new server certificate in {paths.server_cert}")
        return
    paths, created = ensure_certs(certs_dir, list(san))
    click.echo(("created" if created else "already present:") + f" CA {paths.ca_cert}, server certificate {paths.server_cert} (keys 0600)")


@certs.command("client")
@click.argument("name")
@click.option("--role", type=click.Choice(["producer", "worker", "admin"]), required=True)
@click.pass_obj
def certs_client(certs_dir: str, name: str, role: str) -> None:
    """Issue a client certificate for mutual TLS, carrying ROLE."""
    from .tls import issue_client_cert

    if not name.replace("-", "").replace("_", "").isalnum():
        raise click.BadParameter("use letters, digits, - and _", param_hint="NAME")
    try:
        cert, key = issue_client_cert(certs_dir, name, role)
    except FileNotFoundError as exc:
        fail(str(exc))
    click.echo(f"client certificate {cert}, key {key} (0600), role {role}")


@main.group()
def token() -> None:
    """Manage broker tokens."""


@token.command("create")
@click.option("--role", type=click.Choice(["producer", "worker", "admin"]), required=True)
@click.option("--name", default=None, help="A label for logs and job ownership.")
@click.option("--auth-file", default="certs/tokens.jsonl", envvar="TRIOQ_AUTH_FILE", show_default=True)
def token_create(role: str, name: str | None, auth_file: str) -> None:
    """Create a token; it is printed once, and only its hash is stored."""
    from .broker.auth import AuthFileError, add_token

    try:
        tok, cred = add_token(auth_file, role, name)
    except AuthFileError as exc:
        raise click.BadParameter(str(exc), param_hint="--name") from None
    click.echo(tok)
    click.echo(f"stored the hash of {cred.name} ({role}) in {auth_file}; the broker reads it at start", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
