"""Opening a session to a broker: TCP, TLS with hostname checking, HELLO/WELCOME.

Shared by the client and the worker; every transport failure leaves here as a
trioq exception, never a raw OSError, SSL error or exception group.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable

import trio

from ..errors import ConnectError, ConnectionLost, ProtocolError, RemoteError
from .framing import FramedConnection, frame
from .messages import Error, Hello, Welcome

StreamFactory = Callable[[], Awaitable[trio.abc.Stream]]


def parse_address(value: str, default_port: int = 65432) -> tuple[str, int]:
    """'host:port', 'host' or '[v6]:port' -> (host, port); ValueError with a clear message."""
    value = value.strip()
    if not value:
        raise ValueError("empty broker address")
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, port_s = value.split(":")
    else:
        host, port_s = value, ""
    if not port_s:
        return host, default_port
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"bad port in broker address {value!r}")
    return host, int(port_s)


def tcp_tls_factory(
    host: str, port: int, ssl_context: ssl.SSLContext, server_hostname: str | None = None
) -> StreamFactory:
    async def connect() -> trio.abc.Stream:
        try:
            tcp = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise ConnectError(f"cannot reach broker at {host}:{port}: {exc.strerror or exc}") from None
        tls = trio.SSLStream(tcp, ssl_context, server_hostname=server_hostname or host)
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await trio.aclose_forcefully(tcp)
            cause = exc.__cause__
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise ConnectError(f"broker {host}:{port} certificate rejected: {cause.verify_message or cause}") from None
            raise ConnectError(f"TLS handshake with {host}:{port} failed: {cause or exc}") from None
        except BaseException:  # cancelled (the caller's timeout): the socket must not leak
            await trio.aclose_forcefully(tcp)
            raise
        return tls

    return connect


async def open_session(
    factory: StreamFactory, hello: Hello, *, handshake_timeout: float = 10.0, max_frame: int = 64 * 1024 * 1024
) -> tuple[FramedConnection, Welcome]:
    """Connect and shake hands. The caller must start ``conn.run_writer`` itself."""
    with trio.move_on_after(handshake_timeout) as cs:
        stream = await factory()
    if cs.cancelled_caught:
        raise ConnectError(f"connecting to the broker took more than {handshake_timeout:g}s")
    conn = FramedConnection(stream, max_frame=max_frame)
    try:
        with trio.move_on_after(handshake_timeout) as cs:
            await stream.send_all(frame(hello))
            reply = await conn.receive()
        if cs.cancelled_caught:
            raise ConnectError(f"no WELCOME from the broker within {handshake_timeout:g}s")
    except (ConnectionLost, ProtocolError) as exc:
        await conn.aclose()
        hint = ""
        if isinstance(exc, ConnectionLost):  # TLS 1.3 shows a refused client only now, as an EOF
            hint = (" (the broker closed the connection before WELCOME; one started with "
                    "--require-client-cert does so to a client without a client certificate: pass --cert and --key)")
        raise ConnectError(f"handshake failed: {exc}{hint}") from None
    except BaseException:
        await conn.aclose()
        raise
    if isinstance(reply, Error):
        await conn.aclose()
        raise RemoteError(reply.code, reply.message)
    if not isinstance(reply, Welcome):
        await conn.aclose()
        raise ConnectError(f"expected WELCOME, got {reply.TYPE!r}")
    return conn, reply

