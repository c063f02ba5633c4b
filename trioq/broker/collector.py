"""Garbage-collector settings for the broker process, which holds every unfinished job.

CPython's cyclic collector scans every tracked object in a full collection, and a queue
that keeps growing (a producer enqueuing) keeps crossing the threshold for one: in the
enqueue benchmark full collections of the jobs in memory took a quarter of the broker's
time. Jobs and the messages about them are freed by reference counting (they hold no
cycles), so the collector has little to find: collections are made rarer (a larger
young generation, far fewer full collections), and what a restart loads back is moved
out of the collector's sight (``gc.freeze``).

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


def freeze_loaded() -> int:
    """Once the broker serves: what recovery loaded is no longer scanned; returns how many objects."""
    gc.freeze()
    return gc.get_freeze_count()
