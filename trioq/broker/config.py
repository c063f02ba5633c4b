"""Every knob of the broker, with the defaults a production broker should start with."""

from __future__ import annotations

import ipaddress
import math

import attrs

DEFAULT_PORT = 65432
DEFAULT_HTTP_PORT = 8080


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@attrs.define
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    certs_dir: str = "certs"
    sans: tuple[str, ...] = ()
    tls_min_version: str = "1.3"
    require_client_cert: bool = False
    auth_file: str | None = None
    # liveness
    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 10.0
    handshake_timeout: float = 10.0
    hello_timeout: float = 10.0
    lease_grace: float = 5.0
    #: RUNNING marks are journaled this long after dispatch, unless the job ended first (then
    #: its final row carries the attempt): most short jobs cost one row update instead of two.
    dispatch_mark_delay: float = 0.05
    # limits
    max_frame: int = 4 * 1024 * 1024
    max_batch: int = 10_000
    max_payload: int = 1024 * 1024
    max_connections: int = 1024
    max_queued: int = 2_000_000
    #: jobs received but not yet committed, broker-wide: past it producers are not read from
    max_uncommitted: int = 20_000
    max_errors: int = 20  # non-fatal errors per connection before it is closed
    max_concurrency: int = 10_000  # per worker
    max_waits: int = 100_000  # outstanding WAITs per connection
    # lifecycle
    #: a shutdown (SIGTERM) waits this long for running jobs to report before handing them back
    shutdown_grace: float = 10.0
    result_ttl: float = 7 * 24 * 3600.0
    purge_interval: float = 60.0
    # memory: give free heap pages back after this many rows were written (0: never)
    heap_trim_rows: int = 50_000
    heap_trim_interval: float = 1.0
    max_worker_losses: int = 5
    retry_base: float = 1.0
    retry_max: float = 300.0
    retry_jitter: float = 0.1
    allow_unknown_tasks: bool = False
    tasks: tuple[str, ...] = ()
    # store
    db: str = "trioq.db"
    sync: str = "full"
    #: unfinished jobs a restart reads from the journal per step while it serves (each step
    #: holds the event loop for about 2 µs a job)
    restore_chunk: int = 20_000
    # http
    http: bool = True
    http_host: str = "127.0.0.1"
    http_port: int = DEFAULT_HTTP_PORT
    http_token: str | None = None
    http_tls: bool = False
    #: Host header names the HTTP API answers to besides loopback ones (see http/server.py)
    http_allowed_hosts: tuple[str, ...] = ()

    def validate(self) -> None:
        """Refuse configurations that would be unsafe or cannot work."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range 0-65535")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("heartbeat timeout must be longer than the heartbeat interval")
        if self.tls_min_version not in ("1.2", "1.3"):
            raise ValueError("tls_min_version must be 1.2 or 1.3")
        for name in ("max_frame", "max_batch", "max_payload", "max_connections", "max_queued", "max_errors", "max_uncommitted", "restore_chunk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("heartbeat_interval", "heartbeat_timeout", "handshake_timeout", "hello_timeout", "purge_interval"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number of seconds")
        for name in ("lease_grace", "shutdown_grace", "dispatch_mark_delay", "result_ttl", "heap_trim_interval", "retry_base", "retry_max", "retry_jitter"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number, 0 or more")
        if self.sync not in ("full", "normal", "off"):
            raise ValueError("sync must be full, normal or off")
