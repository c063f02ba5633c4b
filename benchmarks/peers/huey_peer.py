"""huey peer: ``RedisHuey`` with one thread worker per consumer process."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import cache

from huey import RedisHuey
from huey.api import TaskWrapper

from benchmarks.peers import QUEUE, Driver, PeerError, Phase, peer_main, record


def noop(index: int) -> None:
    """Throughput job (returns None, so huey stores no result)."""
    record(index)


def echo(index: int) -> list[int]:
    """Latency job: answers its index and the worker's pid."""
    return [index, os.getpid()]


@cache
def make_huey(url: str) -> tuple[RedisHuey, TaskWrapper, TaskWrapper]:
    """The huey instance (blocking dequeue, result notifications) and its tasks."""
    huey = RedisHuey(QUEUE, url=url, blocking=True, notify_result=True)
    return huey, huey.task(name="noop")(noop), huey.task(name="echo")(echo)


class HueyDriver(Driver):
    """Producer side for huey."""

    module = "benchmarks.peers.huey_peer"

    def setup(self) -> None:
        self.huey, self.noop, self.echo = make_huey(self.url)

    def close(self) -> None:
        self.huey.storage.conn.close()

    def enqueue(self, start: int, stop: int) -> None:
        self.noop.map(range(start, stop))

    def call(self, index: int, timeout: float) -> Sequence[int]:
        result = self.echo(index)
        if result is None:
            raise PeerError("huey returned no result handle")
        return result.get(blocking=True, timeout=timeout)  # type: ignore[no-any-return]


def run_worker(url: str, phase: Phase, index: int) -> None:
    """One huey consumer process with a single thread worker (huey's default)."""
    logging.basicConfig(level=logging.WARNING)
    huey, _, _ = make_huey(url)
    huey.create_consumer(workers=1, worker_type="thread").run()


def main(argv: Sequence[str] | None = None) -> None:
    peer_main(HueyDriver, run_worker, argv)


if __name__ == "__main__":
    from benchmarks.peers import huey_peer

    huey_peer.main()
