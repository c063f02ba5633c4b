"""Real trioq processes for end-to-end tests: started, read, killed with real signals."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrioqProcess:
    """A ``python -m trioq ...`` child whose stderr lines are collected as they come."""

    def __init__(self, proc: trio.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.lines: list[str] = []
        self._changed = trio.Event()

    @classmethod
    async def start(cls, nursery: trio.Nursery, name: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> TrioqProcess:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trioq", *args],
            cwd=cwd, env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self = cls(proc, name)
        nursery.start_soon(self._read)
        return self

    async def _read(self) -> None:
        buf = b""
        assert self.proc.stderr is not None
        async for chunk in self.proc.stderr:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            self.lines.extend(line.decode(errors="replace") for line in lines)
            self._changed.set()
            self._changed = trio.Event()
        self._changed.set()

    async def wait_for(self, pattern: str, within: float = 60.0) -> re.Match[str]:
        """Block until a log line matches (the process's own readiness signal)."""
        rx = re.compile(pattern)
        seen = 0
        with trio.fail_after(within):
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                if self.proc.returncode is not None and self._changed.is_set():
                    raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n" + "\n".join(self.lines[-30:]))
                await self._changed.wait()

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)

    def terminate(self) -> None:
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    async def stop(self) -> None:
        self.terminate()
        with trio.move_on_after(15):
            await self.proc.wait()
        if self.proc.returncode is None:
            self.kill9()
            await self.proc.wait()
