"""taskiq peer: ``taskiq worker`` with taskiq-redis's ``RedisStreamBroker``.

``taskiq worker benchmarks.peers.taskiq_peer:broker`` reads the module attribute
``broker``, built on first access from ``PEER_URL``; throughput-phase workers
(``PEER_PHASE=throughput``) get a broker without a result backend, so no result
is stored for no-op jobs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from typing import Any

from taskiq import AsyncBroker
from taskiq.decor import AsyncTaskiqDecoratedTask
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from benchmarks.peers import (
    PHASE_ENV,
    QUEUE,
    URL_ENV,
    AsyncDriver,
    PeerError,
    Phase,
    peer_main,
    record,
)

RESULT_POLL_INTERVAL = 0.001


async def noop(index: int) -> None:
    """Throughput job."""
    record(index)


async def echo(index: int) -> list[int]:
    """Latency job: answers its index and the worker's pid."""
    return [index, os.getpid()]


Tasks = tuple[
    AsyncBroker, AsyncTaskiqDecoratedTask[[int], Any], AsyncTaskiqDecoratedTask[[int], Any]
]


@cache
def make_broker(url: str, with_results: bool) -> Tasks:
    """The stream broker (with a Redis result backend if asked) and its tasks."""
    broker: AsyncBroker = RedisStreamBroker(url, queue_name=QUEUE)
    if with_results:
        broker = broker.with_result_backend(RedisAsyncResultBackend(url))
    return (
        broker,
        broker.register_task(noop, task_name="noop"),
        broker.register_task(echo, task_name="echo"),
    )


def __getattr__(name: str) -> Any:
    """``broker``: the broker for this process's ``PEER_URL`` and ``PEER_PHASE``."""
    if name == "broker":
        return make_broker(os.environ[URL_ENV], os.environ.get(PHASE_ENV) != "throughput")[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class TaskiqDriver(AsyncDriver):
    """Producer side for taskiq."""

    module = "benchmarks.peers.taskiq_peer"

    async def asetup(self) -> None:
        self.broker, self.noop, self.echo = make_broker(self.url, True)
        await self.broker.startup()

    async def aclose(self) -> None:
        await self.broker.shutdown()

    async def aenqueue(self, index: int) -> None:
        await self.noop.kiq(index)

    async def acall(self, index: int) -> Sequence[int]:
        task = await self.echo.kiq(index)
        result = await task.wait_result(check_interval=RESULT_POLL_INTERVAL)
        if result.is_err:
            raise PeerError(f"job {index} failed: {result.error!r}")
        return result.return_value


def run_worker(url: str, phase: Phase, index: int) -> None:
    """One ``taskiq worker --workers 1`` (a manager process and one worker process)."""
    from taskiq.cli.worker.args import WorkerArgs
    from taskiq.cli.worker.run import run_worker as taskiq_run_worker

    args = WorkerArgs.from_cli(
        [f"{TaskiqDriver.module}:broker", "--workers", "1", "--log-level", "WARNING"]
    )
    raise SystemExit(taskiq_run_worker(args) or 0)


def main(argv: Sequence[str] | None = None) -> None:
    peer_main(TaskiqDriver, run_worker, argv)


if __name__ == "__main__":
    from benchmarks.peers import taskiq_peer

    taskiq_peer.main()
