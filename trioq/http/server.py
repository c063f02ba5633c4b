"""Serving the HTTP app with Hypercorn inside the broker's nursery.

``Broker.serve`` runs ``await nursery.start(serve_http, self)``: this returns
the bound port once Hypercorn listens, and everything ends with the broker's
cancel scope (open event streams included).
"""

from __future__ import annotations

import logging
import os
import secrets
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from ..broker.auth import fingerprint
from ..broker.config import BrokerConfig, is_loopback
from ..tls import SERVER_CERT, SERVER_KEY, TLS_VERSIONS, warn_if_readable
from .app import LOOPBACK_NAMES, create_app

if TYPE_CHECKING:
    from ..broker.server import Broker

log = logging.getLogger("trioq.http")

TOKEN_FILE = "http-token"


def check_http_config(cfg: BrokerConfig) -> None:
    """Refuse an API reachable from other machines with a token nobody chose."""
    if not is_loopback(cfg.http_host) and not cfg.http_token:
        raise ValueError(
            f"refusing to serve the HTTP API on {cfg.http_host} without an explicit token: "
            "set --http-token / TRIOQ_HTTP_TOKEN, or bind the API to a loopback address"
        )
    if not 0 <= cfg.http_port <= 65535:
        raise ValueError(f"http port {cfg.http_port} is out of range 0-65535")


def load_or_create_token(certs_dir: str | os.PathLike[str]) -> tuple[str, Path, bool]:
    """The API token kept 0600 in ``certs_dir/http-token``: (token, path, created)."""
    path = Path(certs_dir) / TOKEN_FILE
    for _ in range(2):
        try:
            text = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            pass
        else:
            if text:
                warn_if_readable(path)
                return text, path, False
        token = secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue  # another process made it meanwhile: read theirs
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (token + "\n").encode())
        finally:
            os.close(fd)
        return token, path, True
    raise RuntimeError(f"cannot read or create {path}")  # pragma: no cover


def resolve_token(cfg: BrokerConfig) -> str:
    if cfg.http_token:
        return cfg.http_token
    token, path, created = load_or_create_token(cfg.certs_dir)
    log.info(
        "HTTP API token %s %s (%s); send it as 'Authorization: Bearer <token>' for mutations",
        "generated in" if created else "read from", path, fingerprint(token),
    )
    return token


class _Config(HypercornConfig):
    """Hypercorn's config with the broker's TLS floor."""

    tls_min_version: str = "1.3"

    def create_ssl_context(self) -> ssl.SSLContext | None:
        ctx = super().create_ssl_context()
        if ctx is not None:
            ctx.minimum_version = TLS_VERSIONS[self.tls_min_version]
        return ctx


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port_of(bind: str) -> int:
    """'http://127.0.0.1:8080' or 'https://[::1]:8080' -> 8080."""
    return int(bind.rsplit(":", 1)[1])


def allowed_hosts(cfg: BrokerConfig) -> frozenset[str] | None:
    """The Host header names the API answers to: on loopback, the loopback names, the bound
    address, the certificate's extra names and --http-allowed-host (a DNS-rebinding page
    cannot send any of them); elsewhere anything, unless --http-allowed-host names some."""
    extra = {h.lower() for h in cfg.http_allowed_hosts}
    if not is_loopback(cfg.http_host) and not extra:
        return None
    bound = cfg.http_host.lower()
    return frozenset({*LOOPBACK_NAMES, f"[{bound}]" if ":" in bound else bound, *(s.lower() for s in cfg.sans), *extra})


async def serve_http(broker: Broker, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API until cancelled; ``task_status.started(port)`` once listening."""
    cfg = broker.config
    check_http_config(cfg)
    token = resolve_token(cfg)
    hc = _Config()
    hc.bind = [_bind(cfg.http_host, cfg.http_port)]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("trioq.http.server")
    hc.graceful_timeout = 1.0
    hc.keep_alive_timeout = 30.0
    hc.include_server_header = False
    hc.tls_min_version = cfg.tls_min_version
    if cfg.http_tls:
        certs = Path(cfg.certs_dir)
        cert, key = certs / SERVER_CERT, certs / SERVER_KEY
        if not (cert.is_file() and key.is_file()):
            raise ValueError(f"http_tls needs the broker's certificate: {cert} and {key} do not exist")
        hc.certfile = str(cert)
        hc.keyfile = str(key)
    app = create_app(broker, token=token, allowed_hosts=allowed_hosts(cfg))
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, app, hc)
        port = _port_of(binds[0])
        log.info("HTTP API and dashboard on %s", ", ".join(binds))
        task_status.started(port)
