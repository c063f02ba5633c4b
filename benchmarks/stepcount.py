"""Counts Trio's scheduler work in a trioq process: ``python -m benchmarks.stepcount OUT ARGS...``
runs ``trioq ARGS...`` with an instrument that counts turns of the run loop, task steps (by task
name) and tasks spawned, and writes them to OUT as JSON when the process exits.

An idle job is made of wake-ups, not of work (``benchmarks.latency``'s CPU per job equals its
latency): these counts say how many each message costs. SIGUSR1 takes a snapshot, so a harness
can count only the jobs it measures (the difference of two snapshots).
"""

from __future__ import annotations

import atexit
import json
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import trio


class StepCounter(trio.abc.Instrument):
    def __init__(self, out: Path | None = None) -> None:
        self.out = out
        self.loop_turns = 0
        self.spawned = 0
        self.steps: Counter[str] = Counter()
        self.snapshots: list[dict[str, Any]] = []

    def after_io_wait(self, timeout: float) -> None:
        self.loop_turns += 1  # every turn of the run loop polls epoll, runnable tasks or not

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned += 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name.rsplit(".", 1)[-1]] += 1

    def snapshot(self) -> dict[str, Any]:
        return {"loop_turns": self.loop_turns, "spawned": self.spawned, "steps": dict(self.steps)}

    def take_snapshot(self, *_: object) -> None:
        self.snapshots.append(self.snapshot())
        if self.out is not None:  # at once: a process killed later keeps what it counted
            self.dump()

    def dump(self) -> None:
        assert self.out is not None
        self.out.write_text(json.dumps({"final": self.snapshot(), "snapshots": self.snapshots}))


def difference(after: dict[str, Any], before: dict[str, Any], per: int) -> dict[str, Any]:
    """Counts between two snapshots, per job."""
    steps = {k: (n - before["steps"].get(k, 0)) / per for k, n in after["steps"].items()}
    return {
        "loop_turns": (after["loop_turns"] - before["loop_turns"]) / per,
        "spawned": (after["spawned"] - before["spawned"]) / per,
        "task_steps": sum(steps.values()),
        "steps_by_task": {k: round(v, 2) for k, v in sorted(steps.items(), key=lambda kv: -kv[1]) if v >= 0.05},
    }


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    counter = StepCounter(out)
    signal.signal(signal.SIGUSR1, counter.take_snapshot)  # runs between bytecodes, on the main thread
    atexit.register(counter.dump)
    run = trio.run

    def instrumented_run(*a: Any, **kw: Any) -> Any:
        kw["instruments"] = [*kw.get("instruments", ()), counter]
        return run(*a, **kw)

    trio.run = instrumented_run  # the CLI calls trio.run once, for the whole process
    from trioq.cli import main as trioq_main

    sys.argv = ["trioq", *args]
    trioq_main()


if __name__ == "__main__":
    main()
