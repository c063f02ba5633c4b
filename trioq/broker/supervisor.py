"""``trioq broker --workers N``: local worker processes, restarted when they die."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import trio

log = logging.getLogger("trioq.supervisor")


async def supervise_workers(
    count: int,
    port: int,
    ca: str,
    concurrency: int,
    tasks: str | None,
    token: str | None,
    log_level: str,
    *,
    stopping: Callable[[], bool] = lambda: False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep ``count`` workers running; one that exits once ``stopping()`` (the broker shuts
    down, and a Ctrl-C reached the workers too) is not started again."""
    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(_keep_alive, i + 1, port, ca, concurrency, tasks, token, log_level, stopping)
        task_status.started()


async def _keep_alive(
    index: int, port: int, ca: str, concurrency: int, tasks: str | None, token: str | None, log_level: str,
    stopping: Callable[[], bool],
) -> None:
    cmd = [
        sys.executable, "-m", "trioq", "worker",
        "--broker", f"127.0.0.1:{port}", "--ca", ca,
        "--concurrency", str(concurrency), "--name", f"local-{index}", "--log-level", log_level,
    ]
    if tasks:
        cmd += ["--tasks", tasks]
    env = dict(os.environ)
    env["TRIOQ_PARENT_PID"] = str(os.getpid())  # the worker ends with this process, even a SIGKILLed one
    env.pop("TRIOQ_TOKEN", None)
    if token:
        env["TRIOQ_TOKEN"] = token  # through the environment, never on the command line
    delay = 0.5
    while True:
        started = trio.current_time()
        proc = await trio.lowlevel.open_process(cmd, env=env, stdin=subprocess.DEVNULL)
        log.info("started local worker %d (pid %d)", index, proc.pid)
        try:
            code = await proc.wait()
        finally:
            if proc.returncode is None:
                with trio.CancelScope(shield=True):
                    proc.send_signal(signal.SIGTERM)
                    with trio.move_on_after(10):
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
        if stopping():
            log.info("local worker %d (pid %d) exited with %s", index, proc.pid, code)
            return
        if trio.current_time() - started > 30:
            delay = 0.5
        log.warning("local worker %d (pid %d) exited with %s; restarting in %.1fs", index, proc.pid, code, delay)
        await trio.sleep(delay)
        delay = min(delay * 2, 10.0)
