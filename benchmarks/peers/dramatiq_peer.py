"""Dramatiq peer: the ``dramatiq`` CLI with a RedisBroker.

The broker is built by :func:`setup_broker` (``dramatiq benchmarks.peers.dramatiq_peer:setup_broker``)
from the URL in the ``PEER_URL`` environment variable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

from benchmarks.peers import QUEUE, URL_ENV, Driver, Phase, peer_main, record


def noop(index: int) -> None:
    """Throughput job (no result stored)."""
    record(index)


def echo(index: int) -> list[int]:
    """Latency job: answers its index and the worker's pid."""
    return [index, os.getpid()]


@cache
def setup_broker() -> tuple[RedisBroker, dramatiq.Actor, dramatiq.Actor]:  # type: ignore[type-arg]
    """Broker, results middleware and actors for the URL in ``PEER_URL``."""
    url = os.environ[URL_ENV]
    broker = RedisBroker(url=url)
    broker.add_middleware(Results(backend=RedisBackend(url=url)))
    dramatiq.set_broker(broker)
    noop_actor = dramatiq.actor(actor_name="noop", queue_name=QUEUE, max_retries=0)(noop)
    echo_actor = dramatiq.actor(actor_name="echo", queue_name=QUEUE, store_results=True)(echo)
    return broker, noop_actor, echo_actor


class DramatiqDriver(Driver):
    """Producer side for Dramatiq."""

    module = "benchmarks.peers.dramatiq_peer"

    def setup(self) -> None:
        os.environ[URL_ENV] = self.url
        self.broker, self.noop, self.echo = setup_broker()

    def close(self) -> None:
        self.broker.close()

    def enqueue(self, start: int, stop: int) -> None:
        for i in range(start, stop):
            self.noop.send(i)

    def call(self, index: int, timeout: float) -> Sequence[int]:
        message = self.echo.send(index)
        return message.get_result(block=True, timeout=int(timeout * 1000))  # type: ignore[no-any-return]


def run_worker(url: str, phase: Phase, index: int) -> None:
    """One ``dramatiq`` CLI with a single worker process (8 threads, the default)."""
    from dramatiq.cli import main as dramatiq_main
    from dramatiq.cli import make_argument_parser

    options = f"--processes 1 --threads 8 --queues {QUEUE}".split()
    args = make_argument_parser().parse_args([f"{DramatiqDriver.module}:setup_broker", *options])
    raise SystemExit(dramatiq_main(args))


def main(argv: Sequence[str] | None = None) -> None:
    peer_main(DramatiqDriver, run_worker, argv)


if __name__ == "__main__":
    from benchmarks.peers import dramatiq_peer

    dramatiq_peer.main()
