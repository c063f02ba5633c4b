"""Fan-out of job and worker changes to whoever listens (event streams, tests).

Publishing never blocks the broker: each subscriber has a bounded buffer, and
one that falls behind loses events and is told so by a ``lagged`` flag.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import trio


@attrs.define(eq=False)
class Subscription:
    receive: trio.MemoryReceiveChannel[tuple[str, Any]]
    _send: trio.MemorySendChannel[tuple[str, Any]]
    lagged: int = 0


class EventHub:
    def __init__(self, buffer: int = 10_000) -> None:
        self._subs: list[Subscription] = []
        self._buffer = buffer

    @property
    def active(self) -> bool:
        return bool(self._subs)

    def publish(self, kind: str, data: Any) -> None:
        for sub in self._subs:
            try:
                sub._send.send_nowait((kind, data))
            except trio.WouldBlock:
                sub.lagged += 1

    @contextmanager
    def subscribe(self, buffer: int | None = None) -> Iterator[Subscription]:
        send, recv = trio.open_memory_channel[tuple[str, Any]](buffer or self._buffer)
        sub = Subscription(recv, send)
        self._subs.append(sub)
        try:
            yield sub
        finally:
            self._subs.remove(sub)
            send.close()
