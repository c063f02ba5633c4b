"""Draw the peer comparison as a PNG from the JSON that ``python -m benchmarks.peers`` wrote.

    python -m benchmarks.chart [--json benchmarks/results/peers.json] [--out benchmarks/results/peers.png]

Needs matplotlib (in the ``peers`` extra).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import click

RESULTS = Path(__file__).resolve().parent / "results"


def _rows(data: dict[str, Any]) -> list[tuple[str, float, float | None]]:
    rows = []
    for r in data["results"]:
        t, lat = r.get("throughput") or {}, r.get("latency") or {}
        if r.get("status") == "ok" and t.get("drain_rate"):
            rows.append((r["name"], float(t["drain_rate"]), lat.get("p50_ms")))
    return sorted(rows, key=lambda x: -x[1])


@click.command()
@click.option("--json", "json_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=RESULTS / "peers.json", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS / "peers.png", show_default=True)
def main(json_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        data = json.loads(json_path.read_text())
        rows = _rows(data)
        settings = data["settings"]
        title = f"Drain of {settings['jobs']:,} queued no-op jobs, {settings['workers']} worker processes"
        lat_title = f"Submit-to-result latency p50, {settings['latency_jobs']:,} jobs one at a time"
    except (ValueError, KeyError, TypeError) as exc:
        raise click.ClickException(
            f"{json_path} is not a result of python -m benchmarks.peers ({type(exc).__name__}: {exc})"
        ) from None
    if not rows:
        raise click.ClickException(f"{json_path} has no successful results to draw")
    names = [r[0] for r in rows]
    colors = ["#2b6cb0" if n == "trioq" else "#a0aec0" for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    bars = ax1.barh(names, [r[1] for r in rows], color=colors)
    ax1.invert_yaxis()
    ax1.set_xlabel("jobs/s (higher is better)")
    ax1.set_title(title)
    ax1.bar_label(bars, labels=[f"{r[1]:,.0f}" for r in rows], padding=3, fontsize=9)
    ax1.set_xlim(0, max(r[1] for r in rows) * 1.2)
    lat = [(n, p) for n, _, p in rows if p is not None]
    bars = ax2.barh([n for n, _ in lat], [p for _, p in lat], color=["#2b6cb0" if n == "trioq" else "#a0aec0" for n, _ in lat])
    ax2.invert_yaxis()
    ax2.set_xlabel("ms (lower is better)")
    ax2.set_title(lat_title)
    ax2.bar_label(bars, labels=[f"{p:.2f}" for _, p in lat], padding=3, fontsize=9)
    ax2.set_xlim(0, max(p for _, p in lat) * 1.25)
    host = data.get("host", {})
    fig.suptitle(
        f"trioq vs peers, {data.get('generated_at', '')[:16]} on {host.get('cpus', '?')} cores, Python "
        f"{host.get('python', platform.python_version())}; durable settings as each system documents "
        f"(python -m benchmarks.peers)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
