"""Task registration: a decorator and functions over one registry per process."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import attrs

from ..job import NAME_RE


class Fatal(Exception):
    """Raise from a task to fail its job for good: it is not retried."""


@attrs.frozen
class TaskInfo:
    name: str
    fn: Callable[..., Any]
    is_async: bool
    wants_ctx: bool
    signature: inspect.Signature
    max_attempts: int | None = None
    timeout: float | None = None
    #: a sync function called on the worker's event loop, not in a thread (see register_task)
    inline: bool = False


class Registry:
    def __init__(self) -> None:
        self._tasks: dict[str, TaskInfo] = {}

    def register_task(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        max_attempts: int | None = None,
        timeout: float | None = None,
        replace: bool = False,
        inline: bool = False,
    ) -> TaskInfo:
        """``inline=True`` calls a sync function on the worker's event loop instead of in a
        thread: for functions that return in microseconds, where the hand-off to a thread and
        back costs more than the call. Nothing can interrupt it (a timeout included), and the
        worker does nothing else while it runs."""
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"task name {name!r}: 1-200 letters, digits or _.:- (the broker refuses others)")
        if not callable(fn):
            raise TypeError(f"task {name!r}: {fn!r} is not callable")
        if inline and inspect.iscoroutinefunction(fn):
            raise ValueError(f"task {name!r}: inline is for sync functions (async tasks already run on the event loop)")
        if name in self._tasks and not replace:
            raise ValueError(f"task {name!r} is already registered")
        sig = inspect.signature(fn)
        info = TaskInfo(
            name=name,
            fn=fn,
            is_async=inspect.iscoroutinefunction(fn),
            wants_ctx="ctx" in sig.parameters,
            signature=sig,
            max_attempts=max_attempts,
            timeout=timeout,
            inline=inline,
        )
        self._tasks[name] = info
        return info

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        inline: bool = False,
    ) -> Any:
        """``@task`` or ``@task(name=..., max_attempts=..., timeout=..., inline=...)``."""

        def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
            self.register_task(
                name or f.__name__, f, max_attempts=max_attempts, timeout=timeout, replace=True, inline=inline,
            )
            return f

        return wrap(fn) if fn is not None else wrap

    def unregister_task(self, name: str) -> None:
        if self._tasks.pop(name, None) is None:
            raise KeyError(f"no task {name!r} is registered")

    def list_tasks(self) -> list[str]:
        return sorted(self._tasks)

    def get(self, name: str) -> TaskInfo | None:
        return self._tasks.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks


#: The process-wide registry that ``trioq worker --tasks MODULE`` serves.
default_registry = Registry()
task = default_registry.task
register_task = default_registry.register_task
unregister_task = default_registry.unregister_task
list_tasks = default_registry.list_tasks
