"""Tasks for the chaos test, loaded by real workers with ``--tasks tests/chaos_tasks.py``.

``chaos`` appends ``job_id attempt pid`` to the file named by TRIOQ_CHAOS_LOG when
it starts (one ``write`` on an O_APPEND descriptor: lines never interleave), then
sleeps a little, so that a worker killed with SIGKILL is usually in the middle of jobs.
"""

from __future__ import annotations

import os

import trio

import trioq


@trioq.task(name="chaos")
async def chaos(n: int, ctx, sleep: float = 0.15) -> int:
    fd = os.open(os.environ["TRIOQ_CHAOS_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{ctx.id} {ctx.attempt} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    await trio.sleep(sleep)
    return n
