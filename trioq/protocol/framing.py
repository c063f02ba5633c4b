"""Length-prefixed frames over any ``trio.abc.Stream``, with one writer task.

A frame is a 4-byte big-endian length and that many bytes of JSON. Reads pull
64 KiB at a time and split every frame out of the buffer, so a batch of small
frames costs one ``receive_some``; writes are drained from a channel by a single
task and joined into one ``send_all``, so an ``SSLStream`` never sees two sends
at once nor a send cancelled half-way by a caller (trio issue 198).
"""

from __future__ import annotations

import math
import ssl
import struct
from collections import deque

import trio

from ..errors import ConnectionLost, ErrorCode, ProtocolError
from .messages import Message, decode, encode

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 4 * 1024 * 1024
READ_SIZE = 256 * 1024
#: Messages a writer joins into one send; bounds the size of one send_all.
WRITE_BATCH = 512


def frame(msg: Message) -> bytes:
    body = encode(msg)
    return HEADER.pack(len(body)) + body


class FramedConnection:
    """Frames in, frames out; the only object that touches the stream."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        out_buffer: float = math.inf,
    ) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self._buf = bytearray()
        self._frames: deque[bytes] = deque()
        self._eof = False
        self._out_send, self._out_recv = trio.open_memory_channel[bytes | None](out_buffer)
        self._writer_done = trio.Event()
        self.last_size = 0  # body size of the frame returned last
        self.bytes_in = 0
        self.bytes_out = 0
        #: bytes handed to send_nowait/send and not yet written to the stream
        self.queued_bytes = 0
        self._drained: trio.Event | None = None
        self._drained_below = 0

    # --- reading (one reader task at a time) ---------------------------------

    async def receive(self) -> Message:
        """The next message; ConnectionLost at EOF, ProtocolError on bad input."""
        body = await self.receive_frame()
        self.last_size = len(body)
        return decode(body)

    def receive_nowait(self) -> Message | None:
        """A message already buffered, or None: lets callers handle a batch per read."""
        if not self._frames:
            return None
        body = self._frames.popleft()
        self.last_size = len(body)
        return decode(body)

    async def receive_frame(self) -> bytes:
        while not self._frames:
            if self._eof:
                raise ConnectionLost("peer closed the connection")
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                cause = exc.__cause__
                if isinstance(cause, ssl.SSLEOFError):  # no TLS goodbye: the peer stopped or died
                    raise ConnectionLost("the peer closed the connection abruptly (it stopped, or was killed)") from None
                # The TLS alert behind a broken stream says why (a certificate required, say).
                raise ConnectionLost(f"connection broken: {cause or exc!r}") from None
            if not data:
                self._eof = True
                if self._buf:
                    raise ProtocolError(ErrorCode.BAD_FRAME, "connection closed inside a frame")
                continue
            self.bytes_in += len(data)
            self._buf += data
            self._split()
        return self._frames.popleft()

    def _split(self) -> None:
        buf = self._buf
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (length,) = HEADER.unpack_from(buf, pos)
            if length > self.max_frame:
                raise ProtocolError(
                    ErrorCode.TOO_LARGE,
                    f"frame of {length} bytes is over the limit of {self.max_frame}",
                )
            end = pos + 4 + length
            if end > n:
                break
            self._frames.append(bytes(buf[pos + 4 : end]))
            pos = end
        if pos:
            del buf[:pos]

    # --- writing --------------------------------------------------------------

    def send_nowait(self, msg: Message) -> None:
        data = frame(msg)
        try:
            self._out_send.send_nowait(data)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ConnectionLost("connection is closing") from None
        self.queued_bytes += len(data)

    async def send(self, msg: Message) -> None:
        data = frame(msg)
        try:
            await self._out_send.send(data)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ConnectionLost("connection is closing") from None
        self.queued_bytes += len(data)

    async def wait_queued_below(self, limit: int) -> None:
        """Until at most ``limit`` bytes wait to be written: a peer that sends requests and
        does not read the answers is not read from either (one waiter at a time)."""
        while self.queued_bytes > limit:
            if self._writer_done.is_set():
                raise ConnectionLost("connection is closing")
            if self._drained is None:
                self._drained = trio.Event()
            self._drained_below = limit
            await self._drained.wait()

    def close_after_flush(self) -> None:
        """No more messages: the writer sends what is queued, then ends."""
        try:
            self._out_send.send_nowait(None)
        except (trio.ClosedResourceError, trio.BrokenResourceError, trio.WouldBlock):
            pass
        self._out_send.close()

    async def run_writer(self) -> None:
        """The one task that writes to the stream. Returns after close_after_flush."""
        recv = self._out_recv
        try:
            while True:
                try:
                    first = await recv.receive()
                except trio.EndOfChannel:
                    return
                if first is None:
                    return
                parts = [first]
                done = False
                while len(parts) < WRITE_BATCH:
                    try:
                        nxt = recv.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    if nxt is None:
                        done = True
                        break
                    parts.append(nxt)
                data = b"".join(parts) if len(parts) > 1 else first
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise ConnectionLost(f"connection broken while sending: {exc!r}") from None
                self.bytes_out += len(data)
                self.queued_bytes -= len(data)
                if self._drained is not None and self.queued_bytes <= self._drained_below:
                    self._drained.set()
                    self._drained = None
                if done:
                    return
        finally:
            self._writer_done.set()
            if self._drained is not None:
                self._drained.set()

    async def wait_flushed(self) -> None:
        await self._writer_done.wait()

    async def aclose(self) -> None:
        self._out_send.close()
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
