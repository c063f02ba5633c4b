"""Celery peer: solo-pool workers, Redis broker and Redis result backend."""

from __future__ import annotations

import os
from collections.abc import Sequence

from celery import Celery

from benchmarks.peers import QUEUE, Driver, Phase, peer_main, record

app = Celery("trioq_peers")
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.noop", ignore_result=True)
def noop(index: int) -> None:
    """Throughput job (no result stored)."""
    record(index)


@app.task(name="bench.echo")
def echo(index: int) -> list[int]:
    """Latency job: answers its index and the worker's pid."""
    return [index, os.getpid()]


def configure(url: str) -> None:
    """Point the app at the benchmark's Redis (broker and result backend)."""
    app.conf.update(broker_url=url, result_backend=url)


class CeleryDriver(Driver):
    """Producer side for Celery."""

    module = "benchmarks.peers.celery_peer"

    def setup(self) -> None:
        configure(self.url)
        self.producer_ctx = app.producer_or_acquire()
        self.producer = self.producer_ctx.__enter__()

    def close(self) -> None:
        self.producer_ctx.__exit__(None, None, None)
        app.close()

    def enqueue(self, start: int, stop: int) -> None:
        for i in range(start, stop):
            noop.apply_async((i,), producer=self.producer)

    def call(self, index: int, timeout: float) -> Sequence[int]:
        return echo.apply_async((index,)).get(timeout=timeout)  # type: ignore[no-any-return]


def run_worker(url: str, phase: Phase, index: int) -> None:
    """One ``celery worker --pool=solo`` process."""
    configure(url)
    app.worker_main(
        [
            "worker",
            "--pool=solo",
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--hostname=bench{index}-{os.getpid()}@localhost",
            f"--queues={QUEUE}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    peer_main(CeleryDriver, run_worker, argv)


if __name__ == "__main__":
    from benchmarks.peers import celery_peer

    celery_peer.main()
