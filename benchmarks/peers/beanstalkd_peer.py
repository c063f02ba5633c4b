"""beanstalkd peer: a hand-written greenstalk worker loop (reserve, run, delete).

Job bodies are ``"<index>"`` for throughput jobs and ``"<index> <reply tube>"``
for latency jobs, whose worker answers ``"<index> <pid>"`` into the reply tube.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from urllib.parse import urlsplit

import greenstalk

from benchmarks.peers import QUEUE, Driver, PeerError, Phase, peer_main, record


def address(url: str) -> tuple[str, int]:
    """``beanstalk://host:port`` -> ``(host, port)``."""
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"bad beanstalkd URL {url!r}")
    return parts.hostname, parts.port


class BeanstalkdDriver(Driver):
    """Producer side for beanstalkd."""

    module = "benchmarks.peers.beanstalkd_peer"

    def setup(self) -> None:
        self.reply_tube = f"reply-{os.getpid()}"
        self.client = greenstalk.Client(address(self.url), use=QUEUE, watch=self.reply_tube)
        self.replies: list[greenstalk.Job[str]] = []

    def close(self) -> None:
        self.client.close()

    def enqueue(self, start: int, stop: int) -> None:
        put = self.client.put
        for i in range(start, stop):
            put(str(i))

    def call(self, index: int, timeout: float) -> Sequence[int]:
        self.client.put(f"{index} {self.reply_tube}")
        try:
            job = self.client.reserve(timeout=max(1, math.ceil(timeout)))
        except greenstalk.TimedOutError:
            raise PeerError(f"no reply for job {index} within {timeout:.0f} s") from None
        self.replies.append(job)
        return [int(part) for part in str(job.body).split()]

    def settle(self) -> None:
        """Delete the replies read so far (outside the timed section)."""
        while self.replies:
            self.client.delete(self.replies.pop())


def run_worker(url: str, phase: Phase, index: int) -> None:
    """Reserve jobs from the ``bench`` tube forever, deleting each after it ran."""
    pid = str(os.getpid())
    with greenstalk.Client(address(url), use=QUEUE, watch=QUEUE) as client:
        using = QUEUE
        while True:
            job = client.reserve()
            number, _, reply = str(job.body).partition(" ")
            if reply:
                if reply != using:
                    client.use(reply)
                    using = reply
                client.put(f"{number} {pid}")
            else:
                record(int(number))
            client.delete(job)


def main(argv: Sequence[str] | None = None) -> None:
    peer_main(BeanstalkdDriver, run_worker, argv)


if __name__ == "__main__":
    from benchmarks.peers import beanstalkd_peer

    beanstalkd_peer.main()
