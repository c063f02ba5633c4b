"""Hand the heap's free pages back to the OS after heavy churn.

CPython frees small objects into glibc's heap, which gives memory back to the OS only
from its top. A million submits leave the short-lived frame, spec and row objects' pages
free but scattered among the long-lived queued jobs, and RSS keeps counting them:
measured with 1,000,000 queued jobs, 535 MiB before ``malloc_trim(0)`` and 444 MiB after.
``malloc_trim`` releases free pages anywhere in the heap; it is cheap (well under a
millisecond on a small heap, 17 ms on that one) and runs in a thread, since ctypes drops
the GIL for the call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger("trioq.broker")


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


malloc_trim = _load_malloc_trim()


async def trim_after_churn(
    churn: Callable[[], int],
    *,
    every: float,
    threshold: int,
    trim: Callable[[int], int] | None = None,
    offload: Callable[..., Awaitable[Any]] = trio.to_thread.run_sync,
) -> None:
    """Every ``every`` seconds, trim once ``threshold`` rows were written since the last trim,
    or when writing has just gone quiet after any, so the end of a burst is trimmed too.
    ``churn()`` counts rows written since the start, from 0."""
    trim = trim or malloc_trim
    if trim is None or every <= 0 or threshold <= 0:
        return
    trimmed_at = seen = 0
    while True:
        await trio.sleep(every)
        now = churn()
        quiet = now == seen
        seen = now
        if now - trimmed_at >= threshold or (quiet and now > trimmed_at):
            trimmed_at = now
            try:
                await offload(trim, 0)
            except Exception as exc:  # an optimisation: never worth the broker
                log.warning("heap trimming failed and is off from now on: %r", exc)
                return
