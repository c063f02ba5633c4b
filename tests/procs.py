"""Real trioq processes for end-to-end tests: started, read, killed with real signals."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
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


class BrokerProcess:
    """A ``python -m trioq broker`` child for sync tests; its stderr lines are collected by a thread."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.cwd = cwd
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trioq", *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, *, after: int = 0, within: float = 30.0) -> tuple[re.Match[str], int]:
        """The first log line from index ``after`` on matching ``pattern``, and its index
        (the broker's own readiness signal)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + within
        i = after
        with self._cond:
            while True:
                while i < len(self.lines):  # resume where the last pass stopped
                    m = rx.search(self.lines[i])
                    if m:
                        return m, i
                    i += 1
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"broker exited ({self.proc.returncode}):\n" + self.tail())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no log line matching {pattern!r} within {within}s:\n" + self.tail()
                    )
                self._cond.wait(left)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def stop(self) -> None:
        """SIGTERM to the whole group (broker and its worker), SIGKILL after a bounded wait."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        try:  # a worker left behind in the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._reader.join(5)
