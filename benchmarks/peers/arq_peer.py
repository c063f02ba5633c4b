"""arq peer: asyncio workers polling a Redis sorted set."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Worker, func

from benchmarks.peers import QUEUE, AsyncDriver, PeerError, Phase, peer_main, record

ARQ_QUEUE = f"arq:{QUEUE}"
WORKER_POLL_DELAY = 0.01
RESULT_POLL_DELAY = 0.001


async def noop(ctx: dict[str, Any], index: int) -> None:
    """Throughput job (``keep_result=0``: no result stored)."""
    record(index)


async def echo(ctx: dict[str, Any], index: int) -> list[int]:
    """Latency job: answers its index and the worker's pid."""
    return [index, os.getpid()]


class ArqDriver(AsyncDriver):
    """Producer side for arq."""

    module = "benchmarks.peers.arq_peer"

    async def asetup(self) -> None:
        self.pool: ArqRedis = await create_pool(
            RedisSettings.from_dsn(self.url), default_queue_name=ARQ_QUEUE
        )

    async def aclose(self) -> None:
        await self.pool.aclose()

    async def aenqueue(self, index: int) -> None:
        if await self.pool.enqueue_job("noop", index) is None:
            raise PeerError(f"arq refused job {index}")

    async def acall(self, index: int) -> Sequence[int]:
        job = await self.pool.enqueue_job("echo", index)
        if job is None:
            raise PeerError(f"arq refused job {index}")
        return await job.result(poll_delay=RESULT_POLL_DELAY)  # type: ignore[no-any-return]


def run_worker(url: str, phase: Phase, index: int) -> None:
    """One arq worker process (``max_jobs`` 10, the default)."""
    logging.basicConfig(level=logging.WARNING)
    worker = Worker(
        functions=[func(noop, name="noop", keep_result=0), func(echo, name="echo")],
        queue_name=ARQ_QUEUE,
        redis_settings=RedisSettings.from_dsn(url),
        poll_delay=WORKER_POLL_DELAY,
    )
    worker.run()


def main(argv: Sequence[str] | None = None) -> None:
    peer_main(ArqDriver, run_worker, argv)


if __name__ == "__main__":
    from benchmarks.peers import arq_peer

    arq_peer.main()
