"""The demo tasks kept from the system trioq replaces, with their old payloads."""

from __future__ import annotations

import trio

from .registry import Registry


def reverse_string(data: str) -> str:
    return str(data)[::-1]


def to_uppercase(data: str) -> str:
    return str(data).upper()


def fibonacci(n: int) -> int:
    if not isinstance(n, int) or n < 0 or n > 10_000:
        raise ValueError("n must be an integer from 0 to 10000")
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def is_prime(n: int) -> bool:
    if not isinstance(n, int):
        raise ValueError("n must be an integer")
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


async def slow_task(seconds: float = 1.0, ctx=None) -> str:
    """Sleeps (cancellably), reporting progress every tenth of the way."""
    seconds = float(seconds)
    if not 0 <= seconds <= 3600:
        raise ValueError("seconds must be from 0 to 3600")
    steps = 10
    for i in range(steps):
        await trio.sleep(seconds / steps)
        if ctx is not None:
            ctx.progress((i + 1) / steps, f"slept {seconds * (i + 1) / steps:.1f}s")
    return f"slept {seconds:g}s"


async def noop(**_: object) -> None:
    """Does nothing: the benchmarks' unit of work."""
    return None


BUILTINS = {
    "reverse_string": reverse_string,
    "to_uppercase": to_uppercase,
    "fibonacci": fibonacci,
    "is_prime": is_prime,
    "slow_task": slow_task,
    "noop": noop,
}


#: Sync built-ins that return in at most a few milliseconds (fibonacci(10000) takes about 2 ms)
#: run on the worker's loop; is_prime has no bound on n, so it keeps its thread.
INLINE = frozenset({"reverse_string", "to_uppercase", "fibonacci"})


def register_builtins(registry: Registry) -> None:
    for name, fn in BUILTINS.items():
        if name not in registry:
            registry.register_task(name, fn, inline=name in INLINE)
