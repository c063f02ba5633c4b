"""RQ peer: ``SimpleWorker`` processes on a Redis queue."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from redis import Redis
from rq import Queue
from rq.results import Result
from rq.worker import SimpleWorker

from benchmarks.peers import QUEUE, Driver, PeerError, Phase, peer_main, record


def noop(index: int) -> None:
    """Throughput job."""
    record(index)


def echo(index: int) -> list[int]:
    """Latency job: answers its index and the worker's pid."""
    return [index, os.getpid()]


class RQDriver(Driver):
    """Producer side for RQ."""

    module = "benchmarks.peers.rq_peer"

    def setup(self) -> None:
        self.redis = Redis.from_url(self.url)
        self.queue = Queue(QUEUE, connection=self.redis)

    def close(self) -> None:
        self.redis.close()

    def enqueue(self, start: int, stop: int) -> None:
        self.queue.enqueue_many(
            [Queue.prepare_data(noop, (i,), result_ttl=0) for i in range(start, stop)]
        )

    def call(self, index: int, timeout: float) -> Sequence[int]:
        job = self.queue.enqueue(echo, index)
        result = job.latest_result(timeout=max(1, math.ceil(timeout)))
        if result is None:
            raise PeerError(f"no result for job {index} within {timeout:.0f} s")
        if result.type != Result.Type.SUCCESSFUL:
            raise PeerError(f"job {index} failed: {result.exc_string}")
        value = result.return_value
        if not isinstance(value, list):
            raise PeerError(f"job {index} returned {value!r}")
        return value


def run_worker(url: str, phase: Phase, index: int) -> None:
    """One SimpleWorker process (jobs run in the worker process, no fork)."""
    redis = Redis.from_url(url)
    worker = SimpleWorker([Queue(QUEUE, connection=redis)], connection=redis)
    worker.work(logging_level="WARNING")


def main(argv: Sequence[str] | None = None) -> None:
    peer_main(RQDriver, run_worker, argv)


if __name__ == "__main__":
    from benchmarks.peers import rq_peer

    rq_peer.main()
