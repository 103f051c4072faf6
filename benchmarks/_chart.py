"""The nightly run's chart (``docs/images/nightly_run.png``): wall time and worker time per shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def draw(results: list[dict[str, Any]], labels: dict[str, str], path: Path, title: str) -> None:
    """Two bar groups, wall seconds and worker slot-seconds, one bar per (shape, N), values written on them."""
    import matplotlib

    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt

    order = list(labels)
    results = sorted(results, key=lambda r: (r["n"], order.index(r["shape"])))  # by N, then (a) to (d)
    names = [f"{labels[r['shape']]}\nN = {r['n']:,}" for r in results]
    colours = {"mapped": "#b0b0b0", "end_from_trigger": "#8da0cb", "batch": "#4c72b0", "asyncio": "#55a868"}
    fig, axes = plt.subplots(1, 2, figsize=(max(10.0, 1.75 * len(results)), 3.6), dpi=100)  # room per label
    for ax, key, heading in ((axes[0], "wall_s", "Wall time (s)"), (axes[1], "slot_s", "Worker slot-seconds")):
        values = [r[key] for r in results]
        bars = ax.bar(range(len(results)), values, color=[colours.get(r["shape"], "#999999") for r in results])
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8, padding=2)
        ax.set_title(heading, fontsize=10)
        ax.set_xticks(range(len(results)), names, fontsize=7)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_ylim(0, max(values + [1]) * 1.15)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
