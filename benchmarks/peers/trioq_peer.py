"""trioq through the hook in ``benchmarks.trioq_bench``, run like a peer (child process, timeout).

``benchmarks.trioq_bench.throughput(n_jobs, workers=2)`` and ``latency(n_jobs)``
start their own broker and workers and return dicts with the peers' keys
(``enqueue_rate``, ``drain_rate``, ``total_seconds``, ``completed``,
``durability``; ``p50_ms``, ``p90_ms``, ``p99_ms``, ``max_ms``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.peers import DEFAULT_WORKERS, Progress


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def run(jobs: int, latency_jobs: int, workers: int, run_dir: Path) -> dict[str, Any]:
    """Both workloads through the hook; partial results go to ``<run_dir>/result.json``."""
    bench = importlib.import_module("benchmarks.trioq_bench")
    progress = Progress(run_dir)
    result: dict[str, Any] = {"throughput": None, "latency": None, "errors": []}
    for name, call, n in (
        ("throughput", lambda n: bench.throughput(n, workers=workers), jobs),
        ("latency", lambda n: bench.latency(n), latency_jobs),
    ):
        if n <= 0:
            continue
        progress.update(f"{name}: running {n} jobs", force=True)
        try:
            result[name] = _clean(dict(call(n)))
        except Exception as exc:  # the hook failing is a result, not a crash
            result["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
        (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    progress.update("done", force=True)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers.trioq_peer")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run both workloads through benchmarks.trioq_bench")
    bench.add_argument("--jobs", type=int, default=20000)
    bench.add_argument("--latency-jobs", type=int, default=500)
    bench.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    bench.add_argument("--run-dir", type=Path, required=True)
    bench.add_argument(
        "--timeout", type=float, help="enforced by the harness (accepted for symmetry)"
    )
    args = parser.parse_args(argv)
    print(json.dumps(run(args.jobs, args.latency_jobs, args.workers, args.run_dir), indent=2))


if __name__ == "__main__":
    from benchmarks.peers import trioq_peer

    trioq_peer.main()
