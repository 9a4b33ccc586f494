"""The two plot shapes the cases need (lines per panel, grouped bars), drawn headless with matplotlib's Agg.

matplotlib is imported on first use: a machine without it (e.g. a GPU box with no package index) still
runs every case and writes the JSON; `python -m bench.report DIR --replot` draws the PNGs later.
"""

from __future__ import annotations

import math
from pathlib import Path

Series = dict[str, list[tuple[float, float]]]  # label -> [(x, y)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_panels(panels: dict[str, Series], path: Path, *, title: str, xlabel: str, ylabel: str,
                hline: float | None = None, logx: bool = False) -> None:
    """One panel per key, one line per series; `hline` marks a goal (e.g. a ratio of 0.5)."""
    plt = _pyplot()
    cols = min(3, len(panels)) or 1
    rows = math.ceil(len(panels) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for ax, (name, series) in zip(axes.flat, panels.items()):
        for label, points in series.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label)
        if hline is not None:
            ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
        if logx:
            ax.set_xscale("log", base=2)
            ticks = sorted({x for points in series.values() for x, _ in points})
            ax.set_xticks(ticks, [f"{x / 1024:g}k" if x >= 1024 else f"{x:g}" for x in ticks])
            ax.minorticks_off()
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    _save(plt, fig, title, path)


def grouped_bars(groups: dict[str, dict[str, float]], path: Path, *, title: str, ylabel: str) -> None:
    """One cluster of bars per group (e.g. a configuration), one bar per variant within it."""
    plt = _pyplot()
    variants = list(dict.fromkeys(v for bars in groups.values() for v in bars))
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) + 2), 3.8))
    for i, variant in enumerate(variants):
        xs = [g + i * width for g, bars in enumerate(groups.values()) if variant in bars]
        drawn = ax.bar(xs, [bars[variant] for bars in groups.values() if variant in bars], width, label=variant)
        ax.bar_label(drawn, fmt="%.3g", fontsize=7)
    ax.set_xticks([g + width * (len(variants) - 1) / 2 for g in range(len(groups))], list(groups), fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    _save(plt, fig, title, path)


def _save(plt, fig, title: str, path: Path) -> None:
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
