"""Printing tables and writing JSON results for the benchmark commands."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from trioq.store.sqlite import SYNC_MODES

RESULTS = Path(__file__).resolve().parent / "results"

#: The options every benchmark command shares.
sync_option = click.option(
    "--sync", type=click.Choice(SYNC_MODES), default="full", show_default=True,
    help="The store's synchronous mode (full: fsync before every ACK).",
)
json_option = click.option(
    "--json", "json_path", default=None, help="Where to write results [default: benchmarks/results/NAME.json].",
)


def machine() -> dict[str, Any]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    except OSError:
        model = "?"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent).stdout.strip()
    except OSError:
        commit = "?"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": _command(),
    }


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format)"""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key)
            line.append("-" if v is None else (format(v, fmt) if fmt and isinstance(v, (int, float)) else str(v)))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for n, line in enumerate(cells):
        out.append("  ".join(c.rjust(w) if n and i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def save(name: str, data: dict[str, Any], path: str | None = None) -> Path:
    out = Path(path) if path else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    return out


def _command() -> str:
    """How this run was started, as ``python -m benchmarks.NAME ARGS``."""
    if not sys.argv:
        return ""
    script = Path(sys.argv[0])
    module = f"benchmarks.{script.stem}" if script.suffix == ".py" else sys.argv[0]
    return " ".join(["python", "-m", module, *sys.argv[1:]])
