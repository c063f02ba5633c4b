"""Where a workload's time goes: py-spy samples the broker and a worker while a benchmark runs.

    pip install -e '.[profile]'          # py-spy
    python -m benchmarks.profile [--workload throughput] [--jobs N] [--rate 250] [--top 20]

Each process is sampled from the moment it serves until it exits. Samples whose innermost
frame is a wait (the event loop's epoll, an idle thread) are counted apart: py-spy cannot
always tell a process blocked in a system call from one that runs, and the point here is
the work. For each process this prints the functions with the most samples of their own
(``self``), trioq's functions with what they call (``total``), and the share of each layer (trioq's parts,
Trio's core, TLS, sockets, the standard library), and writes them with the command to
benchmarks/results/profile-WORKLOAD.json.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from . import _report, trioq_bench

#: Innermost frames that mean "waiting", not working.
IDLE_LEAVES = (
    "EpollIOManager.get_events",  # Trio's event loop in epoll_wait
    "WorkerThread._work",  # a Trio thread-cache thread waiting for work
    "Condition.wait",
    "Popen._try_wait",
)
_ENTRY = ("trioq/cli.py", "trioq/__main__.py")  # under every sample: no information
_LINE = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_function(frame: str) -> tuple[str, str]:
    """("function", "file") of one py-spy frame such as ``run (trio/_core/_run.py:2866)``."""
    m = _LINE.match(frame)
    return (m["func"], m["file"]) if m else (frame, "")


def layer(file: str) -> str:
    """Which part of the system a source file belongs to, for the per-layer shares."""
    if file.startswith("trioq/"):
        parts = file.split("/")
        return "trioq." + (parts[1].removesuffix(".py") if len(parts) > 2 else parts[-1].removesuffix(".py"))
    if file.startswith("trio/_ssl") or file.endswith("/ssl.py") or file == "ssl.py":
        return "TLS (trio._ssl, ssl)"
    if file.startswith(("trio/_socket", "trio/_highlevel_socket")):
        return "sockets (trio)"
    if file.startswith("trio/"):
        return "trio core"
    if file.startswith(("outcome/", "attr/", "cattrs/")):
        return "outcome, attrs, cattrs"
    return "other (stdlib, threads)"


def summarize(folded: Iterable[str], top: int = 20) -> dict[str, Any]:
    """Aggregate py-spy ``raw`` (folded) stacks by function, dropping waits."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    layers: collections.Counter[str] = collections.Counter()
    samples = idle = 0
    for line in folded:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [frame_function(f) for f in stack.split(";")]
        leaf_func, leaf_file = frames[-1]
        if any(leaf_func.startswith(idle_leaf) for idle_leaf in IDLE_LEAVES):
            idle += n
            continue
        own[f"{leaf_func} ({leaf_file})"] += n
        layers[layer(leaf_file)] += n
        for name in {f"{func} ({file})" for func, file in frames if file.startswith("trioq/") and file not in _ENTRY}:
            total[name] += n
    busy = samples - idle

    def shares(counter: collections.Counter[str], k: int | None) -> list[dict[str, Any]]:
        return [{"name": name, "samples": n, "share": n / busy} for name, n in counter.most_common(k)] if busy else []

    return {
        "samples": samples,
        "idle_samples": idle,
        "busy_samples": busy,
        "self": shares(own, top),
        "total": shares(total, top),
        "layers": shares(layers, None),
    }


@contextmanager
def sampled(rate: int, out_dir: Path, names: tuple[str, ...]) -> Iterator[dict[str, Path]]:
    """Attach py-spy to each named process of the benchmark cluster once it serves.

    Yields where each process's stacks will be; each sampler ends when its process exits
    (the cluster stops them), and its own messages go to ``NAME.stderr`` beside the stacks.
    """
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise click.ClickException("py-spy is not installed: pip install -e '.[profile]'")
    outputs: dict[str, Path] = {}
    samplers: list[subprocess.Popen[bytes]] = []

    def attach(name: str, pid: int) -> None:
        if name not in names:
            return
        outputs[name] = out_dir / f"{name}.folded"
        with (out_dir / f"{name}.stderr").open("wb") as err:
            samplers.append(subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                 "--output", str(outputs[name])],
                stdout=subprocess.DEVNULL, stderr=err,
            ))

    trioq_bench.Cluster.on_ready = staticmethod(attach)  # type: ignore[assignment]
    try:
        yield outputs
    finally:
        trioq_bench.Cluster.on_ready = None
        for s in samplers:
            _stop(s)


def _stop(sampler: subprocess.Popen[bytes]) -> None:
    """Let a sampler finish writing; one that does not is interrupted, then killed."""
    try:
        sampler.wait(timeout=60)
        return
    except subprocess.TimeoutExpired:
        sampler.send_signal(signal.SIGINT)
    try:
        sampler.wait(timeout=30)
    except subprocess.TimeoutExpired:
        sampler.kill()
        sampler.wait()


def _why_no_samples(out_dir: Path, name: str) -> str:
    err = out_dir / f"{name}.stderr"
    said = err.read_text(errors="replace").strip()[-500:] if err.exists() else ""
    return f"no samples for {name}" + (f"; py-spy said: {said}" if said else ": was py-spy attached?") + (
        " (py-spy needs ptrace: root or CAP_SYS_PTRACE)"
    )


def print_summary(name: str, s: dict[str, Any]) -> None:
    print(f"\n== {name}: {s['busy_samples']} samples at work, {s['idle_samples']} waiting ==")
    for title, rows in (("by layer", s["layers"]), ("self", s["self"]), ("trioq's functions, with what they call", s["total"])):
        print(f"-- {title}")
        for r in rows:
            print(f"{r['share'] * 100:6.1f}%  {r['name']}")


@click.command()
@click.option("--workload", type=click.Choice(["throughput", "latency"]), default="throughput", show_default=True)
@click.option("--jobs", type=click.IntRange(1), default=None, help="[default: 100,000 for throughput, 2,000 for latency]")
@click.option("--rate", type=click.IntRange(1, 2000), default=250, show_default=True, help="Samples per second.")
@click.option("--top", type=click.IntRange(1), default=20, show_default=True)
@_report.json_option
def main(workload: str, jobs: int | None, rate: int, top: int, json_path: str | None) -> None:
    names = ("broker", "worker0")
    summaries = {}
    with tempfile.TemporaryDirectory(prefix="trioq-profile-") as d:
        with sampled(rate, Path(d), names) as outputs:
            if workload == "throughput":
                result = trioq_bench.throughput(jobs or 100_000, progress=True)
            else:
                result = trioq_bench.latency(jobs or 2_000)
        for name in names:  # every sampler has written its stacks by now
            path = outputs.get(name)
            if path is None or not path.exists():
                raise click.ClickException(_why_no_samples(Path(d), name))
            with path.open() as f:
                summaries[name] = summarize(f, top)
    for name, summary in summaries.items():
        print_summary(name, summary)
    print(f"\nwrote {_report.save(f'profile-{workload}', {'rate': rate, 'workload': result, 'profiles': summaries}, json_path)}")


if __name__ == "__main__":
    main()
