"""Garbage-collector settings for the broker process, which holds every unfinished job.

CPython's cyclic collector scans every tracked object in a full collection, and a queue
that keeps growing (a producer enqueuing) keeps crossing the threshold for one: in the
enqueue benchmark full collections of the jobs in memory took a quarter of the broker's
time. Jobs and the messages about them are freed by reference counting (they hold no
cycles), so the collector has little to find and is made to look less often: a larger
young generation and far fewer full collections. (What a restart loads is frozen out
of the scans by ``Broker.start_core`` itself.)

Only ``trioq broker`` applies this; a program that embeds ``Broker`` keeps its own settings.
"""

from __future__ import annotations

import gc

#: (young, middle, old) thresholds; CPython's defaults are (700, 10, 10).
BROKER_THRESHOLDS = (50_000, 20, 100)


def tune_collector() -> tuple[int, int, int]:
    """Apply BROKER_THRESHOLDS; returns the settings they replace."""
    before = gc.get_threshold()
    gc.set_threshold(*BROKER_THRESHOLDS)
    return before  # type: ignore[return-value]
